"""Keras models through lowbit's pipeline: quantize in memory, the CLI on a .keras file
and a SavedModel folder, fine-tuning through the torch bridge, the demo trainer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("keras", reason="lowbit[tf] is not installed: the Keras/TFLite tests need it")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import lowbit  # noqa: E402
from lowbit.backends.keras.models import classic_cnn, train_keras, tutorial_cnn  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.data import digits_resized  # noqa: E402
from lowbit.model_io import resolve_model  # noqa: E402

TRAIN = 512


@pytest.fixture(scope="module")
def digits28():
    """The bundled digits at 28x28, channels-last as Keras wants them."""
    x_tr, y_tr, x_te, y_te = digits_resized(28)
    return (np.ascontiguousarray(x_tr.transpose(0, 2, 3, 1)), y_tr,
            np.ascontiguousarray(x_te.transpose(0, 2, 3, 1)), y_te)


@pytest.fixture(scope="module")
def trained(digits28):
    x_tr, y_tr, _, _ = digits28
    keras.utils.set_random_seed(0)
    model = tutorial_cnn()
    losses = train_keras(model, x_tr[:TRAIN], y_tr[:TRAIN], epochs=3, seed=0)
    assert losses[-1] < losses[0]
    return model


def keras_accuracy(model, x, y) -> float:
    return float((np.asarray(model(x, training=False)).argmax(1) == y).mean())


def test_quantize_an_in_memory_keras_model(trained, digits28):
    x_tr, y_tr, x_te, y_te = digits28
    cm = lowbit.quantize(trained, (x_tr[:256], y_tr[:256]), eval_data=(x_te, y_te))
    assert cm.report["input"]["model"] == "tutorial_cnn"
    accuracy = cm.report["verification"]["agreement"]["accuracy"]
    assert accuracy["float"] == pytest.approx(keras_accuracy(trained, x_te, y_te), abs=1e-6)
    assert accuracy["float"] > 0.8 and accuracy["drop_points"] <= 2.0
    assert cm.model.graph.input[0].name == "image"  # Keras' input, NHWC data as given


def test_cli_quantize_a_keras_file_and_a_savedmodel(trained, digits28, tmp_path, capsys):
    x_tr, y_tr, x_te, y_te = digits28
    path = tmp_path / "model.keras"
    trained.save(path)
    data = tmp_path / "d.npz"
    np.savez(data, x=x_tr[:200], y=y_tr[:200])
    out = tmp_path / "out.onnx"
    assert main(["quantize", str(path), "-o", str(out), "--data", str(data), "--quiet",
                 "--search-time", "0"]) == 0
    report = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert report["input"]["model"] == str(path)
    assert report["verification"]["agreement"]["accuracy"]["float"] > 0.7
    assert out.is_file()

    folder = tmp_path / "saved"
    trained.export(str(folder), verbose=False)
    out2 = tmp_path / "saved.int8.onnx"
    assert main(["quantize", str(folder), "-o", str(out2), "--data", str(data), "--quiet",
                 "--search-time", "0"]) == 0
    assert out2.is_file()
    capsys.readouterr()


def test_cli_names_a_bad_keras_file(tmp_path, capsys):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 28, 28, 1), np.float32))
    rc = main(["quantize", str(bad), "-o", str(tmp_path / "o.onnx"), "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad.name) in err and "not a readable .keras file" in err


def test_prune_with_fine_tuning_runs_the_converted_graph_in_torch(trained, digits28):
    x_tr, y_tr, _, _ = digits28
    cm = lowbit.prune(trained, (x_tr[:TRAIN], y_tr[:TRAIN]), sparsity=0.5, epochs=1)
    assert "1. pruning + fine-tuning" in cm.report["training"]  # trained, not post-training
    assert cm.report["verification"]["agreement"]["accuracy"]["compressed"] > 0.7
    weights = [w for w in cm.fm.weights.values() if w.ndim >= 2]
    assert weights and all(int((w == 0).sum()) == round(0.5 * w.size) for w in weights)


def test_resolve_model_names_and_sizes_a_keras_model(trained):
    fm, name, size = resolve_model(trained, None)
    assert name == "tutorial_cnn" and size > 4 * 5408 * 10
    assert [i.name for i in fm.proto.graph.input] == ["image"]


def test_train_keras_is_repeatable():
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        runs.append(train_keras(classic_cnn(), x, y, epochs=1, batch_size=16, seed=1))
    assert runs[0] == runs[1] and len(runs[0]) == 1
