"""Keras models for demos and benchmarks (channels-last images, logits out), and a small
deterministic trainer. Importing this module does not import Keras; calling does."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.backends.keras.env import import_keras


def tutorial_cnn(side: int = 28, classes: int = 10) -> Any:
    """Keras' tutorial CNN: Conv2D(32, 3, relu) -> MaxPooling2D(2) -> Flatten ->
    Dense(classes), on (N, side, side, 1) images."""
    keras = import_keras("building a Keras model")
    layers = keras.layers
    return keras.Sequential([
        keras.Input((side, side, 1), name="image"),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(classes),
    ], name="tutorial_cnn")


def classic_cnn(side: int = 28, classes: int = 10) -> Any:
    """The classic Keras MNIST CNN: Conv2D(32, 3, relu) -> Conv2D(64, 3, relu) ->
    MaxPooling2D(2) -> Dropout(0.25) -> Flatten -> Dense(128, relu) -> Dropout(0.5) ->
    Dense(classes), on (N, side, side, 1) images."""
    keras = import_keras("building a Keras model")
    layers = keras.layers
    return keras.Sequential([
        keras.Input((side, side, 1), name="image"),
        layers.Conv2D(32, 3, activation="relu"),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(classes),
    ], name="classic_cnn")


def train_keras(model: Any, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int = 32,
                seed: int, lr: float = 1e-3) -> list[float]:
    """Train ``model`` (logits out) on NHWC float32 ``x`` and integer labels ``y`` with
    Adam and sparse categorical cross-entropy. ``seed`` fixes the shuffling and dropout
    (``keras.utils.set_random_seed``): the same starting weights and seed give the same
    losses and weights. (The starting weights are drawn when the model is built: seed
    before building for a fully repeatable run.) Returns the mean training loss of each
    epoch. The model is compiled anew."""
    keras = import_keras("training a Keras model")
    keras.utils.set_random_seed(int(seed))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(np.asarray(x, dtype=np.float32), np.asarray(y).astype(np.int64),
                        epochs=int(epochs), batch_size=int(batch_size), shuffle=True, verbose=0)
    return [float(v) for v in history.history["loss"]]
