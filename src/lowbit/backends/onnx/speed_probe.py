"""Measure, on this CPU, whether one Conv runs faster in INT8 than in float.

ONNX Runtime's integer convolution pays for packing and requantization; for
convolutions with a tiny reduction (e.g. a first layer with one input
channel: 1x3x3 = 9 products per output) that cost can exceed the float
kernel's. ``auto`` mode therefore times such a Conv alone, both ways, at its
real input shape, and keeps it in float when INT8 is clearly slower.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.backends.onnx.graph import GraphIndex, node_name
from lowbit.backends.onnx.graph import attrs as node_attrs
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.quant import affine, weight_rules
from lowbit.quant.observers import HistogramObserver
from lowbit.runtime.latency import measure_side_by_side

# Convs whose reduction size (in_channels/group * kernel area) is above this
# are not probed: they measured faster in INT8 in every model we timed.
PROBE_MAX_REDUCTION = 64
# INT8 must be this much slower than float before a Conv is kept in float,
# so timing noise cannot flip a close decision.
SLOWER_FACTOR = 1.25
PROBE_SECONDS = 0.3  # timing one Conv both ways, about (at least 5 runs of each)


def _single_conv(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                 in_shape: tuple[int, ...], quantized: bool) -> onnx.ModelProto:
    inits = []
    nodes = []
    x = "x"
    if quantized:
        ap = affine.activation_params(-1.0, 1.0)
        inits += [numpy_helper.from_array(np.asarray(ap.scale, np.float32).reshape(()), "a_s"),
                  numpy_helper.from_array(np.asarray(ap.zero_point).reshape(()).astype(np.uint8),
                                          "a_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xd"])]
        x = "xd"
        wp = affine.weight_params_per_channel(weight, axis=0)
        inits += [numpy_helper.from_array(affine.quantize(weight, wp).astype(np.int8), "wq"),
                  numpy_helper.from_array(np.asarray(wp.scale, np.float32), "w_s"),
                  numpy_helper.from_array(np.zeros(weight.shape[0], np.int8), "w_zp")]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "w_s", "w_zp"], ["w"], axis=0))
    else:
        inits.append(numpy_helper.from_array(weight.astype(np.float32), "w"))
    conv_inputs = [x, "w"]
    if bias is not None:
        if quantized:
            bp = weight_rules.bias_params(ap, wp, len(bias))  # (a zero weight scale is floored)
            inits += [numpy_helper.from_array(affine.quantize(bias, bp, dtype=np.int32), "bq"),
                      numpy_helper.from_array(np.asarray(bp.scale, np.float32), "b_s"),
                      numpy_helper.from_array(np.zeros(len(bias), np.int32), "b_zp")]
            nodes.append(helper.make_node("DequantizeLinear", ["bq", "b_s", "b_zp"], ["b"], axis=0))
        else:
            inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        conv_inputs.append("b")
    attrs = node_attrs(node)
    out = "yc" if quantized else "y"
    nodes.append(helper.make_node("Conv", conv_inputs, [out], **attrs))
    if quantized:
        nodes += [helper.make_node("QuantizeLinear", ["yc", "a_s", "a_zp"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "a_s", "a_zp"], ["y"])]
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def conv_int8_slowdown(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                       in_shape: tuple[int, ...], *, threads: int = 1,
                       budget_s: float = PROBE_SECONDS) -> tuple[float, float, float]:
    """(int8 time / float time, float p50 ms, int8 p50 ms) for this Conv alone, timed for
    about ``budget_s`` seconds (5 to 30 runs of each; the Conv of a 1x3x736x1216 input
    takes milliseconds, and 30 runs of each way would cost seconds per Conv)."""
    x = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    sessions = [make_session(_single_conv(node, weight, bias, in_shape, q), threads=threads)
                for q in (False, True)]
    start = time.perf_counter()
    for session in sessions:  # (the first run of each also warms it up)
        session.run(None, {"x": x})
    once = max(time.perf_counter() - start, 1e-6)
    iterations = int(min(30, max(5, budget_s / once)))
    stats = measure_side_by_side(sessions, [{"x": x}, {"x": x}], batch=in_shape[0],
                                 threads=threads, iterations=iterations,
                                 warmup=3 if iterations == 30 else 1,
                                 min_time_s=min(0.05, budget_s))
    return stats[1].p50_ms / stats[0].p50_ms, stats[0].p50_ms, stats[1].p50_ms


def slow_int8_convs(fm: FloatModel, convs: list[str], observers: dict[str, HistogramObserver],
                    threads: int) -> dict[str, str]:
    """Of the named static Convs, those that measured clearly slower in INT8 than in float
    at their real input shape, with the reason. Convs alike (weight shape, attributes,
    input shape) are timed once (a MobileNet repeats its depthwise shapes)."""
    wanted = set(convs)
    index = GraphIndex(fm.proto, fm.weights)
    slow: dict[str, str] = {}
    measured: dict[Any, tuple[float, float, float]] = {}
    for i, node in enumerate(fm.proto.graph.node):
        name = node_name(node, i)
        if name not in wanted:
            continue
        weight = index.constant(node.input[1])
        obs = observers.get(node.input[0])
        if weight is None or obs is None or obs.batch_shape is None:
            continue
        if int(np.prod(weight.shape[1:])) > PROBE_MAX_REDUCTION:  # (out, in/group, kh, kw)
            continue
        bias = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        key = (weight.shape, bias is not None, obs.batch_shape,
               tuple(sorted((k, repr(v)) for k, v in node_attrs(node).items())))
        if key not in measured:
            measured[key] = conv_int8_slowdown(node, weight, bias, obs.batch_shape,
                                               threads=threads)
        ratio, t_float, t_int8 = measured[key]
        if ratio > SLOWER_FACTOR:
            slow[name] = (f"auto: INT8 measured {ratio:.2f}x slower than float for this Conv "
                          f"on this CPU ({t_int8:.3f} vs {t_float:.3f} ms at input "
                          f"{list(obs.batch_shape)})")
    return slow
