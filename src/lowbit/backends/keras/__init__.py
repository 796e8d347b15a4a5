"""Keras backend: Keras 3 models and TensorFlow SavedModels in, as lowbit's float ONNX
model (issue 11).

- ``keras_to_onnx(model, name=...)``: lowbit's own converter of a Functional or
  Sequential model's layer graph (``convert``, ``layers_conv``, ``layers_core``,
  ``activations``, over the layout-aware ``graph``).
- ``load_keras(path)``: ``.keras`` / ``.h5`` files (``safe_mode``) and SavedModel folders
  (``savedmodel`` freezes the ``serving_default`` signature, ``tf_ops`` converts its ops).
- ``is_keras_model`` / ``is_keras_path``: cheap checks that import nothing.
- ``models``: the tutorial and classic Keras CNNs and a small trainer, for demos.

TensorFlow and Keras are imported only inside these functions (``env``); without them a
Keras feature is a ``ValidationError`` naming ``pip install "lowbit[tf]"``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import onnx

KERAS_PATH_SUFFIXES = (".keras", ".h5", ".hdf5")


def is_keras_model(obj: Any) -> bool:
    """True for a ``keras.Model``; never imports Keras (an object cannot be one unless
    Keras is imported already)."""
    keras = sys.modules.get("keras")
    model = getattr(keras, "Model", None) if keras is not None else None
    return isinstance(model, type) and isinstance(obj, model)


def is_keras_path(path: Any) -> bool:
    """True for a path named ``.keras``/``.h5``/``.hdf5`` or a folder holding
    ``saved_model.pb`` (a TensorFlow SavedModel)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        return False
    p = Path(path)
    if p.suffix.lower() in KERAS_PATH_SUFFIXES:
        return True
    return p.is_dir() and ((p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file())


def keras_to_onnx(model: Any, *, name: str) -> onnx.ModelProto:
    """The float ONNX model of a Keras 3 Functional or Sequential model (NHWC inputs and
    Keras' names kept; convolutions channels-first inside)."""
    from lowbit.backends.keras.convert import keras_to_onnx as convert

    return convert(model, name=name)


def load_keras(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read a ``.keras``/``.h5`` file or a SavedModel folder and convert it."""
    from lowbit.backends.keras.load import load_keras as load

    return load(path)


__all__ = ["is_keras_model", "is_keras_path", "keras_to_onnx", "load_keras"]
