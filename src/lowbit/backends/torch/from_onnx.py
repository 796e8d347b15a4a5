"""Run an ONNX graph as a trainable ``torch.nn.Module`` (for fine-tuning).

lowbit fine-tunes ONNX models by interpreting their graph with torch ops:
the float weights become ``nn.Parameter``s, training updates them, and the
new values are written back into the *same* ONNX graph, which therefore
never changes shape or structure. The CNN operators are here, the rest (element-wise,
LayerNormalization, Softmax, shape arithmetic, Gather/Slice/Where/Expand, ...) in
``onnx_ops``, so CNNs and transformer graphs (token ids and attention masks in, any
batch and sequence length) both train. Any other operator raises
``UnsupportedOpError`` and the caller falls back to post-training compression with a
message. (onnx2torch, the usual converter, requires torchvision, which cannot be
installed beside the pinned CPU torch.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.backends.onnx.graph import GraphIndex, attr
from lowbit.backends.onnx.graph import attrs as node_attrs
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import FLOAT, weight_initializers, weighted_nodes
from lowbit.backends.torch.onnx_ops import OPS, Ctx, norm_axis, optional_input, run
from lowbit.errors import UnsupportedOpError


def check_trainable(fm: FloatModel) -> None:
    """Raise ``UnsupportedOpError`` naming the operators the bridge cannot run."""
    unsupported = sorted({n.op_type for n in fm.proto.graph.node if n.op_type not in SUPPORTED
                          or n.domain not in ("", "ai.onnx")})
    if unsupported:
        raise UnsupportedOpError(
            f"cannot fine-tune this graph: operator(s) {', '.join(unsupported)} are not supported "
            "by lowbit's ONNX-to-PyTorch bridge")


def trainable_initializers(fm: FloatModel) -> list[str]:
    """The float32 initializers fine-tuning trains: the weights and biases of the weighted
    layers (``weight_initializers(fm, biases=True)``), and, which that leaves out, the
    bias a constant ``Add`` puts on a weighted MatMul's output (how a Linear layer on
    3-D activations is exported), embedding tables (the data of a ``Gather`` on axis 0)
    and LayerNormalization's scale and bias. Other float constants (a GELU's 0.5, an
    attention scale, a mask's fill value) stay constants."""
    index = GraphIndex(fm.proto, fm.weights)
    names = list(weight_initializers(fm, biases=True))
    matmul_width = {w.node.output[0]: int(index.initializers[w.weight].dims[-1])
                    for w in weighted_nodes(fm)[0] if w.op_type == "MatMul"}

    def add(name: str, size: int | None = None) -> None:
        t = index.initializers.get(name)
        if t is None or t.data_type != FLOAT or name in names:
            return
        if size is None or list(t.dims) == [size]:
            names.append(name)

    for node in fm.proto.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        ins = list(node.input)
        if node.op_type == "Gather" and ins[0] in index.initializers:
            if norm_axis(attr(node, "axis", 0), len(index.initializers[ins[0]].dims)) == 0:
                add(ins[0])
        elif node.op_type == "LayerNormalization":
            for name in ins[1:3]:
                add(name)
        elif node.op_type == "Add":
            for out, bias in ((ins[0], ins[1]), (ins[1], ins[0])):
                if out in matmul_width:
                    add(bias, matmul_width[out])
    return names


def build_torch_module(fm: FloatModel, *, weight_override: dict[str, Callable[[], Any]] | None = None,
                       tensor_hooks: dict[str, Any] | None = None) -> Any:
    """A ``torch.nn.Module`` that runs ``fm``'s graph. The initializers
    ``trainable_initializers`` names are parameters (unless ``weight_override`` computes
    them); ``parameter_values()`` gives them back by initializer name. ``tensor_hooks``:
    torch modules applied to graph tensors (graph inputs, node outputs) by name as they
    are computed, e.g. activation fake quantization; they are submodules, so their
    parameters train and ``train()``/``eval()`` reach them. ``forward`` takes the graph
    inputs in order (or by name) and returns the graph outputs as a list."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    check_trainable(fm)
    overrides = weight_override or {}
    hooks = dict(tensor_hooks or {})
    index = GraphIndex(fm.proto, fm.weights)
    trainable = set(trainable_initializers(fm))
    opset = next((int(o.version) for o in fm.proto.opset_import if o.domain in ("", "ai.onnx")),
                 17)
    program = [(n.op_type, node_attrs(n), list(n.input), list(n.output))
               for n in fm.proto.graph.node]

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keys: dict[str, str] = {}
            self.constants: dict[str, Any] = {}
            for i, name in enumerate(index.initializers):
                value = index.constant(name)
                if value is None:
                    continue
                t = torch.from_numpy(np.array(value, copy=True))
                if name in trainable and t.dtype == torch.float32 and name not in overrides:
                    key = f"p{i}"
                    self.register_parameter(key, torch.nn.Parameter(t))
                    self.keys[name] = key
                else:
                    self.constants[name] = t
            self.overrides = overrides
            self.hooks = torch.nn.ModuleList(list(hooks.values()))
            self.hook_index = {name: i for i, name in enumerate(hooks)}

        def value(self, name: str) -> Any:
            if name in self.overrides:
                return self.overrides[name]()
            if name in self.keys:
                return getattr(self, self.keys[name])
            return self.constants[name]

        def hooked(self, name: str, value: Any) -> Any:
            i = self.hook_index.get(name)
            return value if i is None else self.hooks[i](value)

        def forward(self, *inputs: Any, **named: Any) -> list[Any]:
            given = {**dict(zip(index.graph_inputs, inputs)), **named}
            env: dict[str, Any] = {"": None, **{k: self.hooked(k, v) for k, v in given.items()}}
            for op, a, ins, outs in program:
                args = [env[x] if x in env else (self.value(x) if x else None) for x in ins]
                results = run(op, a, args, F, torch, opset=opset, n_out=len(outs))
                for name, value in zip(outs, results):
                    env[name] = self.hooked(name, value)
            return [env[o] for o in index.graph_outputs]

        def parameter_values(self) -> dict[str, np.ndarray]:
            return {name: getattr(self, key).detach().cpu().numpy().copy()
                    for name, key in self.keys.items()}

    return Module()


def _pads(a: dict[str, Any], spatial: int) -> tuple[list[int], bool]:
    pads = list(a.get("pads", [0] * (2 * spatial)))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedOpError("auto_pad SAME_* is not supported by the fine-tuning bridge")
    return pads, pads[:spatial] == pads[spatial:]


def _padded(x: Any, pads: list[int], spatial: int, F: Any, value: float = 0.0) -> Any:  # noqa: N803
    torch_pads: list[int] = []
    for d in reversed(range(spatial)):
        torch_pads += [pads[d], pads[d + spatial]]
    return F.pad(x, torch_pads, value=value)


# ---------------------------------------------------------------- CNN operators


def _conv(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    spatial = x[0].dim() - 2
    pads, symmetric = _pads(a, spatial)
    inp = x[0] if symmetric else _padded(x[0], pads, spatial, c.F)
    conv = {1: c.F.conv1d, 2: c.F.conv2d, 3: c.F.conv3d}[spatial]
    return [conv(inp, x[1], optional_input(x, 2), stride=a.get("strides", 1),
                 padding=pads[:spatial] if symmetric else 0,
                 dilation=a.get("dilations", 1), groups=a.get("group", 1))]


def _gemm(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    A = x[0].t() if a.get("transA", 0) else x[0]  # noqa: N806
    B = x[1].t() if a.get("transB", 0) else x[1]  # noqa: N806
    y = a.get("alpha", 1.0) * (A @ B)
    if optional_input(x, 2) is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return [y]


def _pool(a: dict[str, Any], x: list[Any], c: Ctx, op: str) -> list[Any]:
    F = c.F  # noqa: N806
    spatial = x[0].dim() - 2
    pads, symmetric = _pads(a, spatial)
    kernel, strides = a["kernel_shape"], a.get("strides", [1] * spatial)
    if op == "MaxPool":
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        inp = x[0] if symmetric else _padded(x[0], pads, spatial, F, float("-inf"))
        return [pool(inp, kernel, strides, pads[:spatial] if symmetric else 0,
                     a.get("dilations", 1), ceil_mode=bool(a.get("ceil_mode", 0)))]
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    if not symmetric:
        raise UnsupportedOpError("asymmetric AveragePool padding is not supported")
    return [pool(x[0], kernel, strides, pads[:spatial], ceil_mode=bool(a.get("ceil_mode", 0)),
                 count_include_pad=bool(a.get("count_include_pad", 0)))]


def _clip(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    lo, hi = optional_input(x, 1), optional_input(x, 2)  # inputs from opset 11, attributes before
    lo = lo.item() if lo is not None else a.get("min")
    hi = hi.item() if hi is not None else a.get("max")
    return [c.torch.clamp(x[0], min=lo, max=hi)]


def _flatten(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    axis = norm_axis(a.get("axis", 1), x[0].dim())
    return [x[0].reshape(math.prod(x[0].shape[:axis]), math.prod(x[0].shape[axis:]))]


OPS.update({
    "Conv": _conv, "Gemm": _gemm, "Clip": _clip, "Flatten": _flatten,
    "MaxPool": lambda a, x, c: _pool(a, x, c, "MaxPool"),
    "AveragePool": lambda a, x, c: _pool(a, x, c, "AveragePool"),
    "GlobalAveragePool": lambda a, x, c: [x[0].mean(dim=tuple(range(2, x[0].dim())),
                                                    keepdim=True)],
    "GlobalMaxPool": lambda a, x, c: [c.torch.amax(x[0], dim=tuple(range(2, x[0].dim())),
                                                   keepdim=True)],
    "BatchNormalization": lambda a, x, c: [c.F.batch_norm(
        x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5))],
})
# every operator the bridge runs: onnx_ops' and the CNN operators above
SUPPORTED = frozenset(OPS)
