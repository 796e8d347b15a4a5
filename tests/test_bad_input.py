"""Bad input through the CLI: exit 2, a one-line message that names the file,
tensor or option, no traceback, and nothing left behind in the output folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from lowbit.backends.torch.export import export_module
from lowbit.cli import main

# ----------------------------------------------------------------- helpers


class TinyNet(torch.nn.Module):
    def __init__(self, tail: str | None = None) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.relu(self.conv(x)).flatten(1))
        return torch.softmax(y, dim=1) if self.tail == "softmax" else y


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_refused(rc: int, out: str, err: str, *names: str) -> None:
    text = out + err
    assert rc == 2, f"exit code {rc}, expected 2; output:\n{text}"
    assert "Traceback" not in text, text
    assert "internal error" not in text, text
    for name in names:
        assert name in err, f"{name!r} not named in the error message: {err!r}"


def assert_empty(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir())
    assert left == [], f"left behind in the output folder: {left}"


RNG_SEED = 0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    rng = np.random.default_rng(RNG_SEED)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    onnx.save(export_module(TinyNet(), x[:2]), str(d / "model.onnx"))
    np.savez(d / "calib.npz", x=x, y=rng.integers(0, 10, 40))
    return {"dir": d, "model": d / "model.onnx", "data": d / "calib.npz"}


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def quantize_args(model: Path, data: Path, out_dir: Path, *extra: object) -> list[object]:
    return ["quantize", model, "-o", out_dir / "model.int8.onnx", "--data", data, *extra]


# ----------------------------------------------------------------- bad model files


def _write_bad_model(kind: str, folder: Path, good: Path) -> Path:
    if kind == "missing":
        return folder / "missing_model.onnx"
    path = folder / f"{kind}_model.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    elif kind == "text":
        path.write_text("this is a text file, not a neural network\n" * 20)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "png", "text", "folder"])
def test_bad_model_file(kind, base, tmp_path, out_dir, capsys):
    model = _write_bad_model(kind, tmp_path, base["model"])
    rc, out, err = run_cli(capsys, *quantize_args(model, base["data"], out_dir))
    assert_refused(rc, out, err, model.name)
    assert_empty(out_dir)


@pytest.mark.parametrize("verb", ["inspect", "eval", "bench"])
def test_bad_model_file_in_other_verbs(verb, base, tmp_path, capsys):
    model = _write_bad_model("truncated", tmp_path, base["model"])
    args: list[object] = [verb, model]
    if verb == "eval":
        args += ["--data", base["data"]]
    if verb == "bench":
        args = [verb, base["model"], model, "--iterations", "1"]
    rc, out, err = run_cli(capsys, *args)
    assert_refused(rc, out, err, model.name)


def test_nan_in_a_model_weight(base, tmp_path, out_dir, capsys):
    model = onnx.load(str(base["model"]))
    target = next(t for t in model.graph.initializer if t.name.endswith("weight"))
    arr = numpy_helper.to_array(target).copy()
    arr.flat[3] = np.nan
    target.CopyFrom(numpy_helper.from_array(arr, target.name))
    path = tmp_path / "nan_weight.onnx"
    onnx.save(model, str(path))
    rc, out, err = run_cli(capsys, *quantize_args(path, base["data"], out_dir))
    assert_refused(rc, out, err, path.name, target.name)
    assert "NaN" in err
    assert_empty(out_dir)


# ----------------------------------------------------------------- bad calibration data


def _write_bad_data(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """(path, the names the message must contain besides the file name)."""
    rng = np.random.default_rng(1)
    path = folder / f"{kind}_data.npz"
    good = rng.random((10, 1, 8, 8), dtype=np.float32)
    if kind == "missing":
        return path, []
    if kind == "no-arrays":
        np.savez(path)
        return path, []
    if kind == "empty-file":
        path.write_bytes(b"")
        return path, []
    if kind == "not-npz":
        path.write_text("a,b,c\n1,2,3\n")
        return path, []
    if kind == "wrong-shape":
        np.savez(path, x=rng.random((10, 3, 8, 8), dtype=np.float32))
        return path, ["input", "3"]
    if kind == "wrong-rank":
        np.savez(path, x=rng.random((10, 64), dtype=np.float32))
        return path, ["input", "rank"]
    if kind == "zero-samples":
        np.savez(path, x=np.zeros((0, 1, 8, 8), np.float32))
        return path, []
    if kind == "nan":
        good[3, 0, 2, 2] = np.nan
        np.savez(path, x=good)
        return path, ["input", "NaN"]
    if kind == "inf":
        good[5, 0, 1, 1] = -np.inf
        np.savez(path, x=good)
        return path, ["input", "inf"]
    if kind == "strings":
        np.savez(path, x=np.full((10, 1, 8, 8), "0.5"))
        return path, ["input"]
    if kind == "labels-mismatch":
        np.savez(path, x=good, y=np.zeros(7, np.int64))
        return path, ["labels"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "no-arrays", "empty-file", "not-npz", "wrong-shape",
                                  "wrong-rank", "zero-samples", "nan", "inf", "strings",
                                  "labels-mismatch"])
def test_bad_calibration_data(kind, base, tmp_path, out_dir, capsys):
    data, names = _write_bad_data(kind, tmp_path)
    rc, out, err = run_cli(capsys, *quantize_args(base["model"], data, out_dir))
    assert_refused(rc, out, err, data.name, *names)
    assert_empty(out_dir)


@pytest.mark.parametrize("which", ["calibration", "eval"])
def test_nan_in_eval_data_is_refused_too(which, base, tmp_path, out_dir, capsys):
    data, _ = _write_bad_data("nan", tmp_path)
    if which == "calibration":
        args = quantize_args(base["model"], base["data"], out_dir, "--eval-data", data)
    else:
        args = ["eval", base["model"], "--data", data]
    rc, out, err = run_cli(capsys, *args)
    assert_refused(rc, out, err, data.name, "input")
    assert_empty(out_dir)


class _Explode:
    """Unpickling this creates a marker folder: proof that the data was unpickled."""

    marker = ""

    def __reduce__(self):  # type: ignore[override]
        return (os.mkdir, (self.marker,))


def test_object_dtype_npz_is_refused_and_never_unpickled(base, tmp_path, out_dir, capsys):
    marker = tmp_path / "UNPICKLED"
    bomb = _Explode()
    bomb.marker = str(marker)
    objects = np.empty((10,), dtype=object)
    objects[:] = [bomb] * 10
    data = tmp_path / "objects.npz"
    np.savez(data, x=objects)  # pickled inside the archive (allow_pickle is the default on save)
    assert not marker.exists()
    rc, out, err = run_cli(capsys, *quantize_args(base["model"], data, out_dir))
    assert_refused(rc, out, err, data.name)
    assert "pickle" in err.lower()
    assert not marker.exists(), "lowbit unpickled the data file"
    assert_empty(out_dir)


def test_wrong_input_name_for_a_two_input_model(tmp_path, out_dir, capsys):
    rng = np.random.default_rng(2)
    sample = (rng.random((2, 4), dtype=np.float32), rng.random((2, 4), dtype=np.float32))
    model = tmp_path / "two_inputs.onnx"
    onnx.save(export_module(TwoInputs(), sample, input_names=["left", "right"]), str(model))
    data = tmp_path / "named_wrong.npz"
    np.savez(data, left=rng.random((10, 4), dtype=np.float32),
             rihgt=rng.random((10, 4), dtype=np.float32))
    rc, out, err = run_cli(capsys, *quantize_args(model, data, out_dir))
    assert_refused(rc, out, err, data.name, "right", "rihgt")
    assert_empty(out_dir)

    # the right names work (so the refusal above is about the name only)
    good = tmp_path / "named_right.npz"
    np.savez(good, left=rng.random((10, 4), dtype=np.float32),
             right=rng.random((10, 4), dtype=np.float32))
    rc, out, err = run_cli(capsys, *quantize_args(model, good, out_dir, "--quiet"))
    assert rc == 0, err


# ----------------------------------------------------------------- bad options


@pytest.mark.parametrize("option,value,names", [
    ("--mode", "bogus", ["mode", "bogus"]),
    ("--calibration", "bogus", ["calibration", "bogus"]),
    ("--max-samples", "0", ["max", "samples", "0"]),
    ("--batch", "0", ["batch", "0"]),
    ("--threads", "0", ["threads", "0"]),
])
def test_bad_option_value(option, value, names, base, out_dir, capsys):
    rc, out, err = run_cli(capsys, *quantize_args(base["model"], base["data"], out_dir,
                                                  option, value))
    assert_refused(rc, out, err, *names)
    assert_empty(out_dir)


def test_output_folder_missing(base, tmp_path, capsys):
    target = tmp_path / "no_such_folder" / "model.int8.onnx"
    rc, out, err = run_cli(capsys, "quantize", base["model"], "-o", target, "--data",
                           base["data"], "--quiet")
    assert_refused(rc, out, err, "no_such_folder")
    assert not target.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------- unsupported ops


@pytest.fixture(scope="module")
def softmax_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("softmax")
    torch.manual_seed(0)
    x = np.random.default_rng(3).random((2, 1, 8, 8), dtype=np.float32)
    path = d / "with_softmax.onnx"
    onnx.save(export_module(TinyNet(tail="softmax"), x), str(path))
    assert "Softmax" in {n.op_type for n in onnx.load(str(path)).graph.node}
    return path


def test_strict_refuses_an_unregistered_op(softmax_model, base, out_dir, capsys):
    rc, out, err = run_cli(capsys, *quantize_args(softmax_model, base["data"], out_dir,
                                                  "--strict"))
    assert_refused(rc, out, err, "Softmax", "strict")
    assert_empty(out_dir)


def test_without_strict_an_unregistered_op_stays_float_with_a_reason(softmax_model, base,
                                                                      out_dir, capsys):
    rc, out, err = run_cli(capsys, *quantize_args(softmax_model, base["data"], out_dir,
                                                  "--quiet", "--mode", "static"))
    assert rc == 0, err
    assert (out_dir / "model.int8.onnx").is_file()
    report = json.loads((out_dir / "model.int8.onnx.report.json").read_text())
    softmax = [d for d in report["nodes"]["decisions"] if d["op_type"] == "Softmax"]
    assert len(softmax) == 1
    assert softmax[0]["treatment"] == "float"
    assert "registry" in softmax[0]["reason"]
    assert report["nodes"]["counts"].get("float", 0) >= 1
    # and the output model still computes a softmax
    sess = ort.InferenceSession(str(out_dir / "model.int8.onnx"),
                                providers=["CPUExecutionProvider"])
    x = np.load(base["data"])["x"][:4]
    probs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


# ----------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("failure", ["nan-data", "bad-model", "bad-option"])
def test_failed_quantize_leaves_existing_output_untouched(failure, base, tmp_path, out_dir,
                                                          capsys):
    existing = out_dir / "model.int8.onnx"
    existing.write_bytes(b"OLD MODEL BYTES")
    old_report = out_dir / "model.int8.onnx.report.json"
    old_report.write_text('{"old": true}\n')
    model, data, extra = base["model"], base["data"], []
    if failure == "nan-data":
        data, _ = _write_bad_data("nan", tmp_path)
    elif failure == "bad-model":
        model = _write_bad_model("truncated", tmp_path, base["model"])
    else:
        extra = ["--calibration", "bogus"]
    rc, out, err = run_cli(capsys, *quantize_args(model, data, out_dir, *extra))
    assert_refused(rc, out, err)
    assert existing.read_bytes() == b"OLD MODEL BYTES"
    assert old_report.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.int8.onnx", "model.int8.onnx.report.json"]


def test_successful_quantize_replaces_existing_output(base, out_dir, capsys):
    existing = out_dir / "model.int8.onnx"
    existing.write_bytes(b"OLD MODEL BYTES")
    rc, out, err = run_cli(capsys, *quantize_args(base["model"], base["data"], out_dir,
                                                  "--quiet", "--mode", "static"))
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(str(existing)))
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.int8.onnx", "model.int8.onnx.report.json"]


# ----------------------------------------------------------------- degenerate tensors


def _scales(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.endswith("_scale")}


def _assert_sane_output(path: Path, x: np.ndarray) -> None:
    scales = _scales(path)
    assert scales, "no *_scale initializers: nothing was quantized"
    for name, s in scales.items():
        assert np.all(np.isfinite(s)), f"{name} is not finite: {s}"
        assert np.all(s > 0), f"{name} is not > 0: {s}"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("mode", ["static", "auto"])
def test_all_zero_conv_weights_quantize_with_finite_scales(mode, base, tmp_path, out_dir,
                                                           capsys):
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        net.conv.weight.zero_()
        net.conv.bias.zero_()
    x = np.load(base["data"])["x"]
    model = tmp_path / "zero_conv.onnx"
    onnx.save(export_module(net, x[:2]), str(model))
    rc, out, err = run_cli(capsys, *quantize_args(model, base["data"], out_dir, "--quiet",
                                                  "--mode", mode))
    assert rc == 0, err
    assert "Traceback" not in out + err
    _assert_sane_output(out_dir / "model.int8.onnx", x[:4])


def test_constant_zero_input_quantizes_with_finite_scales(base, tmp_path, out_dir, capsys):
    data = tmp_path / "zeros.npz"
    np.savez(data, x=np.zeros((20, 1, 8, 8), np.float32))
    rc, out, err = run_cli(capsys, *quantize_args(base["model"], data, out_dir, "--quiet",
                                                  "--mode", "static"))
    assert rc == 0, err
    assert "Traceback" not in out + err
    _assert_sane_output(out_dir / "model.int8.onnx", np.zeros((3, 1, 8, 8), np.float32))
