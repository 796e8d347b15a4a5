"""How data arrays map onto a model's inputs: the one layout rule of every verb (issue 12).

A model input has rank R; each dimension is fixed (an int) or dynamic.

- An array of rank R holds *rows*: axis 0 is the batch axis. The model runs on batches
  of rows; where its inputs fix the first dimension at B, every run has exactly B rows
  (the last run is filled up from the first rows and their extra results are dropped).
- An array of rank R + 1 holds *whole samples*: axis 0 counts samples and each sample
  is a whole input of the model's shape (a model with no batch axis, e.g. [5, 5], or
  one fixed at B whose samples are stored as [B, ...]). The model runs once per sample.
- Any other rank, a dimension that differs from a fixed one, inputs stored both ways,
  or rows for inputs that share no batch axis (different fixed first dimensions, or an
  input without axes) is a ``DataError`` naming the input, the model's shape and the
  data's shape.
- The batch a model runs and is timed at is its fixed first dimension, else the rows
  of one whole sample, else ``--batch`` (default 8); a ``--batch`` that disagrees with
  the first two is a ``ValidationError`` naming both numbers.

Synthetic inputs (no data given) follow the same rule: rows where the inputs share a
batch axis, whole samples where they do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.errors import DataError, ValidationError

DEFAULT_BATCH = 8
Shape = tuple[int | str | None, ...]  # a model shape: ints, or None/str for dynamic
DEFAULT_DYNAMIC_DIM = 16  # dynamic dims other than the batch (e.g. sequence length) without data


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints, or None/str for dynamic)."""

    name: str
    dtype: np.dtype[Any]
    shape: Shape


def fmt_shape(shape: tuple[Any, ...]) -> str:
    """A model shape as text, ``?`` for a dynamic dimension: ``(?, 16)``."""
    dims = ["?" if not isinstance(d, int) or d <= 0 else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _static(dim: Any) -> bool:
    return isinstance(dim, int) and dim > 0


def fixed_first_dims(specs: list[InputSpec]) -> dict[str, int]:
    """The inputs whose first dimension is fixed, with its size."""
    return {s.name: int(s.shape[0]) for s in specs if s.shape and _static(s.shape[0])}


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size a model's inputs declare (the one static first dimension they
    share), if any."""
    dims = set(fixed_first_dims(specs).values())
    return dims.pop() if len(dims) == 1 else None


def no_batch_axis(specs: list[InputSpec]) -> str | None:
    """Why the inputs share no batch axis (so only whole samples fit), or None."""
    scalars = [s.name for s in specs if not s.shape]
    if scalars:
        return f"input(s) {scalars} have no axes"
    dims = fixed_first_dims(specs)
    if len(set(dims.values())) > 1:
        listed = ", ".join(f"'{k}': {v}" for k, v in dims.items())
        return f"the inputs fix different first dimensions ({listed})"
    return None


def _mismatch(source: str, spec: InputSpec, arr: np.ndarray, why: str) -> DataError:
    return DataError(f"{source}: array '{spec.name}' has shape {tuple(arr.shape)} but the "
                     f"model input '{spec.name}' has shape {fmt_shape(spec.shape)}: {why}")


def holds_whole_samples(arrays: dict[str, np.ndarray], specs: list[InputSpec],
                        source: str) -> bool:
    """True if ``arrays`` hold whole samples (rank R + 1), False if rows (rank R).

    Checks every array's rank and fixed dimensions against its input; anything the rule
    cannot place is a DataError naming the input and both shapes."""
    whole: dict[str, bool] = {}
    for spec in specs:
        arr, rank = arrays[spec.name], len(spec.shape)
        if arr.ndim == rank + 1:
            whole[spec.name], model_dims = True, spec.shape
        elif arr.ndim == rank:
            whole[spec.name], model_dims = False, spec.shape[1:]
        else:
            raise _mismatch(source, spec, arr, (
                f"rank {arr.ndim}; give rank {rank} (axis 0 the batch axis) or rank "
                f"{rank + 1} (axis 0 counts samples, each a whole input)"))
        for axis, (got, want) in enumerate(zip(arr.shape[1:], model_dims), start=1):
            if _static(want) and got != want:
                kind = "whole samples" if whole[spec.name] else "rows, axis 0 the batch axis"
                raise _mismatch(source, spec, arr, f"read as {kind}, axis {axis} is {got}, "
                                                   f"the model's is {want}")
    if len(set(whole.values())) > 1:
        shapes = "; ".join(f"'{s.name}' {tuple(arrays[s.name].shape)} for model input "
                           f"{fmt_shape(s.shape)}" for s in specs)
        raise DataError(f"{source}: ambiguous layout: some arrays have one more axis than "
                        f"their model input (whole samples) and some do not (rows): {shapes}; "
                        "store every input the same way")
    if any(whole.values()):
        _check_named_rows(arrays, specs, source)
    else:
        why = no_batch_axis(specs)
        if why is not None:
            want = ", ".join(f"'{s.name}' as {fmt_shape(('n', *s.shape))}".replace("?", "n", 1)
                             for s in specs)
            got = ", ".join(f"'{s.name}' {tuple(arrays[s.name].shape)} for model input "
                            f"{fmt_shape(s.shape)}" for s in specs)
            raise DataError(f"{source}: the arrays ({got}) hold rows with axis 0 as the batch "
                            f"axis, but {why}, so they share no batch axis; store each sample "
                            f"whole: {want}")
    return any(whole.values())


def _check_named_rows(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> None:
    """Whole samples of inputs whose dynamic first axes share a name (N in [N, 16] and
    [N, 4, 4]) must have as many rows as each other."""
    by_name: dict[str, list[InputSpec]] = {}
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], str) and spec.shape[0]:
            by_name.setdefault(spec.shape[0], []).append(spec)
    for name, group in by_name.items():
        if len({arrays[s.name].shape[1] for s in group}) > 1:
            shapes = "; ".join(f"'{s.name}' {tuple(arrays[s.name].shape)} for model input "
                               f"{fmt_shape(s.shape)}" for s in group)
            raise DataError(f"{source}: whole samples of inputs sharing the first axis {name!r} "
                            f"have different rows: {shapes}")


def synthetic_shape(spec: InputSpec, samples: int, whole: bool,
                    dynamic: int = DEFAULT_DYNAMIC_DIM) -> list[int]:
    """The shape of ``samples`` synthetic samples of ``spec``: rows ``[samples, ...]`` or
    whole samples ``[samples, *shape]`` (a dynamic first axis of a whole sample is 1, any
    other dynamic dimension ``dynamic``)."""
    if whole:
        return [samples] + [d if _static(d) else (1 if axis == 0 else dynamic)
                            for axis, d in enumerate(spec.shape)]
    return [samples] + [d if _static(d) else dynamic for d in spec.shape[1:]]


def own_batch(specs: list[InputSpec], sample_rows: int | None) -> tuple[int, str] | None:
    """(the batch the model itself runs at, why) when the model or the data fix it:
    its fixed first dimension, or ``sample_rows``, the rows of one whole sample."""
    fixed = fixed_batch(specs)
    if fixed is not None:
        name = next(k for k, v in fixed_first_dims(specs).items() if v == fixed)
        shape = next(s.shape for s in specs if s.name == name)
        return fixed, f"the model's fixed batch {fixed} (input '{name}' has shape {fmt_shape(shape)})"
    if sample_rows is not None:
        return sample_rows, (f"the data's {sample_rows} rows per run (each sample is a whole "
                             "input)")
    return None


def resolve_batch(specs: list[InputSpec], batch: int | None,
                  sample_rows: int | None = None) -> int:
    """The batch a model runs and is timed at: its own (``own_batch``), else ``batch``,
    else ``DEFAULT_BATCH``. A ``batch`` that disagrees with the model's own is refused."""
    own = own_batch(specs, sample_rows)
    if own is None:
        return DEFAULT_BATCH if batch is None else batch
    if batch is not None and batch != own[0]:
        raise ValidationError(f"option batch: {batch} disagrees with {own[1]}; leave it out "
                              f"or give {own[0]}")
    return own[0]


def whole_sample_labels(labels: np.ndarray, output: Shape | None, specs: list[InputSpec],
                        arrays: dict[str, np.ndarray], source: str
                        ) -> tuple[np.ndarray, int, Shape | None]:
    """Labels of whole samples as (labels, one per output row; rows per sample; the
    first output's shape by rows).

    Each run's first output gives rows: its first axis when it has two or more (fixed,
    or named like an input's dynamic first axis, e.g. N in [N, 16] -> [N, 4]: that
    input's rows per sample); labels per sample then have that many rows, merged.
    An output with fewer axes gives one row per sample (the outputs are stacked)."""
    if output is None:
        return labels, 1, output
    if len(output) < 2:
        return labels, 1, (None, *output)
    first = output[0]
    named = next((int(arrays[s.name].shape[1]) for s in specs if isinstance(first, str)
                  and s.shape and s.shape[0] == first and arrays[s.name].ndim >= 2), 1)
    rows = first if _static(first) else named
    if rows == 1:
        return labels, 1, output
    if labels.ndim < 2 or labels.shape[1] != rows:
        raise DataError(f"{source}: labels 'y' have shape {tuple(labels.shape)}; each sample "
                        f"is a whole input whose output {fmt_shape(output)} has {rows} rows, "
                        f"so labels need shape ({labels.shape[0]}, {rows})")
    return labels.reshape(-1, *labels.shape[2:]), int(rows), output
