"""Read a Keras model file (``.keras``, a legacy ``.h5`` Keras 3 can read) or a TensorFlow
SavedModel folder, and convert it to lowbit's float ONNX model.

``.keras`` and ``.h5`` files are read with ``keras.saving.load_model(safe_mode=True)``:
no Python code stored in the file (a ``Lambda``'s bytecode, pickles) is ever run, and a
class that is not part of Keras is refused with its name instead of imported."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import onnx

from lowbit.backends.keras.env import import_keras
from lowbit.backends.keras.savedmodel import is_savedmodel_dir, savedmodel_to_onnx
from lowbit.errors import LowbitError, ModelLoadError
from lowbit.fileio import input_file

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_MISSING = re.compile(r"(?:Could not locate|Unknown) (?:class|layer|function|object)"
                      r"[^'\"`]*['\"`]([\w.]+)['\"`]")


def load_keras(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The float ONNX model of the Keras file or SavedModel folder at ``path``."""
    from lowbit.backends.keras.convert import keras_to_onnx

    p = Path(path)
    if p.is_dir():
        if not is_savedmodel_dir(p):
            raise ModelLoadError(f"{p}: a folder that is not a TensorFlow SavedModel "
                                 "(no saved_model.pb in it)")
        return savedmodel_to_onnx(p)
    input_file(p, "model", ModelLoadError)
    suffix = p.suffix.lower()
    if suffix in KERAS_SUFFIXES and not zipfile.is_zipfile(p):
        raise ModelLoadError(f"model file {p} is not a readable .keras file (a .keras file is a "
                             "zip archive; this one is truncated or another format)")
    if suffix in H5_SUFFIXES:
        with open(p, "rb") as fh:
            if fh.read(len(HDF5_MAGIC)) != HDF5_MAGIC:
                raise ModelLoadError(f"model file {p} is not an HDF5 file (truncated or "
                                     "another format)")
    if suffix not in KERAS_SUFFIXES + H5_SUFFIXES:
        raise ModelLoadError(f"model file {p}: not a Keras model (.keras, .h5) or a "
                             "SavedModel folder")
    keras = import_keras(f"reading {p}")
    try:
        model = keras.saving.load_model(p, compile=False, safe_mode=True)
    except LowbitError:
        raise
    except Exception as exc:
        raise ModelLoadError(_load_failure(p, exc)) from None
    return keras_to_onnx(model, name=str(p))


def _load_failure(path: Path, exc: BaseException) -> str:
    """One line on why Keras could not read ``path``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    missing = _MISSING.search(text)
    if missing:
        return (f"{path}: the model uses the class '{missing.group(1)}', which is not part of "
                "Keras; lowbit cannot load it (it never imports or runs a model file's own code)")
    if "Lambda" in text and "safe_mode" in text:
        return (f"{path}: the model has a Lambda layer (stored Python code); lowbit does not "
                "load it (safe_mode). Replace the Lambda with Keras layers")
    if path.suffix.lower() in H5_SUFFIXES:
        return (f"{path}: Keras 3 cannot read this legacy HDF5 model ({text[:200]}); re-save it "
                "as .keras with the Keras version that wrote it")
    if isinstance(exc, (zipfile.BadZipFile, EOFError, OSError, KeyError)):
        return f"model file {path} is not a readable .keras file (truncated or damaged: {text[:200]})"
    return f"{path}: Keras could not load the model ({text[:300]})"
