"""Integer codings of tensor parts, on numpy arrays: bit packing, gaps, bitmaps, byte planes.

These produce bytes that zstd then entropy-codes; none of them is an entropy
coder. The decoders take untrusted bytes and raise ``CodecError`` (a plain
``ValueError``) with a short reason for anything inconsistent; the caller
turns it into a ``ContainerError`` naming the file and the tensor.

Arrays of tensor values are handled as their bit patterns (unsigned integers
of the element size), so -0.0 and NaN payloads are just numbers here.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 20  # elements per step when bit packing (bounds temporary memory)
_MAX_VARINT_BYTES = 9  # 63 bits: more than any position in a 2 GiB tensor


class CodecError(ValueError):
    """Untrusted bytes do not decode to what the manifest says."""


def uint_dtype(itemsize: int) -> np.dtype:
    """Little-endian unsigned integer dtype holding the bit pattern of one element."""
    return np.dtype(f"<u{itemsize}")


# ---------------------------------------------------------------- bit packing


def index_bits(k: int) -> int:
    """Bits per index into a codebook of ``k`` entries: ceil(log2 k), at least 1."""
    return max(1, (k - 1).bit_length())


def pack_bits(indices: np.ndarray, bits: int) -> bytes:
    """``indices`` (each < 2**bits) packed ``bits`` each, little-endian bit order."""
    idx = np.ascontiguousarray(indices, dtype=np.uint8)
    if bits == 8:
        return idx.tobytes()
    shifts = np.arange(bits, dtype=np.uint8)
    out = []
    for start in range(0, idx.size, _CHUNK):  # _CHUNK * bits is a whole number of bytes
        planes = (idx[start: start + _CHUNK, None] >> shifts) & 1  # (chunk, bits)
        out.append(np.packbits(planes.ravel(), bitorder="little").tobytes())
    return b"".join(out)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_bits``; checks the length and that padding bits are zero."""
    if len(data) != packed_size(count, bits):
        raise CodecError(f"{len(data)} bytes of {bits}-bit indices, expected {packed_size(count, bits)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    tail = count * bits % 8
    if tail and raw[-1] >> tail:
        raise CodecError("nonzero padding bits after the last index")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint8)
    out = np.empty(count, dtype=np.uint8)
    step_bytes = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        planes = np.unpackbits(raw[i * step_bytes: i * step_bytes + packed_size(n, bits)],
                               count=n * bits, bitorder="little").reshape(n, bits)
        out[start: start + n] = planes @ weights if bits > 1 else planes[:, 0]
    return out


# ---------------------------------------------------------------- positions


def encode_gaps(positions: np.ndarray) -> bytes:
    """Sorted distinct positions as LEB128 varints of the gaps (p0, then p[i] - p[i-1] - 1)."""
    pos = np.asarray(positions, dtype=np.uint64)
    if pos.size == 0:
        return b""
    gaps = np.diff(pos, prepend=np.uint64(0)) - np.uint64(1)
    gaps[0] = pos[0]
    lengths = np.ones(gaps.size, dtype=np.int64)
    for k in range(1, _MAX_VARINT_BYTES + 1):
        lengths += gaps >= np.uint64(1 << (7 * k))
    starts = np.cumsum(lengths) - lengths
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    for k in range(int(lengths.max())):
        sel = lengths > k
        byte = (gaps[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (byte | more).astype(np.uint8)
    return out.tobytes()


def decode_gaps(data: bytes, nnz: int, size: int) -> np.ndarray:
    """Positions (int64, ascending) from ``encode_gaps`` bytes; all checked to lie in [0, size)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if nnz == 0:
        if raw.size:
            raise CodecError("position bytes given for a tensor with no nonzeros")
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != nnz or ends[-1] != raw.size - 1:
        raise CodecError(f"position bytes hold {ends.size} complete gaps, expected {nnz}")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise CodecError("a position gap is longer than 9 bytes")
    if np.any((lengths > 1) & (raw[ends] == 0)):
        raise CodecError("a position gap is not minimally encoded")
    gaps = np.zeros(nnz, dtype=np.uint64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        gaps[sel] |= (raw[starts[sel] + k].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * k)
    if int(gaps.max()) >= size:
        raise CodecError(f"a position gap exceeds the tensor size {size}")
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1  # each gap < size, so no overflow
    if int(positions[-1]) >= size:
        raise CodecError(f"a position ({int(positions[-1])}) lies outside the tensor of {size} elements")
    return positions


def encode_bitmap(mask: np.ndarray) -> bytes:
    """One bit per element (1 = stored), little-endian bit order."""
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little").tobytes()


def decode_bitmap(data: bytes, nnz: int, size: int) -> np.ndarray:
    """Positions from ``encode_bitmap`` bytes; checks length, padding and the count of ones."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != (size + 7) // 8:
        raise CodecError(f"{raw.size}-byte bitmap for {size} elements, expected {(size + 7) // 8}")
    if size % 8 and raw[-1] >> (size % 8):
        raise CodecError("nonzero padding bits after the bitmap")
    mask = np.unpackbits(raw, count=size, bitorder="little").astype(bool)
    positions = np.flatnonzero(mask)
    if positions.size != nnz:
        raise CodecError(f"bitmap marks {positions.size} elements, expected {nnz}")
    return positions


# ---------------------------------------------------------------- values


def shuffle_bytes(values: np.ndarray) -> bytes:
    """Byte planes: all first bytes, then all second bytes, ... (exponents line up for zstd)."""
    planes = values.view(np.uint8).reshape(values.size, values.itemsize)  # (n, itemsize)
    return planes.T.tobytes()


def unshuffle_bytes(data: bytes, count: int, itemsize: int) -> np.ndarray:
    if len(data) != count * itemsize:
        raise CodecError(f"{len(data)} bytes of values, expected {count * itemsize}")
    planes = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, count)
    return np.ascontiguousarray(planes.T).view(uint_dtype(itemsize)).reshape(count)


def raw_values(data: bytes, count: int, itemsize: int) -> np.ndarray:
    if len(data) != count * itemsize:
        raise CodecError(f"{len(data)} bytes of values, expected {count * itemsize}")
    return np.frombuffer(data, dtype=uint_dtype(itemsize)).copy()
