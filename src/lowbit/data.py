"""Data in: .npz files, arrays, dicts, torch tensors and DataLoaders.

Everything becomes a ``Dataset``: one float/int array per model input (first
axis = samples) and optional labels ``y``. Files are read with
``allow_pickle=False``: an .npz can never run code.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import DataError

LABEL_KEYS = ("y", "labels", "label")


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints, or None/str for dynamic)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str | None, ...]


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "data"

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, start: int, stop: int) -> Dataset:
        return Dataset(
            {k: v[start:stop] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[start:stop],
            self.source,
        )

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.num_samples, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def feed(self, batch_size: int) -> dict[str, np.ndarray]:
        """One batch of exactly ``batch_size`` samples (repeating samples if needed)."""
        n = self.num_samples
        idx = np.arange(batch_size) % n
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.inputs.items()}


def load_npz(path: str | os.PathLike[str], limit: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file; with ``limit``, only the first ``limit`` rows of each
    are read (streamed from the archive), so a huge calibration file costs no more
    memory than the samples used."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        raise DataError(f"data path is a folder, expected an .npz file: {p}")
    if p.stat().st_size == 0:
        raise DataError(f"data file is empty: {p}")
    try:
        with np.load(str(p), allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(f"data file {p} is a single .npy array; expected an .npz archive")
            if limit is None:
                arrays = {k: npz[k] for k in npz.files}
            else:
                declared: dict[str, int] = {}
                arrays = {k: _read_rows(npz, k, limit, declared) for k in npz.files}
                if len(set(declared.values())) > 1:
                    raise DataError(f"data file {p}: arrays have different sample counts "
                                    f"{declared}")
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"data file {p} holds Python objects (pickled); lowbit only reads plain "
                "numeric arrays and never unpickles data"
            ) from None
        raise DataError(f"data file {p} is not a readable .npz archive: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"data file {p} is not a readable .npz archive: {exc}") from None
    if not arrays:
        raise DataError(f"data file {p} holds no arrays")
    return arrays


def _read_rows(npz: Any, key: str, limit: int, declared: dict[str, int]) -> np.ndarray:
    """The first ``limit`` rows of member ``key`` without reading the rest."""
    from numpy.lib import format as npy_format

    with npz.zip.open(f"{key}.npy") as fh:
        version = npy_format.read_magic(fh)
        reader = (npy_format.read_array_header_1_0 if version == (1, 0)
                  else npy_format.read_array_header_2_0)
        shape, fortran, dtype = reader(fh)
        if len(shape):
            declared[key] = int(shape[0])
        if fortran or dtype.hasobject or len(shape) == 0 or shape[0] <= limit:
            return npz[key]  # the plain reader (refuses pickled objects)
        rows = limit
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        buf = fh.read(rows * row_bytes)
        if len(buf) != rows * row_bytes:
            raise EOFError(f"member {key} is truncated")
        return np.frombuffer(buf, dtype=dtype).reshape((rows, *shape[1:])).copy()


def _to_numpy(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise DataError(f"{what}: cannot be read as an array ({exc})") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise DataError(f"{what}: expected numeric values, got dtype {arr.dtype}")
    return arr


def _materialise_iterable(data: Iterable[Any], limit: int) -> tuple[list[Any], list[Any]]:
    xs: list[Any] = []
    ys: list[Any] = []
    count = 0
    for batch in data:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
            ys.append(_to_numpy(y, "labels"))
        else:
            x = batch
        xs.append(x)
        first = x if not isinstance(x, dict) else next(iter(x.values()))
        count += int(np.shape(first)[0]) if np.ndim(first) else 1
        if count >= limit:
            break
    return xs, ys


def as_dataset(
    data: Any,
    specs: list[InputSpec],
    *,
    source: str | None = None,
    limit: int | None = None,
) -> Dataset:
    """Turn ``data`` into a validated ``Dataset`` for a model with inputs ``specs``.

    ``data``: path to .npz; array (single-input model); dict of arrays by input
    name (or ``x``), optional ``y``; ``(x, y)`` tuple; torch tensors; or an
    iterable of batches such as a DataLoader (at most ``limit`` samples are read).
    """
    labels: np.ndarray | None = None
    if isinstance(data, (str, os.PathLike)):
        source = source or str(data)
        raw: dict[str, Any] = dict(load_npz(data, limit=limit))
    elif isinstance(data, dict):
        raw = dict(data)
    elif isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        raw = dict(data[0]) if isinstance(data[0], dict) else {"x": data[0]}
        raw["y"] = data[1]
    elif isinstance(data, np.ndarray) or hasattr(data, "detach"):
        raw = {"x": data}
    elif isinstance(data, Iterable):
        xs, ys = _materialise_iterable(data, limit or 10**9)
        if not xs:
            raise DataError(f"{source or 'data'}: the iterable yielded no batches")
        if isinstance(xs[0], dict):
            raw = {k: np.concatenate([_to_numpy(b[k], k) for b in xs]) for k in xs[0]}
        else:
            raw = {"x": np.concatenate([_to_numpy(b, "x") for b in xs])}
        if ys:
            raw["y"] = np.concatenate(ys)
    else:
        raise DataError(f"unsupported data type: {type(data).__name__}")
    source = source or "data"
    for key in LABEL_KEYS:
        if key in raw and key not in {s.name for s in specs}:
            labels = _to_numpy(raw.pop(key), f"{source}: labels '{key}'")
            break
    inputs = _match_inputs(raw, specs, source)
    n = next(iter(inputs.values())).shape[0]
    for name, arr in inputs.items():
        if arr.shape[0] != n:
            raise DataError(
                f"{source}: arrays have different sample counts ({name}: {arr.shape[0]}, expected {n})"
            )
    if n == 0:
        raise DataError(f"{source}: no samples (the arrays are empty)")
    if labels is not None:
        labels = labels.reshape(-1) if labels.ndim > 1 and labels.shape[-1] == 1 else labels
        if labels.shape[0] != n:
            raise DataError(f"{source}: {labels.shape[0]} labels for {n} samples")
    if limit is not None and n > limit:
        inputs = {k: v[:limit] for k, v in inputs.items()}
        labels = None if labels is None else labels[:limit]
    return Dataset(inputs, labels, source)


def _match_inputs(raw: dict[str, Any], specs: list[InputSpec], source: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if len(specs) == 1 and specs[0].name not in raw:
        if "x" in raw:
            raw = {specs[0].name: raw["x"]}
        elif len(raw) == 1:
            raw = {specs[0].name: next(iter(raw.values()))}
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(
            f"{source}: no array for model input(s) {missing}; it has {sorted(raw)}. "
            "Use 'x' for a single-input model, or name the arrays after the model's inputs"
        )
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = _to_numpy(raw[spec.name], f"{source}: array '{spec.name}'")
        out[spec.name] = _fit(arr, spec, source)
    return out


def _fit(arr: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    what = f"{source}: array '{spec.name}'"
    if arr.ndim != len(spec.shape):
        raise DataError(
            f"{what} has shape {tuple(arr.shape)} (rank {arr.ndim}); the model input "
            f"'{spec.name}' expects rank {len(spec.shape)} {_fmt_shape(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(arr.shape[1:], spec.shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(
                f"{what} has shape {tuple(arr.shape)}; the model input '{spec.name}' expects "
                f"{_fmt_shape(spec.shape)} (axis {axis}: {got} != {want})"
            )
    want_kind = spec.dtype.kind
    if want_kind == "f":
        if arr.dtype.kind == "f":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise DataError(f"{what} contains {bad} NaN/inf value(s)")
        arr = arr.astype(spec.dtype, copy=False)
    elif want_kind in "iub":
        if arr.dtype.kind == "f":
            raise DataError(
                f"{what} has dtype {arr.dtype}; the model input '{spec.name}' expects {spec.dtype}"
            )
        arr = arr.astype(spec.dtype, copy=False)
    return np.ascontiguousarray(arr)


def _fmt_shape(shape: tuple[int | str | None, ...]) -> str:
    return "(" + ", ".join("?" if not isinstance(d, int) or d <= 0 else str(d) for d in shape) + ")"


DEFAULT_DYNAMIC_DIM = 16  # non-batch dynamic dims (e.g. sequence length) without data


def synthetic_feed(specs: list[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of the right shape and dtype (for timing only)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = [batch] + [d if isinstance(d, int) and d > 0 else DEFAULT_DYNAMIC_DIM
                           for d in spec.shape[1:]]
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feed


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (x_train, y_train, x_test, y_test).

    x is float32 (N, 1, 8, 8) scaled to [0, 1]; a fixed, seeded, stratified
    80/20 split (1,437 train, 360 test).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def split_holdout(data: Dataset, fraction: float = 0.2) -> tuple[Dataset, Dataset, bool]:
    """(working part, held-back last ``fraction``, whether they are separate).

    With a single sample nothing can be held back: both parts are that sample."""
    n = data.num_samples
    if n < 2 or fraction <= 0:
        return data, data, False
    hold = min(max(1, int(round(n * fraction))), n - 1)
    work, held = data.take(0, n - hold), data.take(n - hold, n)
    held.source = f"{data.source} (last {hold} samples, held back from calibration/training)"
    return work, held, True
