"""More bad input: external weight files, odd output names, models lowbit cannot handle,
plan files, empty and repeated options, stray data arrays, API type errors, warnings that
must be said, and SIGTERM. A refusal is exit 2 naming the culprit, inputs byte-identical
and no new file."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError, ValidationError

OPSET = [helper.make_opsetid("", 17)]
F = TensorProto.FLOAT


def _vi(name: str, shape: list, dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _init(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> None:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=OPSET), str(path))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("more_src")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    gemms = [helper.make_node("Gemm", [a, f"w{i}", f"b{i}"], [b], name=f"fc{i}", transB=1)
             for i, (a, b) in enumerate((("x", "h0"), ("h0", "h1"), ("h1", "y")))]
    _save(d / "m.onnx", gemms, [_vi("x", ["n", 16])], [_vi("y", ["n", 4])],
          [t for i, k in enumerate((16, 16, 4))
           for t in (_init(rng, f"w{i}", k, 16), _init(rng, f"b{i}", k))])
    np.savez(d / "d.npz", x=x, y=y)
    np.savez(d / "extra.npz", x=x, y=y, z=x)
    np.savez(d / "upper.npz", x=x, Y=y)
    # Conv only
    _save(d / "conv.onnx", [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
          [_vi("x", ["n", 1, 8, 8])], [_vi("y", ["n", 4, 8, 8])], [_init(rng, "w", 4, 1, 3, 3)])
    np.savez(d / "conv.npz", x=rng.standard_normal((20, 1, 8, 8)).astype(np.float32))
    # token ids into a 50-row embedding
    tok = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
           helper.make_node("ReduceMean", ["e"], ["r"], axes=[1], keepdims=0),
           helper.make_node("Gemm", ["r", "w", "b"], ["y"], name="head", transB=1)]
    _save(d / "tok.onnx", tok, [_vi("ids", ["n", 6], TensorProto.INT64)], [_vi("y", ["n", 4])],
          [_init(rng, "emb", 50, 8), _init(rng, "w", 4, 8), _init(rng, "b", 4)])
    np.savez(d / "tok.npz", ids=rng.integers(0, 100, (20, 6)).astype(np.int64))
    # no outputs; no (non-initializer) inputs
    _save(d / "noout.onnx", [helper.make_node("Gemm", ["x", "w0"], ["y"], transB=1)],
          [_vi("x", ["n", 16])], [], [_init(rng, "w0", 4, 16)])
    _save(d / "noin.onnx", [helper.make_node("Relu", ["w0"], ["y"])], [_vi("w0", [4, 16])],
          [_vi("y", [4, 16])], [_init(rng, "w0", 4, 16)])
    # an If with subgraphs after a Gemm
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [], [_vi("t", ["n", 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [], [_vi("e", ["n", 4])])
    _save(d / "if.onnx", [helper.make_node("Gemm", ["x", "w0"], ["h"], name="fc", transB=1),
                          helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
          [_vi("x", ["n", 16])], [_vi("y", ["n", 4])],
          [_init(rng, "w0", 4, 16), numpy_helper.from_array(np.array(True), "c")])
    # rank-3 output
    _save(d / "rank3.onnx", [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["n", 4, 4])],
          [_vi("y", ["n", 4, 4])], [])
    np.savez(d / "rank3.npz", x=rng.standard_normal((20, 4, 4)).astype(np.float32), y=rng.integers(0, 4, 20))
    return d


@pytest.fixture
def work(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(source, w)
    monkeypatch.chdir(w)
    return w


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def refused(work: Path, capsys: pytest.CaptureFixture[str], args: list, *names: str) -> str:
    """Run the CLI, expect exit 2 naming every one of ``names`` and no file touched or made."""
    before = snapshot(work)
    rc, out, err = cli(capsys, *args)
    assert rc == 2, f"exit {rc}; stderr: {err!r}"
    assert "Traceback" not in out + err and "internal error" not in err, out + err
    for name in names:
        assert name.lower() in err.lower(), f"{name!r} not named: {err!r}"
    assert snapshot(work) == before, "a file was created or an input changed"
    return err


Q = ["quantize", "m.onnx", "--data", "d.npz"]


# 1. external data files are inputs too
def test_external_weight_file_is_never_overwritten(work, capsys):
    m = onnx.load(str(work / "m.onnx"))
    onnx.save_model(m, str(work / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    refused(work, capsys, ["quantize", "ext.onnx", "--data", "d.npz", "-o", "weights.bin"],
            "never overwrites an input")


def test_api_save_never_overwrites_an_external_weight_file(work):
    m = onnx.load(str(work / "m.onnx"))
    onnx.save_model(m, str(work / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.onnx", size_threshold=0)
    result = lowbit.prune(str(work / "ext.onnx"), sparsity=0.5)
    before = snapshot(work)
    with pytest.raises(ValidationError, match="never overwrites an input"):
        result.save(work / "weights.onnx")
    assert snapshot(work) == before


# 2. the extension's case does not change the format
def test_upper_case_lbz_is_a_real_lbz(work, capsys):
    assert cli(capsys, "compress", "m.onnx", "-o", "low.lbz", "--quiet")[0] == 0
    assert cli(capsys, "compress", "m.onnx", "-o", "X.LBZ", "--quiet")[0] == 0
    assert (work / "X.LBZ").read_bytes()[:4] == (work / "low.lbz").read_bytes()[:4] == b"LBZ\x00"
    rc, _, err = cli(capsys, "unpack", "X.LBZ", "-o", "u.onnx")
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(str(work / "u.onnx")))


# 3. file names too long for the file system
def test_a_too_long_output_name_is_refused(work, capsys):
    refused(work, capsys, ["compress", "m.onnx", "-o", "c" * 236 + ".lbz", "--quiet"], "--output", "too long")
    assert cli(capsys, "compress", "m.onnx", "-o", "c" * 196 + ".lbz", "--quiet")[0] == 0
    assert (work / ("c" * 196 + ".lbz")).is_file()


# 4. a container holding a model the ONNX checker refuses
def test_unpack_of_an_invalid_model_is_refused(work, capsys):
    from lowbit.container import encode

    graph = helper.make_graph([helper.make_node("Relu", ["missing"], ["y"])], "g",
                              [_vi("x", ["n", 4])], [_vi("y", ["n", 4])])
    (work / "bad.lbz").write_bytes(encode(helper.make_model(graph, opset_imports=OPSET)))
    refused(work, capsys, ["unpack", "bad.lbz", "-o", "u.onnx"], "bad.lbz")
    assert not (work / "u.onnx").exists()


# 5. token ids past the embedding
@pytest.mark.parametrize("args", [["eval", "tok.onnx", "--data", "tok.npz"],
                                  ["bench", "tok.onnx", "--data", "tok.npz", "--iterations", "1"],
                                  ["sensitivity", "tok.onnx", "--data", "tok.npz", "--max-bits", "5",
                                   "-o", "s.json"]], ids=["eval", "bench", "sensitivity"])
def test_token_ids_out_of_range(work, capsys, args):
    refused(work, capsys, args, "ids", "embedding")


# 6. models without outputs or inputs
@pytest.mark.parametrize("model,what", [("noout.onnx", "no outputs"), ("noin.onnx", "no inputs")])
@pytest.mark.parametrize("verb", ["quantize", "eval"])
def test_models_without_outputs_or_inputs(work, capsys, model, what, verb):
    args = [verb, model, "--data", "d.npz"] + (["-o", "out.onnx"] if verb == "quantize" else [])
    refused(work, capsys, args, model, what)


# 7. control flow
def test_subgraphs_are_refused_by_quantize_but_inspected(work, capsys):
    refused(work, capsys, ["quantize", "if.onnx", "--data", "d.npz", "-o", "out.onnx"], "subgraph")
    rc, out, err = cli(capsys, "inspect", "if.onnx")
    assert rc == 0, err


# 8. plan files
@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_dev_zero_as_plan(work):
    before = snapshot(work)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lowbit", *Q, "--plan", "/dev/zero", "-o", "out.onnx"],
                          cwd=work, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2, proc.stderr
    assert "regular file" in proc.stderr and "/dev/zero" in proc.stderr
    assert time.monotonic() - start < 20
    assert snapshot(work) == before


@pytest.mark.parametrize("text,names", [
    ("[" * 100000 + "]" * 100000, ("not valid JSON",)),
    (json.dumps({"format": "lowbit.mixed-precision/99", "layers": {"fc0": "int8"}}),
     ("lowbit.mixed-precision/99",)),
    (json.dumps({"format": "lowbit.mixed-precision/1", "layers": {}}), ("no layers",)),
], ids=["nested", "format-99", "no-layers"])
def test_bad_plan_files(work, capsys, text, names):
    (work / "p.json").write_text(text)
    refused(work, capsys, [*Q, "--plan", "p.json", "-o", "out.onnx"], "p.json", *names)


# 9. empty option values are not defaults
@pytest.mark.parametrize("args,option", [
    ([*Q, "-o", "out.onnx", "--mode", "weight-only", "--algorithm", ""], "--algorithm"),
    ([*Q, "-o", "out.onnx", "--calibration", ""], "--calibration"),
    ([*Q, "-o", "out.onnx", "--weights", ""], "--weights"),
    (["prune", "m.onnx", "-o", "out.onnx", "--nm", ""], "--nm"),
], ids=["algorithm", "calibration", "weights", "nm"])
def test_empty_values_are_refused(work, capsys, args, option):
    refused(work, capsys, args, option)


# 10. repeated options
def test_repeated_options_are_refused(work, capsys):
    refused(work, capsys, ["prune", "m.onnx", "-o", "a.onnx", "--sparsity", "0.5", "--sparsity", "0.9"],
            "--sparsity", "more than once")
    refused(work, capsys, ["prune", "m.onnx", "-o", "a.onnx", "-o", "b.onnx", "--sparsity", "0.5"],
            "--output")


def test_exclude_is_repeatable(work, capsys):
    rc, _, err = cli(capsys, *Q, "-o", "out.onnx", "--mode", "static", "--exclude", "fc0", "--exclude", "fc1",
                     "--quiet")
    assert rc == 0, err
    err = refused(work, capsys, [*Q, "-o", "o2.onnx", "--exclude", "nosuch1", "--exclude", "nosuch2"],
                  "nosuch")
    assert "more than once" not in err


# 11. stray arrays in the data
def test_unknown_data_arrays_are_named(work, capsys):
    err = refused(work, capsys, ["quantize", "m.onnx", "--data", "extra.npz", "-o", "out.onnx"], "extra.npz")
    assert re.search(r"\bz\b", err), err
    err = refused(work, capsys, ["quantize", "m.onnx", "--data", "upper.npz", "-o", "out.onnx"], "upper.npz")
    assert re.search(r"\bY\b", err), err


# 12. API type errors are LowbitErrors
def test_api_type_errors(work):
    cm = lowbit.prune("m.onnx", sparsity=0.5)
    before = snapshot(work)
    for bad in (None, 123, b"x.lbz"):
        with pytest.raises(ValidationError):
            cm.save(bad)
    assert snapshot(work) == before
    with pytest.raises(ValidationError):
        lowbit.run("m.onnx", lowbit.PruneConfig(sparsity=0.5))
    with pytest.raises(ValidationError):
        lowbit.bench("m.onnx")
    with pytest.raises(ValidationError):
        lowbit.prune("m.onnx", sparsity=0.5, layers="fc0")
    with pytest.raises(LowbitError):
        lowbit.quantize("m.onnx", [1, 2, 3])
    with pytest.raises(LowbitError):
        lowbit.evaluate(b"bytes", "d.npz")
    with pytest.raises(LowbitError):
        lowbit.inspect_model(None)
    assert snapshot(work) == before


# 13. nothing to quantize is said, not silent
def test_weight_only_on_conv_only_warns(work, capsys):
    rc, _, err = cli(capsys, "quantize", "conv.onnx", "--data", "conv.npz", "-o", "q.onnx",
                     "--mode", "weight-only", "--bits", "4", "--quiet")
    assert rc == 0, err
    report = json.loads((work / "q.onnx.report.json").read_text())
    assert any("no MatMul/Gemm layer was quantized" in w for w in report["warnings"]), report["warnings"]


def test_sensitivity_on_conv_only_has_nothing_to_plan(work, capsys):
    refused(work, capsys, ["sensitivity", "conv.onnx", "--data", "conv.npz", "--max-bits", "5",
                           "-o", "s.json"], "nothing to plan")


# 14. verifying on the calibration data is flagged
def test_eval_data_equal_to_calibration_data_warns(work, capsys):
    rc, _, err = cli(capsys, *Q, "--eval-data", "d.npz", "-o", "q.onnx", "--mode", "static", "--quiet")
    assert rc == 0, err
    warnings = json.loads((work / "q.onnx.report.json").read_text())["warnings"]
    assert any("verification data is the calibration" in w for w in warnings), warnings


def _wait_until_working(proc: subprocess.Popen, limit_s: float = 60.0) -> None:
    """Until the child has loaded ONNX Runtime or torch (after lowbit's CLI set its SIGTERM
    handler, so a busy machine cannot make the signal arrive first), then one more second."""
    maps = Path(f"/proc/{proc.pid}/maps")
    start = time.monotonic()
    while time.monotonic() - start < limit_s and proc.poll() is None:
        loaded = maps.read_text(errors="ignore") if maps.exists() else ""
        if not maps.exists() or "onnxruntime" in loaded or "libtorch" in loaded:
            break
        time.sleep(0.2)
    time.sleep(1.0)


# 15. SIGTERM leaves nothing behind
@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_writes_nothing(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 4, 2000))
    _save(tmp_path / "m.onnx", [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
          [_vi("x", ["n", 16])], [_vi("y", ["n", 4])], [_init(rng, "w", 4, 16), _init(rng, "b", 4)])
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "prune", "m.onnx", "-o", "p.onnx",
                             "--sparsity", "0.5", "--data", "d.npz", "--epochs", "5000", "--quiet"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_working(proc)
        assert proc.poll() is None, f"finished early: {proc.returncode} {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=8)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, f"exit {proc.returncode}; stderr: {err!r}"
    assert "terminated; nothing written" in err
    assert snapshot(tmp_path) == before


# 16. accuracy only for class scores
def test_eval_of_non_class_scores_says_so(work, capsys):
    rc, out, err = cli(capsys, "eval", "rank3.onnx", "--data", "rank3.npz")
    assert rc == 0, err
    assert "not class scores" in " ".join((out + err).split())
