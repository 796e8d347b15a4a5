"""The pruning / weight-sharing verbs of the command line (prune, cluster, compress, unpack)
and the .lbz support of bench / eval / inspect, run in-process through ``lowbit.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lowbit import models
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.train import train_classifier
from lowbit.cli import main
from lowbit.data import digits_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def outputs(model: str | Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
            if len(t.dims) >= 2}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits_cnn trained 2 epochs, saved as a.onnx; train.npz / test.npz of the digits;
    x.lbz made once by ``lowbit compress``."""
    d = tmp_path_factory.mktemp("cli_compression")
    x_tr, y_tr, x_te, y_te = digits_split()
    module = train_classifier(models.digits_cnn(), x_tr, y_tr, epochs=2, seed=0)
    onnx.save(export_module(module, x_tr[:2]), str(d / "a.onnx"))
    np.savez(d / "train.npz", x=x_tr[:600], y=y_tr[:600])
    np.savez(d / "test.npz", x=x_te, y=y_te)
    rc = main(["compress", str(d / "a.onnx"), "-o", str(d / "x.lbz"), "--sparsity", "0.8",
               "--bits", "4", "--data", str(d / "train.npz"), "--epochs", "1", "--quiet"])
    assert rc == 0
    return {"dir": d, "onnx": d / "a.onnx", "train": d / "train.npz", "test": d / "test.npz",
            "lbz": d / "x.lbz", "x": x_te[:32]}


def tampered(work: dict[str, Path], name: str) -> Path:
    data = bytearray(work["lbz"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = work["dir"] / name
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- the verbs work


def test_compress_wrote_lbz_and_report(work):
    assert work["lbz"].is_file()
    report = json.loads((work["dir"] / "x.lbz.report.json").read_text())
    assert report["tool"] == "lowbit compress"
    assert report["output"]["format"] == "lbz"
    assert work["lbz"].stat().st_size * 4 < work["onnx"].stat().st_size
    assert report["settings"]["prune"]["epochs"] == 1


def test_prune_to_lbz(work, capsys, tmp_path):
    out = tmp_path / "p.lbz"
    rc, stdout, err = run_cli(capsys, "prune", work["onnx"], "--sparsity", "0.9", "-o", out)
    assert rc == 0, err
    assert out.is_file() and (tmp_path / "p.lbz.report.json").is_file()
    assert str(out) in stdout.replace("\n", "")
    report = json.loads((tmp_path / "p.lbz.report.json").read_text())
    for row in report["layers"]:
        assert row["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_prune_json_report(work, capsys, tmp_path):
    out = tmp_path / "p.onnx"
    rc, stdout, _ = run_cli(capsys, "prune", work["onnx"], "--sparsity", "0.5", "-o", out, "--json")
    assert rc == 0
    report = json.loads(stdout)
    assert report["tool"] == "lowbit prune" and report["settings"]["sparsity"] == 0.5
    for w in weights_of(onnx.load(str(out))).values():
        assert int(np.sum(w == 0)) == round(0.5 * w.size)


def test_prune_structured(work, capsys, tmp_path):
    out = tmp_path / "s.onnx"
    rc, _, err = run_cli(capsys, "prune", work["onnx"], "--structured", "--sparsity", "0.5",
                         "-o", out, "--quiet")
    assert rc == 0, err
    shapes = sorted(w.shape for w in weights_of(onnx.load(str(out))).values())
    assert shapes == [(10, 144), (16, 1, 3, 3)]
    assert outputs(out, work["x"]).shape == (32, 10)


def test_prune_nm(work, capsys, tmp_path):
    module = models.lenet_300_100(64)  # 64, 300, 100: every input axis a multiple of 4
    model = export_module(module, np.zeros((2, 64), np.float32))
    src = tmp_path / "mlp.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "nm.onnx"
    rc, stdout, err = run_cli(capsys, "prune", src, "--nm", "2:4", "--sparsity", "0.5", "-o", out,
                              "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert any("no CPU speedup" in n for n in report["notes"])
    from lowbit.pruning.nm import is_nm_sparse

    for w in weights_of(onnx.load(str(out))).values():
        assert is_nm_sparse(w, 2, 4, axis=1)


def test_cluster_4_bits(work, capsys, tmp_path):
    from lowbit.container import read_lbz

    out = tmp_path / "c.lbz"
    rc, _, err = run_cli(capsys, "cluster", work["onnx"], "--bits", "4", "-o", out, "--quiet")
    assert rc == 0, err
    model = read_lbz(out)
    for t in model.graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        assert np.unique(w[w != 0]).size <= 16, t.name


def test_unpack_gives_the_compressed_model(work, capsys, tmp_path):
    from lowbit.api import compress

    out = tmp_path / "y.onnx"
    rc, stdout, err = run_cli(capsys, "unpack", work["lbz"], "-o", out)
    assert rc == 0, err
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)))
    cm = compress(str(work["onnx"]), str(work["train"]), sparsity=0.8, bits=4, epochs=1)
    assert np.array_equal(outputs(out, work["x"]), outputs(cm.model, work["x"]))


def test_bench_onnx_against_lbz(work, capsys):
    rc, stdout, err = run_cli(capsys, "bench", work["onnx"], work["lbz"], "--iterations", "5",
                              "--json")
    assert rc == 0, err
    result = json.loads(stdout)
    assert [Path(r["model"]).name for r in result["models"]] == ["a.onnx", "x.lbz"]
    assert result["models"][1]["size_bytes"] == work["lbz"].stat().st_size


def test_eval_lbz(work, capsys):
    rc, stdout, err = run_cli(capsys, "eval", work["lbz"], "--data", work["test"], "--json")
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["samples"] == 360
    assert result["accuracy"] > 0.5
    rc, stdout, _ = run_cli(capsys, "eval", work["lbz"], "--data", work["test"])
    assert rc == 0 and "accuracy" in stdout


def test_inspect_lbz_json_has_the_breakdown(work, capsys):
    rc, stdout, err = run_cli(capsys, "inspect", work["lbz"], "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    parts = info["lbz"]["parts"]
    assert sum(parts.values()) == work["lbz"].stat().st_size
    assert {"graph", "indices", "codebooks", "values"} <= set(parts)


def test_inspect_lbz_table_shows_the_breakdown(work, capsys):
    rc, stdout, err = run_cli(capsys, "inspect", work["lbz"])
    assert rc == 0, err
    text = stdout.lower()
    assert "codebook" in text and "indices" in text  # the per-part .lbz sizes are shown


def test_prune_an_lbz_input(work, capsys, tmp_path):
    out = tmp_path / "again.lbz"
    rc, _, err = run_cli(capsys, "prune", work["lbz"], "--sparsity", "0.9", "-o", out, "--quiet")
    assert rc == 0, err
    assert out.is_file()


def test_unpack_of_a_plain_onnx_file_is_exit_2(work, capsys, tmp_path):
    out = tmp_path / "y.onnx"
    rc, stdout, err = run_cli(capsys, "unpack", work["onnx"], "-o", out)
    assert rc == 2
    assert str(work["onnx"]) in err.replace("\n", "") and "lbz" in err
    assert not out.exists()


# ---------------------------------------------------------------- bad values: exit 2


@pytest.mark.parametrize("args,word", [
    (["prune", "--sparsity", "1.5"], "sparsity"),
    (["prune", "--sparsity", "-0.1"], "sparsity"),
    (["prune", "--sparsity", "0.5", "--nm", "2-4"], "--nm"),
    (["cluster", "--bits", "9"], "bits"),
    (["cluster", "--bits", "0"], "bits"),
    (["compress", "--bits", "9"], "bits"),
    (["compress", "--sparsity", "1.0"], "sparsity"),
    (["prune", "--sparsity", "0.5", "--nm", "4:2"], "n:m"),
    (["prune", "--sparsity", "0.5", "--scope", "everything"], "scope"),
    (["prune", "--sparsity", "0.5", "--structured", "--importance", "size"], "importance"),
    (["cluster", "--bits", "4", "--init", "kmeans++"], "init"),
])
def test_bad_values_exit_2_and_write_nothing(work, capsys, tmp_path, args, word):
    out = tmp_path / "out.lbz"
    rc, stdout, err = run_cli(capsys, args[0], work["onnx"], "-o", out, *args[1:])
    assert rc == 2, (stdout, err)
    assert word in err
    assert "Traceback" not in err + stdout
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_is_exit_2(work, capsys, tmp_path):
    out = tmp_path / "no" / "such" / "x.lbz"
    rc, _, err = run_cli(capsys, "prune", work["onnx"], "--sparsity", "0.5", "-o", out)
    assert rc == 2 and "--output" in err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("verb", ["unpack", "bench", "eval", "inspect", "prune"])
def test_tampered_lbz_exit_2_naming_the_file(work, capsys, tmp_path, verb):
    bad = tampered(work, f"bad_{verb}.lbz")
    before = set(work["dir"].iterdir())
    out = tmp_path / "out.onnx"
    args = {"unpack": ["unpack", bad, "-o", out],
            "bench": ["bench", work["onnx"], bad, "--iterations", "3"],
            "eval": ["eval", bad, "--data", work["test"]],
            "inspect": ["inspect", bad],
            "prune": ["prune", bad, "--sparsity", "0.5", "-o", out]}[verb]
    rc, stdout, err = run_cli(capsys, *args)
    assert rc == 2, (stdout, err)
    assert str(bad) in err.replace("\n", "")
    assert "Traceback" not in err + stdout
    assert "internal error" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert set(work["dir"].iterdir()) == before


def test_error_message_keeps_brackets_in_a_file_name(work, capsys, tmp_path):
    # the message is user text, not rich markup: "[red]" must be printed, not eaten
    bad = tmp_path / "model[red].lbz"
    bad.write_bytes(tampered(work, "bad_brackets.lbz").read_bytes())
    out = tmp_path / "y.onnx"
    rc, stdout, err = run_cli(capsys, "unpack", bad, "-o", out)
    assert rc == 2
    assert str(bad) in err.replace("\n", "")
    assert not out.exists()


def test_error_message_with_a_closing_tag_in_a_file_name_is_no_crash(capsys, tmp_path):
    missing = tmp_path / "missing[/x].lbz"
    rc, stdout, err = run_cli(capsys, "unpack", missing, "-o", tmp_path / "y.onnx")
    assert rc == 2
    assert str(missing) in err.replace("\n", "")
    assert "Traceback" not in err + stdout


def test_regression_compression_table_shows_quality_size_and_latency(work, capsys, tmp_path,
                                                                     monkeypatch):
    """The table of prune/cluster/compress read the report's old top-level keys and lost
    accuracy and latency when they moved under 'verification'."""
    import lowbit.cli as cli

    monkeypatch.setattr(cli.out_console, "width", 200)
    out = tmp_path / "p.lbz"
    rc, stdout, err = run_cli(capsys, "prune", work["onnx"], "--sparsity", "0.5", "-o", out,
                              "--data", work["train"], "--eval-data", work["test"])
    assert rc == 0, err
    for row in ("test accuracy", "top-1 agreement", "weight sparsity", "size: .lbz",
                "latency p50", "speedup"):
        assert row in stdout, row
