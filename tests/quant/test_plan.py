"""The quantization plan: plain data read by writers and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.quant.plan import Fold, NodeDecision, NodeQuant, QuantizationPlan, Treatment
from lowbit.quant.scheme import Granularity, TensorQuantParams


def _act(scale: float, zp: int = 0) -> TensorQuantParams:
    return TensorQuantParams(bits=8, signed=False, symmetric=False, granularity=Granularity.TENSOR,
                             scale=np.float32(scale), zero_point=np.int64(zp))


def _plan() -> QuantizationPlan:
    plan = QuantizationPlan()
    plan.add_node(NodeQuant("conv1", "Conv", Treatment.STATIC, weight="w1", bias="b1"), "static")
    plan.add_node(NodeQuant("fc1", "Gemm", Treatment.DYNAMIC, weight="w2"), "fed float data")
    plan.add_node(NodeQuant("mm", "MatMul", Treatment.WEIGHT_ONLY, weight="w3", accuracy_level=4),
                  "weight-only", bits=4)
    plan.add_node(NodeQuant("emb", "MatMul", Treatment.WEIGHT_ONLY, weight="w4"), "weight-only",
                  bits=8)
    plan.add_node(NodeQuant("head", "Gemm", Treatment.FLOAT, weight="w5"), "excluded by option")
    plan.add_node(NodeQuant("pool", "MaxPool", Treatment.PASSTHROUGH), "8-bit in, 8-bit out")
    plan.decide("relu1", "Relu", Treatment.FOLDED, "folded into conv1")
    plan.decide("clip1", "Clip", Treatment.FOLDED, "folded into fc1")
    plan.decide("softmax", "Softmax", Treatment.FLOAT, "no int8 kernel")
    return plan


def test_counts_use_labels_with_weight_only_bits() -> None:
    assert _plan().counts() == {
        "int8-static": 1, "int8-dynamic": 1, "int4-weight-only": 1, "int8-weight-only": 1,
        "float": 2, "int8-passthrough": 1, "folded": 2,
    }
    assert sum(_plan().counts().values()) == len(_plan().decisions)
    assert QuantizationPlan().counts() == {}


def test_docstring_example() -> None:
    plan = QuantizationPlan()
    plan.decide("fc1", "Gemm", Treatment.FLOAT, "excluded by option")
    assert plan.counts() == {"float": 1}
    assert plan.nodes == {}  # decide records a decision only


@pytest.mark.parametrize(("treatment", "bits", "label"), [
    (Treatment.STATIC, None, "int8-static"),
    (Treatment.DYNAMIC, None, "int8-dynamic"),
    (Treatment.PASSTHROUGH, None, "int8-passthrough"),
    (Treatment.FOLDED, None, "folded"),
    (Treatment.FLOAT, None, "float"),
    (Treatment.WEIGHT_ONLY, 4, "int4-weight-only"),
    (Treatment.WEIGHT_ONLY, 2, "int2-weight-only"),
    (Treatment.WEIGHT_ONLY, 8, "int8-weight-only"),
])
def test_decision_labels(treatment: Treatment, bits: int | None, label: str) -> None:
    assert NodeDecision("n", "MatMul", treatment, bits=bits).label == label


def test_decision_dicts_in_order_and_serialisable() -> None:
    dicts = _plan().decision_dicts()
    assert [d["name"] for d in dicts] == ["conv1", "fc1", "mm", "emb", "head", "pool", "relu1",
                                          "clip1", "softmax"]
    assert dicts[2] == {"name": "mm", "op_type": "MatMul", "treatment": "int4-weight-only",
                        "reason": "weight-only"}
    assert dicts[4]["treatment"] == "float" and dicts[4]["reason"] == "excluded by option"
    assert all("weights" not in d for d in dicts)
    json.dumps(dicts)


def test_decision_dict_records_weight_granularity() -> None:
    d = NodeDecision("fc", "Gemm", Treatment.STATIC, "static", weights="per-channel").to_dict()
    assert d["weights"] == "per-channel"
    assert d["treatment"] == "int8-static"


def test_nodes_with_filters_by_treatment_in_graph_order() -> None:
    plan = _plan()
    assert [n.name for n in plan.nodes_with(Treatment.WEIGHT_ONLY)] == ["mm", "emb"]
    assert [n.name for n in plan.nodes_with(Treatment.STATIC, Treatment.DYNAMIC)] == ["conv1", "fc1"]
    assert [n.name for n in plan.nodes_with(Treatment.FLOAT)] == ["head"]
    # FOLDED nodes are decisions only, not nodes a writer emits
    assert plan.nodes_with(Treatment.FOLDED) == []
    assert plan.nodes_with() == []
    assert plan.nodes["mm"].accuracy_level == 4 and plan.nodes["conv1"].bias == "b1"


def test_quantized_layers_excludes_float_and_unweighted_ops() -> None:
    plan = _plan()
    assert plan.quantized_layers() == [("conv1", "Conv"), ("fc1", "Gemm"), ("mm", "MatMul"),
                                       ("emb", "MatMul")]
    assert plan.quantized_layers(("Gemm",)) == [("fc1", "Gemm")]
    assert plan.quantized_layers(("MaxPool",)) == [("pool", "MaxPool")]


def test_add_node_replaces_node_and_its_decision() -> None:
    """One decision per node: a later one replaces the earlier in place (an embedding
    Gather used to get two, float from the INT8 planner and weight-only, counted twice)."""
    plan = QuantizationPlan()
    plan.add_node(NodeQuant("fc", "Gemm", Treatment.STATIC, weight="w"), "first")
    plan.decide("pool", "MaxPool", Treatment.FLOAT, "pool")
    plan.add_node(NodeQuant("fc", "Gemm", Treatment.FLOAT, weight="w"), "fallback")
    assert plan.nodes["fc"].treatment is Treatment.FLOAT
    assert plan.quantized_layers() == []
    assert [d.reason for d in plan.decisions] == ["fallback", "pool"]
    assert plan.counts() == {"float": 2}


def test_observed_excludes_shared_tensors() -> None:
    plan = QuantizationPlan(activations=["x", "conv1_out", "pool_out", "fc1_out", "concat_out"],
                            shared={"pool_out": "conv1_out", "concat_out": "x"})
    assert plan.observed == ["x", "conv1_out", "fc1_out"]
    assert QuantizationPlan(activations=["a"], shared={"b": "a"}).observed == ["a"]


def test_activation_params_follow_shared() -> None:
    pa, pb = _act(0.1, 3), _act(0.5, 7)
    plan = QuantizationPlan(activations=["a", "b", "c"], shared={"c": "a"},
                            tensors={"a": pa, "b": pb})
    assert plan.activation_params("a") is pa
    assert plan.activation_params("b") is pb
    assert plan.activation_params("c") is pa
    with pytest.raises(KeyError):
        plan.activation_params("missing")


def test_clip_caps_only_from_clip_folds() -> None:
    plan = QuantizationPlan(folds=[
        Fold("conv1", "relu1", "conv1_out", None),
        Fold("conv2", "clip2", "conv2_out", (0.0, 6.0)),
        Fold("fc", "clip3", "fc_out", (0.0, 1.0)),
    ])
    assert plan.clip_caps == {"conv2_out": (0.0, 6.0), "fc_out": (0.0, 1.0)}
    assert QuantizationPlan(folds=[Fold("c", "r", "o", None)]).clip_caps == {}


def test_plans_do_not_share_mutable_defaults() -> None:
    a, b = QuantizationPlan(), QuantizationPlan()
    a.decide("n", "Relu", Treatment.FLOAT)
    a.activations.append("x")
    a.shared["y"] = "x"
    assert b.decisions == [] and b.activations == [] and b.shared == {}


def test_treatment_values_are_strings() -> None:
    assert Treatment("int8-static") is Treatment.STATIC
    assert Treatment.WEIGHT_ONLY == "weight-only"
