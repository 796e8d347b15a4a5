"""verify() (checker, agreement, latency, flags) and bench/eval, on tiny Gemm classifiers built
in code."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.onnx.store import FloatModel
from lowbit.data import Dataset
from lowbit.errors import ValidationError
from lowbit.report import verify as verify_module
from lowbit.report.bench import bench_models, evaluate_model
from lowbit.report.verify import (
    MAX_ACCURACY_DROP_POINTS,
    MIN_SQNR_DB,
    MIN_TOP1_AGREEMENT,
    agreement,
    check_model,
    speed_reasons,
    verify,
)
from lowbit.runtime.latency import LatencyStats

IN, OUT, N = 12, 5, 64
QUALITY_FLAGS = {"shape", "checker", "degradation"}


def gemm_model(w: np.ndarray, b: np.ndarray, *, declared_out: int | None = None,
               metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", declared_out or w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model


@pytest.fixture(scope="module")
def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((IN, OUT)).astype(np.float32),
            (0.1 * rng.standard_normal(OUT)).astype(np.float32))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((N, IN)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(weights: tuple[np.ndarray, np.ndarray]) -> onnx.ModelProto:
    return gemm_model(*weights)


@pytest.fixture(scope="module")
def permuted(weights: tuple[np.ndarray, np.ndarray]) -> onnx.ModelProto:
    """The classes rotated by one: nearly every arg-max changes."""
    w, b = weights
    perm = np.roll(np.arange(OUT), 1)
    return gemm_model(np.ascontiguousarray(w[:, perm]), np.ascontiguousarray(b[perm]))


def _logits(weights: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    w, b = weights
    return x.astype(np.float64) @ w + b


def _kinds(result: dict) -> list[str]:
    return [f["kind"] for f in result["flags"]]


# ------------------------------------------------------------------ verify


def test_model_against_itself(reference: onnx.ModelProto, x: np.ndarray) -> None:
    result = verify(reference, reference, Dataset({"x": x}, source="holdout.npz"), iterations=5,
                    batch=4)
    assert result["checker"] == "passed"
    ag = result["agreement"]
    assert ag["samples"] == N
    assert ag["top1_agreement"] == 1.0
    assert ag["sqnr_db"] >= 100.0
    assert ag["cosine"] == pytest.approx(1.0)
    assert ag["source"] == "holdout.npz"
    assert "accuracy" not in ag  # no labels
    lat = result["latency"]
    assert (lat["batch"], lat["threads"]) == (4, 1)
    for side in ("float", "compressed"):
        assert lat[side]["iterations"] >= 5
        assert lat[side]["batch"] == 4
        assert lat[side]["p50_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["float"]["p50_ms"] / lat["compressed"]["p50_ms"],
                                           rel=0.01, abs=0.002)
    assert result["runtime_ops"].get("Gemm") == 1
    assert not QUALITY_FLAGS & set(_kinds(result))
    json.dumps(result)


def test_permuted_model_is_flagged_as_degraded(reference: onnx.ModelProto,
                                               permuted: onnx.ModelProto, x: np.ndarray,
                                               weights: tuple[np.ndarray, np.ndarray]) -> None:
    result = verify(reference, permuted, Dataset({"x": x}), iterations=5)
    assert result["checker"] == "passed"
    ag = result["agreement"]
    ref = _logits(weights, x)
    perm = np.roll(np.arange(OUT), 1)
    expected_top1 = float(np.mean(ref.argmax(1) == ref[:, perm].argmax(1)))
    assert ag["top1_agreement"] == pytest.approx(expected_top1)
    assert ag["top1_agreement"] < MIN_TOP1_AGREEMENT
    assert ag["sqnr_db"] < MIN_SQNR_DB
    degradation = [f["message"] for f in result["flags"] if f["kind"] == "degradation"]
    assert any("top-1 agreement" in m for m in degradation)
    assert any("SQNR" in m for m in degradation)
    assert "shape" not in _kinds(result) and "checker" not in _kinds(result)


def test_small_perturbation_is_not_flagged(reference: onnx.ModelProto, x: np.ndarray,
                                           weights: tuple[np.ndarray, np.ndarray]) -> None:
    w, b = weights
    noisy = gemm_model(w + np.float32(1e-4) * np.sign(w), b)
    result = verify(reference, noisy, Dataset({"x": x}), iterations=5)
    ag = result["agreement"]
    assert MIN_SQNR_DB < ag["sqnr_db"] < 200.0
    assert ag["top1_agreement"] >= MIN_TOP1_AGREEMENT
    assert "degradation" not in _kinds(result)


def test_accuracy_with_labels_gives_drop_points(reference: onnx.ModelProto,
                                                permuted: onnx.ModelProto, x: np.ndarray,
                                                weights: tuple[np.ndarray, np.ndarray]) -> None:
    ref = _logits(weights, x)
    labels = ref.argmax(1).astype(np.int64)
    labels[:8] = (labels[:8] + 1) % OUT  # float accuracy 56/64
    perm = np.roll(np.arange(OUT), 1)
    acc_f = float(np.mean(ref.argmax(1) == labels))
    acc_q = float(np.mean(ref[:, perm].argmax(1) == labels))
    result = verify(reference, permuted, Dataset({"x": x}, labels), iterations=5)
    acc = result["agreement"]["accuracy"]
    assert acc["float"] == pytest.approx(acc_f, abs=1e-6)
    assert acc["compressed"] == pytest.approx(acc_q, abs=1e-6)
    assert acc["drop_points"] == pytest.approx(100 * (acc_f - acc_q), abs=1e-3)
    assert acc["drop_points"] > MAX_ACCURACY_DROP_POINTS
    assert any("accuracy dropped" in f["message"] for f in result["flags"])

    same = verify(reference, reference, Dataset({"x": x}, labels), iterations=5)
    assert same["agreement"]["accuracy"]["drop_points"] == 0.0
    assert not any("accuracy" in f["message"] for f in same["flags"])


def test_without_holdout_a_collapse_is_flagged_on_synthetic_inputs(
        reference: onnx.ModelProto, permuted: onnx.ModelProto) -> None:
    result = verify(reference, permuted, None, iterations=5, batch=3)
    assert result["agreement"]["source"].startswith("synthetic")
    assert result["agreement"]["samples"] == verify_module.SYNTHETIC_SAMPLES
    assert result["checker"] == "passed"
    assert result["latency"]["batch"] == 3
    assert result["latency"]["float"]["iterations"] >= 5
    assert result["latency"]["compressed"]["iterations"] >= 5
    # every arg-max moved: a collapse, flagged and called a synthetic-input check
    flags = [f for f in result["flags"] if f["kind"] == "degradation"]
    assert len(flags) == 1 and "synthetic inputs" in flags[0]["message"]


def test_without_holdout_a_small_change_is_not_flagged(reference: onnx.ModelProto,
                                                      weights) -> None:
    """On random inputs only a collapse counts: a 1% weight change is no alarm."""
    w, b = weights
    rng = np.random.default_rng(3)
    nudged = gemm_model((w * (1 + 0.01 * rng.standard_normal(w.shape))).astype(np.float32), b)
    result = verify(reference, nudged, None, iterations=5, batch=3)
    assert not QUALITY_FLAGS & set(_kinds(result))
    assert result["agreement"]["cosine"] > 0.99


def test_without_holdout_times_on_seeded_synthetic_feed(reference: onnx.ModelProto,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict[str, np.ndarray]]] = []

    def fake_measure(sessions, feeds, **kw):
        seen.append(feeds)
        return [LatencyStats(1.0, 1.0, 1.0, kw["batch"], kw["threads"], 5)] * len(sessions)

    monkeypatch.setattr(verify_module, "measure_side_by_side", fake_measure)
    verify(reference, reference, None, batch=6)
    verify(reference, reference, None, batch=6)
    (f1, q1), (f2, _) = seen
    assert f1["x"].shape == (6, IN) and f1["x"].dtype == np.float32
    np.testing.assert_array_equal(f1["x"], q1["x"])  # both models get the same input
    np.testing.assert_array_equal(f1["x"], f2["x"])  # seeded: the same every run
    assert np.std(f1["x"]) > 0


def test_float_model_may_be_a_split_float_model(reference: onnx.ModelProto, x: np.ndarray) -> None:
    fm = FloatModel.split(reference, min_bytes=1)
    assert fm.weights  # the weights really live outside the proto
    result = verify(fm, reference, Dataset({"x": x}), iterations=5)
    assert result["agreement"]["top1_agreement"] == 1.0
    assert result["agreement"]["sqnr_db"] >= 100.0


def test_checker_failure_is_flagged(reference: onnx.ModelProto, x: np.ndarray,
                                    weights: tuple[np.ndarray, np.ndarray]) -> None:
    # declares 7 classes where Gemm makes 5: strict shape inference objects, ORT still runs it
    bad = gemm_model(*weights, declared_out=OUT + 2)
    result = verify(reference, bad, Dataset({"x": x}), iterations=5)
    assert result["checker"].startswith("failed: ")
    assert any(f["kind"] == "checker" for f in result["flags"])
    assert result["agreement"]["top1_agreement"] == 1.0


def test_output_shape_mismatch_is_flagged(reference: onnx.ModelProto, x: np.ndarray,
                                          weights: tuple[np.ndarray, np.ndarray]) -> None:
    w, b = weights
    fewer = gemm_model(np.ascontiguousarray(w[:, :3]), np.ascontiguousarray(b[:3]))
    result = verify(reference, fewer, Dataset({"x": x}), iterations=5)
    assert "shape" in _kinds(result)


def _fixed_speed(monkeypatch: pytest.MonkeyPatch, float_ms: float, compressed_ms: float) -> None:
    def fake_measure(sessions, feeds, **kw):
        return [LatencyStats(t, t, t, kw["batch"], kw["threads"], 5)
                for t in (float_ms, compressed_ms)]

    monkeypatch.setattr(verify_module, "measure_side_by_side", fake_measure)


def test_not_faster_flag_names_the_kept_float_layers(reference: onnx.ModelProto,
                                                     weights: tuple[np.ndarray, np.ndarray],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    decisions = [{"name": "fc", "op_type": "Gemm", "treatment": "float", "reason": "too sensitive"}]
    compressed = gemm_model(*weights, metadata={"lowbit.decisions": json.dumps(decisions)})
    _fixed_speed(monkeypatch, 1.0, 2.0)
    result = verify(reference, compressed, None, batch=2)
    assert result["latency"]["speedup"] == 0.5
    (msg,) = [f["message"] for f in result["flags"] if f["kind"] == "not_faster"]
    assert "0.50x at batch 2" in msg
    assert "fc: too sensitive" in msg


def test_faster_model_is_not_flagged(reference: onnx.ModelProto,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed_speed(monkeypatch, 2.0, 1.0)
    result = verify(reference, reference, None)
    assert result["latency"]["speedup"] == 2.0
    assert result["flags"] == []


# --------------------------------------------------------------- helpers


def test_check_model(reference: onnx.ModelProto) -> None:
    assert check_model(reference) == "passed"
    broken = onnx.ModelProto()
    broken.CopyFrom(reference)
    broken.graph.node[0].input[0] = "nowhere"
    status = check_model(broken)
    assert status.startswith("failed: ") and "\n" not in status
    assert len(status) <= len("failed: ") + 300


def test_agreement_direct() -> None:
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
    app = ref.copy()
    app[3] = [3.0, 2.0, 0.0]  # one arg-max flips
    labels = np.array([0, 1, 2, 0])
    out = agreement([ref], [app], labels)
    assert out["samples"] == 4
    assert out["top1_agreement"] == 0.75
    assert out["accuracy"] == {"float": 0.75, "compressed": 1.0, "drop_points": -25.0}
    noise = float(np.sum((ref - app) ** 2))
    assert out["sqnr_db"] == pytest.approx(10 * np.log10(float(np.sum(ref**2)) / noise), abs=1e-3)
    assert 0 < out["cosine"] < 1
    assert "accuracy" not in agreement([ref], [app], None)


def test_agreement_averages_sqnr_over_outputs_and_skips_top1_for_non_scores() -> None:
    a = np.arange(1.0, 9.0).reshape(8, 1)
    out = agreement([a, a], [a, a * 1.1], None)
    single = 10 * np.log10(float(np.sum(a**2)) / float(np.sum((0.1 * a) ** 2)))
    assert out["sqnr_db"] == pytest.approx((200.0 + single) / 2, abs=1e-3)
    assert out["top1_agreement"] is None  # one column is not class scores


def test_speed_reasons_conv_integer_and_bad_metadata() -> None:
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="ci")], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2, 2, 2])],
        [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.uint8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="lowbit.decisions", value="{not json")
    reasons = speed_reasons(model)
    assert any("1 Conv(s)" in r and "ConvInteger" in r for r in reasons)
    assert not any("stay in float" in r for r in reasons)


def test_speed_reasons_counts_only_float_weighted_ops(weights: tuple[np.ndarray, np.ndarray]) -> None:
    decisions = [
        {"name": "a", "op_type": "MatMul", "treatment": "float", "reason": "excluded"},
        {"name": "b", "op_type": "Softmax", "treatment": "float", "reason": "no kernel"},
        {"name": "c", "op_type": "Conv", "treatment": "int8-static", "reason": "static"},
        {"name": "d", "op_type": "Conv", "treatment": "float", "reason": "sensitive"},
    ]
    model = gemm_model(*weights, metadata={"lowbit.decisions": json.dumps(decisions)})
    (kept,) = [r for r in speed_reasons(model) if "stay in float" in r]
    assert kept.startswith("2 Conv/Gemm/MatMul op(s)")
    assert "a: excluded" in kept
    assert not any("ConvInteger" in r for r in speed_reasons(model))


# ------------------------------------------------------------ bench / eval


def _labels(weights: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    labels = _logits(weights, x).argmax(1).astype(np.int64)
    labels[:8] = (labels[:8] + 1) % OUT  # the reference model gets 56/64 right
    return labels


@pytest.fixture
def model_files(tmp_path, reference: onnx.ModelProto, permuted: onnx.ModelProto):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(reference, str(a))
    big = onnx.ModelProto()
    big.CopyFrom(permuted)
    big.doc_string = "x" * 3000  # a larger file with the same graph
    onnx.save(big, str(b))
    return a, b


def test_bench_models_rows(model_files, x: np.ndarray,
                           weights: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = model_files
    labels = _labels(weights, x)
    result = bench_models([a, b], data=(x, labels), batch=4, iterations=5)
    assert (result["batch"], result["threads"]) == (4, 1)
    assert {"cpu", "onnxruntime", "lowbit"} <= set(result["environment"])
    first, second = result["models"]
    assert [first["model"], second["model"]] == [str(a), str(b)]
    size_a, size_b = a.stat().st_size, b.stat().st_size
    assert (first["size_bytes"], second["size_bytes"]) == (size_a, size_b)
    assert first["size_ratio_vs_first"] == 1.0 and first["speedup_vs_first"] == 1.0
    assert second["size_ratio_vs_first"] == round(size_a / size_b, 3) < 1.0
    expected_speedup = first["latency"]["p50_ms"] / second["latency"]["p50_ms"]
    # p50s in the rows are rounded to 0.1 us; the ratio was taken before rounding
    assert second["speedup_vs_first"] == pytest.approx(expected_speedup, rel=0.05, abs=0.002)
    for row in (first, second):
        assert row["latency"]["iterations"] >= 5 and row["latency"]["batch"] == 4
    ref = _logits(weights, x)
    perm = np.roll(np.arange(OUT), 1)
    assert first["accuracy"] == pytest.approx(56 / 64)
    assert second["accuracy"] == pytest.approx(float(np.mean(ref[:, perm].argmax(1) == labels)))
    json.dumps(result)


def test_bench_without_data_uses_synthetic_inputs(model_files) -> None:
    a, _ = model_files
    result = bench_models([a], iterations=5, batch=2)
    (row,) = result["models"]
    assert "accuracy" not in row
    assert row["latency"]["batch"] == 2 and row["speedup_vs_first"] == 1.0


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"threads": 0}, {"iterations": 0}])
def test_bench_refuses_bad_options(model_files, kwargs: dict) -> None:
    with pytest.raises(ValidationError, match=next(iter(kwargs))):
        bench_models([model_files[0]], **kwargs)


def test_bench_needs_a_model() -> None:
    with pytest.raises(ValidationError, match="at least one model"):
        bench_models([])


def test_evaluate_model_accuracy_and_shapes(model_files, reference: onnx.ModelProto,
                                            x: np.ndarray,
                                            weights: tuple[np.ndarray, np.ndarray]) -> None:
    labels = _labels(weights, x)
    by_path = evaluate_model(model_files[0], {"x": x, "y": labels})
    assert by_path == {"samples": N, "output_shapes": [[N, OUT]], "accuracy": pytest.approx(56 / 64)}
    by_proto = evaluate_model(reference, (x, labels))
    assert by_proto["accuracy"] == pytest.approx(56 / 64)
    permuted_acc = evaluate_model(model_files[1], (x, labels))["accuracy"]
    assert permuted_acc < by_path["accuracy"]
    without_labels = evaluate_model(reference, x[:10])
    assert without_labels == {"samples": 10, "output_shapes": [[10, OUT]]}


def test_without_holdout_a_miss_short_of_a_collapse_is_unverified(reference: onnx.ModelProto,
                                                                  weights) -> None:
    """Agreement below the real-data target but no collapse: quality unknown, said so."""
    w, b = weights
    rng = np.random.default_rng(4)
    noisy = gemm_model((w + 0.35 * np.std(w) * rng.standard_normal(w.shape)).astype(np.float32), b)
    result = verify(reference, noisy, None, iterations=5, batch=3)
    ag = result["agreement"]
    assert verify_module.COLLAPSE_TOP1_AGREEMENT <= ag["top1_agreement"] < 0.98, ag
    assert _kinds(result).count("unverified") == 1 and "degradation" not in _kinds(result)


def test_top1_agreement_only_for_class_scores(reference: onnx.ModelProto, x: np.ndarray) -> None:
    """A normalised embedding's arg-max means nothing: no top-1 agreement for it."""
    from lowbit.backends.onnx.graph import outputs_class_scores

    embedding = onnx.helper.make_model(onnx.helper.make_graph(
        [*reference.graph.node,
         onnx.helper.make_node("ReduceL2", [reference.graph.output[0].name], ["n"], keepdims=1),
         onnx.helper.make_node("Div", [reference.graph.output[0].name, "n"], ["e"])],
        "emb", list(reference.graph.input),
        [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["b", OUT])],
        list(reference.graph.initializer)), opset_imports=list(reference.opset_import))
    assert outputs_class_scores(reference) and not outputs_class_scores(embedding)
    data = Dataset({"x": x})
    assert verify(reference, reference, data, iterations=5)["agreement"]["top1_agreement"] == 1.0
    ag = verify(embedding, embedding, data, iterations=5)["agreement"]
    assert ag["top1_agreement"] is None and ag["cosine"] > 0.9999
