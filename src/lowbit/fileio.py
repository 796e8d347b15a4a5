"""Atomic file writes: a temp file in the target's folder, then ``os.replace``.

A failure at any point leaves no partial file and does not touch an existing one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lowbit.errors import ValidationError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary temp file that becomes ``path`` only if the block succeeds."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ValidationError(f"output folder does not exist: {folder}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _final_mode(target))  # mkstemp makes 0600; honour umask
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _final_mode(target: Path) -> int:
    if target.exists():
        return target.stat().st_mode & 0o777
    mask = os.umask(0)
    try:
        return 0o666 & ~mask
    finally:
        os.umask(mask)


def input_file(path: str | os.PathLike[str], what: str,
               error: type[Exception] = ValidationError) -> Path:
    """An input that is an existing, regular, non-empty file (a device such as /dev/zero
    would be read forever), or ``error`` naming it (``what``: "model", "data", ...)."""
    p = Path(path)
    if not p.exists():
        raise error(f"{what} file not found: {p}")
    if p.is_dir():
        raise error(f"{what} path is a folder, not a file: {p}")
    if not p.is_file():
        raise error(f"{what} path {p} is not a regular file (a device, pipe or socket)")
    if p.stat().st_size == 0:
        raise error(f"{what} file is empty: {p}")
    return p


def has_magic(path: Any, magic: bytes, offset: int = 0) -> bool:
    """Whether ``path`` is a regular file whose bytes at ``offset`` are ``magic`` (a file
    told apart by its content, not its name)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(offset + len(magic))[offset:] == magic


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


NAME_MAX = 255  # bytes in one file name on common file systems
TEMP_NAME_EXTRA = 14  # atomic_open's temporary name: ".NAME.xxxxxxxx.tmp"
REPORT_SUFFIX = ".report.json"
PLOT_SUFFIX = ".report.png"


def report_path(output: str | os.PathLike[str]) -> Path:
    """Where the report of a model written to ``output`` goes: ``OUT.report.json`` beside
    it, so two outputs in one folder never share (or overwrite) a report."""
    out = Path(output)
    return out.with_name(out.name + REPORT_SUFFIX)


def plot_path(output: str | os.PathLike[str]) -> Path:
    """Where the stage plot of a model written to ``output`` goes: ``OUT.report.png``."""
    out = Path(output)
    return out.with_name(out.name + PLOT_SUFFIX)


def check_output_path(path: str | os.PathLike[str], inputs: tuple[Any, ...] = (), *,
                      option: str = "--output", report: bool = True,
                      suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output that would destroy something or cannot be
    written: a folder, a device or other non-regular file, a missing or read-only folder,
    or any of ``inputs`` (paths; other values are ignored). With ``report`` the same holds
    for the report written beside it (``report_path``). Returns the path."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValidationError(f"option {option}: expected a file path, got {type(path).__name__}")
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise ValidationError(f"option {option}: expected a file path as text, got bytes")
    target = Path(raw)
    if not raw or raw.endswith(os.sep) or target.is_dir():
        raise ValidationError(f"option {option}: '{raw}' is a folder; give a file name")
    extra = TEMP_NAME_EXTRA + (len(REPORT_SUFFIX) if report else 0)
    if len(os.fsencode(target.name)) + extra > NAME_MAX:
        raise ValidationError(f"option {option}: the file name is too long ({len(target.name)} "
                              f"characters; at most {NAME_MAX - extra} bytes, to leave room for "
                              "the temporary and report names)")
    for out in (target, report_path(target), plot_path(target)) if report else (target,):
        _check_target(out, inputs, option)
    if suffixes and target.suffix.lower() not in suffixes:
        raise ValidationError(f"option {option}: {target.name} - the extension decides the "
                              f"format; use one of {', '.join(suffixes)}")
    check_folder_writable(target.parent if str(target.parent) else Path("."), option)
    return target


def _check_target(target: Path, inputs: tuple[Any, ...], option: str) -> None:
    if target.is_dir():
        raise ValidationError(f"option {option}: {target} is a folder")
    if target.exists() and not target.is_file():
        raise ValidationError(f"option {option}: {target} exists and is not a regular file")
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and target.exists() and Path(item).exists() \
                and os.path.samefile(target, item):
            raise ValidationError(f"option {option}: {target} is an input of this command "
                                  f"({item}); lowbit never overwrites an input")


def check_folder_writable(folder: Path, option: str) -> None:
    """The folder exists and a file can be created in it (tried, then removed)."""
    if not folder.is_dir():
        raise ValidationError(f"option {option}: folder does not exist: {folder}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe.", dir=folder)
    except OSError as exc:
        raise ValidationError(f"option {option}: cannot create files in {folder} "
                              f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
