"""Group-wise weight-only math (lowbit.quant.groupwise): RTN error bounds, padding, degenerate
groups, MatMulNBits packing, and parity of the packed bits with ONNX Runtime's kernel."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lowbit.quant.groupwise import (
    GROUP_SIZES,
    pack_codes,
    pack_zero_points,
    rtn,
    storage_bits,
)

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True)

_bits = st.integers(min_value=2, max_value=8)
_groups = st.sampled_from(GROUP_SIZES)


def _weights(seed: int, n: int, k: int, magnitude: float, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.standard_normal((n, k))
    elif kind == "heavy":
        w = rng.standard_t(2, (n, k))
    elif kind == "positive":
        w = rng.uniform(0.1, 1.0, (n, k))
    else:  # "negative"
        w = -rng.uniform(0.1, 1.0, (n, k))
    return (w * magnitude).astype(np.float32)


def _half_step_bound(scales: np.ndarray, group_size: int, k: int, bits: int) -> np.ndarray:
    """Per element of the (N, K) weight: half its block's step, plus float32 rounding
    of the division and of the product (relative ~6e-8 times up to 2**bits steps)."""
    per_col = np.repeat(scales.astype(np.float64), group_size, axis=1)[:, :k]
    return per_col * (0.5 + 2.0**bits * 2.4e-7)


# ---------------------------------------------------------------- RTN error bound


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=_bits, group=_groups,
       n=st.integers(1, 4), k=st.integers(1, 300), symmetric=st.booleans(),
       magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 37.5, 1e4]),
       kind=st.sampled_from(["normal", "heavy", "positive", "negative"]))
@example(seed=0, bits=2, group=16, n=1, k=17, symmetric=True, magnitude=1.0, kind="normal")
@example(seed=0, bits=8, group=256, n=2, k=1, symmetric=False, magnitude=1.0, kind="positive")
def test_rtn_error_is_at_most_half_a_step(seed, bits, group, n, k, symmetric, magnitude, kind):
    w = _weights(seed, n, k, magnitude, kind)
    q = rtn(w, bits=bits, group_size=group, symmetric=symmetric)
    kp = -(-k // group) * group
    assert q.codes.shape == (n, kp) and q.codes.dtype == np.uint8
    assert q.scales.shape == (n, kp // group) and q.zero_points.shape == (n, kp // group)
    assert q.k == k and q.bits == bits and q.group_size == group and q.symmetric == symmetric
    assert int(q.codes.max()) <= 2**bits - 1
    assert int(q.zero_points.max()) <= 2**bits - 1
    if symmetric:
        assert np.all(q.zero_points == 2 ** (bits - 1))
    assert np.all(np.isfinite(q.scales)) and np.all(q.scales > 0)
    deq = q.dequantize()
    assert deq.shape == (n, k), "dequantize must return exactly the real K columns"
    assert deq.dtype == np.float32
    err = np.abs(deq.astype(np.float64) - w.astype(np.float64))
    bound = _half_step_bound(q.scales, group, k, bits)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    step = np.repeat(q.scales, group, axis=1)[:, :k]
    assert np.all(err <= bound), f"error {err[worst]:.3g} at {worst}, step {step[worst]:.3g}"


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=_bits, group=_groups, k=st.integers(1, 300),
       symmetric=st.booleans())
def test_padding_columns_hold_the_zero_point(seed, bits, group, k, symmetric):
    """K is padded with zeros up to a whole block: the padding codes must be the zero
    point (they dequantize to exactly 0), so padding never adds to a dot product."""
    w = _weights(seed, 3, k, 1.0, "normal")
    q = rtn(w, bits=bits, group_size=group, symmetric=symmetric)
    kp = q.codes.shape[1]
    assert kp % group == 0 and kp - k < group
    if kp > k:
        last_zp = q.zero_points[:, -1:]
        assert np.array_equal(q.codes[:, k:], np.broadcast_to(last_zp, (3, kp - k)))


def test_symmetric_rtn_is_odd_and_scale_is_absmax_over_qmax():
    w = np.array([[-3.0, -1.0, 0.0, 0.5, 1.5, 3.0] + [0.0] * 10], dtype=np.float32)
    for bits in range(2, 9):
        q = rtn(w, bits=bits, group_size=16, symmetric=True)
        assert q.scales[0, 0] == pytest.approx(3.0 / (2 ** (bits - 1) - 1), rel=1e-6)
        pos = rtn(w, bits=bits, group_size=16, symmetric=True).dequantize()
        neg = rtn(-w, bits=bits, group_size=16, symmetric=True).dequantize()
        np.testing.assert_allclose(pos, -neg, atol=1e-6)
        assert pos[0, 0] == pytest.approx(-3.0, rel=1e-6) and pos[0, 5] == pytest.approx(3.0, rel=1e-6)


def test_asymmetric_rtn_uses_the_whole_grid_for_a_one_sided_group():
    w = np.linspace(0.25, 4.0, 32, dtype=np.float32)[None]
    q = rtn(w, bits=4, group_size=32, symmetric=False)
    # range [0, 4] (zero always representable): 15 steps of 4/15
    assert q.scales[0, 0] == pytest.approx(4.0 / 15, rel=1e-6)
    assert q.zero_points[0, 0] == 0
    assert q.codes.max() == 15


# ---------------------------------------------------------------- degenerate groups


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("value", [0.0, 1e-30, -1e-30, 1e-45, 0.75, -2.5, 3e4])
def test_all_zero_and_constant_groups_give_finite_positive_scales(bits, symmetric, value):
    # row 0: one constant group and one normal group; row 1: all zeros
    w = np.zeros((2, 64), dtype=np.float32)
    w[0, :32] = value
    w[0, 32:] = np.linspace(-1.0, 1.0, 32, dtype=np.float32)
    q = rtn(w, bits=bits, group_size=32, symmetric=symmetric)
    assert np.all(np.isfinite(q.scales)) and np.all(q.scales > 0)
    deq = q.dequantize()
    assert np.all(np.isfinite(deq))
    assert np.all(deq[1] == 0.0), "an all-zero row must dequantize to exact zeros"
    err = np.abs(deq[0, :32].astype(np.float64) - np.float64(np.float32(value)))
    assert np.all(err <= q.scales[0, 0] * 0.5 * (1 + 1e-5) + 1e-37)
    if value != 0.0 and abs(value) > 1e-20:  # a normal-sized constant is hit (almost) exactly
        np.testing.assert_allclose(deq[0, :32], np.float32(value), rtol=1e-5)


# ---------------------------------------------------------------- packing


def _unpack_codes(packed: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Straightforward reading of MatMulNBits' B: bytes of a block in order, each byte
    holding 8/bits codes, the first code in the lowest bits."""
    n, blocks, blob = packed.shape
    assert blob == group_size * bits // 8
    out = np.zeros((n, blocks * group_size), dtype=np.uint8)
    mask = (1 << bits) - 1
    for r in range(n):
        for b in range(blocks):
            for j in range(blob):
                byte = int(packed[r, b, j])
                for i in range(8 // bits):
                    out[r, b * group_size + j * (8 // bits) + i] = (byte >> (bits * i)) & mask
    return out


def _unpack_zero_points(packed: np.ndarray, bits: int, n: int, blocks: int) -> np.ndarray:
    per_byte = 8 // bits
    row_bytes = -(-blocks // per_byte)
    assert packed.shape == (n * row_bytes,)
    mask = (1 << bits) - 1
    out = np.zeros((n, blocks), dtype=np.uint8)
    for r in range(n):
        for b in range(blocks):
            byte = int(packed[r * row_bytes + b // per_byte])
            out[r, b] = (byte >> (bits * (b % per_byte))) & mask
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), bits=st.sampled_from([2, 4, 8]),
       group=st.sampled_from([16, 32, 64]), n=st.integers(1, 5), blocks=st.integers(1, 7))
def test_pack_codes_and_zero_points_round_trip(seed, bits, group, n, blocks):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (n, blocks * group)).astype(np.uint8)
    zps = rng.integers(0, 2**bits, (n, blocks)).astype(np.uint8)
    packed = pack_codes(codes, bits, group)
    assert packed.dtype == np.uint8 and packed.shape == (n, blocks, group * bits // 8)
    assert np.array_equal(_unpack_codes(packed, bits, group), codes)
    pz = pack_zero_points(zps, bits)
    assert pz.dtype == np.uint8
    assert np.array_equal(_unpack_zero_points(pz, bits, n, blocks), zps)


def test_pack_codes_known_bytes():
    codes = np.array([[1, 2, 3, 0] * 4], dtype=np.uint8)  # one block of 16
    assert pack_codes(codes, 4, 16)[0, 0, 0] == 0x21  # first code in the low nibble
    assert pack_codes(codes, 2, 16)[0, 0, 0] == 0b00111001  # 1 | 2<<2 | 3<<4 | 0<<6
    assert np.array_equal(pack_codes(codes, 8, 16)[0, 0], codes[0])
    # zero points: 3 blocks per row at 4 bits -> 2 bytes per row (the row is padded)
    zp = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    assert list(pack_zero_points(zp, 4)) == [0x21, 0x03, 0x54, 0x06]


@pytest.mark.parametrize(("bits", "stored"), [(2, 2), (3, 4), (4, 4), (5, 8), (6, 8), (7, 8), (8, 8)])
def test_storage_bits(bits, stored):
    assert storage_bits(bits) == stored


# ---------------------------------------------------------------- ONNX Runtime parity


def _matmulnbits_model(q, stored: int, with_zero_points: bool, accuracy_level: int,
                       m: int) -> onnx.ModelProto:
    n = q.codes.shape[0]
    inits = [numpy_helper.from_array(pack_codes(q.codes, stored, q.group_size), "B"),
             numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), "scales")]
    inputs = ["A", "B", "scales"]
    if with_zero_points:
        inits.append(numpy_helper.from_array(pack_zero_points(q.zero_points, stored), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=q.k, N=n,
                            bits=stored, block_size=q.group_size, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, q.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_points", [True, False], ids=["with-zp", "default-zp"])
@pytest.mark.parametrize(("k", "group"), [(96, 32), (100, 32), (64, 16), (300, 128)],
                         ids=["3blocks", "padded", "4blocks", "padded-128"])
def test_matmulnbits_runs_the_packed_codes(bits, zero_points, k, group):
    rng = np.random.default_rng(bits * 1000 + k + group)
    n, m = 24, 5
    w = rng.standard_normal((n, k)).astype(np.float32)
    # explicit zero points: asymmetric codes; without them ORT assumes 2**(bits-1),
    # the symmetric zero point
    q = rtn(w, bits=bits, group_size=group, symmetric=not zero_points)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = _ort(_matmulnbits_model(q, bits, zero_points, 0, m), x)
    ref = x.astype(np.float64) @ q.dequantize().astype(np.float64).T
    assert y.shape == (m, n)
    assert _rel(y, ref) < 1e-4
    # and the quantized product is near the float one (the codes are not garbage)
    assert _rel(y, x @ w.T) < {2: 0.9, 4: 0.25, 8: 0.02}[bits]


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_widths_run_in_their_storage_width(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((16, 80)).astype(np.float32)
    x = rng.standard_normal((3, 80)).astype(np.float32)
    for symmetric in (True, False):
        q = rtn(w, bits=bits, group_size=32, symmetric=symmetric)
        y = _ort(_matmulnbits_model(q, storage_bits(bits), True, 0, 3), x)
        assert _rel(y, x @ q.dequantize().T) < 1e-4


def test_matmulnbits_accuracy_level_4_stays_close():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    q = rtn(w, bits=4, group_size=32, symmetric=True)
    y = _ort(_matmulnbits_model(q, 4, False, 4, 4), x)
    assert _rel(y, x @ q.dequantize().T) < 2e-2
