"""Writers consume the plan and decide nothing: a plan with hand-set scales (as QAT will
hand over) is written, run in ONNX Runtime, and checked against a numpy model of that
exact plan within one quantization step."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.plan import build_int8_plan
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.weight_only import plan_weight_only
from lowbit.backends.onnx.writer import write_model
from lowbit.config import WeightOnlyConfig
from lowbit.quant import affine
from lowbit.quant.plan import Treatment
from lowbit.quant.scheme import Granularity, TensorQuantParams

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 24)).astype(np.float32) * 0.3  # Gemm transB: (N, K)
B1 = RNG.standard_normal(16).astype(np.float32) * 0.1
W2 = RNG.standard_normal((16, 8)).astype(np.float32) * 0.3  # MatMul: (K, N)
X = RNG.standard_normal((32, 24)).astype(np.float32)


def _model() -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
         numpy_helper.from_array(W2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _act(lo: float, hi: float) -> TensorQuantParams:
    return affine.activation_params(lo, hi)


def _weight(w: np.ndarray, axis: int, levels: int) -> TensorQuantParams:
    """Per-channel symmetric params with a hand-chosen grid (|q| <= levels), not the
    weight rule's: the writer must use these, and small codes keep every CPU's u8s8
    kernel exact (no 16-bit saturation)."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=other) / levels).astype(np.float32)
    return TensorQuantParams(bits=8, signed=True, symmetric=True, granularity=Granularity.CHANNEL,
                             scale=scale, zero_point=np.zeros_like(scale, np.int64), axis=axis,
                             narrow_range=True)


def _fq(x: np.ndarray, p: TensorQuantParams) -> np.ndarray:
    return affine.dequantize(affine.quantize(x, p), p)


def _run(model: onnx.ModelProto) -> np.ndarray:
    return make_session(model).run(None, {"x": X})[0]


def test_static_plan_with_hand_set_scales_matches_numpy_within_one_step():
    fm, _ = load_model(_model())
    plan = build_int8_plan(fm, treatments={"Gemm": Treatment.STATIC, "MatMul": Treatment.STATIC})
    assert [f.activation for f in plan.folds] == ["relu"]
    x_p, h_p, w1_p, w2_p = _act(-3.0, 2.5), _act(0.0, 1.7), _weight(W1, 0, 50), _weight(W2, 1, 40)
    plan.tensors.update({"x": x_p, "r": h_p, "w1": w1_p, "w2": w2_p})
    b_scale = (float(x_p.scale) * np.asarray(w1_p.scale)).astype(np.float32)
    plan.tensors["b1"] = TensorQuantParams(bits=32, signed=True, symmetric=True,
                                           granularity=Granularity.CHANNEL, scale=b_scale,
                                           zero_point=np.zeros(16, np.int64), axis=0)
    got = _run(write_model(fm, plan))
    # numpy model of exactly this plan: fake-quantize every tensor with its plan params
    h = _fq(X, x_p) @ _fq(W1, w1_p).T + _fq(B1, plan.tensors["b1"])
    r = _fq(np.maximum(h, 0.0), h_p)  # the Relu is folded into r's range [0, 1.7]
    want = r @ _fq(W2, w2_p)
    # the last MatMul's output stays float; one step of its input grid through the weights
    step = float(h_p.scale) * np.abs(_fq(W2, w2_p)).sum(axis=0).max()
    assert np.max(np.abs(got - want)) <= step
    # and the writer really used the hand-set grid, not a weight rule of its own
    stored = {t.name: numpy_helper.to_array(t) for t in write_model(fm, plan).graph.initializer}
    assert np.array_equal(stored["w1_scale"], w1_p.scale)
    assert np.abs(stored["w1_quantized"]).max() == 50


def test_dynamic_plan_matches_numpy_dynamic_quantization():
    fm, _ = load_model(_model())
    plan = build_int8_plan(fm, treatments={"Gemm": Treatment.DYNAMIC, "MatMul": Treatment.DYNAMIC})
    assert {n.treatment for n in plan.nodes.values()} == {Treatment.DYNAMIC}
    w1_p, w2_p = _weight(W1, 0, 60), _weight(W2, 1, 60)
    plan.tensors.update({"w1": w1_p, "w2": w2_p})
    got = _run(write_model(fm, plan))

    def dyn(a: np.ndarray) -> np.ndarray:  # DynamicQuantizeLinear: uint8 over [min, max] with 0
        return _fq(a, _act(float(a.min()), float(a.max())))

    h = np.maximum(dyn(X) @ _fq(W1, w1_p).T + B1, 0.0)
    want = dyn(h) @ _fq(W2, w2_p)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_plan_with_replaced_values_is_what_gets_packed(symmetric):
    """GPTQ/QAT hand over new float values: the writer packs those, with the plan's params."""
    fm, _ = load_model(_model())
    config = WeightOnlyConfig(bits=4, group_size=16, symmetric=symmetric, accuracy_level=0)
    plan = plan_weight_only(fm, config, None)  # accuracy level 0: float math, exact
    new = (W2 * 0.5).astype(np.float32)  # (K, N), as stored
    plan.weight_values["w2"] = new
    p2 = plan.tensors["w2"]
    assert p2.granularity is Granularity.GROUP and p2.axis == 0  # groups along K of (K, N)
    got = _run(write_model(fm, plan))
    w1_deq = _fq(W1, plan.tensors["w1"])
    want = np.maximum(X @ w1_deq.T + B1, 0.0) @ _fq(new, p2)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    ops = [n.op_type for n in write_model(fm, plan).graph.node]
    assert ops.count("MatMulNBits") == 2


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_regression_gather_block_quantized_writes_the_plans_zero_points(bits, symmetric):
    """The embedding writer dropped zero points: a hand-set asymmetric plan came out wrong."""
    table = RNG.standard_normal((64, 64)).astype(np.float32) + 0.5
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["y"], name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(table, "t")])
    fm, _ = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_weight_only(fm, WeightOnlyConfig(bits=bits, group_size=32), None)
    plan.tensors["t"] = affine.group_params(table, bits=bits, group_size=32, axis=1,
                                            symmetric=symmetric)
    ids = np.arange(64, dtype=np.int64)
    got = make_session(write_model(fm, plan)).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, _fq(table, plan.tensors["t"]))
