"""The integer codings under .lbz (lowbit.container.codecs): inverses, and strict decoders."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.container import codecs
from lowbit.container.codecs import CodecError

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


@SETTINGS
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(
    st.just(b), hnp.arrays(np.uint8, st.integers(0, 300), elements=st.integers(0, (1 << b) - 1)))))
def test_pack_bits_round_trip(case):
    bits, idx = case
    data = codecs.pack_bits(idx, bits)
    assert len(data) == codecs.packed_size(idx.size, bits)
    assert np.array_equal(codecs.unpack_bits(data, idx.size, bits), idx)


def test_pack_bits_across_chunks(monkeypatch):
    monkeypatch.setattr(codecs, "_CHUNK", 16)
    idx = np.random.default_rng(0).integers(0, 32, 1000).astype(np.uint8)
    assert np.array_equal(codecs.unpack_bits(codecs.pack_bits(idx, 5), 1000, 5), idx)


def test_index_bits():
    ks = (1, 2, 3, 4, 5, 16, 17, 128, 129, 256)
    assert [codecs.index_bits(k) for k in ks] == [1, 1, 2, 2, 3, 4, 5, 7, 8, 8]


@SETTINGS
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(
    st.just(n), st.sets(st.integers(0, n - 1), max_size=200))))
def test_gaps_and_bitmap_round_trip(case):
    size, chosen = case
    positions = np.array(sorted(chosen), dtype=np.int64)
    gaps = codecs.encode_gaps(positions)
    assert np.array_equal(codecs.decode_gaps(gaps, positions.size, size), positions)
    mask = np.zeros(size, dtype=bool)
    mask[positions] = True
    assert np.array_equal(codecs.decode_bitmap(codecs.encode_bitmap(mask), positions.size, size), positions)


def test_gaps_of_large_positions():
    positions = np.array([0, 127, 128, 16_511, 2**31 - 2], dtype=np.int64)
    data = codecs.encode_gaps(positions)
    assert data[:3] == bytes([0, 126, 0])  # gaps 0, 126, 0
    assert np.array_equal(codecs.decode_gaps(data, 5, 2**31 - 1), positions)


@pytest.mark.parametrize("data, nnz, size, why", [
    (b"\x05", 1, 5, "exceeds"),             # position 5 in a 5-element tensor
    (b"\x01\x03", 2, 5, "outside"),         # positions 1, 5
    (b"\x81", 1, 1000, "complete gaps"),     # unterminated varint
    (b"\x80\x00", 1, 1000, "minimally"),     # 0 written in two bytes
    (b"\x00", 2, 1000, "complete gaps"),
    (b"\x00", 0, 1000, "no nonzeros"),
    (b"\xff" * 9 + b"\x01", 1, 1000, "9 bytes"),
])
def test_decode_gaps_refuses_lies(data, nnz, size, why):
    with pytest.raises(CodecError, match=why):
        codecs.decode_gaps(data, nnz, size)


def test_strict_bitmap_and_bit_unpacking():
    with pytest.raises(CodecError, match="padding"):
        codecs.decode_bitmap(b"\x20", 1, 5)  # bit 5 set in a 5-element bitmap
    with pytest.raises(CodecError, match="marks 1"):
        codecs.decode_bitmap(b"\x01", 2, 5)
    with pytest.raises(CodecError, match="expected 1"):
        codecs.decode_bitmap(b"\x01\x00", 1, 5)
    with pytest.raises(CodecError, match="padding"):
        codecs.unpack_bits(b"\xf0", 1, 3)
    with pytest.raises(CodecError, match="expected 2"):
        codecs.unpack_bits(b"\x00", 3, 5)


@SETTINGS
@given(st.sampled_from([1, 2, 4, 8]).flatmap(
    lambda s: hnp.arrays(codecs.uint_dtype(s), st.integers(0, 200))))
def test_byte_planes_round_trip(values):
    data = codecs.shuffle_bytes(values)
    assert np.array_equal(codecs.unshuffle_bytes(data, values.size, values.itemsize), values)
    assert np.array_equal(codecs.raw_values(values.tobytes(), values.size, values.itemsize), values)
