"""``lowbit quantize --mode weight-only`` on the command line, run in-process through
``lowbit.cli.main``: writes the model and OUT.report.json, rejects bad options with exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from lowbit import models
from lowbit.backends.torch.export import export_module
from lowbit.cli import main

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokens(rng: np.random.Generator, n: int, t: int) -> np.ndarray:
    out = np.empty((n, t), dtype=np.int64)
    for i in range(n):
        out[i] = np.resize(rng.integers(0, VOCAB, int(rng.integers(2, 9))), t)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """gpt.onnx (tiny_gpt, random weights, dynamic batch/sequence) and calib.npz of token ids."""
    d = tmp_path_factory.mktemp("cli_weight_only")
    torch.manual_seed(0)
    module = models.tiny_gpt(vocab=VOCAB, d_model=64, heads=4, layers=2)
    rng = np.random.default_rng(0)
    onnx.save(export_module(module, _tokens(rng, 2, 16), dynamic_dims=(0, 1)), str(d / "gpt.onnx"))
    np.savez(d / "calib.npz", input=_tokens(rng, 48, 33))
    return {"dir": d, "model": d / "gpt.onnx", "data": d / "calib.npz"}


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _quantize_args(work, out: Path, *extra: object) -> list[object]:
    return ["quantize", work["model"], "-o", out, "--data", work["data"], "--mode", "weight-only",
            *extra]


def _logits(model: str | Path | onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": ids})[0]


def test_weight_only_gptq_writes_model_and_report(work, capsys, tmp_path):
    out = tmp_path / "gpt.int4.onnx"
    rc, stdout, err = run_cli(capsys, *_quantize_args(work, out, "--bits", 4, "--group-size", 32,
                                                      "--algorithm", "gptq", "--quiet"))
    assert rc == 0, err
    assert out.is_file() and (tmp_path / "gpt.int4.onnx.report.json").is_file()
    report = json.loads((tmp_path / "gpt.int4.onnx.report.json").read_text())
    wo = report["weight_only"]
    assert (wo["bits"], wo["group_size"], wo["algorithm"], wo["symmetric"]) == (4, 32, "gptq", True)
    assert report["calibration"]["samples"] > 0
    assert report["output"]["size_bytes"] == out.stat().st_size
    assert out.stat().st_size <= 0.25 * work["model"].stat().st_size
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 9
    ids = _tokens(np.random.default_rng(5), 3, 11)
    ref, got = _logits(work["model"], ids), _logits(out, ids)
    cos = np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    assert float(np.mean(cos)) > 0.98


def test_json_output_is_the_report(work, capsys, tmp_path):
    out = tmp_path / "m.onnx"
    rc, stdout, err = run_cli(capsys, *_quantize_args(work, out, "--bits", 4, "--group-size", 64,
                                                      "--json"))
    assert rc == 0, err
    printed = json.loads(stdout)
    assert printed["weight_only"]["group_size"] == 64
    assert printed["weight_only"] == json.loads((tmp_path / "m.onnx.report.json").read_text())["weight_only"]


def test_asymmetric_hqq_and_bits_3(work, capsys, tmp_path):
    for name, extra in [("asym", ("--bits", 4, "--group-size", 32, "--asymmetric")),
                        ("hqq", ("--bits", 4, "--group-size", 32, "--algorithm", "hqq")),
                        ("b3", ("--bits", 3, "--group-size", 32))]:
        folder = tmp_path / name
        folder.mkdir()
        out = folder / "m.onnx"
        rc, _, err = run_cli(capsys, *_quantize_args(work, out, *extra, "--quiet"))
        assert rc == 0, (name, err)
        model = onnx.load(str(out))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(len(n.input) >= 4 and n.input[3] for n in nbits), \
            f"{name}: zero points must be written"
        report = json.loads((folder / "m.onnx.report.json").read_text())
        assert report["weight_only"]["symmetric"] is False or name == "b3"
        assert report["weight_only"]["bits"] == (3 if name == "b3" else 4)


@pytest.mark.parametrize("level", [0, 4])
def test_accuracy_level_options_both_run(work, capsys, tmp_path, level):
    out = tmp_path / f"acc{level}.onnx"
    rc, _, err = run_cli(capsys, *_quantize_args(work, out, "--bits", 4, "--group-size", 32,
                                                 "--accuracy-level", level, "--quiet"))
    assert rc == 0, err
    model = onnx.load(str(out))
    levels = {helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {level}
    report = json.loads((tmp_path / f"acc{level}.onnx.report.json").read_text())
    assert report["weight_only"]["accuracy_level"] == level


@pytest.mark.parametrize(("extra", "option"), [
    (("--algorithm", "bogus"), r"algorithm"),
    (("--group-size", 48), r"group[-_]size"),
    (("--bits", 1), r"bits"),
    (("--bits", 9), r"bits"),
    (("--accuracy-level", 7), r"accuracy[-_]level"),
], ids=["algorithm", "group-size", "bits-1", "bits-9", "accuracy-level"])
def test_bad_options_exit_2_naming_the_option_and_write_nothing(work, capsys, tmp_path, extra, option):
    out = tmp_path / "m.onnx"
    rc, stdout, err = run_cli(capsys, *_quantize_args(work, out, *extra, "--quiet"))
    assert rc == 2, (stdout, err)
    assert re.search(option, err), err
    assert "Traceback" not in err and "internal error" not in err
    assert list(tmp_path.iterdir()) == [], "nothing may be left behind"


def test_bits_4_without_weight_only_mode_exits_2(work, capsys, tmp_path):
    out = tmp_path / "m.onnx"
    rc, _, err = run_cli(capsys, "quantize", work["model"], "-o", out, "--data", work["data"],
                         "--bits", 4, "--quiet")
    assert rc == 2 and "bits" in err and "weight-only" in err
    assert list(tmp_path.iterdir()) == []


def test_token_ids_outside_the_vocabulary_exit_2(work, capsys, tmp_path):
    ids = np.load(work["data"])["input"].copy()
    ids[0, 0] = VOCAB + 3
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=ids)
    out = tmp_path / "m.onnx"
    rc, _, err = run_cli(capsys, "quantize", work["model"], "-o", out, "--data", bad,
                         "--mode", "weight-only", "--bits", 4, "--group-size", 32, "--quiet")
    assert rc == 2 and "'input'" in err and str(VOCAB + 3) in err
    assert not out.exists() and not (tmp_path / "m.onnx.report.json").exists()


@pytest.mark.parametrize("args", [
    ["--mode", "weight-only", "--calibration", "mse"],
    ["--mode", "weight-only", "--strict"],
    ["--mode", "static", "--group-size", "64"],
    ["--mode", "auto", "--asymmetric"],
    ["--plan", "plan.json", "--mode", "dynamic"],
])
def test_regression_options_that_do_not_apply_are_refused(tmp_path, capsys, args):
    """The CLI used to ignore options of the other mode (or all of them with --plan)."""
    rc = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
               "--data", str(tmp_path / "d.npz"), *args])
    assert rc == 2
    assert "does not apply" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
