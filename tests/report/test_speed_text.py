"""Speed ratios in reports never round a slowdown to "1.00x", and the verification's flags
are in the report's one list of warnings (issue 12 §5)."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import lowbit
from lowbit.config import Int8Config
from lowbit.report import verify as verify_module
from lowbit.report.build import build_report
from lowbit.report.speed import speedup_text, stored_ratio
from lowbit.report.table import render_report
from lowbit.runtime.latency import LatencyStats


@pytest.mark.parametrize(("ratio", "text"), [
    (1.234, "1.23x"), (0.5, "0.50x"), (1.0, "1.00x"), (2.0, "2.00x"),
    (0.996, "0.996x"), (1.004, "1.004x"), (0.9996, "0.9996x"),
    (0.99996, "0.9999x"),  # four decimals would say 1.0000: truncated below 1
    (1.00004, "1.0000x"), (0.994, "0.99x"),
])
def test_speedup_text_shows_which_side_of_one(ratio, text):
    assert speedup_text(ratio) == text


def test_speedup_text_can_say_slower():
    assert speedup_text(0.996, say_slower=True) == "0.996x (slower)"
    assert speedup_text(1.2, say_slower=True) == "1.20x"
    assert speedup_text(float("inf")) == "infx"


def test_stored_ratio_never_stores_a_slowdown_as_one():
    assert stored_ratio(0.99996) == 0.9999
    assert stored_ratio(0.99612) == 0.9961
    assert stored_ratio(1.00004) == 1.0
    assert stored_ratio(1.23456) == 1.2346


def _render(report: dict) -> str:
    buf = io.StringIO()
    render_report(report, Console(file=buf, width=200), title="t", label="INT8")
    return buf.getvalue()


def _latency(speedup: float) -> dict:
    side = {"p50_ms": 1.0, "p90_ms": 1.0, "mean_ms": 1.0, "batch": 1, "threads": 1,
            "iterations": 5, "throughput_per_s": 1000.0}
    return {"batch": 1, "threads": 1, "float": side, "compressed": side, "speedup": speedup}


def test_table_shows_a_slowdown_with_enough_digits():
    flag = {"kind": "not_faster", "message": "the compressed model is NOT faster"}
    report = build_report(
        tool="t", name="m.onnx", input_size=1, stages=[(Int8Config().to_dict(), {})],
        sections={"candidates": {"batch": 1, "threads": 1, "candidates": [
            {"name": "auto", "speedup": 0.9961, "sqnr_db": 40.0, "kept": True}]}},
        plan=None, notes=[], warnings=["w1"], skipped={},
        verification={"checker": "passed", "latency": _latency(0.9961), "flags": [flag]},
        seconds={})
    text = _render(report)
    assert "0.996x (slower)" in text and "auto 0.996x" in text
    (row,) = [line for line in text.splitlines() if "speedup" in line]
    assert row.count("1.00x") == 1  # the float column's own, not the slowdown
    # the flag is printed once, with its kind, although it is also a warning
    assert text.count("the compressed model is NOT faster") == 1
    assert "w1" in text


def test_report_warnings_include_the_verification_flags():
    flags = [{"kind": "degradation", "message": "output SQNR is 9.0 dB (< 15.0 dB)"},
             {"kind": "not_faster", "message": "not faster (0.996x ...)"}]
    report = build_report(tool="t", name="m.onnx", input_size=1, stages=[({"kind": "x"}, {})],
                          sections={}, plan=None, notes=[], warnings=["mine"], skipped={},
                          verification={"flags": flags}, seconds={})
    assert report["warnings"] == ["mine", flags[0]["message"], flags[1]["message"]]
    assert report["verification"]["flags"] == flags  # (still there, with their kinds)
    no_verification = build_report(tool="t", name="m.onnx", input_size=1,
                                   stages=[({"kind": "x"}, {})], sections={}, plan=None,
                                   notes=[], warnings=["mine"], skipped={}, verification=None,
                                   seconds={})
    assert no_verification["warnings"] == ["mine"]


def _gemm(path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def test_a_run_reports_a_small_slowdown_in_its_warnings(tmp_path, monkeypatch):
    def slightly_slower(sessions, feeds, **kw):  # compressed 0.4% slower than float
        return [LatencyStats(t, t, t, kw["batch"], kw["threads"], 5) for t in (1.0, 1.004)]

    monkeypatch.setattr(verify_module, "measure_side_by_side", slightly_slower)
    _gemm(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32)
    qm = lowbit.quantize(str(tmp_path / "m.onnx"), x, mode="static")
    qm.save(tmp_path / "q.onnx")
    report = json.loads((tmp_path / "q.onnx.report.json").read_text())
    ver = report["verification"]
    assert ver["latency"]["speedup"] == 0.996
    (flag,) = [f for f in ver["flags"] if f["kind"] == "not_faster"]
    assert "(0.996x at batch 8" in flag["message"]
    assert flag["message"] in report["warnings"]
    assert "0.996x (slower)" in _render(report)
