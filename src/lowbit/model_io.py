"""Read any model lowbit accepts: an ONNX file, a ``.lbz`` file, an ``onnx.ModelProto``,
a ``torch.nn.Module`` (exported with a sample of the data), a ``keras.Model``, a Keras
file (``.keras``, ``.h5``) or a TensorFlow SavedModel folder (converted to ONNX by
``backends.keras``), normalised once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.backends.keras import is_keras_model, is_keras_path
from lowbit.backends.onnx.load import check_opset, load_model, normalise, read_model
from lowbit.backends.onnx.store import FloatModel
from lowbit.errors import DataError, ModelLoadError, ValidationError
from lowbit.fileio import has_magic


def is_lbz(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a file that starts with the .lbz magic (content, not name)."""
    from lowbit.container.format import MAGIC

    return has_magic(path, MAGIC)


def decode_lbz(data: bytes, source: str) -> onnx.ModelProto:
    """Decode .lbz bytes and run the ONNX checker on the result."""
    from lowbit.container import decode

    model = decode(data, source=source)
    check_opset(model, source)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{source}: the decoded model fails the ONNX checker: {exc}") from None
    return model


def read_any(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file or a lowbit .lbz file (told apart by content; a file named .lbz
    that is not ONNX either gets the .lbz decoder's reason)."""
    from lowbit.container import read_lbz_file

    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ValidationError(f"model: expected a file path, got {type(path).__name__}")

    if is_lbz(path):
        return decode_lbz(read_lbz_file(path), str(path))
    try:
        return read_model(path)
    except ModelLoadError:
        if Path(path).suffix.lower() != ".lbz" or not Path(path).is_file():
            raise
        return decode_lbz(read_lbz_file(path), str(path))


EXTERNAL_SCAN_MAX_BYTES = 100 * 2**20  # a model file with external weights is small


def external_data_files(path: Any) -> list[Path]:
    """The external weight files an ONNX file points at (they are inputs too: an output
    must never replace them). Empty for anything unreadable; reading errors come later."""
    p = Path(path) if isinstance(path, (str, os.PathLike)) else None
    if p is None or not p.is_file() or p.stat().st_size > EXTERNAL_SCAN_MAX_BYTES \
            or not _mentions(p, b"location"):
        return []
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # not ONNX (an .lbz, a bad file): nothing external to protect
        return []
    files = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in t.external_data}.get("location")
            if where:
                files.add(p.parent / where)
    return sorted(files)


def _mentions(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the file's bytes contain ``needle`` (read in chunks: a model with its
    weights inside is not parsed a second time just to learn it has no external data)."""
    tail = b""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch (hundreds of MB) just to check
    return torch is not None and isinstance(obj, torch.nn.Module)


def first_batch(data: Any) -> Any:
    """A small sample of ``data`` (any accepted form) to export a torch module with."""
    if isinstance(data, tuple) and len(data) == 2:
        return data[0]
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k not in ("y", "labels", "label")}
    if isinstance(data, (str, os.PathLike)):
        from lowbit.npz import load_npz

        arrays = load_npz(data, limit=2)  # export needs one small batch only
        return arrays.get("x", next(iter(arrays.values())))
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        return data
    for batch in data:
        return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
    raise DataError("data is empty")


def resolve_model(model: Any, data: Any, *, fold_bn: bool = True
                  ) -> tuple[FloatModel, str, int | None]:
    """(normalised float ONNX model, display name, size on disk if a file)."""
    if is_torch_module(model):
        from lowbit.backends.torch.export import export_module

        if data is None:
            raise ValidationError("a torch module needs data (a sample input) to be exported")
        sample = first_batch(data)
        if isinstance(sample, dict):
            names = list(sample)
            proto = export_module(model, tuple(np.asarray(sample[k])[:2] for k in names),
                                  input_names=names)
        else:
            arr = sample.detach().cpu().numpy() if hasattr(sample, "detach") else np.asarray(sample)
            proto = export_module(model, arr[:2])
        normalised, _ = load_model(proto, fold_bn=fold_bn)
        return normalised, type(model).__name__, len(proto.SerializeToString())
    if is_keras_model(model):
        from lowbit.backends.keras import keras_to_onnx

        proto = keras_to_onnx(model, name=str(model.name))
        normalised, _ = load_model(proto, fold_bn=fold_bn)
        return normalised, str(model.name), len(proto.SerializeToString())
    if isinstance(model, onnx.ModelProto):
        normalised, name = load_model(model, fold_bn=fold_bn)
        return normalised, name, len(model.SerializeToString())
    if is_keras_path(model):  # size: the converted float ONNX model's, what lowbit compares
        from lowbit.backends.keras import load_keras

        proto = load_keras(model)
        size = len(proto.SerializeToString())
        return normalise(proto, name=str(model), fold_bn=fold_bn), str(model), size
    if isinstance(model, (str, os.PathLike)):
        normalised = normalise(read_any(model), name=str(model), fold_bn=fold_bn)
        return normalised, str(model), Path(model).stat().st_size
    raise ValidationError(
        f"model must be an ONNX file path, an onnx.ModelProto, a torch.nn.Module, a "
        f"keras.Model or a Keras file / SavedModel folder, not {type(model).__name__}")
