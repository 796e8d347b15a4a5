"""Importing TensorFlow and Keras only when a Keras feature is asked for.

``import lowbit`` never imports TensorFlow (seconds and hundreds of MB); these helpers
do, quietly, and turn a missing installation into one ``ValidationError`` line."""

from __future__ import annotations

import os
from typing import Any

from lowbit.errors import TF_EXTRA as INSTALL_HINT
from lowbit.errors import ValidationError


def _quiet_tf_logs() -> None:
    # TensorFlow prints C++ start-up notes (oneDNN, CPU features) unless told not to;
    # a user's own setting wins
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def import_keras(what: str = "reading a Keras model") -> Any:
    """The ``keras`` module (Keras 3), or a ``ValidationError`` naming the install."""
    _quiet_tf_logs()
    try:
        import keras
    except ImportError:
        raise ValidationError(f"{what} needs TensorFlow: {INSTALL_HINT}") from None
    if int(str(getattr(keras, "__version__", "0")).split(".")[0]) < 3:
        raise ValidationError(f"{what} needs Keras 3 (found keras {keras.__version__}): "
                              f"{INSTALL_HINT}")
    return keras


def import_tf(what: str = "reading a TensorFlow SavedModel") -> Any:
    """The ``tensorflow`` module, or a ``ValidationError`` naming the install."""
    _quiet_tf_logs()
    try:
        import tensorflow as tf
    except ImportError:
        raise ValidationError(f"{what} needs TensorFlow: {INSTALL_HINT}") from None
    return tf
