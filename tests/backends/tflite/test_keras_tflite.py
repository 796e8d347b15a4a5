"""Keras 3 models to TFLite through lowbit: the float file matches Keras' own outputs, and
a Keras model needs no TRANSPOSE in TFLite (it is channels last throughout)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="lowbit[tf] is not installed: the Keras/TFLite "
                            "tests need it")
pytest.importorskip("ai_edge_litert", reason="lowbit[tf] is not installed: the TFLite tests "
                    "need ai-edge-litert")

from lowbit.backends.tflite.inspect import read_structure  # noqa: E402
from lowbit.backends.tflite.session import TfliteSession  # noqa: E402
from lowbit.backends.tflite.writer import write_tflite  # noqa: E402
from lowbit.model_io import resolve_model  # noqa: E402


def _branchy() -> keras.Model:
    layers = keras.layers
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3), name="pixels")
    a = layers.Conv2D(16, 3, strides=2, padding="same")(inp)
    a = layers.BatchNormalization()(a)
    a = layers.Activation("relu6")(a)
    b = layers.DepthwiseConv2D(3, padding="same", activation="relu")(a)
    b = layers.Conv2D(16, 1)(b)
    a = layers.Add()([a, b])
    c = layers.Concatenate()([layers.MaxPooling2D(2)(a), layers.AveragePooling2D(2)(a)])
    c = layers.UpSampling2D(2)(c)
    c = layers.Conv2D(8, 3, padding="valid", activation="sigmoid")(c)
    d = layers.GlobalAveragePooling2D()(c)
    out = layers.Dense(5, activation="softmax")(layers.Dense(12, activation="relu")(d))
    model = keras.Model(inp, out)
    bn = model.layers[2]
    bn.moving_mean.assign(np.random.default_rng(0).uniform(-0.3, 0.3, 16).astype(np.float32))
    bn.moving_variance.assign(np.random.default_rng(1).uniform(0.5, 2, 16).astype(np.float32))
    return model


def _classic() -> keras.Model:
    from lowbit.backends.keras.models import classic_cnn

    keras.utils.set_random_seed(4)
    return classic_cnn(28)


@pytest.mark.parametrize("build,shape", [(_branchy, (6, 16, 16, 3)), (_classic, (6, 28, 28, 1))])
def test_float_tflite_matches_keras(build, shape):
    model = build()
    x = np.random.default_rng(5).random(shape).astype(np.float32)
    fm, _, _ = resolve_model(model, x[:2])
    data = write_tflite(fm)
    session = TfliteSession(data)
    name = session.get_inputs()[0].name
    got = session.run(None, {name: x})[0]
    want = np.asarray(model(x, training=False))
    assert np.abs(got - want).max() < 1e-4
    assert "TRANSPOSE" not in read_structure(data)["op_counts"]
