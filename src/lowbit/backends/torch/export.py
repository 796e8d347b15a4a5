"""Export a ``torch.nn.Module`` to an ONNX ModelProto inside lowbit.

Uses the TorchScript-based exporter (``dynamo=False``): it is fast, needs no
extra packages, and handles the plain feed-forward models lowbit targets.
The batch dimension is exported as dynamic.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.errors import ModelLoadError

EXPORT_OPSET = 17


def export_module(module: Any, sample: Any, *, input_names: list[str] | None = None,
                  opset: int = EXPORT_OPSET, dynamic_dims: tuple[int, ...] = (0,)
                  ) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) with ``sample`` input(s).

    ``dynamic_dims``: axes of every input and output exported as dynamic (default the
    batch axis; ``(0, 1)`` for token models with a dynamic sequence length).
    """
    import torch

    samples = sample if isinstance(sample, tuple) else (sample,)
    tensors = tuple(torch.as_tensor(np.asarray(s)) if not isinstance(s, torch.Tensor) else s
                    for s in samples)
    names = input_names or (["input"] if len(tensors) == 1 else
                            [f"input_{i}" for i in range(len(tensors))])
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*tensors)
        n_out = len(out) if isinstance(out, (tuple, list)) else 1
        out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        labels = {0: "batch", 1: "sequence"}
        axes = {n: {d: labels.get(d, f"dim{d}") for d in dynamic_dims} for n in names + out_names}
        with tempfile.TemporaryDirectory(prefix="lowbit-export-") as tmp:
            path = Path(tmp) / "model.onnx"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, tensors, str(path), dynamo=False, opset_version=opset,
                                  input_names=names, output_names=out_names,
                                  dynamic_axes=axes, do_constant_folding=True)
            model = onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(
            f"could not export the PyTorch module to ONNX: {str(exc).strip().splitlines()[0][:300]}"
        ) from None
    finally:
        module.train(was_training)
    return model
