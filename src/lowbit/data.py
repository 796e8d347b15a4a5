"""Data in: .npz files, arrays, dicts, torch tensors and DataLoaders.

Everything becomes a ``Dataset``: one float/int array per model input (first axis =
samples) and optional labels ``y``. How the arrays map onto the model's inputs (rows
of a batch, or whole samples) is ``lowbit.layouts``' rule. Files are read with
``allow_pickle=False``: an .npz can never run code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.errors import DataError
from lowbit.layouts import (
    DEFAULT_BATCH,
    InputSpec,
    fixed_batch,
    holds_whole_samples,
    no_batch_axis,
    resolve_batch,
    synthetic_shape,
    whole_sample_labels,
)
from lowbit.npz import load_npz

LABEL_KEYS = ("y", "labels", "label")


@dataclass
class Dataset:
    """Samples for a model's inputs, and optional labels.

    ``fixed_batch``: the batch size the model's inputs declare (a static first
    dimension), which every run then has. ``whole``: each sample (first axis) is a whole
    input and the model runs once per sample (``lowbit.layouts``). ``labels`` hold one
    entry per output row: ``label_rows`` per sample (the rows of one run's first output
    when samples are whole, else 1)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "data"
    fixed_batch: int | None = None
    whole: bool = False
    label_rows: int = 1

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, start: int, stop: int) -> Dataset:
        r = self.label_rows
        return Dataset(
            {k: v[start:stop] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[start * r : stop * r],
            self.source, self.fixed_batch, self.whole, r,
        )

    def runs(self, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(samples covered, feed) for each model run: one whole sample per run, or
        consecutive rows; with ``fixed_batch`` each run has exactly that many rows (the
        last one filled up from the start), and a caller keeps the first ``num_samples``
        results."""
        n = self.num_samples
        if self.whole:
            for i in range(n):
                yield 1, {k: v[i] for k, v in self.inputs.items()}
            return
        size = self.fixed_batch or batch_size
        for start in range(0, n, size):
            if self.fixed_batch and start + size > n:
                idx = np.arange(start, start + size) % n
                yield n - start, {k: np.ascontiguousarray(v[idx]) for k, v in self.inputs.items()}
            else:
                yield min(size, n - start), {k: v[start : start + size]
                                             for k, v in self.inputs.items()}

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """The feed of each model run (``runs``)."""
        for _, feed in self.runs(batch_size):
            yield feed

    def feed(self, batch_size: int) -> dict[str, np.ndarray]:
        """One run's input: the first whole sample, or exactly ``batch_size`` rows
        (``fixed_batch`` if the model has one; repeating samples if needed)."""
        if self.whole:
            return {k: np.ascontiguousarray(v[0]) for k, v in self.inputs.items()}
        idx = np.arange(self.fixed_batch or batch_size) % self.num_samples
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.inputs.items()}

    def rows_per_run(self, batch_size: int) -> int:
        """The batch each run has: the first axis of a whole sample (1 if it has none),
        else ``fixed_batch`` or ``batch_size``."""
        if self.whole:
            return next((int(v.shape[1]) for v in self.inputs.values() if v.ndim >= 2), 1)
        return self.fixed_batch or batch_size

    def join_outputs(self, parts: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Each output's per-run results as one array: rows concatenated (the fill-up
        rows of a fixed batch dropped); whole samples' outputs concatenated along their
        first axis (rows), or stacked where an output has fewer than two axes."""
        if self.whole:
            return [np.concatenate(p) if p[0].ndim >= 2 else np.stack(p) for p in parts]
        n = self.num_samples
        return [np.concatenate(p)[:n] if p[0].ndim else np.stack(p) for p in parts]


def run_batch(specs: list[InputSpec], batch: int | None, data: Dataset | None = None) -> int:
    """The batch a model runs and is timed at (``layouts.resolve_batch``): its fixed first
    dimension, the rows of one whole sample of ``data``, or ``batch`` (default 8)."""
    rows = data.rows_per_run(DEFAULT_BATCH) if data is not None and data.whole else None
    return resolve_batch(specs, batch, rows)


def _to_numpy(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if getattr(value, "is_floating_point", lambda: False)() and value.element_size() == 2:
            value = value.float()  # bfloat16 has no numpy type; float16 is exact in float32
        value = value.numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise DataError(f"{what}: cannot be read as an array ({exc})") from None
    if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (kind 'V'): exact in float32
        arr = arr.astype(np.float32)
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


def _from_batches(data: Iterable[Any], limit: int | None, source: str) -> dict[str, Any]:
    """Arrays from an iterable of batches (x, or (x, y), or dicts of arrays)."""
    try:
        xs, ys = _materialise_iterable(data, limit or 10**9)
        if not xs:
            raise DataError(f"{source}: the iterable yielded no batches")
        if isinstance(xs[0], dict):
            raw = {k: np.concatenate([_to_numpy(b[k], k) for b in xs]) for k in xs[0]}
        else:
            raw = {"x": np.concatenate([np.atleast_1d(_to_numpy(b, "x")) for b in xs])}
        if ys:
            raw["y"] = np.concatenate([np.atleast_1d(y) for y in ys])
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise DataError(f"{source}: cannot read the batches as arrays ({str(exc)[:120]}); give "
                        "an array, a dict of arrays, (x, y), or an iterable of such batches") from None
    return raw


def as_dataset(
    data: Any,
    specs: list[InputSpec],
    *,
    source: str | None = None,
    limit: int | None = None,
    output: tuple[int | str | None, ...] | None = None,
) -> Dataset:
    """Turn ``data`` into a validated ``Dataset`` for a model with inputs ``specs``.

    ``data``: path to .npz; array (single-input model); dict of arrays by input
    name (or ``x``), optional ``y``; ``(x, y)`` tuple; torch tensors; or an
    iterable of batches such as a DataLoader (at most ``limit`` samples are read).
    ``output``: the shape of the model's first output, to check the labels against
    (``check_labels``).
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
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        raw = _from_batches(data, limit, source or "data")
    else:
        raise DataError(f"unsupported data type: {type(data).__name__}")
    source = source or "data"
    for key in LABEL_KEYS:
        if key in raw and key not in {s.name for s in specs}:
            labels = _to_numpy(raw.pop(key), f"{source}: labels '{key}'")
            break
    inputs, whole = _match_inputs(raw, specs, source)
    n = next(iter(inputs.values())).shape[0]
    for name, arr in inputs.items():
        if arr.shape[0] != n:
            raise DataError(
                f"{source}: arrays have different sample counts ({name}: {arr.shape[0]}, expected {n})"
            )
    if n == 0:
        raise DataError(f"{source}: no samples (the arrays are empty)")
    empty = [k for k, v in inputs.items() if v.size == 0]
    if empty:
        raise DataError(f"{source}: array(s) {empty} hold no values (shape "
                        f"{tuple(inputs[empty[0]].shape)})")
    rows = 1
    if labels is not None:
        if labels.ndim == 0 or labels.shape[0] != n:
            raise DataError(f"{source}: {labels.shape[0] if labels.ndim else 0} labels for "
                            f"{n} samples")
        if whole:
            labels, rows, output = whole_sample_labels(labels, output, specs, inputs, source)
        labels = check_labels(labels, output, source)
    dataset = Dataset(inputs, labels, source, fixed_batch(specs), whole, rows)
    return dataset.take(0, limit) if limit is not None and n > limit else dataset


def synthetic_dataset(specs: list[InputSpec], samples: int, seed: int = 0,
                      source: str = "synthetic inputs") -> Dataset:
    """``samples`` seeded random inputs for a model with inputs ``specs``: rows where
    the inputs share a batch axis, else whole samples (``lowbit.layouts``)."""
    whole = no_batch_axis(specs) is not None
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = synthetic_shape(spec, samples, whole)
        feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype) \
            if spec.dtype.kind == "f" else np.zeros(shape, dtype=spec.dtype)
    return Dataset(feed, None, source, fixed_batch(specs), whole)


def check_labels(labels: np.ndarray, output: tuple[int | str | None, ...] | None,
                 source: str) -> np.ndarray:
    """Labels as the model's first output (shape ``output``) can use them.

    A classifier (output [N, K], K >= 2) takes class indices in [0, K): integers, floats
    with integral values, or one-hot rows (N, K), which become indices. Any other output
    keeps its labels as targets (regression; fine-tuning checks their shape). Anything
    else is refused here, before any work, with the reason."""
    what = f"{source}: labels 'y'"
    if not np.all(np.isfinite(labels)):
        raise DataError(f"{what} hold NaN or infinite values")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    classes = output[1] if output is not None and len(output) == 2 else None
    classifier = output is not None and len(output) == 2 and (
        not isinstance(classes, int) or classes >= 2)
    if labels.ndim == 2 and classifier and _one_hot(labels):
        if isinstance(classes, int) and labels.shape[1] != classes:
            raise DataError(f"{what} are one-hot with {labels.shape[1]} classes but the model "
                            f"outputs {classes}")
        return np.argmax(labels, axis=1).astype(np.int64)
    if classifier and labels.ndim == 1:
        if labels.dtype.kind == "f":
            if not np.all(labels == np.round(labels)):
                raise DataError(f"{what} are not class indices (e.g. {_first_fraction(labels):g}); "
                                "a classifier needs integers 0..K-1 or one-hot rows")
            labels = labels.astype(np.int64)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (isinstance(classes, int) and high >= classes):
            span = f"0..{classes - 1}" if isinstance(classes, int) else ">= 0"
            raise DataError(f"{what} run from {low} to {high} but the model's output has "
                            f"classes {span}")
        return labels
    return labels  # targets of another output (regression): checked where they are used


def _one_hot(labels: np.ndarray) -> bool:
    return labels.shape[1] >= 2 and bool(np.all((labels == 0) | (labels == 1))) and \
        bool(np.all(labels.sum(axis=1) == 1))


def _first_fraction(labels: np.ndarray) -> float:
    return float(labels[labels != np.round(labels)][0])


def _match_inputs(raw: dict[str, Any], specs: list[InputSpec], source: str
                  ) -> tuple[dict[str, np.ndarray], bool]:
    """The array of each input, in its dtype, and whether they hold whole samples."""
    names = [s.name for s in specs]
    if len(specs) == 1 and specs[0].name not in raw:
        if "x" in raw:
            raw = {specs[0].name: raw.pop("x"), **raw}
        elif len(raw) == 1:
            raw = {specs[0].name: next(iter(raw.values()))}
    unused = sorted(k for k in raw if k not in names)
    if unused:
        raise DataError(f"{source}: array(s) {unused} match no model input ({', '.join(names)}) "
                        f"and are not labels ({', '.join(LABEL_KEYS)}); remove or rename them")
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(
            f"{source}: no array for model input(s) {missing}; it has {sorted(raw)}. "
            "Use 'x' for a single-input model, or name the arrays after the model's inputs"
        )
    arrays = {s.name: _to_numpy(raw[s.name], f"{source}: array '{s.name}'") for s in specs}
    scalars = [k for k, v in arrays.items() if v.ndim == 0]
    if scalars:
        raise DataError(f"{source}: array(s) {scalars} hold a single value; samples go along "
                        "the first axis")
    whole = holds_whole_samples(arrays, specs, source)
    return {s.name: _fit(arrays[s.name], s, source) for s in specs}, whole


def _fit(arr: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    """``arr`` in the input's dtype (its shape is checked by ``holds_whole_samples``)."""
    what = f"{source}: array '{spec.name}'"
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


def digits_resized(side: int = 28, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``digits_split`` with each 8x8 image resized (bilinear) to ``side`` x ``side``, as
    the classic 28x28 digit tutorials see their images: x is (N, 1, side, side) in [0, 1]."""
    import torch

    x_tr, y_tr, x_te, y_te = digits_split(seed)

    def resize(x: np.ndarray) -> np.ndarray:
        big = torch.nn.functional.interpolate(torch.from_numpy(x), size=(side, side),
                                              mode="bilinear", align_corners=False)
        return np.ascontiguousarray(big.clamp(0.0, 1.0).numpy(), dtype=np.float32)

    return resize(x_tr), y_tr, resize(x_te), y_te
