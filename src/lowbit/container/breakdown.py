"""Where the bytes of a ``.lbz`` file go: per part (exact) and per initializer (proportional)."""

from __future__ import annotations

import numpy as np
import onnx

from lowbit.container import codecs, tensors
from lowbit.container import format as fmt
from lowbit.container.format import ContainerError
from lowbit.container.lbz import UNEXPECTED_ERRORS, decode_entry, parse

_PART_KEYS = ("graph", "indices", "codebooks", "values")
ATTRIBUTION_NOTE = (
    "header, checksum and each part (its own zstd frame) are exact byte counts; the graph part also "
    "holds the JSON manifest; an initializer's bytes are each frame's compressed size shared among "
    "the initializers in it in proportion to each segment's size when zstd-compressed alone (fast level)"
)


def breakdown(data: bytes, *, source: str = "model") -> dict:
    """Per-part and per-initializer sizes of ``.lbz`` bytes (checks the file like ``decode``).

    The parts (header, graph, indices, codebooks, values, checksum) sum to the file size.

    Example::

        info = breakdown(Path("lenet.lbz").read_bytes())
        print(info["parts"], [(t["name"], t["encoding"], t["bytes"]) for t in info["initializers"]])
    """
    try:
        return _breakdown(data, source)
    except ContainerError:
        raise
    except UNEXPECTED_ERRORS as exc:  # the same last net as decode
        raise ContainerError(
            f"{source}: malformed .lbz file ({type(exc).__name__}: {str(exc)[:120]})") from None


def _breakdown(data: bytes, source: str) -> dict:
    parsed = parse(data, source=source)
    frames = parsed.frames
    parts = {"header": fmt.HEADER_SIZE}
    parts.update(zip(_PART_KEYS, frames.compressed))
    parts["checksum"] = fmt.CHECKSUM_SIZE
    graph_share = frames.compressed[0] / frames.raw[0] if frames.raw[0] else 0.0
    # Alone-compressed sizes as weights: by raw length, incompressible 4-bit indices and
    # very compressible float bytes sharing a frame would get the same bytes per byte.
    weights = [[fmt.estimate_size(s) for s in segs] for segs in parsed.segments]
    totals = [sum(w[j] for w in weights) for j in range(3)]
    shares = [c / tot if tot else 0.0 for c, tot in zip(frames.compressed[1:], totals)]
    inits = parsed.model.graph.initializer
    rows: dict[int, dict] = {}
    for entry, segs, w in zip(parsed.entries, parsed.segments, weights):
        t = inits[entry["i"]]
        bits = decode_entry(entry, t, segs, source)
        on_disk = sum(wj * share for wj, share in zip(w, shares))
        rows[entry["i"]] = _row(entry, t, bits, segs, on_disk)
    for i, t in enumerate(inits):
        if i not in rows:
            rows[i] = {
                "name": t.name, "encoding": "in-graph",
                "dtype": _dtype_name(t.data_type),
                "shape": [int(d) for d in t.dims], "count": tensors.element_count(t),
                "bytes": None,  # counted inside the graph part
            }
    return {
        "format_version": fmt.VERSION,
        "file_bytes": len(data),
        "parts": parts,
        "uncompressed": dict(zip(_PART_KEYS, frames.raw)),
        "manifest_bytes_uncompressed": parsed.manifest_bytes,
        "manifest_bytes_estimated": round(parsed.manifest_bytes * graph_share, 1),
        "attribution": "proportional",
        "attribution_note": ATTRIBUTION_NOTE,
        "initializers": [rows[i] for i in range(len(inits))],
    }


def _dtype_name(data_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()
    except (KeyError, ValueError):
        return f"type {data_type}"


def _row(entry: dict, t, bits: np.ndarray, segs: tuple[bytes, bytes, bytes], on_disk: float) -> dict:
    dt = tensors.DTYPES[t.data_type]
    count = int(bits.size)
    sparse = bool(entry.get("s"))
    coding = entry["v"]
    clustered = coding in ("packed", "bytes")
    if clustered:
        book = np.frombuffer(segs[1], dtype=codecs.uint_dtype(dt.itemsize))
        clusters = int(np.count_nonzero(book))
        stored_bits = codecs.index_bits(entry["k"]) if coding == "packed" else 8
    else:
        clusters = None
        stored_bits = 8 * dt.itemsize
    if sparse:
        encoding = "sparse+codebook" if clustered else "sparse"
    else:
        encoding = {"raw": "raw", "shuffled": "raw-shuffled"}.get(coding, "codebook")
    zeros = count - int(np.count_nonzero(bits))
    return {
        "name": t.name,
        "encoding": encoding,
        "values": coding,  # raw | shuffled (byte planes) | packed (b-bit indices) | bytes (byte indices)
        "positions": entry["p"] if sparse else None,  # gaps (LEB128) | bitmap
        "dtype": dt.name,
        "shape": [int(d) for d in t.dims],
        "count": count,
        "stored": entry["nnz"] if sparse else count,
        "sparsity": zeros / count if count else 0.0,
        "clusters": clusters,
        "bits": stored_bits,
        "bytes": round(on_disk, 1),
        "bits_per_element": round(8 * on_disk / count, 3) if count else 0.0,
        "segments_uncompressed": {"indices": len(segs[0]), "codebooks": len(segs[1]), "values": len(segs[2])},
    }
