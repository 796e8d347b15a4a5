"""build_report, weight_section and layer_table on small models built in code."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.onnx.store import FloatModel
from lowbit.config import ClusterConfig, Int8Config, PruneConfig, StructuredPruneConfig
from lowbit.quant.plan import NodeQuant, QuantizationPlan, Treatment
from lowbit.report.build import build_report, layer_table, weight_section


def _report(stages, **overrides):
    kwargs = dict(tool="lowbit test", name="tiny.onnx", input_size=1234, stages=stages,
                  sections={}, plan=None, notes=[], warnings=[], skipped={}, verification=None,
                  seconds={"total": 1.23456})
    kwargs.update(overrides)
    return build_report(**kwargs)


# ---------------------------------------------------------------- build_report


def test_one_stage_gives_config_and_settings() -> None:
    config = PruneConfig(sparsity=0.75).to_dict()
    settings = {"achieved_sparsity": 0.75}
    report = _report([(config, settings)])
    assert report["tool"] == "lowbit test"
    assert report["input"] == {"model": "tiny.onnx", "size_bytes": 1234}
    assert report["config"] == config and report["settings"] == settings
    assert "stages" not in report
    assert "nodes" not in report and "verification" not in report
    assert report["seconds"] == {"total": 1.235}
    assert {"skipped", "notes", "warnings"} <= set(report)
    env = report["environment"]
    assert {"cpu", "cores", "vnni", "python", "numpy", "onnx", "onnxruntime", "lowbit"} <= set(env)
    assert env["onnx"] == onnx.__version__
    json.dumps(report)


def test_two_stages_give_stage_list_and_settings_by_short_kind() -> None:
    prune, cluster = PruneConfig(sparsity=0.9, epochs=1), ClusterConfig(bits=4)
    report = _report([(prune.to_dict(), {"s": 1}), (cluster.to_dict(), {"c": 2})])
    assert report["stages"] == [prune.to_dict(), cluster.to_dict()]
    assert report["settings"] == {"prune": {"s": 1}, "cluster": {"c": 2}}
    assert "config" not in report


def test_short_kinds_of_structured_prune_and_quantize() -> None:
    report = _report([(StructuredPruneConfig().to_dict(), {"a": 1}),
                      (Int8Config().to_dict(), {"b": 2})])
    assert report["settings"] == {"structured_prune": {"a": 1}, "quantize": {"b": 2}}
    assert [s["kind"] for s in report["stages"]] == ["prune-structured", "quantize-int8"]


def test_every_stage_keeps_its_settings() -> None:
    report = _report([(StructuredPruneConfig().to_dict(), {"channels_removed": 8}),
                      (PruneConfig().to_dict(), {"achieved_sparsity": 0.5})])
    assert len(report["settings"]) == len(report["stages"]) == 2


def test_sections_plan_skipped_notes_and_verification() -> None:
    plan = QuantizationPlan()
    plan.add_node(NodeQuant("fc1", "Gemm", Treatment.STATIC, weight="w1"), "static")
    plan.add_node(NodeQuant("fc2", "MatMul", Treatment.WEIGHT_ONLY, weight="w2"), "wo", bits=4)
    plan.decide("sm", "Softmax", Treatment.FLOAT, "no int8 kernel")
    verification = {"checker": "passed", "flags": []}
    report = _report([(Int8Config().to_dict(), {})], sections={"sizes": {"x": 1}}, plan=plan,
                     notes=["n1"], warnings=["w1"], skipped={"conv9": "not constant"},
                     verification=verification, seconds={"quantize-int8": 0.1, "total": 0.25})
    assert report["sizes"] == {"x": 1}
    assert report["nodes"]["counts"] == {"int8-static": 1, "int4-weight-only": 1, "float": 1}
    assert report["nodes"]["decisions"] == plan.decision_dicts()
    assert report["nodes"]["decisions"][1]["treatment"] == "int4-weight-only"
    assert report["skipped"] == {"conv9": "not constant"}
    assert report["notes"] == ["n1"] and report["warnings"] == ["w1"]
    assert report["verification"] is verification
    assert report["seconds"] == {"quantize-int8": 0.1, "total": 0.25}
    json.dumps(report)


# ---------------------------------------------------------- weight_section


def _weighted_model() -> onnx.ModelProto:
    """Gemm (transB) with a pruned, 4-valued weight; MatMul with 300 distinct values;
    a Reshape shape constant that is not a weight."""
    w1 = np.tile(np.array([0.0, 0.5, -0.5, 1.0, 0.0, 0.25, 0.0, 0.0], np.float32), (16, 4))  # (16, 32)
    b1 = np.linspace(-1, 1, 16).astype(np.float32)
    w2 = np.linspace(0.01, 3.0, 16 * 20).astype(np.float32).reshape(16, 20)
    w2[0, :5] = 0.0  # 5 of 320 zero; 315 distinct nonzero
    shape = np.array([-1, 20], np.int64)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("MatMul", ["h", "w2"], ["m"], name="fc2"),
        helper.make_node("Reshape", ["m", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 20])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(shape, "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("min_bytes", [1, 1 << 20], ids=["split", "embedded"])
def test_layer_table(min_bytes: int) -> None:
    fm = FloatModel.split(_weighted_model(), min_bytes=min_bytes)
    rows = layer_table(fm)
    assert [r["name"] for r in rows] == ["w1", "w2"]  # no bias, no shape constant
    w1, w2 = rows
    assert w1["shape"] == [16, 32] and w1["params"] == 512
    assert w1["sparsity"] == 0.5
    assert w1["distinct_nonzero_values"] == 4  # 0.5, -0.5, 1.0, 0.25
    assert w1["bits"] == 2
    assert w2["shape"] == [16, 20] and w2["params"] == 320
    assert w2["sparsity"] == round(5 / 320, 4)
    assert w2["distinct_nonzero_values"] == 315
    assert w2["bits"] is None  # more than 256 values: not clustered


@pytest.mark.parametrize(("values", "bits"), [([1.0], None), ([1.0, 2.0], 1), ([1.0, 2.0, 3.0], 2),
                                              (list(range(1, 6)), 3), (list(range(1, 257)), 8),
                                              (list(range(1, 258)), None)])
def test_layer_table_bits_from_distinct_values(values: list[float], bits: int | None) -> None:
    w = np.zeros((len(values) + 3, 1), np.float32)
    w[: len(values), 0] = values
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (row,) = layer_table(FloatModel.split(model))
    assert row["distinct_nonzero_values"] == len(values)
    assert row["bits"] == bits


def test_weight_section_sizes_sparsity_and_lbz_ratio() -> None:
    fm = FloatModel.split(_weighted_model(), min_bytes=1)
    section = weight_section(10_000, 4_000, 2_500, fm)
    assert section["sizes"] == {"float_onnx_bytes": 10_000, "compressed_onnx_bytes": 4_000,
                                "lbz_bytes": 2_500, "lbz_ratio": 4.0}
    assert [r["name"] for r in section["layers"]] == ["w1", "w2"]
    expected = (256 + 5) / (512 + 320)
    assert section["weight_sparsity"] == pytest.approx(expected, abs=1e-4)
    assert weight_section(1000, 1000, 300, fm)["sizes"]["lbz_ratio"] == 3.33
    json.dumps(section)


@pytest.mark.parametrize("lbz", [None, 0])
def test_weight_section_without_lbz(lbz: int | None) -> None:
    fm = FloatModel.split(_weighted_model())
    sizes = weight_section(100, 50, lbz, fm)["sizes"]
    assert sizes == {"float_onnx_bytes": 100, "compressed_onnx_bytes": 50}


def test_weight_section_of_model_without_weights() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    fm = FloatModel.split(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    section = weight_section(10, 10, None, fm)
    assert section["layers"] == [] and section["weight_sparsity"] == 0.0
