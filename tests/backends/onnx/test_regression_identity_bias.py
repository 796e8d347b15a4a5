"""Regression: de-duplicated parameters reached Gemm through Identity nodes and the
Gemm was left in float ("bias is not a constant") for HF GPT-2 style exports."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.weight_only import plan_weight_only
from lowbit.config import WeightOnlyConfig


def _model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    b = np.zeros(16, np.float32)
    g = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["b_copy"]),
         helper.make_node("Gemm", ["x", "w", "b_copy"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_identity_of_an_initializer_is_bypassed():
    fm, _ = load_model(_model())
    assert [n.op_type for n in fm.proto.graph.node] == ["Gemm"]
    assert fm.proto.graph.node[0].input[2] == "b"
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    np.testing.assert_allclose(make_session(fm).run(None, {"x": x})[0],
                               make_session(_model()).run(None, {"x": x})[0], rtol=1e-6)


def test_gemm_behind_identity_bias_is_quantized():
    fm, _ = load_model(_model())
    plan = plan_weight_only(fm, WeightOnlyConfig(bits=4, group_size=32), None)
    assert [d.label for d in plan.decisions] == ["int4-weight-only"]
