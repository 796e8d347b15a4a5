"""encode / decode / write_lbz / read_lbz: an ONNX model <-> a ``.lbz`` file, losslessly.

The graph part holds a one-line JSON manifest and, after its newline, the
ModelProto with the extracted initializers' data removed (name, dims, data
type, doc string and every other field stay). Tensors the
container cannot code exactly (strings, int4, complex, odd protos) stay
inside that graph unchanged; zstd still compresses them.

Manifest: ``{"e": [entry per graph.initializer], "typed": [indices]}``; an entry is
``null`` (kept in the graph), ``[values]``, ``[values, k]`` or ``[values, k, positions, nnz]``
(see ``tensors`` for the codings); ``typed`` lists tensors the proto held in a typed field
(``float_data`` ...) rather than ``raw_data``, restored the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnx

from lowbit.container import format as fmt
from lowbit.container import tensors
from lowbit.container.codecs import CodecError
from lowbit.container.format import ContainerError
from lowbit.errors import ModelLoadError, ValidationError
from lowbit.fileio import input_file, write_bytes_atomic

# A ModelProto cannot serialize past 2 GiB (tensors plus graph), so no real model
# decodes to more tensor data; and no real model expands more than MAX_RATIO times its
# .lbz size (a heavily pruned, clustered one is ~10-60x) beyond a small floor.
MAX_TENSOR_BYTES = (1 << 31) - (1 << 26)
MAX_RATIO = 1000
RATIO_FLOOR_BYTES = 1 << 26
UNEXPECTED_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, RecursionError)


def encode(model: onnx.ModelProto) -> bytes:
    """The ``.lbz`` bytes of ``model``; deterministic (same model, same bytes).

    Example::

        data = encode(onnx.load("lenet.onnx"))
        assert decode(data) == onnx.load("lenet.onnx")  # bit-exact weights and graph
    """
    if not isinstance(model, onnx.ModelProto):
        raise ValidationError(f"encode expects an onnx.ModelProto, got {type(model).__name__}")
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    entries: list[list | None] = []
    typed: list[int] = []
    parts: list[list[bytes]] = [[], [], []]  # indices, codebooks, values
    for i, t in enumerate(skeleton.graph.initializer):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValidationError(
                f"initializer '{t.name}' keeps its data outside the model (external data); "
                "load it first (onnx.load with load_external_data=True) or embed the weights")
        found = tensors.extract_bits(t)
        if found is None:
            entries.append(None)  # stays in the graph as it is
            continue
        bits, is_typed = found
        enc = tensors.encode_tensor(bits)
        entries.append(_compact(enc.entry))
        if is_typed:
            typed.append(i)
        for part, segment in zip(parts, (enc.indices, enc.codebook, enc.values)):
            part.append(segment)
        tensors.strip_data(t)
    manifest = {"e": entries, **({"typed": typed} if typed else {})}
    text = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode("ascii")
    graph = text + b"\n" + skeleton.SerializeToString(deterministic=True)
    return fmt.pack([graph] + [b"".join(p) for p in parts])


def _compact(entry: dict) -> list:
    """Manifest form of an entry: [v], [v, k] or, when sparse, [v, k, p, nnz] (k = 0: no codebook).

    Lists keep the manifest of a small model to ~15 bytes per tensor after zstd; position
    byte counts are not stored: gaps end at the nnz-th byte below 0x80."""
    if entry.get("s"):
        return [entry["v"], entry.get("k", 0), entry["p"], entry["nnz"]]
    return [entry["v"], entry["k"]] if "k" in entry else [entry["v"]]


@dataclass
class Parsed:
    """A checked file: the skeleton model, its manifest, and each entry's segments."""

    frames: fmt.Frames
    model: onnx.ModelProto
    entries: list[dict]  # one per extracted initializer, with "i" (its index) and "t" (typed)
    segments: list[tuple[bytes, bytes, bytes]]  # (indices, codebook, values) per entry
    manifest_bytes: int  # uncompressed, including its newline


def decode(data: bytes, *, source: str = "model") -> onnx.ModelProto:
    """The ONNX model stored in ``.lbz`` bytes; ``ContainerError`` naming ``source`` if they are bad.

    Example::

        model = decode(Path("lenet.lbz").read_bytes(), source="lenet.lbz")
    """
    try:
        parsed = parse(data, source=source)
        for entry, segs in zip(parsed.entries, parsed.segments):
            t = parsed.model.graph.initializer[entry["i"]]
            bits = decode_entry(entry, t, segs, source)
            tensors.restore_data(t, bits, entry["t"])
    except ContainerError:
        raise
    except UNEXPECTED_ERRORS as exc:  # a last net: every check above should fire first
        raise ContainerError(
            f"{source}: malformed .lbz file ({type(exc).__name__}: {str(exc)[:120]})") from None
    return parsed.model


def decode_entry(entry: dict, t: onnx.TensorProto, segs: tuple[bytes, bytes, bytes], source: str):
    dt = tensors.DTYPES[t.data_type]
    try:
        return tensors.decode_tensor(entry, tensors.element_count(t), dt.itemsize, *segs)
    except CodecError as exc:
        raise ContainerError(f"{source}: initializer '{t.name}': {exc}") from None
    except MemoryError:
        raise ContainerError(f"{source}: initializer '{t.name}' is too large to decode") from None


def parse(data: bytes, *, source: str = "model") -> Parsed:
    """Check everything about a file except the tensor payloads themselves."""
    frames = fmt.read_frames(data, source)
    graph, indices, codebooks, values = fmt.decompress_parts(data, frames, source)
    cut = graph.find(b"\n")
    if cut < 0:
        raise ContainerError(f"{source}: corrupted .lbz file (manifest has no end)")
    try:
        manifest = json.loads(graph[:cut].decode("ascii"))
    except (ValueError, RecursionError) as exc:
        raise ContainerError(f"{source}: bad JSON manifest ({str(exc)[:120]})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(graph[cut + 1:])
    except Exception as exc:  # protobuf raises DecodeError and, from C++, RuntimeError
        raise ContainerError(
            f"{source}: the graph is not a valid ONNX model ({type(exc).__name__})") from None
    inits = model.graph.initializer
    if (not isinstance(manifest, dict) or set(manifest) - {"e", "typed"}
            or not isinstance(manifest.get("e"), list) or len(manifest["e"]) != len(inits)):
        raise ContainerError(
            f"{source}: bad manifest (expected one entry per initializer, {len(inits)} in the graph)")
    typed = manifest.get("typed", [])
    if (not isinstance(typed, list) or not all(_is_int(i) for i in typed)
            or len(set(typed)) != len(typed)
            or not all(0 <= i < len(inits) and manifest["e"][i] is not None for i in typed)):
        raise ContainerError(f"{source}: bad manifest (typed list)")
    blobs = (indices, codebooks, values)
    limit = min(MAX_TENSOR_BYTES, max(RATIO_FLOOR_BYTES, MAX_RATIO * len(data)))
    offsets = [0, 0, 0]
    entries: list[dict] = []
    segments: list[tuple[bytes, bytes, bytes]] = []
    total = 0
    for i, compact in enumerate(manifest["e"]):
        if compact is None:
            continue
        t = inits[i]
        entry = _check_entry(compact, t, source)
        entry.update(i=i, t=i in typed)
        count = tensors.element_count(t)
        itemsize = tensors.DTYPES[t.data_type].itemsize
        total += count * itemsize
        if total > limit:
            raise ContainerError(
                f"{source}: initializer '{t.name}' takes the tensors past {limit:,} bytes (more "
                f"than an ONNX model can hold, or {MAX_RATIO}x this file's size: damaged or forged)")
        if entry.get("s"):
            entry["pl"] = _positions_length(entry, count, indices, offsets[0], t.name, source)
        segs = []
        for j, length in enumerate(tensors.segment_lengths(entry, count, itemsize)):
            end = offsets[j] + length
            if end > len(blobs[j]):
                raise ContainerError(
                    f"{source}: inconsistent lengths: initializer '{t.name}' needs {length} bytes of "
                    f"{fmt.PART_NAMES[j + 1]} beyond the part's {len(blobs[j])}")
            segs.append(blobs[j][offsets[j]: end])
            offsets[j] = end
        entries.append(entry)
        segments.append((segs[0], segs[1], segs[2]))
    for j, used in enumerate(offsets):
        if used != len(blobs[j]):
            raise ContainerError(
                f"{source}: inconsistent lengths: the {fmt.PART_NAMES[j + 1]} part has "
                f"{len(blobs[j]) - used} bytes no initializer uses")
    return Parsed(frames, model, entries, segments, cut + 1)


def _positions_length(entry: dict, count: int, indices: bytes, offset: int, name: str, source: str) -> int:
    if entry["p"] == "bitmap":
        return (count + 7) // 8
    nnz = entry["nnz"]
    if nnz == 0:
        return 0
    window = np.frombuffer(indices, dtype=np.uint8, count=min(len(indices) - offset, 9 * nnz), offset=offset)
    ends = np.flatnonzero(window < 0x80)
    if ends.size < nnz:
        raise ContainerError(
            f"{source}: inconsistent lengths: the indices part ends inside the positions of '{name}'")
    return int(ends[nnz - 1]) + 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(compact: object, t: onnx.TensorProto, source: str) -> dict:
    """The entry dict of a manifest list, checked against its initializer ``t``."""
    def bad(why: str) -> ContainerError:
        return ContainerError(f"{source}: bad manifest entry for initializer '{t.name}': {why}")

    if not isinstance(compact, list) or len(compact) not in (1, 2, 4):
        raise bad("expected [coding], [coding, k] or [coding, k, positions, nnz]")
    if t.data_type not in tensors.DTYPES or any(d < 0 for d in t.dims):
        raise bad("its data type or shape is not one the container codes")
    if t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL or any(
            len(getattr(t, f)) for f in ("float_data", "int32_data", "int64_data", "double_data",
                                         "uint64_data", "string_data")):
        raise bad("it already holds data in the graph")
    coding = compact[0]
    entry: dict = {"v": coding}
    if coding in ("packed", "bytes"):
        k = compact[1] if len(compact) > 1 else None
        if not _is_int(k) or not 1 <= k <= tensors.MAX_CODEBOOK:
            raise bad(f"codebook size {k!r} is not in 1..{tensors.MAX_CODEBOOK}")
        entry["k"] = k
    elif coding in ("raw", "shuffled"):
        if len(compact) == 2 or (len(compact) == 4 and compact[1] != 0):
            raise bad("codebook size given for values without a codebook")
    else:
        raise bad(f"unknown value coding {coding!r}")
    if len(compact) == 4:
        pos, nnz = compact[2], compact[3]
        count = tensors.element_count(t)
        if pos not in ("gaps", "bitmap"):
            raise bad(f"unknown position coding {pos!r}")
        if not _is_int(nnz) or not 0 <= nnz <= count:
            raise bad(f"stored count {nnz!r} does not fit {count} elements (shape/size mismatch)")
        entry.update(s=True, p=pos, nnz=nnz)
    return entry


def write_lbz(path: str | os.PathLike[str], model: onnx.ModelProto) -> None:
    """Write ``model`` as a ``.lbz`` file, atomically (no partial file on failure).

    Example::

        write_lbz("lenet.lbz", model)
    """
    write_bytes_atomic(path, encode(model))


def read_lbz(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read a ``.lbz`` file; ``ModelLoadError`` (or its ``ContainerError``) naming the path.

    Example::

        model = read_lbz("lenet.lbz")
    """
    return decode(read_lbz_file(path), source=str(path))


def read_lbz_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a ``.lbz`` file: a regular, non-empty file (a device such as /dev/zero
    would never end); ``ModelLoadError`` naming the path."""
    p = input_file(path, "lbz", ModelLoadError)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read lbz file {p}: {exc.strerror or exc}") from None
