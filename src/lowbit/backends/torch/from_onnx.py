"""Run an ONNX graph as a trainable ``torch.nn.Module`` (for fine-tuning).

lowbit fine-tunes ONNX models by interpreting their graph with torch ops:
the float weights become ``nn.Parameter``s, training updates them, and the
new values are written back into the *same* ONNX graph, which therefore
never changes shape or structure. Only the operators below are supported;
anything else raises ``UnsupportedOpError`` and the caller falls back to
post-training compression with a message. (onnx2torch, the usual converter,
requires torchvision, which cannot be installed beside the pinned CPU torch.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.backends.onnx.graph import GraphIndex
from lowbit.backends.onnx.graph import attrs as node_attrs
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weight_initializers
from lowbit.errors import UnsupportedOpError

SUPPORTED = frozenset({
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid",
    "Tanh", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
    "Transpose", "Concat", "Softmax", "BatchNormalization", "Identity", "Dropout", "Squeeze",
    "Unsqueeze",
})


def check_trainable(fm: FloatModel) -> None:
    """Raise ``UnsupportedOpError`` naming the operators the bridge cannot run."""
    unsupported = sorted({n.op_type for n in fm.proto.graph.node if n.op_type not in SUPPORTED
                          or n.domain not in ("", "ai.onnx")})
    if unsupported:
        raise UnsupportedOpError(
            f"cannot fine-tune this graph: operator(s) {', '.join(unsupported)} are not supported "
            "by lowbit's ONNX-to-PyTorch bridge")


def build_torch_module(fm: FloatModel, *, weight_override: dict[str, Callable[[], Any]] | None = None
                       ) -> Any:
    """A ``torch.nn.Module`` that runs ``fm``'s graph. The constant weights and biases of
    Conv/Gemm/MatMul layers are parameters (unless ``weight_override`` computes them);
    ``parameter_values()`` gives them back by initializer name."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    check_trainable(fm)
    overrides = weight_override or {}
    index = GraphIndex(fm.proto, fm.weights)
    trainable = set(weight_initializers(fm, biases=True))
    program = [(n.op_type, node_attrs(n), list(n.input), list(n.output)) for n in fm.proto.graph.node]

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

        def value(self, name: str) -> Any:
            if name in self.overrides:
                return self.overrides[name]()
            if name in self.keys:
                return getattr(self, self.keys[name])
            return self.constants[name]

        def forward(self, *inputs: Any) -> list[Any]:
            env: dict[str, Any] = {"": None}
            for spec, x in zip(index.graph_inputs, inputs):
                env[spec] = x
            for op, a, ins, outs in program:
                args = [env[x] if x in env else (self.value(x) if x else None) for x in ins]
                for name, value in zip(outs, _run(op, a, args, F, torch)):
                    env[name] = value
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


def _run(op: str, a: dict[str, Any], x: list[Any], F: Any, torch: Any) -> list[Any]:  # noqa: N803, C901
    if op == "Conv":
        spatial = x[0].dim() - 2
        pads, symmetric = _pads(a, spatial)
        inp = x[0] if symmetric else _padded(x[0], pads, spatial, F)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
        return [conv(inp, x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", 1),
                     padding=pads[:spatial] if symmetric else 0,
                     dilation=a.get("dilations", 1), groups=a.get("group", 1))]
    if op == "Gemm":
        A = x[0].t() if a.get("transA", 0) else x[0]  # noqa: N806
        B = x[1].t() if a.get("transB", 0) else x[1]  # noqa: N806
        y = a.get("alpha", 1.0) * (A @ B)
        if len(x) > 2 and x[2] is not None:
            y = y + a.get("beta", 1.0) * x[2]
        return [y]
    simple = {"MatMul": lambda: x[0] @ x[1], "Add": lambda: x[0] + x[1],
              "Sub": lambda: x[0] - x[1], "Mul": lambda: x[0] * x[1],
              "Div": lambda: x[0] / x[1], "Relu": lambda: F.relu(x[0]),
              "Sigmoid": lambda: torch.sigmoid(x[0]), "Tanh": lambda: torch.tanh(x[0]),
              "Identity": lambda: x[0], "Dropout": lambda: x[0],
              "LeakyRelu": lambda: F.leaky_relu(x[0], a.get("alpha", 0.01)),
              "GlobalAveragePool": lambda: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True),
              "Softmax": lambda: F.softmax(x[0], dim=a.get("axis", -1))}
    if op in simple:
        return [simple[op]()]
    if op == "Clip":
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
        return [torch.clamp(x[0], min=None if lo is None else float(lo),
                            max=None if hi is None else float(hi))]
    if op in ("MaxPool", "AveragePool"):
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
    if op == "Flatten":
        axis = a.get("axis", 1)
        return [x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)]
    if op == "Reshape":
        shape = [int(s) for s in x[1].tolist()]
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x[0].reshape(shape)]
    if op == "Transpose":
        return [x[0].permute(*a.get("perm", list(reversed(range(x[0].dim())))))]
    if op == "Concat":
        return [torch.cat([t for t in x if t is not None], dim=a["axis"])]
    if op == "BatchNormalization":
        return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = x[1].tolist() if len(x) > 1 and x[1] is not None else a.get("axes")
        y = x[0]
        if op == "Squeeze":
            return [y.squeeze() if axes is None else y.squeeze(tuple(axes))]
        for ax in sorted(int(v) for v in axes):
            y = y.unsqueeze(ax)
        return [y]
    raise UnsupportedOpError(f"operator {op} is not supported by the fine-tuning bridge")
