"""``lowbit demo --framework keras``: the TFLite tutorial's workflow end to end (a short
recipe here; the full edge recipe is benchmark B4-K)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("keras", reason="lowbit[tf] is not installed: the Keras/TFLite tests need it")
pytest.importorskip("ai_edge_litert", reason="lowbit[tf] is not installed: the TFLite tests "
                    "need ai-edge-litert")


def test_keras_demo_writes_a_verified_tflite(tmp_path):
    from lowbit.backends.tflite.session import TfliteSession
    from lowbit.demo import run_keras_demo

    report = run_keras_demo(tmp_path / "demo", epochs=1, batch=16, recipe="int8")
    out = tmp_path / "demo"
    assert (out / "digits_cnn.keras").is_file() and (out / "report.json").is_file()
    assert json.loads((out / "report.json").read_text())["demo"]["framework"] == "keras"
    tfl = report["tflite"]
    assert tfl["output"]["path"] == str(out / "digits_cnn.edge.tflite")
    session = TfliteSession(out / "digits_cnn.edge.tflite")
    assert session.get_inputs()[0].shape[1:] == (28, 28, 1)  # channels last, as Keras
    acc = tfl["verification"]["accuracy"]
    assert acc["tflite"] >= acc["float onnx"] - 0.03
    assert not list(out.glob(".*partial*"))
