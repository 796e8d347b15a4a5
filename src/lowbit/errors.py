"""The one small hierarchy of errors lowbit raises on purpose.

Every error a user can cause (a bad file, bad data, a bad option) is a
``LowbitError``; the CLI prints its message and exits with ``exit_code``
instead of showing a traceback.
"""

from __future__ import annotations

TF_EXTRA = 'pip install "lowbit[tf]"'  # the extra with TensorFlow, Keras and LiteRT


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""

    exit_code = 2  # a usage or input error, unless a subclass says otherwise


class ModelLoadError(LowbitError):
    """A model file is missing, empty, truncated, not ONNX, or unusable."""


class ValidationError(LowbitError):
    """An option or value is out of range or inconsistent."""


class DataError(LowbitError):
    """Calibration/evaluation data is missing, empty, or does not fit the model."""


class UnsupportedOpError(LowbitError):
    """An operator lowbit cannot handle was met and ``strict`` was asked for."""


class TargetNotMetError(LowbitError):
    """The work finished but a required target (``--require``) was not met."""

    exit_code = 1
