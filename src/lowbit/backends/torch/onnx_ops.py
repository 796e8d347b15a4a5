"""ONNX operators in torch, with ONNX semantics, for the fine-tuning bridge (``from_onnx``).

Each operator is a function ``(attributes, inputs, ctx) -> outputs``; an optional input
that is absent arrives as ``None``. Float tensors keep their autograd history, so
gradients flow through every differentiable operator; integer and bool tensors (shape
arithmetic, token ids, masks) flow through with ONNX's integer semantics (``Div``
truncates, ``Mod`` follows ``fmod``, ``Shape`` gives int64) and follow the actual
input, so a graph exported with dynamic axes runs at any batch or sequence length.
``from_onnx`` adds the CNN operators (Conv, Gemm, pools, BatchNormalization) to ``OPS``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.errors import UnsupportedOpError


@dataclass(frozen=True)
class Ctx:
    """What an operator may need beyond its attributes and inputs."""

    F: Any  # torch.nn.functional  # noqa: N815
    torch: Any
    opset: int = 17  # the model's default-domain opset
    n_out: int = 1  # how many outputs the node declares


Impl = Callable[[dict[str, Any], list[Any], Ctx], list[Any]]
OPS: dict[str, Impl] = {}


def run(op: str, a: dict[str, Any], x: list[Any], F: Any, torch: Any, *,  # noqa: N803
        opset: int = 17, n_out: int = 1) -> list[Any]:
    """Run one ONNX operator ``op`` on torch tensors ``x``; its outputs as a list."""
    impl = OPS.get(op)
    if impl is None:
        raise UnsupportedOpError(f"operator {op} is not supported by the fine-tuning bridge")
    return impl(a, x, Ctx(F, torch, opset, n_out))


def _op(*names: str) -> Callable[[Impl], Impl]:
    def register(fn: Impl) -> Impl:
        for name in names:
            OPS[name] = fn
        return fn
    return register


def optional_input(x: list[Any], i: int) -> Any:
    return x[i] if len(x) > i else None


def _ints(t: Any) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ONNX TensorProto.DataType -> torch dtype name (Cast, ConstantOfShape)
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
           9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


def torch_dtype(onnx_type: int, torch: Any) -> Any:
    name = _DTYPES.get(int(onnx_type))
    if name is None or not hasattr(torch, name):
        raise UnsupportedOpError(f"ONNX element type {onnx_type} is not supported by the "
                                 "fine-tuning bridge")
    return getattr(torch, name)


def _is_int(t: Any, torch: Any) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


# ---------------------------------------------------------------- element-wise

_UNARY: dict[str, Callable[[Any, dict[str, Any], Ctx], Any]] = {
    "Identity": lambda v, a, c: v,
    "Relu": lambda v, a, c: c.F.relu(v),
    "LeakyRelu": lambda v, a, c: c.F.leaky_relu(v, a.get("alpha", 0.01)),
    "Elu": lambda v, a, c: c.F.elu(v, a.get("alpha", 1.0)),
    "Sigmoid": lambda v, a, c: c.torch.sigmoid(v),
    "HardSigmoid": lambda v, a, c: c.torch.clamp(a.get("alpha", 0.2) * v + a.get("beta", 0.5),
                                                 0.0, 1.0),
    "HardSwish": lambda v, a, c: c.F.hardswish(v),
    "Tanh": lambda v, a, c: c.torch.tanh(v),
    "Softplus": lambda v, a, c: c.F.softplus(v),
    "Gelu": lambda v, a, c: c.F.gelu(v, approximate=_s(a.get("approximate", "none"))),
    "Erf": lambda v, a, c: c.torch.erf(v),
    "Neg": lambda v, a, c: -v,
    "Abs": lambda v, a, c: v.abs(),
    "Sign": lambda v, a, c: v.sign(),
    "Exp": lambda v, a, c: v.exp(),
    "Log": lambda v, a, c: v.log(),
    "Sqrt": lambda v, a, c: v.sqrt(),
    "Reciprocal": lambda v, a, c: v.reciprocal(),
    "Floor": lambda v, a, c: v.floor(),
    "Ceil": lambda v, a, c: v.ceil(),
    "Round": lambda v, a, c: v.round(),  # half to even, as ONNX
    "Sin": lambda v, a, c: v.sin(),
    "Cos": lambda v, a, c: v.cos(),
    "Not": lambda v, a, c: c.torch.logical_not(v),
}


for _name, _fn in _UNARY.items():
    OPS[_name] = (lambda f: lambda a, x, c: [f(x[0], a, c)])(_fn)


def _div(p: Any, q: Any, torch: Any) -> Any:
    if _is_int(p, torch) and _is_int(q, torch):
        return torch.div(p, q, rounding_mode="trunc")  # C integer division, as ONNX Runtime
    return p / q


def _mod(p: Any, q: Any, a: dict[str, Any], torch: Any) -> Any:
    return torch.fmod(p, q) if a.get("fmod", 0) else torch.remainder(p, q)


_BINARY: dict[str, Callable[[Any, Any, dict[str, Any], Any], Any]] = {
    "Add": lambda p, q, a, t: p + q,
    "Sub": lambda p, q, a, t: p - q,
    "Mul": lambda p, q, a, t: p * q,
    "Div": lambda p, q, a, t: _div(p, q, t),
    "Mod": _mod,
    "Pow": lambda p, q, a, t: t.pow(p, q).to(p.dtype),  # the output has the base's type
    "PRelu": lambda p, q, a, t: t.where(p < 0, p * q, p),
    "MatMul": lambda p, q, a, t: t.matmul(p, q),
    "Equal": lambda p, q, a, t: t.eq(p, q),
    "Less": lambda p, q, a, t: t.lt(p, q),
    "LessOrEqual": lambda p, q, a, t: t.le(p, q),
    "Greater": lambda p, q, a, t: t.gt(p, q),
    "GreaterOrEqual": lambda p, q, a, t: t.ge(p, q),
    "And": lambda p, q, a, t: t.logical_and(p, q),
    "Or": lambda p, q, a, t: t.logical_or(p, q),
    "Xor": lambda p, q, a, t: t.logical_xor(p, q),
}
for _name, _fn in _BINARY.items():
    OPS[_name] = (lambda f: lambda a, x, c: [f(x[0], x[1], a, c.torch)])(_fn)

_VARIADIC = {"Max": "maximum", "Min": "minimum", "Sum": "add", "Mean": "add"}


def _fold(name: str, xs: list[Any], c: Ctx) -> Any:
    out = functools.reduce(getattr(c.torch, _VARIADIC[name]), [t for t in xs if t is not None])
    return out / len(xs) if name == "Mean" else out


for _name in _VARIADIC:
    OPS[_name] = (lambda n: lambda a, x, c: [_fold(n, x, c)])(_name)


# the operators that are one expression: (attributes, inputs, ctx) -> outputs
_DIRECT: dict[str, Impl] = {
    "Where": lambda a, x, c: [c.torch.where(x[0].bool(), x[1], x[2])],
    "Cast": lambda a, x, c: [x[0].to(torch_dtype(a["to"], c.torch))],  # float->int truncates
    "CastLike": lambda a, x, c: [x[0].to(x[1].dtype)],
    "Dropout": lambda a, x, c: [x[0], c.torch.ones_like(x[0], dtype=c.torch.bool)],
    "Size": lambda a, x, c: [c.torch.tensor(x[0].numel(), dtype=c.torch.int64)],
    "Transpose": lambda a, x, c: [x[0].permute(*a.get("perm", range(x[0].dim() - 1, -1, -1)))],
    "Concat": lambda a, x, c: [c.torch.cat([t for t in x if t is not None], dim=a["axis"])],
    "Tile": lambda a, x, c: [x[0].repeat(*_ints(x[1]))],
    "GatherElements": lambda a, x, c: [c.torch.gather(
        x[0], norm_axis(a.get("axis", 0), x[0].dim()),
        _indices(x[1], x[0].shape[norm_axis(a.get("axis", 0), x[0].dim())], c.torch))],
}
OPS.update(_DIRECT)


# ---------------------------------------------------------------- normalisation, softmax


def _softmax_of(log: bool) -> Impl:
    def impl(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
        fn = c.F.log_softmax if log else c.F.softmax
        v = x[0]
        if c.opset >= 13:
            return [fn(v, dim=a.get("axis", -1))]
        axis = norm_axis(a.get("axis", 1), v.dim())  # before opset 13: over a 2-D coercion
        flat = v.reshape(math.prod(v.shape[:axis]), -1)
        return [fn(flat, dim=1).reshape(v.shape)]
    return impl


OPS["Softmax"], OPS["LogSoftmax"] = _softmax_of(False), _softmax_of(True)


@_op("LayerNormalization")
def _layer_norm(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    v, scale, bias = x[0], x[1], optional_input(x, 2)
    axis = norm_axis(a.get("axis", -1), v.dim())
    eps = a.get("epsilon", 1e-5)
    shape = tuple(v.shape[axis:])
    if c.n_out == 1 and tuple(scale.shape) == shape and (bias is None or
                                                          tuple(bias.shape) == shape):
        return [c.F.layer_norm(v, shape, scale, bias, eps)]
    dims = tuple(range(axis, v.dim()))
    mean = v.mean(dims, keepdim=True)
    inv = c.torch.rsqrt(((v - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = (v - mean) * inv * scale
    return [y if bias is None else y + bias, mean, inv]


def _reduce_dims(a: dict[str, Any], x: list[Any]) -> list[int] | None:
    """The axes to reduce (sorted, non-negative), or None for no reduction at all. The
    axes are an input from opset 18 (ReduceSum: 13) and an attribute before."""
    given = optional_input(x, 1)
    axes = _ints(given) if given is not None else a.get("axes")
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return None
        return list(range(x[0].dim()))
    return sorted(norm_axis(int(d), x[0].dim()) for d in axes)


_REDUCE: dict[str, Callable[[Any, list[int], bool, Any], Any]] = {
    "ReduceMean": lambda v, d, k, t: v.mean(d, keepdim=k),
    "ReduceSum": lambda v, d, k, t: v.sum(d, keepdim=k).to(v.dtype),
    "ReduceMax": lambda v, d, k, t: t.amax(v, d, keepdim=k),
    "ReduceMin": lambda v, d, k, t: t.amin(v, d, keepdim=k),
    "ReduceSumSquare": lambda v, d, k, t: (v * v).sum(d, keepdim=k),
    "ReduceL1": lambda v, d, k, t: v.abs().sum(d, keepdim=k),
    "ReduceL2": lambda v, d, k, t: (v * v).sum(d, keepdim=k).sqrt(),
    "ReduceLogSumExp": lambda v, d, k, t: t.logsumexp(v, d, keepdim=k),
    "ReduceProd": lambda v, d, k, t: functools.reduce(
        lambda acc, dim: acc.prod(dim, keepdim=k), sorted(d, reverse=True), v),
}
for _name, _fn in _REDUCE.items():
    OPS[_name] = (lambda f: lambda a, x, c: [
        x[0] if (d := _reduce_dims(a, x)) is None
        else f(x[0], d, bool(a.get("keepdims", 1)), c.torch)])(_fn)


# ---------------------------------------------------------------- shapes and indexing


@_op("Shape")
def _shape(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    dims = list(x[0].shape)[a.get("start", 0):a.get("end", None)]  # clamps as ONNX does
    return [c.torch.tensor(dims, dtype=c.torch.int64)]


def _indices(idx: Any, n: int, torch: Any) -> Any:
    idx = idx.long()
    return torch.where(idx < 0, idx + n, idx)  # ONNX counts negative indices from the end


@_op("Gather")
def _gather(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    data, idx = x[0], x[1]
    axis = norm_axis(a.get("axis", 0), data.dim())
    flat = data.index_select(axis, _indices(idx, data.shape[axis], c.torch).reshape(-1))
    return [flat.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))]


@_op("Slice")
def _slice(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    v = x[0]
    if len(x) > 1:  # opset >= 10: starts, ends, axes, steps are inputs
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if optional_input(x, 3) is not None else list(range(len(starts)))
        steps = _ints(x[4]) if optional_input(x, 4) is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    index: list[Any] = [slice(None)] * v.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = norm_axis(axis, v.dim())
        d = v.shape[axis]
        start, end = start + d if start < 0 else start, end + d if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), d), min(max(end, 0), d), step)
        elif step < 0:  # torch slicing has no negative steps: pick the indices
            start, end = min(max(start, 0), d - 1), min(max(end, -1), d - 1)
            v = v.index_select(axis, _arange(start, end, step, c.torch.int64, c.torch))
        else:
            raise UnsupportedOpError("Slice with a zero step")
    return [v[tuple(index)]]


@_op("Split")
def _split(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    v = x[0]
    axis = norm_axis(a.get("axis", 0), v.dim())
    given = optional_input(x, 1)  # opset >= 13: an input; before, an attribute
    sizes = _ints(given) if given is not None else a.get("split")
    if not sizes:  # equal parts; from opset 18 the last may be smaller
        parts, d = a.get("num_outputs", c.n_out), v.shape[axis]
        chunk = -(-d // parts)
        sizes = [chunk] * (parts - 1) + [d - chunk * (parts - 1)]
    return list(c.torch.split(v, list(sizes), dim=axis))


def _axes(a: dict[str, Any], x: list[Any]) -> list[int] | None:
    given = optional_input(x, 1)  # opset >= 13: an input; before, an attribute
    return _ints(given) if given is not None else a.get("axes")


@_op("Squeeze")
def _squeeze(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    axes = _axes(a, x)
    if not axes:  # none given: every axis of size 1
        return [x[0].squeeze()]
    return [x[0].squeeze(tuple(norm_axis(d, x[0].dim()) for d in axes))]


@_op("Unsqueeze")
def _unsqueeze(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    axes = _axes(a, x) or []
    rank = x[0].dim() + len(axes)  # negative axes count in the output's rank
    y = x[0]
    for axis in sorted(norm_axis(d, rank) for d in axes):
        y = y.unsqueeze(axis)
    return [y]


@_op("Reshape")
def _reshape(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    shape = _ints(x[1])
    if not a.get("allowzero", 0):  # 0 copies the input's dim
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


@_op("Expand")
def _expand(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    # bidirectional broadcasting: a 1 in the shape keeps the input's dim
    return [x[0].expand(c.torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]))))]


def _from_proto(value: Any, torch: Any) -> Any:
    from onnx import numpy_helper

    return torch.from_numpy(np.array(numpy_helper.to_array(value), copy=True))


@_op("ConstantOfShape")
def _constant_of_shape(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    fill = _from_proto(a["value"], c.torch).reshape(-1) if "value" in a else \
        c.torch.zeros(1, dtype=c.torch.float32)
    return [c.torch.full(_ints(x[0]), fill[0].item(), dtype=fill.dtype)]


@_op("Constant")
def _constant(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    t = c.torch
    if "value" in a:
        return [_from_proto(a["value"], t)]
    kinds = {"value_float": t.float32, "value_floats": t.float32, "value_int": t.int64,
             "value_ints": t.int64}
    for key, dtype in kinds.items():
        if key in a:
            return [t.tensor(a[key], dtype=dtype)]
    raise UnsupportedOpError(f"Constant with {sorted(a)} is not supported by the fine-tuning "
                             "bridge")


@_op("Range")
def _range(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    start, limit, delta = (v.item() for v in x[:3])
    return [_arange(start, limit, delta, x[0].dtype, c.torch)]


def _arange(start: Any, limit: Any, delta: Any, dtype: Any, torch: Any) -> Any:
    """ONNX Range: ``max(ceil((limit - start) / delta), 0)`` values ``start + i * delta``
    (empty, not an error, when ``delta`` points away from ``limit``)."""
    n = max(math.ceil((limit - start) / delta), 0)
    if dtype.is_floating_point:
        return (torch.arange(n, dtype=torch.float64) * delta + start).to(dtype)
    return torch.arange(n, dtype=torch.int64).mul(int(delta)).add(int(start)).to(dtype)


@_op("Trilu")
def _trilu(a: dict[str, Any], x: list[Any], c: Ctx) -> list[Any]:
    k = int(x[1].item()) if optional_input(x, 1) is not None else 0
    return [(c.torch.triu if a.get("upper", 1) else c.torch.tril)(x[0], diagonal=k)]
