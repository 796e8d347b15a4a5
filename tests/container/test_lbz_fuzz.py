"""Bad .lbz bytes: only ContainerError escapes decode, with a clear message; never a crash."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lbz_models import identity_model
from onnx import numpy_helper

from lowbit.container import ContainerError, breakdown, decode, encode
from lowbit.container import format as fmt
from lowbit.errors import ModelLoadError

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)


def _small_model():
    """Every coding in one small model: sparse+codebook (gaps, bitmap), codebook, raw, int8."""
    rng = np.random.default_rng(0)
    sparse = np.zeros(300, dtype=np.float32)
    sparse[rng.choice(300, 15, replace=False)] = np.float32([0.5, -0.25, -0.0])[rng.integers(0, 3, 15)]
    half = np.where(rng.random(96) < 0.5, rng.integers(-128, 128, 96), 0).astype(np.int8)
    book = np.float32([1.5, -2.0, 0.0, 3.25])[rng.integers(0, 4, 40)]
    codes = np.linspace(-1, 1, 16).astype(np.float32)
    skew = codes[np.clip(np.round(rng.normal(7.5, 2.5, 500)), 0, 15).astype(np.int64)]
    raw = rng.standard_normal(5).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in
             [("sparse", sparse), ("half", half), ("book", book), ("skew", skew), ("raw", raw)]]
    return identity_model(inits)


MODEL = _small_model()
DATA = encode(MODEL)
# adds a tensor stored as byte planes (too big for the every-byte tests)
BIG = encode(identity_model(list(MODEL.graph.initializer) + [numpy_helper.from_array(
    np.random.default_rng(1).normal(0, 0.05, 1024).astype(np.float32), "planes")]))


def _decode_fails(data: bytes) -> ContainerError:
    with pytest.raises(ContainerError) as info:
        decode(data, source="fuzz.lbz")
    assert isinstance(info.value, ModelLoadError)
    message = str(info.value)
    assert message.startswith("fuzz.lbz: ") and "\n" not in message
    return info.value


def _repack(parts: list[bytes]) -> bytes:
    """A file with a valid checksum around any parts (to reach the checks behind it)."""
    return fmt.pack(parts)


def _parts(data: bytes = DATA) -> list[bytes]:
    return fmt.decompress_parts(data, fmt.read_frames(data, "x"), "x")


def test_the_small_file_exercises_every_coding():
    encodings = {(r["encoding"], r["positions"], r["values"]) for r in breakdown(DATA)["initializers"]}
    assert ("sparse+codebook", "gaps", "packed") in encodings
    assert any(pos == "bitmap" for _, pos, _ in encodings)
    assert ("codebook", None, "packed") in encodings and ("codebook", None, "bytes") in encodings
    assert len(DATA) < 800
    assert breakdown(BIG)["initializers"][-1]["values"] == "shuffled"
    assert decode(DATA).SerializeToString() == MODEL.SerializeToString()


def test_every_truncation_is_detected():
    for length in range(len(DATA)):
        error = _decode_fails(DATA[:length])
        assert "truncated" in str(error) or "not a .lbz file" in str(error)


def test_every_single_byte_flip_is_detected():
    for pos in range(len(DATA)):
        for mask in (0x01, 0x80, 0xFF):
            data = bytearray(DATA)
            data[pos] ^= mask
            _decode_fails(bytes(data))


@SETTINGS
@given(st.data())
def test_random_byte_changes_are_detected(draw):
    data = bytearray(DATA)
    positions = draw.draw(st.lists(st.integers(0, len(DATA) - 1), min_size=1, max_size=8, unique=True))
    for pos in positions:
        data[pos] ^= draw.draw(st.integers(1, 255))
    _decode_fails(bytes(data))


@SETTINGS
@given(st.binary(max_size=300))
def test_garbage_is_refused(garbage):
    _decode_fails(garbage)
    _decode_fails(fmt.MAGIC + b"\x01" + garbage)


def test_messages_say_what_is_wrong():
    assert "not a .lbz file" in str(_decode_fails(b"\x08\x07\x12\x04onnx model bytes"))
    assert "not a .lbz file" in str(_decode_fails(b""))
    wrong = bytearray(DATA)
    wrong[4] = 7
    message = str(_decode_fails(bytes(wrong)))
    assert "version 7" in message and "reads version 1" in message
    message = str(_decode_fails(DATA[:-1] + bytes([DATA[-1] ^ 1])))
    assert "corrupted" in message and "checksum" in message
    assert "trailing" in str(_decode_fails(DATA + b"\0"))
    with pytest.raises(ContainerError):
        breakdown(DATA[:-3])


def _with_header(lengths: list[int], body: bytes = b"", flags: int = 0) -> bytes:
    head = struct.pack("<4sBB8I", fmt.MAGIC, fmt.VERSION, flags, *lengths) + body
    return head + struct.pack("<I", zlib.crc32(head))


def test_huge_declared_lengths_allocate_nothing():
    _decode_fails(_with_header([0xFFFFFFFF] * 8))  # claims 16 GiB of frames
    frame = fmt.compress_part(b"x")
    huge = _with_header([len(frame), 0xFFFFFFFF] + [0] * 6, frame)
    assert "more than zstd can expand" in str(_decode_fails(huge))
    lying = _with_header([len(frame), 2] + [0] * 6, frame)  # frame holds 1 byte, header says 2
    assert "inconsistent lengths" in str(_decode_fails(lying))
    assert "flags" in str(_decode_fails(_with_header([0] * 8, flags=4)))


def test_manifest_and_graph_lies_are_refused():
    graph, indices, codebooks, values = _parts()
    cut = graph.find(b"\n")
    manifest, skeleton = json.loads(graph[:cut]), graph[cut + 1:]

    def variant(new_manifest=None, new_skeleton=None, parts=None) -> bytes:
        text = graph[:cut] if new_manifest is None else json.dumps(new_manifest).encode()
        g = text + b"\n" + (skeleton if new_skeleton is None else new_skeleton)
        return _repack([g] + list(parts or (indices, codebooks, values)))

    assert "bad JSON" in str(_decode_fails(_repack([b"{not json\n" + skeleton, indices, codebooks, values])))
    assert "manifest has no end" in str(_decode_fails(_repack([b"[]", indices, codebooks, values])))
    assert "not a valid ONNX model" in str(_decode_fails(variant(new_skeleton=b"\xff\xff\xff")))
    _decode_fails(variant({"e": manifest["e"][:-1]}))  # one entry short
    _decode_fails(variant({"e": manifest["e"], "typed": [99]}))
    _decode_fails(variant({"e": manifest["e"], "extra": 1}))
    _decode_fails(variant([1, 2, 3]))
    _decode_fails(variant(parts=(indices, codebooks, values + b"\0")))  # bytes nobody uses
    _decode_fails(variant(parts=(indices[:-1], codebooks, values)))
    entries = manifest["e"]
    for n, entry in enumerate(entries):
        for bad in (None, [], ["zip"], [entry[0], -1], [entry[0], 0, "gaps", 10**12], ["packed", 300],
                    ["raw", 5], ["packed", 2, "diagonal", 3], [entry[0], True], "raw", [1.5],
                    [entry[0], 1, "bitmap", 1], ["bytes", 1, "gaps", 0]):
            changed = list(entries)
            changed[n] = bad
            try:
                model = decode(variant({"e": changed}), source="fuzz.lbz")
            except ContainerError:
                continue
            assert model.SerializeToString() != MODEL.SerializeToString() or bad == entry


@SETTINGS
@given(st.data())
def test_valid_checksum_around_damaged_parts_raises_only_container_error(draw):
    """Damage behind a correct checksum (a crafted file) reaches the inner checks."""
    parts = _parts(draw.draw(st.sampled_from([DATA, BIG])))
    which = draw.draw(st.integers(0, 3))
    part = bytearray(parts[which])
    if part:
        for _ in range(draw.draw(st.integers(1, 4))):
            pos = draw.draw(st.integers(0, len(part) - 1))
            part[pos] = draw.draw(st.integers(0, 255))
        cut = draw.draw(st.integers(0, len(part)))
        if draw.draw(st.booleans()):
            part = part[:cut]
    parts[which] = bytes(part)
    try:
        decode(_repack(parts), source="fuzz.lbz")
    except ContainerError as exc:
        assert str(exc).startswith("fuzz.lbz: ")


def test_huge_shapes_behind_a_valid_checksum_are_refused():
    model = identity_model([numpy_helper.from_array(np.zeros(8, dtype=np.float32), "z")])
    graph, indices, codebooks, values = _parts(encode(model))
    cut = graph.find(b"\n")
    skeleton = type(model)()
    skeleton.ParseFromString(graph[cut + 1:])
    del skeleton.graph.initializer[0].dims[:]
    skeleton.graph.initializer[0].dims.extend([1 << 20, 1 << 20])  # 4 TiB of zeros claimed
    crafted = _repack([graph[: cut + 1] + skeleton.SerializeToString(), indices, codebooks, values])
    assert "more than an ONNX model can hold" in str(_decode_fails(crafted))
