"""One initializer <-> its segments in the indices, codebooks and values parts.

Encoding is chosen per tensor by measured size: every applicable coding of
the values (raw, byte planes, codebook + b-bit packed indices, codebook +
one byte per index) and, when the tensor has exact zeros, of the positions
(LEB128 gaps, bitmap) is compressed with a fast zstd level and the smallest
wins; sparse wins over dense only when positions + nonzero values are
smaller. "Zero" means the all-zero bit pattern, so -0.0 is an ordinary value
and NaN payloads are kept exactly. One byte per index can beat bit packing
because zstd's Huffman stage then codes frequent clusters in fewer bits.

In memory an encoding is an entry dict::

    v   values: raw | shuffled | packed | bytes    k    codebook entries (packed/bytes)
    s   True when sparse                           nnz  stored elements (sparse)
    p   positions: gaps | bitmap (sparse)          pl   position bytes (sparse)

``lbz`` writes it to the manifest in a compact list form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from lowbit.container import codecs
from lowbit.container.codecs import CodecError
from lowbit.container.format import estimate_size

MAX_CODEBOOK = 256
_SAMPLE = 4096  # leading elements checked before a full np.unique


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    field: str  # the typed repeated field ONNX uses when raw_data is absent
    signed: bool = False  # int32_data holds sign-extended values


DTYPES: dict[int, DType] = {
    TensorProto.FLOAT: DType("float32", 4, "float_data"),
    TensorProto.UINT8: DType("uint8", 1, "int32_data"),
    TensorProto.INT8: DType("int8", 1, "int32_data", signed=True),
    TensorProto.UINT16: DType("uint16", 2, "int32_data"),
    TensorProto.INT16: DType("int16", 2, "int32_data", signed=True),
    TensorProto.INT32: DType("int32", 4, "int32_data", signed=True),
    TensorProto.INT64: DType("int64", 8, "int64_data", signed=True),
    TensorProto.BOOL: DType("bool", 1, "int32_data"),
    TensorProto.FLOAT16: DType("float16", 2, "int32_data"),
    TensorProto.DOUBLE: DType("float64", 8, "double_data"),
    TensorProto.UINT32: DType("uint32", 4, "uint64_data"),
    TensorProto.UINT64: DType("uint64", 8, "uint64_data"),
    TensorProto.BFLOAT16: DType("bfloat16", 2, "int32_data"),
}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_FIELD_DTYPES = {"float_data": np.float32, "double_data": np.float64, "int64_data": np.int64,
                 "uint64_data": np.uint64, "int32_data": np.int64}


def element_count(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


# ---------------------------------------------------------------- proto <-> bit patterns


def extract_bits(t: TensorProto) -> tuple[np.ndarray, bool] | None:
    """(bit patterns, held in a typed field) of an embedded tensor, or None to keep it in the graph.

    None for types without a fixed element size (strings, int4, complex), bad dims, data
    in both raw_data and a typed field, a wrong length, or a typed field whose values
    would not come back exactly (then the graph keeps the tensor as it is)."""
    dt = DTYPES.get(t.data_type)
    if dt is None or any(d < 0 for d in t.dims):
        return None
    n = element_count(t)
    present = [f for f in _TYPED_FIELDS if len(getattr(t, f))]
    if t.HasField("raw_data"):
        if present or len(t.raw_data) != n * dt.itemsize:
            return None
        return np.frombuffer(t.raw_data, dtype=codecs.uint_dtype(dt.itemsize)).copy(), False
    if present not in ([], [dt.field]) or len(getattr(t, dt.field)) != n:
        return None
    original = np.array(getattr(t, dt.field), dtype=_FIELD_DTYPES[dt.field])
    bits = _field_to_bits(original, dt)
    back = np.array(_bits_to_field(bits, dt), dtype=_FIELD_DTYPES[dt.field])
    if original.tobytes() != back.tobytes():  # compares bit patterns, so NaN payloads count
        return None
    return bits, True


def _field_to_bits(values: np.ndarray, dt: DType) -> np.ndarray:
    u = codecs.uint_dtype(dt.itemsize)
    if dt.field in ("float_data", "double_data", "int64_data", "uint64_data"):
        if values.itemsize == dt.itemsize:
            return values.view(u).copy()
        return values.astype(u)  # uint32 held in uint64_data
    return (values & ((1 << (8 * dt.itemsize)) - 1)).astype(u)  # int32_data


def _bits_to_field(bits: np.ndarray, dt: DType) -> list:
    if dt.field == "float_data":
        return bits.view(np.float32).tolist()
    if dt.field == "double_data":
        return bits.view(np.float64).tolist()
    if dt.field == "int64_data":
        return bits.view(np.int64).tolist()
    if dt.field == "uint64_data":
        return bits.tolist()
    if dt.signed:
        return bits.view(f"<i{dt.itemsize}").tolist()
    return bits.tolist()


def strip_data(t: TensorProto) -> None:
    t.ClearField("raw_data")
    for f in _TYPED_FIELDS:
        t.ClearField(f)


def restore_data(t: TensorProto, bits: np.ndarray, typed: bool) -> None:
    dt = DTYPES[t.data_type]
    if typed:
        getattr(t, dt.field).extend(_bits_to_field(bits, dt))
    else:
        t.raw_data = bits.astype(codecs.uint_dtype(dt.itemsize), copy=False).tobytes()


# ---------------------------------------------------------------- choosing an encoding


@dataclass
class Encoded:
    entry: dict
    indices: bytes = b""
    codebook: bytes = b""
    values: bytes = b""


def _value_codings(values: np.ndarray) -> list[tuple[int, dict, bytes, bytes]]:
    """(estimated size, manifest fields, codebook bytes, values bytes) for each coding."""
    out = [(estimate_size(b := values.tobytes()), {"v": "raw"}, b"", b)]
    if values.itemsize > 1:
        out.append((estimate_size(b := codecs.shuffle_bytes(values)), {"v": "shuffled"}, b"", b))
    if values.size and np.unique(values[:_SAMPLE]).size <= MAX_CODEBOOK:
        codes, idx = np.unique(values, return_inverse=True)
        if codes.size <= MAX_CODEBOOK:
            book = codes.astype(values.dtype).tobytes()
            bits = codecs.index_bits(codes.size)
            layouts = [("packed", codecs.pack_bits(idx, bits))]
            if bits < 8:
                layouts.append(("bytes", idx.astype(np.uint8).tobytes()))
            for name, data in layouts:
                size = len(book) + estimate_size(data)
                out.append((size, {"v": name, "k": int(codes.size)}, book, data))
    return out


def _best(options: list) -> tuple:
    return min(enumerate(options), key=lambda p: (p[1][0], p[0]))[1]  # ties: the first listed


def encode_tensor(bits: np.ndarray) -> Encoded:
    """Segments of the smallest encoding of one tensor's bit patterns ``bits`` (flat)."""
    dense_size, fields, book, data = _best(_value_codings(bits))
    best = (dense_size, Encoded(dict(fields), codebook=book, values=data))
    mask = bits != 0
    nnz = int(np.count_nonzero(mask))
    if nnz < bits.size:
        positions = np.flatnonzero(mask)
        pos_options = [(estimate_size(g := codecs.encode_gaps(positions)), "gaps", g)]
        if nnz * 8 > bits.size // 8:  # a bitmap can only win when nonzeros are dense enough
            pos_options.append((estimate_size(m := codecs.encode_bitmap(mask)), "bitmap", m))
        pos_size, pos_name, pos_bytes = _best(pos_options)
        if nnz:
            val_size, fields, book, data = _best(_value_codings(bits[mask]))
        else:
            val_size, fields, book, data = 0, {"v": "raw"}, b"", b""
        if pos_size + val_size < best[0]:
            entry = {"s": True, "nnz": nnz, "p": pos_name, "pl": len(pos_bytes), **fields}
            best = (pos_size + val_size, Encoded(entry, pos_bytes, book, data))
    return best[1]


# ---------------------------------------------------------------- decoding


def segment_lengths(entry: dict, count: int, itemsize: int) -> tuple[int, int, int]:
    """(indices, codebook, values) byte lengths that ``entry`` occupies; entry already validated."""
    stored = entry["nnz"] if entry.get("s") else count
    k = entry.get("k", 0)
    value_len = {
        "raw": stored * itemsize,
        "shuffled": stored * itemsize,
        "packed": codecs.packed_size(stored, codecs.index_bits(k)) if k else 0,
        "bytes": stored,
    }[entry["v"]]
    return (entry["pl"] if entry.get("s") else 0), k * itemsize, value_len


def decode_tensor(entry: dict, count: int, itemsize: int,
                  indices: bytes, codebook: bytes, values: bytes) -> np.ndarray:
    """Flat bit patterns (count,) of one tensor; raises CodecError when inconsistent."""
    sparse = bool(entry.get("s"))
    stored = entry["nnz"] if sparse else count
    coding = entry["v"]
    if coding == "raw":
        vals = codecs.raw_values(values, stored, itemsize)
    elif coding == "shuffled":
        vals = codecs.unshuffle_bytes(values, stored, itemsize)
    else:
        k = entry["k"]
        book = np.frombuffer(codebook, dtype=codecs.uint_dtype(itemsize))
        if coding == "packed":
            idx = codecs.unpack_bits(values, stored, codecs.index_bits(k))
        else:
            idx = np.frombuffer(values, dtype=np.uint8)
        if idx.size != stored:
            raise CodecError(f"{idx.size} codebook indices, expected {stored}")
        if idx.size and int(idx.max()) >= k:
            raise CodecError(f"a codebook index ({int(idx.max())}) is past the {k}-entry codebook")
        vals = book[idx]
    if not sparse:
        return vals
    if entry["p"] == "gaps":
        positions = codecs.decode_gaps(indices, stored, count)
    else:
        positions = codecs.decode_bitmap(indices, stored, count)
    out = np.zeros(count, dtype=codecs.uint_dtype(itemsize))
    out[positions] = vals
    return out
