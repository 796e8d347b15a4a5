"""The ``lowbit`` command line, run in-process through ``lowbit.cli.main`` (plus
a couple of real ``python -m lowbit`` subprocesses)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lowbit.cli as cli
from lowbit.backends.torch.export import export_module
from lowbit.cli import main

VERBS = ["quantize", "bench", "eval", "inspect", "demo"]


# ----------------------------------------------------------------- helpers


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def float_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float CNN, labelled data, and a static INT8 version of the model."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    model = export_module(TinyNet(), x[:2])
    onnx.save(model, str(d / "m.onnx"))
    # labels = the float model's own prediction for half the samples, so the
    # accuracy is a known number that is neither 0 nor 1.
    pred = float_outputs(d / "m.onnx", x).argmax(1)
    y = pred.copy()
    y[::2] = (pred[::2] + 1) % 10
    np.savez(d / "data.npz", x=x, y=y)
    np.savez(d / "nolabels.npz", x=x)
    rc = main(["quantize", str(d / "m.onnx"), "-o", str(d / "m.int8.onnx"), "--data",
               str(d / "data.npz"), "--mode", "static", "--quiet"])
    assert rc == 0
    return {"dir": d, "model": d / "m.onnx", "data": d / "data.npz",
            "nolabels": d / "nolabels.npz", "int8": d / "m.int8.onnx",
            "x": x, "y": y}  # type: ignore[dict-item]


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide console so rich tables are not cut in the captured output."""
    monkeypatch.setattr(cli.out_console, "width", 240)


# ----------------------------------------------------------------- quantize


def test_quantize_writes_model_report_and_table(work, tmp_path, capsys, wide):
    out = tmp_path / "q.int8.onnx"
    rc, stdout, stderr = run_cli(capsys, "quantize", work["model"], "-o", out,
                                 "--data", work["data"], "--mode", "static")
    assert rc == 0, stderr
    assert out.is_file() and out.stat().st_size > 0
    report_path = tmp_path / "q.int8.onnx.report.json"
    assert report_path.is_file()
    report = json.loads(report_path.read_text())
    assert report["output"]["path"] == str(out)
    assert report["output"]["size_bytes"] == out.stat().st_size
    assert "verification" in report and "latency" in report["verification"]
    assert report["verification"]["checker"] == "passed"
    # the written model is a valid ONNX file that holds INT8 (QDQ) nodes and runs
    qmodel = onnx.load(str(out))
    onnx.checker.check_model(qmodel)
    ops = {n.op_type for n in qmodel.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    got = float_outputs(out, work["x"][:4])
    assert got.shape == (4, 10) and np.all(np.isfinite(got))
    # the human-readable table
    assert "speedup" in stdout
    assert "size on disk" in stdout
    assert "report.json" in stdout
    assert "Traceback" not in stdout + stderr
    # nothing else (no temp file) in the output folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.int8.onnx", "q.int8.onnx.report.json"]


def test_quantize_json_prints_parseable_report(work, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    rc, stdout, stderr = run_cli(capsys, "quantize", work["model"], "-o", out,
                                 "--data", work["data"], "--mode", "static", "--json")
    assert rc == 0, stderr
    report = json.loads(stdout)  # stdout is exactly the JSON report, no table
    ver = report["verification"]
    assert set(ver) >= {"checker", "agreement", "latency", "flags"}
    assert isinstance(ver["flags"], list)
    assert ver["latency"]["speedup"] > 0
    assert 0.0 <= ver["agreement"]["top1_agreement"] <= 1.0
    assert report["tool"] == "lowbit quantize"
    # the same report as the one written to disk
    on_disk = json.loads((tmp_path / "q.onnx.report.json").read_text())
    assert on_disk["nodes"] == report["nodes"]
    assert on_disk["verification"]["flags"] == ver["flags"]


def test_quantize_quiet_prints_no_table(work, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    rc, stdout, stderr = run_cli(capsys, "quantize", work["model"], "-o", out,
                                 "--data", work["data"], "--mode", "static", "--quiet")
    assert rc == 0, stderr
    assert out.is_file() and (tmp_path / "q.onnx.report.json").is_file()
    assert stdout.strip() == ""
    assert "speedup" not in stdout + stderr


def test_require_exit_code_follows_the_report_flags(work, tmp_path, capsys):
    """Whether a tiny model is faster in INT8 depends on the machine: exit 1 iff flagged."""
    out = tmp_path / "q.onnx"
    rc, stdout, stderr = run_cli(capsys, "quantize", work["model"], "-o", out,
                                 "--data", work["data"], "--require", "--json")
    report = json.loads(stdout)
    flags = report["verification"]["flags"]
    assert rc == (1 if flags else 0), (rc, flags, stderr)
    if flags:
        assert "--require" in stderr
        for f in flags:
            assert f["kind"] in stderr
    # the model and report are written either way
    assert out.is_file() and (tmp_path / "q.onnx.report.json").is_file()
    assert "Traceback" not in stdout + stderr


def _degrading_model(d: Path) -> tuple[Path, Path]:
    """Gemm whose input has a constant 1000 in a feature with zero weight: the
    per-tensor UINT8 input scale (~4) wipes out the 0..0.01 features that matter."""
    rng = np.random.default_rng(1)
    w = np.zeros((4, 16), np.float32)
    w[:, 1:] = rng.standard_normal((4, 15)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="gemm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(d / "deg.onnx"))
    x = rng.random((40, 16), dtype=np.float32) * 0.01
    x[:, 0] = 1000.0
    np.savez(d / "deg.npz", x=x)
    return d / "deg.onnx", d / "deg.npz"


def test_require_fails_with_exit_1_on_a_degradation(tmp_path, capsys):
    model, data = _degrading_model(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["quantize", model, "-o", out_dir / "deg.int8.onnx", "--data", data,
            "--mode", "static", "--calibration", "minmax", "--quiet"]
    rc, stdout, stderr = run_cli(capsys, *args)
    assert rc == 0, stderr  # flags alone are not an error
    flags = json.loads((out_dir / "deg.int8.onnx.report.json").read_text())["verification"]["flags"]
    assert "degradation" in {f["kind"] for f in flags}

    rc, stdout, stderr = run_cli(capsys, *args, "--require")
    assert rc == 1
    assert "--require" in stderr and "degradation" in stderr
    assert "Traceback" not in stdout + stderr


# ----------------------------------------------------------------- bench / eval / inspect


def test_bench_two_models_prints_both_and_ratios(work, capsys, monkeypatch, wide):
    monkeypatch.chdir(work["dir"])
    rc, stdout, stderr = run_cli(capsys, "bench", "m.onnx", "m.int8.onnx", "--iterations", "5")
    assert rc == 0, stderr
    assert "m.onnx" in stdout and "m.int8.onnx" in stdout
    assert "speedup" in stdout and "size ratio" in stdout
    assert "1.00x" in stdout  # the first model against itself

    rc, stdout, stderr = run_cli(capsys, "bench", "m.onnx", "m.int8.onnx", "--iterations", "5",
                                 "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    rows = result["models"]
    assert [r["model"] for r in rows] == ["m.onnx", "m.int8.onnx"]
    assert rows[0]["speedup_vs_first"] == 1.0 and rows[0]["size_ratio_vs_first"] == 1.0
    assert rows[1]["speedup_vs_first"] > 0
    expected_ratio = work["model"].stat().st_size / work["int8"].stat().st_size
    assert rows[1]["size_ratio_vs_first"] == pytest.approx(expected_ratio, abs=1e-3)
    assert rows[1]["size_ratio_vs_first"] > 1.0  # INT8 is smaller
    assert all("accuracy" not in r for r in rows)  # no data, no accuracy


def test_bench_with_labelled_data_gives_accuracy(work, capsys, wide):
    rc, stdout, stderr = run_cli(capsys, "bench", work["model"], work["int8"], "--data",
                                 work["data"], "--iterations", "5", "--json")
    assert rc == 0, stderr
    rows = json.loads(stdout)["models"]
    assert len(rows) == 2
    expected = float(np.mean(float_outputs(work["model"], work["x"]).argmax(1) == work["y"]))
    assert rows[0]["accuracy"] == pytest.approx(expected)
    assert 0.0 <= rows[1]["accuracy"] <= 1.0
    assert abs(rows[1]["accuracy"] - expected) <= 0.2

    rc, stdout, stderr = run_cli(capsys, "bench", work["model"], work["int8"], "--data",
                                 work["data"], "--iterations", "5")
    assert rc == 0, stderr
    assert "accuracy" in stdout
    assert f"{100 * expected:.2f}%" in stdout


def test_eval_gives_accuracy(work, capsys):
    expected = float(np.mean(float_outputs(work["model"], work["x"]).argmax(1) == work["y"]))
    assert 0.0 < expected < 1.0
    rc, stdout, stderr = run_cli(capsys, "eval", work["model"], "--data", work["data"], "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["samples"] == 40
    assert result["accuracy"] == pytest.approx(expected)
    assert result["output_shapes"] == [[40, 10]]

    rc, stdout, stderr = run_cli(capsys, "eval", work["int8"], "--data", work["data"])
    assert rc == 0, stderr
    assert "40 samples" in stdout and "accuracy" in stdout and "%" in stdout

    rc, stdout, stderr = run_cli(capsys, "eval", work["model"], "--data", work["nolabels"])
    assert rc == 0, stderr
    assert "no labels" in stdout


def test_inspect_float_model_lists_operators(work, capsys, wide):
    rc, stdout, stderr = run_cli(capsys, "inspect", work["model"], "--json")
    assert rc == 0, stderr
    info = json.loads(stdout)
    assert info["operators"].get("Conv") == 1 and info["operators"].get("Gemm") == 1
    assert info["parameters"] == sum(p.numel() for p in TinyNet().parameters())
    assert info["quantized_by"] is None
    layers = {layer["op_type"]: layer for layer in info["layers"]}
    for op in ("Conv", "Gemm"):
        assert layers[op]["status"] == "float"
        assert layers[op]["reason"]

    rc, stdout, stderr = run_cli(capsys, "inspect", work["model"])
    assert rc == 0, stderr
    assert "operators" in stdout and "Conv" in stdout and "Gemm" in stdout
    assert "float" in stdout


def test_inspect_quantized_model_shows_int8_and_float_with_reasons(work, capsys, wide):
    rc, stdout, stderr = run_cli(capsys, "inspect", work["int8"], "--json")
    assert rc == 0, stderr
    info = json.loads(stdout)
    assert info["quantized_by"] == "lowbit"
    assert info["operators"].get("QuantizeLinear", 0) >= 1
    assert info["operators"].get("DequantizeLinear", 0) >= 1
    layers = info["layers"]
    by_op: dict[str, list[dict]] = {}
    for layer in layers:
        by_op.setdefault(layer["op_type"], []).append(layer)
    for op in ("Conv", "Gemm"):
        assert by_op.get(op), f"{op} missing from the layers"
        for layer in by_op[op]:
            assert layer["status"].startswith("int8"), layer
            assert layer["reason"], layer
            assert "int8" in layer["weight_dtypes"], layer
    # every listed layer says why it is what it is
    assert all(layer["reason"] for layer in layers)

    rc, stdout, stderr = run_cli(capsys, "inspect", work["int8"])
    assert rc == 0, stderr
    assert "int8-static" in stdout
    assert "Conv" in stdout and "Gemm" in stdout
    assert "why" in stdout


# ----------------------------------------------------------------- help / usage


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_each_verb_shows_an_example(verb, capsys, wide):
    rc, stdout, stderr = run_cli(capsys, verb, "--help")
    assert rc == 0
    assert "Example:" in stdout
    assert f"lowbit {verb}" in stdout


def test_unknown_option_exits_2(work, tmp_path, capsys):
    rc, stdout, stderr = run_cli(capsys, "quantize", work["model"], "-o", tmp_path / "x.onnx",
                                 "--data", work["data"], "--bogus")
    assert rc == 2
    assert "--bogus" in stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["quantize", "MODEL"],                                   # required -o/--data missing
    ["quantize", "MODEL", "-o", "OUT", "--data", "DATA", "--batch", "abc"],  # not an int
    ["frobnicate"],                                          # unknown verb
], ids=["missing-option", "not-an-int", "unknown-verb"])
def test_usage_errors_exit_2(args, work, tmp_path, capsys):
    subst = {"MODEL": work["model"], "OUT": tmp_path / "x.onnx", "DATA": work["data"]}
    rc, stdout, stderr = run_cli(capsys, *[subst.get(a, a) for a in args])
    assert rc == 2
    assert "Traceback" not in stdout + stderr
    assert list(tmp_path.iterdir()) == []


def _python_m_lowbit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_python_m_lowbit_help_subprocess():
    proc = _python_m_lowbit("--help")
    assert proc.returncode == 0, proc.stderr
    for verb in ("quantize", "bench", "eval", "inspect", "demo"):
        assert verb in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_python_m_lowbit_without_arguments_shows_usage_not_a_traceback():
    proc = _python_m_lowbit()
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "Usage" in proc.stdout + proc.stderr
    assert proc.returncode in (0, 2)


def test_python_m_lowbit_bad_model_subprocess(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model\n")
    proc = _python_m_lowbit("inspect", str(bad))
    assert proc.returncode == 2
    assert "notes.onnx" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------- written files


def test_written_files_respect_the_umask(work, tmp_path, capsys):
    """An atomically written model must get ordinary permissions (0666 & ~umask),
    not the 0600 of the temp file it was written through."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "q.onnx"
        rc, _, stderr = run_cli(capsys, "quantize", work["model"], "-o", out, "--data",
                                work["data"], "--mode", "static", "--quiet")
    finally:
        os.umask(old)
    assert rc == 0, stderr
    for path in (out, tmp_path / "q.onnx.report.json"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o644, f"{path.name} has mode {oct(mode)}, expected 0o644"
