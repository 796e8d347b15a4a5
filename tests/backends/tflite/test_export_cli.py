"""``lowbit export --to tflite`` end to end, and ``bench``/``eval``/``inspect`` on the
``.tflite`` it writes; bad input refused with one line and exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="lowbit[tf] is not installed: the TFLite tests "
                    "need ai-edge-litert")

from lowbit.cli import main  # noqa: E402


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """The tutorial CNN on 8x8 digits, briefly trained, as ONNX; train/test .npz."""
    import torch

    from lowbit.backends.torch.export import export_module
    from lowbit.models import digits_cnn

    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(0)
    net = digits_cnn(8)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    for _ in range(4):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    folder = tmp_path_factory.mktemp("export")
    path = folder / "cnn.onnx"
    path.write_bytes(export_module(net.eval(), x_tr[:2]).SerializeToString())
    np.savez(folder / "train.npz", x=x_tr, y=y_tr)
    np.savez(folder / "test.npz", x=x_te, y=y_te)
    return folder


def test_export_auto_then_bench_eval_inspect(trained, capsys):
    out = trained / "cnn.tflite"
    rc, text, err = run_cli(capsys, "export", trained / "cnn.onnx", "--to", "tflite", "-o", out,
                            "--data", trained / "train.npz", "--val", trained / "test.npz",
                            "--batch", "16", "--json")
    assert rc == 0, err
    report = json.loads(text)
    assert json.loads(Path(str(out) + ".report.json").read_text())["output"]["path"] == str(out)
    t, v = report["tflite"], report["verification"]
    rows = t["candidates"]
    assert rows[0]["name"] == "float" and sum(r["kept"] for r in rows) == 1
    kept = next(r for r in rows if r["kept"])
    # never slower than a model it could have built: a quantized model is kept only when
    # it is at least as fast as float, within the timing-noise band (then it is smaller)
    from lowbit.backends.tflite.candidates import TIE

    assert kept["name"] == "float" or kept["speedup"] >= TIE
    assert v["loads_and_runs_in_litert"] and v["samples"] == 360
    assert abs(v["accuracy"]["tflite"] - v["accuracy"]["float onnx"]) <= 0.02
    assert v["size_ratio_vs_float_tflite"] < 0.6 or kept["name"] == "float"

    rc, text, err = run_cli(capsys, "eval", out, "--data", trained / "test.npz", "--json")
    assert rc == 0, err
    assert json.loads(text)["accuracy"] == pytest.approx(v["accuracy"]["tflite"], abs=1e-4)
    rc, text, err = run_cli(capsys, "bench", trained / "cnn.onnx", out, "--data",
                            trained / "test.npz", "--json", "--iterations", "5")
    assert rc == 0, err
    assert len(json.loads(text)["models"]) == 2
    rc, text, err = run_cli(capsys, "inspect", out, "--json")
    assert rc == 0, err
    info = json.loads(text)
    assert info["format"] == "tflite" and info["operators"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_export_fixed_modes(trained, capsys, mode):
    out = trained / f"cnn.{mode}.tflite"
    extra = ["--io", "int8"] if mode == "int8" else []
    rc, text, err = run_cli(capsys, "export", trained / "cnn.onnx", "-o", out, "--mode", mode,
                            "--data", trained / "train.npz", "--json", *extra)
    assert rc == 0, err
    report = json.loads(text)
    structure = report["tflite"]["structure"]
    if mode == "int8":  # full integer, INT8 in and out (the CNN ends in its Gemm)
        assert structure["inputs"][0]["type"] == "int8" == structure["outputs"][0]["type"]
        assert "float" not in structure["execution"]
    else:
        assert "int4" in structure["constant_bytes"]
    assert report["verification"]["agreement"]["float onnx"] >= 0.9


@pytest.mark.parametrize("args,needle", [
    (["--mode", "int7"], "--mode"),
    (["--mode", "auto", "--io", "int8", "--data", "train.npz"], "io"),
    (["--mode", "int8"], "needs data"),
    (["--to", "coreml", "--mode", "float"], "option --to"),
    (["--mode", "float", "--recipe", "no-such-recipe", "--data", "train.npz"], "recipe"),
])
def test_bad_options_exit_2_before_any_work(trained, capsys, args, needle):
    out = trained / "bad.tflite"
    args = [str(trained / a) if a.endswith(".npz") else a for a in args]
    rc, _, err = run_cli(capsys, "export", trained / "cnn.onnx", "-o", out, *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not Path(str(out) + ".report.json").exists()


def test_output_never_overwrites_an_input(trained, capsys):
    target = trained / "train.npz"
    before = target.read_bytes()
    rc, _, err = run_cli(capsys, "export", trained / "cnn.onnx", "-o", target, "--mode", "float")
    assert rc == 2 and target.read_bytes() == before


def test_unsupported_op_names_the_node(tmp_path, capsys):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="the_erf")], "g",
                              [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    rc, _, err = run_cli(capsys, "export", tmp_path / "m.onnx", "-o", tmp_path / "m.tflite",
                         "--mode", "float")
    assert rc == 2 and "the_erf" in err and "Erf" in err
    assert not (tmp_path / "m.tflite").exists()
