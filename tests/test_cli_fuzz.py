"""Fuzzing the CLI's promise for bad input: damaged files and odd option values end in
exit 0 or 2, never 1, a traceback or an 'internal error'; a refusal writes nothing and
a success writes only its output; the inputs stay byte-identical."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lowbit.cli import main

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
OUTPUTS = {"out.onnx", "out.lbz", "out.onnx.report.json", "out.lbz.report.json", "report.json"}


class Files(dict):
    """File name -> bytes, with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of a valid model, calibration data (4 classes) and .lbz."""
    d = tmp_path_factory.mktemp("fuzz_src")
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              d / "model.onnx")
    np.savez(d / "calib.npz", x=rng.standard_normal((24, 16)).astype(np.float32),
             y=rng.integers(0, 4, 24))
    assert main(["compress", str(d / "model.onnx"), "-o", str(d / "m.lbz"), "--sparsity", "0.5",
                 "--bits", "4", "--quiet"]) == 0
    return Files((name, (d / name).read_bytes()) for name in ("model.onnx", "calib.npz", "m.lbz"))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_and_check(folder: Path, argv: list[str]) -> int:
    """Run ``argv`` (paths relative to ``folder``), check the promise, return the exit code."""
    before = _snapshot(folder)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(folder / a) if (folder / a).exists() or a.startswith("out.") else a
                   for a in argv])
    text = out.getvalue() + err.getvalue()
    assert rc in (0, 2), f"exit {rc} for {argv}: {err.getvalue()!r}"
    assert "Traceback" not in text and "internal error" not in text, f"{argv}: {text!r}"
    after = _snapshot(folder)
    assert {k: after.get(k) for k in before} == before, f"an input changed: {argv}"
    new = set(after) - set(before)
    if rc == 2:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert len(lines) == 1, f"{argv}: {err.getvalue()!r}"
        assert not new, f"a refusal left {sorted(new)}"
    else:
        assert new <= OUTPUTS, f"{argv} left {sorted(new - OUTPUTS)}"
    return rc


@contextlib.contextmanager
def example_dir(files: dict[str, bytes]):
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as name:
        d = Path(name)
        for fname, blob in files.items():
            (d / fname).write_bytes(blob)
        yield d


@st.composite
def damaged(draw: st.DrawFn, raw: bytes) -> bytes:
    """Random bytes, a few flipped bytes, or a truncation of ``raw``."""
    kind = draw(st.sampled_from(["random", "flip", "truncate", "prefix-flip"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=4096))
    if kind == "truncate":
        return raw[:draw(st.integers(1, len(raw) - 1))]
    blob = bytearray(raw)
    span = 64 if kind == "prefix-flip" else len(raw)  # headers and sizes live up front
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, min(span, len(raw)) - 1))
        blob[i] ^= draw(st.integers(1, 255))
    return bytes(blob)


DAMAGED_FILES = {  # which file is damaged -> the commands that read it
    "model.onnx": [["quantize", "model.onnx", "-o", "out.onnx", "--data", "calib.npz", "--quiet",
                    "--mode", "dynamic"], ["inspect", "model.onnx"]],
    "calib.npz": [["quantize", "model.onnx", "-o", "out.onnx", "--data", "calib.npz", "--quiet",
                   "--mode", "dynamic"]],
    "m.lbz": [["unpack", "m.lbz", "-o", "out.onnx"], ["inspect", "m.lbz"],
              ["quantize", "m.lbz", "-o", "out.onnx", "--data", "calib.npz", "--quiet",
               "--mode", "dynamic"]],
}


@pytest.mark.parametrize("target", list(DAMAGED_FILES))
@FUZZ
@given(data=st.data())
def test_damaged_input_file(target: str, data: st.DataObject, good: dict[str, bytes]) -> None:
    blob = data.draw(damaged(good[target]), label=target)
    argv = data.draw(st.sampled_from(DAMAGED_FILES[target]), label="argv")
    with example_dir({**good, target: blob}) as d:
        run_and_check(d, argv)


# ----------------------------------------------------------------- option values

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, math.nan, math.inf, -math.inf])
ANY_INT = st.integers(-(2**70), 2**70) | st.integers(-3, 300)
CHEAP_COUNT = st.integers(-(2**70), 0) | st.integers(1, 2) | st.integers(2**31, 2**70)

Q = ["quantize", "model.onnx", "-o", "out.onnx", "--data", "calib.npz", "--quiet"]
P = ["prune", "model.onnx", "-o", "out.onnx", "--quiet"]
OPTION_CASES = {  # id -> (argv before the option, option, values)
    "prune-sparsity": (P, "--sparsity", ANY_FLOAT),
    "compress-sparsity": (["compress", "model.onnx", "-o", "out.lbz", "--quiet"], "--sparsity",
                          ANY_FLOAT),
    "cluster-bits": (["cluster", "model.onnx", "-o", "out.lbz", "--quiet"], "--bits", ANY_INT),
    "quantize-wo-bits": ([*Q, "--mode", "weight-only"], "--bits", ANY_INT),
    "quantize-wo-group-size": ([*Q, "--mode", "weight-only"], "--group-size", ANY_INT),
    "quantize-min-cosine": ([*Q, "--mode", "dynamic"], "--min-cosine", ANY_FLOAT),
    "quantize-max-drop": ([*Q, "--mode", "dynamic"], "--max-drop", ANY_FLOAT),
    "prune-lr": ([*P, "--sparsity", "0.5", "--data", "calib.npz", "--epochs", "1"], "--lr",
                 ANY_FLOAT),
    "prune-epochs": ([*P, "--sparsity", "0.5", "--data", "calib.npz"], "--epochs",
                     st.integers(-(2**70), 1)),
    "quantize-threads": ([*Q, "--mode", "dynamic"], "--threads", CHEAP_COUNT),
    "prune-threads": ([*P, "--sparsity", "0.5"], "--threads", CHEAP_COUNT),
    "quantize-batch": ([*Q, "--mode", "dynamic"], "--batch",
                       st.integers(-(2**70), 0) | st.integers(1, 64) | st.integers(10**12, 2**70)),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_option_value(case: str, data: st.DataObject, good: dict[str, bytes]) -> None:
    argv, option, values = OPTION_CASES[case]
    value = data.draw(values, label=option)
    with example_dir(good) as d:
        run_and_check(d, [*argv, option, repr(value) if isinstance(value, float) else str(value)])
