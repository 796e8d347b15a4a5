"""Input layouts (issue 12): models whose first axis is fixed (batch 1, batch 4), has no
batch meaning ([5, 5], [2, 3]), or differs between inputs, with data stored as rows
(axis 0 the batch axis) or as whole samples (one more axis), through every verb.
A layout the rule cannot place is exit 2 naming the input and both shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.cli import main
from lowbit.data import as_dataset, synthetic_dataset
from lowbit.errors import ValidationError
from lowbit.layouts import InputSpec
from lowbit.metrics import sqnr_db

N = 48  # samples per data file
RNG = np.random.default_rng(12)


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> None:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _mlp(path: Path, batch: int | str) -> None:
    """Gemm-Relu-Gemm, 16 -> 32 -> 4, input [batch, 16]."""
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="fc0", transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w1", "b1"], ["y"], name="fc1", transB=1)]
    _save(path, nodes, [_vi("x", [batch, 16])], [_vi("y", [batch, 4])],
          [_w("w0", 32, 16), _w("b0", 32), _w("w1", 4, 32), _w("b1", 4)])


def _matmul_add(path: Path, rows: int, k: int, n: int) -> None:
    """x [rows, k] @ W [k, n] + c: axis 0 is no batch axis."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "c"], ["y"], name="add")]
    _save(path, nodes, [_vi("x", [rows, k])], [_vi("y", [rows, n])], [_w("w", k, n), _w("c", n)])


def _two_inputs(path: Path, batch: int | str) -> None:
    """Two inputs of different ranks sharing the first axis: x [b, 16], m [b, 1, 4, 4]."""
    _save(path, [helper.make_node("Conv", ["m", "k"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                 helper.make_node("Flatten", ["c"], ["f"], axis=1),
                 helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
                 helper.make_node("Add", ["h", "f"], ["s"]),
                 helper.make_node("MatMul", ["s", "w1"], ["y"], name="mm1")],
          [_vi("x", [batch, 16]), _vi("m", [batch, 1, 4, 4])], [_vi("y", [batch, 4])],
          [_w("k", 1, 1, 3, 3), _w("w0", 16, 16), _w("w1", 16, 4)])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("layouts")
    for name, batch in (("b1", 1), ("b4", 4), ("bn", "N")):
        _mlp(d / f"{name}.onnx", batch)
    _matmul_add(d / "sq5.onnx", 5, 5, 5)
    _matmul_add(d / "r23.onnx", 2, 3, 4)
    _two_inputs(d / "two.onnx", 1)
    _two_inputs(d / "two_n.onnx", "N")
    # inputs whose fixed first dimensions differ: no shared batch axis
    _save(d / "diff.onnx", [helper.make_node("MatMul", ["a", "wa"], ["h"], name="mma"),
                            helper.make_node("MatMul", ["b", "wb"], ["g"], name="mmb"),
                            helper.make_node("Add", ["h", "g"], ["y"])],
          [_vi("a", [1, 16]), _vi("b", [4, 4])], [_vi("y", [4, 4])],
          [_w("wa", 16, 4), _w("wb", 4, 4)])
    arrays = {
        "rows16": {"x": (N, 16)}, "whole1": {"x": (N, 1, 16)}, "whole4": {"x": (N, 4, 16)},
        "whole2": {"x": (N, 2, 16)}, "rows5": {"x": (N, 5)}, "whole5": {"x": (N, 5, 5)},
        "rows7": {"x": (N, 7)}, "rank4": {"x": (N, 3, 5, 5)}, "rows3": {"x": (N, 3)},
        "whole23": {"x": (N, 2, 3)}, "two_rows": {"x": (N, 16), "m": (N, 1, 4, 4)},
        "two_whole": {"x": (N, 1, 16), "m": (N, 1, 1, 4, 4)},
        "two_mixed": {"x": (N, 1, 16), "m": (N, 1, 4, 4)},
        "two_uneven": {"x": (N, 2, 16), "m": (N, 3, 1, 4, 4)},
        "diff_rows": {"a": (N, 16), "b": (N, 4)}, "diff_whole": {"a": (N, 1, 16), "b": (N, 4, 4)},
    }
    for name, shapes in arrays.items():
        np.savez(d / f"{name}.npz", **{k: RNG.standard_normal(s).astype(np.float32)
                                       for k, s in shapes.items()})
    x = RNG.standard_normal((N, 16)).astype(np.float32)
    np.savez(d / "whole1_y.npz", x=x[:, None], y=RNG.integers(0, 4, N))
    np.savez(d / "whole4_y.npz", x=RNG.standard_normal((N, 4, 16)).astype(np.float32),
             y=RNG.integers(0, 4, (N, 4)))
    np.savez(d / "whole4_ybad.npz", x=RNG.standard_normal((N, 4, 16)).astype(np.float32),
             y=RNG.integers(0, 4, N))
    np.savez(d / "rows16_y.npz", x=x, y=RNG.integers(0, 4, N))
    return d


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _declared(session: ort.InferenceSession, path: Path, i: int) -> dict[str, np.ndarray]:
    """Sample ``i`` of a data file at each input's declared shape, by hand: a whole
    sample as stored, or that many rows from ``i`` on (3 for a dynamic first axis)."""
    arrays, feed = np.load(path), {}
    for inp in session.get_inputs():
        arr = arrays[inp.name]
        rows = inp.shape[0] if isinstance(inp.shape[0], int) else 3
        feed[inp.name] = arr[i] if arr.ndim == len(inp.shape) + 1 else \
            arr[np.arange(i, i + rows) % len(arr)]
    return feed


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


CASES = [("b1", "rows16", 1), ("b1", "whole1", 1), ("b4", "rows16", 4), ("b4", "whole4", 4),
         ("bn", "rows16", 8), ("bn", "whole4", 4), ("sq5", "rows5", 5), ("sq5", "whole5", 5),
         ("r23", "whole23", 2), ("r23", "rows3", 2), ("two", "two_rows", 1),
         ("two", "two_whole", 1), ("two_n", "two_whole", 1), ("diff", "diff_whole", 1)]


@pytest.mark.parametrize("mode", ["auto", "static", "dynamic"])
@pytest.mark.parametrize(("model", "data", "batch"), CASES)
def test_quantize_runs_at_the_declared_shape_close_to_float(work, tmp_path, capsys, model, data,
                                                            batch, mode):
    out = tmp_path / f"{model}.{mode}.onnx"
    rc, _, err = cli(capsys, "quantize", work / f"{model}.onnx", "-o", out, "--data",
                     work / f"{data}.npz", "--mode", mode, "--quiet")
    assert rc == 0, err
    onnx.checker.check_model(str(out))
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["verification"]["latency"]["batch"] == batch
    assert report["verification"]["agreement"]["samples"] == round(N * 0.2)
    reference, quantized = _session(work / f"{model}.onnx"), _session(out)
    feeds = [_declared(reference, work / f"{data}.npz", i) for i in range(N)]
    ref = np.stack([reference.run(None, f)[0] for f in feeds])
    assert sqnr_db(ref, np.stack([quantized.run(None, f)[0] for f in feeds])) > 25.0


def test_whole_samples_are_run_once_each_and_labels_follow_them(work, capsys):
    """eval: whole samples [n, 1, 16] with one label each, [n, 4, 16] with four; the
    accuracy equals the one computed sample by sample."""
    for model, data in (("b1", "whole1_y"), ("b4", "whole4_y")):
        file = np.load(work / f"{data}.npz")
        session = _session(work / f"{model}.onnx")
        pred = np.stack([session.run(None, {"x": s})[0].argmax(-1) for s in file["x"]])
        rc, out, err = cli(capsys, "eval", work / f"{model}.onnx", "--data",
                           work / f"{data}.npz", "--json")
        assert rc == 0, err
        result = json.loads(out)
        assert result["samples"] == N
        assert result["accuracy"] == pytest.approx(float(np.mean(pred == file["y"].reshape(pred.shape))))


def test_rows_of_a_fixed_batch_are_filled_up_and_cut_back(work):
    """48 rows for a batch of 5: ten runs, the last filled from the start; one result per row."""
    from lowbit.backends.onnx.session import input_specs, run_batches

    session = _session(work / "sq5.onnx")
    data = as_dataset(str(work / "rows5.npz"), input_specs(session))
    assert (data.whole, data.fixed_batch, data.rows_per_run(8)) == (False, 5, 5)
    out = run_batches(session, data)[0]
    x = np.load(work / "rows5.npz")["x"]
    expected = np.concatenate([session.run(None, {"x": x[np.arange(s, s + 5) % N]})[0]
                               for s in range(0, N, 5)])[:N]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_synthetic_inputs_follow_the_rule():
    rows = synthetic_dataset([InputSpec("x", np.dtype(np.float32), (4, 16))], 10)
    assert not rows.whole and rows.inputs["x"].shape == (10, 16) and rows.feed(8)["x"].shape == (4, 16)
    specs = [InputSpec("a", np.dtype(np.float32), (1, 16)), InputSpec("b", np.dtype(np.float32), (4, "s"))]
    whole = synthetic_dataset(specs, 10)
    assert whole.whole and whole.inputs["b"].shape == (10, 4, 16)
    assert {k: v.shape for k, v in whole.feed(8).items()} == {"a": (1, 16), "b": (4, 16)}


@pytest.mark.parametrize("model", ["b4", "sq5", "r23", "diff", "two"])
def test_bench_and_prune_without_data_use_synthetic_inputs_of_the_right_shape(work, tmp_path,
                                                                             capsys, model):
    rc, out, err = cli(capsys, "bench", work / f"{model}.onnx", "--iterations", 3, "--json")
    assert rc == 0, err
    batch = {"b4": 4, "sq5": 5, "r23": 2, "diff": 1, "two": 1}[model]
    assert json.loads(out)["batch"] == batch
    rc, _, err = cli(capsys, "prune", work / f"{model}.onnx", "-o", tmp_path / "p.onnx",
                     "--sparsity", 0.5, "--quiet")
    assert rc == 0, err


def test_bench_times_every_model_at_the_fixed_batch(work, tmp_path, capsys):
    q = tmp_path / "b4.int8.onnx"
    assert cli(capsys, "quantize", work / "b4.onnx", "-o", q, "--data", work / "rows16.npz",
               "--quiet")[0] == 0
    rc, out, err = cli(capsys, "bench", work / "bn.onnx", work / "b4.onnx", q, "--data",
                       work / "whole4_y.npz", "--iterations", 3, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["batch"] == 4
    assert all(m["latency"]["batch"] == 4 and m["accuracy"] is not None for m in result["models"])


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("model", "data"), [("b1", "whole1_y"), ("b4", "rows16_y"),
                                             ("b4", "whole4_y")])
def test_fine_tuning_runs_at_the_fixed_batch(work, tmp_path, capsys, model, data):
    out = tmp_path / "c.lbz"
    rc, _, err = cli(capsys, "compress", work / f"{model}.onnx", "-o", out, "--data",
                     work / f"{data}.npz", "--epochs", 1, "--quiet")
    assert rc == 0, err
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert not any("fine-tuning" in n for n in report.get("notes", []))


def test_sensitivity_with_whole_samples(work, tmp_path, capsys):
    rc, _, err = cli(capsys, "sensitivity", work / "two.onnx", "-o", tmp_path / "plan.json",
                     "--data", work / "two_whole.npz", "--min-cosine", 0.99, "--quiet")
    assert rc == 0, err


# ----------------------------------------------------------------- refusals


def _refused(capsys: pytest.CaptureFixture[str], folder: Path, *args: object) -> str:
    rc, out, err = cli(capsys, *args)
    assert rc == 2, f"exit {rc}: {out + err}"
    assert "Traceback" not in out + err and "internal error" not in err, out + err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == [], "a file was written"
    return err


@pytest.mark.parametrize(("model", "data", "names"), [
    ("sq5", "rank4", ["'x'", "(5, 5)", f"({N}, 3, 5, 5)", "rank"]),
    ("sq5", "rows7", ["'x'", "(5, 5)", f"({N}, 7)"]),
    ("b4", "whole2", ["'x'", "(4, 16)", f"({N}, 2, 16)"]),
    ("b1", "whole5", ["'x'", "(1, 16)", f"({N}, 5, 5)"]),
    ("two", "two_mixed", ["ambiguous", "'x'", "'m'", f"({N}, 1, 16)", "(1, 1, 4, 4)"]),
    ("two_n", "two_uneven", ["'N'", "'x'", "'m'", f"({N}, 2, 16)", f"({N}, 3, 1, 4, 4)"]),
    ("diff", "diff_rows", ["'a'", "'b'", "(1, 16)", "(4, 4)", f"({N}, 4)", "(n, 4, 4)"]),
    ("b4", "whole4_ybad", ["labels", f"({N},)", f"({N}, 4)"]),
])
@pytest.mark.parametrize("verb", ["quantize", "eval"])
def test_a_layout_the_rule_cannot_place_is_refused(work, tmp_path, capsys, model, data, names,
                                                   verb):
    args = ["-o", tmp_path / "q.onnx"] if verb == "quantize" else []
    err = _refused(capsys, tmp_path, verb, work / f"{model}.onnx", *args, "--data",
                   work / f"{data}.npz")
    for name in names:
        assert name in err, (name, err)


@pytest.mark.parametrize(("args", "numbers"), [
    (["quantize", "b1.onnx", "-o", "{out}", "--data", "rows16.npz", "--batch", "8"], ["8", "1"]),
    (["quantize", "b4.onnx", "-o", "{out}", "--data", "whole4.npz", "--batch", "1"], ["1", "4"]),
    (["quantize", "bn.onnx", "-o", "{out}", "--data", "whole4.npz", "--batch", "8"], ["8", "4"]),
    (["bench", "b4.onnx", "--batch", "2"], ["2", "4"]),
    (["bench", "b1.onnx", "b4.onnx"], ["b1.onnx", "b4.onnx", "1", "4"]),
])
def test_a_batch_that_disagrees_with_the_fixed_one_is_refused(work, tmp_path, capsys, args,
                                                              numbers):
    out = str(tmp_path / "q.onnx")
    argv = [out if a == "{out}" else str(work / a) if a.endswith((".onnx", ".npz")) else a
            for a in args]
    err = _refused(capsys, tmp_path, *argv)
    assert "batch" in err
    for number in numbers:
        assert number in err, (number, err)


def test_the_api_refuses_a_disagreeing_batch_before_any_work(work):
    with pytest.raises(ValidationError, match=r"batch: 8 disagrees with the model's fixed batch 1"):
        lowbit.quantize(str(work / "b1.onnx"), str(work / "rows16.npz"), batch=8)
    assert lowbit.bench([str(work / "b1.onnx")], batch=1, iterations=3)["batch"] == 1
