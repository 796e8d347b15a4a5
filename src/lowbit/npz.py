"""Reading .npz data files safely: never unpickled, every member's declared size checked
against the bytes the archive holds and the machine's memory before it is read, and
only the rows a caller uses read from a large file."""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from lowbit.errors import DataError
from lowbit.fileio import input_file


def load_npz(path: str | os.PathLike[str], limit: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file; with ``limit``, only the first ``limit`` rows of each
    are read (streamed from the archive), so a huge calibration file costs no more
    memory than the samples used. Each member's header is checked against the bytes the
    archive holds and the machine's memory before anything is read."""
    p = input_file(path, "data", DataError)
    with open(p, "rb") as fh:
        head = fh.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"data file {p} is a single .npy array; save the arrays into an .npz "
                        "archive (numpy.savez(path, x=..., y=...))")
    if not head.startswith(b"PK"):
        raise DataError(f"data file {p} is not an .npz archive (a zip of .npy arrays, as "
                        "numpy.savez writes)")
    try:
        with np.load(str(p), allow_pickle=False) as npz:
            declared: dict[str, int] = {}
            arrays = {k: _read_member(npz, k, limit, declared) for k in npz.files}
            if len(set(declared.values())) > 1:
                raise DataError(f"data file {p}: arrays have different sample counts "
                                f"{declared}")
    except DataError as exc:
        raise DataError(str(exc) if str(p) in str(exc) else f"data file {p}: {exc}") from None
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"data file {p} holds Python objects (pickled); lowbit only reads plain "
                "numeric arrays and never unpickles data"
            ) from None
        raise DataError(f"data file {p} is not a readable .npz archive: {exc}") from None
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"data file {p} is not a readable .npz archive: {exc}") from None
    if not arrays:
        raise DataError(f"data file {p} holds no arrays")
    return arrays


def _read_member(npz: Any, key: str, limit: int | None, declared: dict[str, int]) -> np.ndarray:
    """Member ``key`` (its first ``limit`` rows), after checking that its header declares
    no more bytes than the archive holds or memory can take."""
    from numpy.lib import format as npy_format

    member = f"{key}.npy" if f"{key}.npy" in npz.zip.namelist() else key
    with npz.zip.open(member) as fh:
        version = npy_format.read_magic(fh)
        reader = (npy_format.read_array_header_1_0 if version == (1, 0)
                  else npy_format.read_array_header_2_0)
        shape, fortran, dtype = reader(fh)
        if dtype.hasobject:
            raise ValueError("object arrays need pickle")
        if len(shape):
            declared[key] = int(shape[0])
        rows = shape[0] if not len(shape) or limit is None else min(limit, shape[0])
        row_bytes = int(np.prod(shape[1:], dtype=np.float64)) * dtype.itemsize
        need = float(rows if len(shape) else 1) * row_bytes
        stored = npz.zip.getinfo(member).file_size - fh.tell()
        if float(np.prod(shape, dtype=np.float64)) * dtype.itemsize > stored:
            raise DataError(f"array '{key}' declares shape {tuple(shape)} but the archive holds "
                            f"only {max(stored, 0):,} bytes of it (damaged or forged)")
        if need > _memory_bytes() / 2:
            raise DataError(f"array '{key}' of shape {tuple(shape)} needs {need / 2**30:.1f} GiB, "
                            "more than half this machine's memory; pass fewer samples")
        if fortran or not len(shape) or rows == shape[0]:
            return npz[key]  # the plain reader (refuses pickled objects)
        buf = fh.read(rows * row_bytes)
        if len(buf) != rows * row_bytes:
            raise EOFError(f"member {key} is truncated")
        return np.frombuffer(buf, dtype=dtype).reshape((rows, *shape[1:])).copy()


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float(2**40)
