"""An output never destroys an input, a folder or a device: refused with exit 2 before any
work, the input untouched (issue 9's data-loss cases)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.cli import main
from lowbit.errors import ValidationError


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w")])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "c.npz"
    np.savez(data, x=rng.standard_normal((20, 16)).astype(np.float32), y=rng.integers(0, 4, 20))
    return {"model": model, "data": data, "dir": tmp_path}


def _unchanged(files: dict[str, Path]) -> list[bytes]:
    return [files["model"].read_bytes(), files["data"].read_bytes()]


@pytest.mark.parametrize("verb", [["quantize"], ["prune", "--sparsity", "0.5"],
                                  ["cluster", "--bits", "4"], ["compress"]])
@pytest.mark.parametrize("target", ["model", "data"])
def test_output_equal_to_an_input_is_refused(files, capsys, verb, target):
    before = _unchanged(files)
    rc = main([verb[0], str(files["model"]), "-o", str(files[target]), "--data",
               str(files["data"]), *verb[1:]])
    assert rc == 2
    assert "never overwrites an input" in capsys.readouterr().err
    assert _unchanged(files) == before


@pytest.mark.parametrize("output", ["", "adir", "adir/", "report.json"])
def test_folders_and_other_extensions_are_refused(files, capsys, output):
    (files["dir"] / "adir").mkdir()
    cwd = os.getcwd()
    os.chdir(files["dir"])
    try:
        rc = main(["quantize", str(files["model"]), "-o", output, "--data", str(files["data"])])
    finally:
        os.chdir(cwd)
    assert rc == 2
    assert "--output" in capsys.readouterr().err
    assert not (files["dir"] / "report.json").exists()


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_device_is_never_replaced(files, capsys):
    rc = main(["quantize", str(files["model"]), "-o", "/dev/null", "--data", str(files["data"])])
    assert rc == 2
    assert Path("/dev/null").is_char_device()


def test_unpack_onto_its_input_is_refused(files, capsys, tmp_path):
    lbz = tmp_path / "x.lbz"
    assert main(["compress", str(files["model"]), "-o", str(lbz), "--quiet"]) == 0
    before = lbz.read_bytes()
    assert main(["unpack", str(lbz), "-o", str(lbz)]) == 2
    assert lbz.read_bytes() == before


def test_api_save_never_overwrites_what_the_run_read(files):
    result = lowbit.quantize(str(files["model"]), str(files["data"]), verify=False)
    before = _unchanged(files)
    for target in (files["model"], files["data"]):
        with pytest.raises(ValidationError, match="never overwrites an input"):
            result.save(target)
    assert _unchanged(files) == before


@pytest.mark.parametrize("name", ["x.zip", "x.txt", "noextension"])
def test_the_extension_decides_the_format_or_is_refused(files, capsys, name):
    rc = main(["prune", str(files["model"]), "-o", str(files["dir"] / name), "--sparsity", "0.5"])
    assert rc == 2
    assert "extension" in capsys.readouterr().err
    assert not (files["dir"] / name).exists()


def test_epochs_without_data_is_refused_before_any_work(files, capsys):
    rc = main(["prune", str(files["model"]), "-o", str(files["dir"] / "p.onnx"),
               "--sparsity", "0.5", "--epochs", "2"])
    assert rc == 2
    assert "epochs" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--batch", "0"], ["--threads", "-1"], ["--epochs", "0"]])
def test_demo_checks_its_options_before_training(tmp_path, capsys, option):
    out = tmp_path / "d"
    assert main(["demo", "-o", str(out), *option]) == 2
    assert not out.exists()  # refused before the folder or any model was written


def test_each_output_gets_its_own_report(files, capsys):
    """Two models written into one folder keep two reports (OUT.report.json)."""
    for name in ("a.onnx", "b.onnx"):
        assert main(["quantize", str(files["model"]), "-o", str(files["dir"] / name), "--data",
                     str(files["data"]), "--quiet"]) == 0
    capsys.readouterr()
    for name in ("a.onnx", "b.onnx"):
        report = json.loads((files["dir"] / f"{name}.report.json").read_text())
        assert report["output"]["path"].endswith(name)


def test_a_report_that_would_replace_an_input_is_refused(files, capsys):
    data = files["dir"] / "q.onnx.report.json"
    data.write_bytes(files["data"].read_bytes())
    before = data.read_bytes()
    rc = main(["quantize", str(files["model"]), "-o", str(files["dir"] / "q.onnx"), "--data",
               str(data)])
    assert rc == 2
    assert "never overwrites an input" in capsys.readouterr().err
    assert data.read_bytes() == before and not (files["dir"] / "q.onnx").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir() or os.name != "posix", reason="needs /proc")
@pytest.mark.parametrize("verb", ["quantize", "demo"])
def test_a_folder_where_nothing_can_be_created_is_refused(files, capsys, verb):
    out = "/proc/lowbit-out" if verb == "demo" else "/proc/q.onnx"
    args = ["demo", "-o", out] if verb == "demo" else \
        ["quantize", str(files["model"]), "-o", out, "--data", str(files["data"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "internal error" not in err
