"""Give freed heap memory back to the operating system between large stages.

Quantizing a big model allocates and frees weight-sized buffers (sessions,
serialized candidates). glibc keeps freed blocks in its heap, so resident
memory ratchets up; ``malloc_trim`` returns them. A no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_memory() -> None:
    gc.collect()
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
