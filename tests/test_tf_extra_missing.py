"""Without the ``tf`` extra, a Keras or TFLite request is one line naming the extra, exit 2,
before any work (everything else works without it)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lowbit.cli import main


@pytest.fixture
def no_tf(monkeypatch):
    """TensorFlow, Keras and LiteRT as if not installed (None in sys.modules: import fails)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("tensorflow", "keras", "ai_edge_litert"):
            monkeypatch.delitem(sys.modules, name)
    for name in ("tensorflow", "keras", "ai_edge_litert", "ai_edge_litert.interpreter",
                 "ai_edge_litert.schema_py_generated"):
        monkeypatch.setitem(sys.modules, name, None)


def test_export_without_litert_names_the_extra(tmp_path, capsys, no_tf):
    from lowbit.backends.torch.export import export_module
    from lowbit.models import digits_cnn

    (tmp_path / "m.onnx").write_bytes(export_module(
        digits_cnn(8).eval(), np.zeros((2, 1, 8, 8), np.float32)).SerializeToString())
    rc = main(["export", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.tflite"),
               "--mode", "float"])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install "lowbit[tf]"' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.tflite").exists()


def test_keras_file_without_tensorflow_names_the_extra(tmp_path, capsys, no_tf):
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:  # a .keras file is a zip archive
        z.writestr("config.json", "{}")
        z.writestr("metadata.json", "{}")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8, 1), np.float32))
    rc = main(["quantize", str(tmp_path / "m.keras"), "-o", str(tmp_path / "q.onnx"),
               "--data", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install "lowbit[tf]"' in err and len(err.strip().splitlines()) == 1
