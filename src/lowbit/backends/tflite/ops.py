"""One emitter per ONNX op type: ONNX node -> TFLite op(s), in NHWC (see ``tensors.py``).

Each emitter reads the node's treatment from the plan (via ``Writer``) and writes an INT8,
hybrid or float op; it never chooses a treatment itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import attr
from lowbit.backends.tflite.tensors import NHWC, identity
from lowbit.errors import UnsupportedOpError
from lowbit.quant.plan import Treatment

QUANTIZED = (Treatment.STATIC, Treatment.PASSTHROUGH)
ACTIVATION = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
Writer = Any  # writer.Writer (which imports this module)


def _unsupported(w: Writer, name: str, op: str, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"{w.source}: node {name!r} ({op}) cannot be written to TFLite: {why}")


def _padding(w: Writer, node: onnx.NodeProto, name: str, x: str, kernel: tuple[int, int],
             strides: tuple[int, int], dilations: tuple[int, int]) -> tuple[str, list[int]]:
    """("SAME" | "VALID", explicit [top, bottom, left, right] pads still to apply)."""
    _, _, h, wd = w.t.shapes[x]
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(attr(node, "pads", [0, 0, 0, 0]))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return "SAME", [0, 0, 0, 0]
    if auto == "VALID" or not any(pads):
        return "VALID", [0, 0, 0, 0]
    same = []
    for size, k, s, d in zip((h, wd), kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        same += [total // 2, total - total // 2]
    explicit = [pads[0], pads[2], pads[1], pads[3]]
    if explicit == same:
        return "SAME", [0, 0, 0, 0]
    return "VALID", explicit


def _pad(w: Writer, x: str, pads: list[int], dtype: str, quant: Any) -> int:
    src = w.t.to_layout(x, NHWC, dtype, quant)
    if not any(pads):
        return src
    n, c, h, wd = w.t.shapes[x]
    shape = (n, h + pads[0] + pads[1], wd + pads[2] + pads[3], c)
    sig = (-1, *shape[1:]) if x in w.t.dynamic_batch else None
    out = w.b.tensor(f"{x}/padded", shape, dtype, quant=quant, signature=sig)
    amounts = np.asarray([[0, 0], pads[0:2], pads[2:4], [0, 0]], dtype=np.int32)
    w.b.op("PAD", [src, w.b.constant(f"{x}/pads", amounts)], [out])
    return out


def conv(w: Writer, node: onnx.NodeProto, name: str) -> None:
    x, wname = node.input[0], node.input[1]
    bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
    weight = w.constant(wname)
    if weight is None or weight.ndim != 4:
        raise _unsupported(w, name, "Conv", "needs a constant 2-D kernel")
    o, i, kh, kw = weight.shape
    group = int(attr(node, "group", 1))
    depthwise = group > 1 and i == 1 and group == w.t.shapes[x][1]
    if group > 1 and not depthwise:
        raise _unsupported(w, name, "Conv", f"grouped convolution (group {group})")
    strides = tuple(attr(node, "strides", [1, 1]))
    dilations = tuple(attr(node, "dilations", [1, 1]))
    padding, pads = _padding(w, node, name, x, (kh, kw), strides, dilations)
    treatment = w.treatment(name)
    if depthwise:  # (O, 1, kh, kw) -> (1, kh, kw, O), channel axis 3
        layout, axis = (lambda a: a.reshape(o, kh, kw).transpose(1, 2, 0)[None]), 3
    else:  # (O, I, kh, kw) -> OHWI, channel axis 0
        layout, axis = (lambda a: a.transpose(0, 2, 3, 1)), 0
    fields = dict(padding=0 if padding == "SAME" else 1, strideH=strides[0], strideW=strides[1],
                  dilationHFactor=dilations[0], dilationWFactor=dilations[1])
    if depthwise:
        fields["depthMultiplier"] = o // group
    kind, opts = ("DEPTHWISE_CONV_2D", "DepthwiseConv2DOptions") if depthwise else \
        ("CONV_2D", "Conv2DOptions")
    _weighted(w, node, name, treatment, kind, opts, fields, x, wname, bname, layout, axis,
              lambda xin, q, d: _pad(w, x, pads, d, q), NHWC, version=3)


def gemm(w: Writer, node: onnx.NodeProto, name: str) -> None:
    a, wname = node.input[0], node.input[1]
    weight = w.constant(wname)
    if node.op_type == "MatMul" and weight is None:
        return batch_matmul(w, node, name)
    if weight is None or weight.ndim != 2:
        raise _unsupported(w, name, node.op_type, "needs a constant 2-D weight")
    trans_b = node.op_type == "Gemm" and int(attr(node, "transB", 0)) == 1
    if node.op_type == "Gemm" and (int(attr(node, "transA", 0)) or
                                   float(attr(node, "alpha", 1.0)) != 1.0 or
                                   float(attr(node, "beta", 1.0)) != 1.0):
        raise _unsupported(w, name, "Gemm", "transA, alpha or beta other than the defaults")
    bname = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] \
        else None
    cols = w.row_perm.get(a)

    def layout(arr: np.ndarray) -> np.ndarray:
        nk = arr if trans_b else arr.T
        return np.ascontiguousarray(nk[:, cols] if cols is not None else nk)
    rank = len(w.t.shapes[a])
    fields = dict(keepNumDims=rank > 2)
    _weighted(w, node, name, w.treatment(name), "FULLY_CONNECTED", "FullyConnectedOptions",
              fields, a, wname, bname, layout, 0,
              lambda xin, q, d: w.t.to_layout(a, identity(rank), d, q), identity(rank),
              version=4)


def _weighted(w: Writer, node: onnx.NodeProto, name: str, treatment: Treatment, kind: str,
              opts: str, fields: dict[str, Any], x: str, wname: str, bname: str | None,
              layout: Callable[[np.ndarray], np.ndarray], axis: int,
              prepare: Callable[[str, Any, str], int], out_perm: tuple[int, ...],
              version: int) -> None:
    """CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED as the node's treatment says."""
    plan, fm = w.plan, w.fm
    params = plan.tensors.get(wname)
    item = plan.nodes.get(name)
    if treatment is Treatment.STATIC and params is not None:
        act, out = w.static_activation(name, node.output[0])
        in_q, out_q = w.act_quant(x), w.act_quant(out)
        bname = (item.bias if item is not None and item.bias else None) or bname
        if in_q is None or out_q is None:  # (its folded Relu would be lost in float)
            raise ValueError(f"internal: static node {name!r} has no INT8 scale for its "
                             "input or output: complete the plan first (tflite.plan.complete)")
        values = plan.values_of(wname, fm.constant)
        wt = w.quantized_weight(wname, params, values, layout, axis, (wname, "static"))
        scales = np.asarray(w.b.tensors[wt].quantization.scale, np.float64)
        channels = w.b.shape_of(wt)[axis]
        bias_values = np.zeros(channels) if bname is None else \
            np.asarray(plan.values_of(bname, fm.constant), np.float64).reshape(-1)
        grid = np.float64(in_q.scale[0]) * scales
        if grid.size == 1 and channels > 1:
            grid = np.repeat(grid, channels)
        bias = w.int32_bias(bname or f"{name}/bias", bias_values, grid)
        xin = prepare(x, in_q, "int8")
        w.t.perm[out] = out_perm
        y = w.t.new(out, "int8", out_q)
        options = w.b.options(opts, fusedActivationFunction=ACTIVATION[act], **fields)
        w.b.op(kind, [xin, wt, bias], [y], *options, version=version)
        w.t.set_int8(out, y, out_q, out_perm)
        return
    fused = w.bias_after(node, int(w.constant(wname).shape[-1])) \
        if node.op_type == "MatMul" and bname is None else None  # (K, N): N channels
    if fused is not None:
        bname = fused[0]
        act, out = w.activation_after(fused[1], w.name_of[id(fused[1])])
    else:
        act, out = w.activation_after(node, name)
    if treatment in (Treatment.DYNAMIC, Treatment.WEIGHT_ONLY) and params is not None:
        values = plan.values_of(wname, fm.constant)
        wt = w.quantized_weight(wname, params, values, layout, axis, (wname, "hybrid"),
                                packed=True)
        if kind == "FULLY_CONNECTED":
            fields = dict(fields, asymmetricQuantizeInputs=True)
    else:
        weight = np.asarray(fm.constant(wname), np.float32)
        wt = w.float_weight(wname, layout(weight), (wname, "float"))
    channels = w.b.shape_of(wt)[axis]
    bias_values = np.zeros(channels, np.float32) if bname is None else \
        np.asarray(fm.constant(bname), np.float32).reshape(-1)
    bias = w.float_weight(bname or f"{name}/bias", bias_values, bname or f"{name}/bias")
    xin = prepare(x, None, "float32")
    y = w.t.new_float(out, out_perm)
    options = w.b.options(opts, fusedActivationFunction=ACTIVATION[act], **fields)
    w.b.op(kind, [xin, wt, bias], [y], *options, version=version)


def batch_matmul(w: Writer, node: onnx.NodeProto, name: str) -> None:
    a, b = node.input[0], node.input[1]
    ra, rb = len(w.t.shapes[a]), len(w.t.shapes[b])
    ia, ib = w.t.to_layout(a, identity(ra)), w.t.to_layout(b, identity(rb))
    out = node.output[0]
    y = w.t.new_float(out, identity(len(w.t.shapes[out])))
    w.b.op("BATCH_MATMUL", [ia, ib], [y], *w.b.options("BatchMatMulOptions"))


def _int8_input(w: Writer, name: str, x: str) -> Any:
    """The INT8 parameters a pooling op runs on: its input's, when the input already is
    INT8; else None (float). Pooling commutes with quantization, so running it in float
    and quantizing its (smaller) output for the next INT8 op gives the same codes and
    moves the QUANTIZE onto fewer elements."""
    if w.treatment(name) not in QUANTIZED:
        return None
    have = w.t.int8.get(x)
    return have[1] if have is not None else None


def pool(w: Writer, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    kernel = tuple(attr(node, "kernel_shape"))
    strides = tuple(attr(node, "strides", [1, 1]))
    if len(kernel) != 2 or int(attr(node, "ceil_mode", 0)) and \
            w.t.shapes[out][2:] != _floor_size(w.t.shapes[x], kernel, strides):
        raise _unsupported(w, name, node.op_type, "only 2-D pooling without ceil_mode")
    padding, pads = _padding(w, node, name, x, kernel, strides, (1, 1))
    if node.op_type == "AveragePool" and any(pads) and int(attr(node, "count_include_pad", 0)) == 0:
        raise _unsupported(w, name, node.op_type, "explicit padding that the average excludes")
    if node.op_type == "MaxPool" and any(pads):
        raise _unsupported(w, name, node.op_type, "explicit padding that is not SAME")
    q = _int8_input(w, name, x)
    dtype = "int8" if q is not None else "float32"
    act, out = ("NONE", out) if q is not None else w.activation_after(node, name)
    xin = _pad(w, x, pads, dtype, q)
    w.t.perm[out] = NHWC
    y = w.t.new(out, dtype, q)
    kind = "MAX_POOL_2D" if node.op_type == "MaxPool" else "AVERAGE_POOL_2D"
    w.b.op(kind, [xin], [y], *w.b.options(
        "Pool2DOptions", padding=0 if padding == "SAME" else 1, strideH=strides[0],
        strideW=strides[1], filterHeight=kernel[0], filterWidth=kernel[1],
        fusedActivationFunction=ACTIVATION[act]), version=2 if q is not None else 1)
    if q is not None:
        w.t.set_int8(out, y, q, NHWC)
    else:
        w.t.set_float(out, y, NHWC)


def _floor_size(shape: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...]
                ) -> tuple[int, ...]:
    return tuple((s - k) // st + 1 for s, k, st in zip(shape[2:], kernel, strides))


def global_pool(w: Writer, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    q = _int8_input(w, name, x)
    out_q = w.act_quant(out) if q is not None else None
    dtype = "int8" if out_q is not None else "float32"
    xin = w.t.to_layout(x, NHWC, dtype, q if out_q is not None else None)
    w.t.perm[out] = NHWC
    y = w.t.new(out, dtype, out_q)
    axes = w.b.constant(f"{name}/axes", np.asarray([1, 2], dtype=np.int32))
    kind = "MEAN" if node.op_type == "GlobalAveragePool" else "REDUCE_MAX"
    w.b.op(kind, [xin, axes], [y], *w.b.options("ReducerOptions", keepDims=True),
           version=2 if out_q is not None else 1)
    if out_q is not None:
        w.t.set_int8(out, y, out_q, NHWC)
    else:
        w.t.set_float(out, y, NHWC)


from lowbit.backends.tflite.ops_more import MORE_EMITTERS  # noqa: E402  (the other ops)
from lowbit.backends.tflite.ops_shape import SHAPE_EMITTERS  # noqa: E402

EMITTERS: dict[str, Callable[[Writer, onnx.NodeProto, str], None]] = {
    "Conv": conv, "Gemm": gemm, "MatMul": gemm, "MaxPool": pool, "AveragePool": pool,
    "GlobalAveragePool": global_pool, "GlobalMaxPool": global_pool, **SHAPE_EMITTERS,
    **MORE_EMITTERS,
}
