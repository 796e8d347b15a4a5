"""GPTQ (lowbit.quant.gptq) and HQQ (lowbit.quant.hqq) against round-to-nearest: GPTQ lowers the
layer's *output* error on correlated inputs, HQQ lowers the weight error; options validated."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from lowbit.backends.onnx.weight_only import WeightOnlyConfig
from lowbit.errors import ValidationError
from lowbit.quant.gptq import gptq
from lowbit.quant.groupwise import rtn
from lowbit.quant.hqq import hqq


@lru_cache(maxsize=4)
def _correlated_layer(seed: int, n: int = 64, k: int = 256, samples: int = 1024
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X (samples, K), W (N, K), H = 2 X^T X / samples) with strongly correlated input
    features: X = Z (I + A)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((samples, k))
    a = rng.standard_normal((k, k)) * (0.9 / np.sqrt(k))
    x = (z @ (np.eye(k) + a)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    h = 2.0 * x.T.astype(np.float64) @ x.astype(np.float64) / samples
    return x, w, h


def _output_error(x: np.ndarray, w: np.ndarray, deq: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(x64 @ deq.astype(np.float64).T - x64 @ w.astype(np.float64).T))


# ---------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_error_is_lower_than_rtn_on_correlated_inputs(bits, group, symmetric):
    x, w, h = _correlated_layer(int(symmetric))
    q = gptq(w, h, bits=bits, group_size=group, symmetric=symmetric)
    r = rtn(w, bits=bits, group_size=group, symmetric=symmetric)
    e_gptq = _output_error(x, w, q.dequantize())
    e_rtn = _output_error(x, w, r.dequantize())
    # the gain on correlated inputs is large (~20% here); a GPTQ that does not
    # propagate the rounding error lands at ~1.0
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert q.codes.shape == r.codes.shape and int(q.codes.max()) <= 2**bits - 1
    assert q.symmetric == symmetric and q.bits == bits and q.group_size == group


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I no error is pushed to other columns, so GPTQ must round like RTN."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    for bits, group in ((4, 32), (3, 128), (8, 64)):
        q = gptq(w, np.eye(256), bits=bits, group_size=group)
        r = rtn(w, bits=bits, group_size=group)
        assert np.mean(q.codes != r.codes) < 1e-3
        np.testing.assert_allclose(q.scales, r.scales, rtol=1e-6)
        e_q = np.linalg.norm(q.dequantize() - w)
        e_r = np.linalg.norm(r.dequantize() - w)
        assert e_q == pytest.approx(e_r, rel=1e-2)


def test_gptq_with_a_near_identity_hessian_stays_close_to_rtn():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    h = np.eye(128) + 1e-3 * np.ones((128, 128))
    q = gptq(w, h, bits=4, group_size=32)
    r = rtn(w, bits=4, group_size=32)
    e_q = np.linalg.norm(q.dequantize() - w)
    e_r = np.linalg.norm(r.dequantize() - w)
    assert e_q == pytest.approx(e_r, rel=0.05)
    assert np.mean(q.codes != r.codes) < 0.05


def test_gptq_pads_k_and_survives_dead_inputs():
    """K not a multiple of the group (padded), and input features that are always zero
    (zero Hessian diagonal): finite result, exactly K columns, dead columns quantized to 0."""
    x, w, _ = _correlated_layer(5, n=16, k=200, samples=1024)
    x[:, [3, 77, 150]] = 0.0
    h = 2.0 * x.T.astype(np.float64) @ x.astype(np.float64) / len(x)
    q = gptq(w, h, bits=4, group_size=128)
    deq = q.dequantize()
    assert deq.shape == (16, 200) and q.codes.shape == (16, 256)
    assert np.all(np.isfinite(deq)) and np.all(np.isfinite(q.scales)) and np.all(q.scales > 0)
    assert np.all(deq[:, [3, 77, 150]] == 0.0)
    assert _output_error(x, w, deq) < _output_error(x, w, rtn(w, bits=4, group_size=128).dequantize())


def test_gptq_is_deterministic():
    _, w, h = _correlated_layer(6, n=16, k=64, samples=256)
    a = gptq(w, h, bits=4, group_size=32)
    b = gptq(w, h, bits=4, group_size=32)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)


# ---------------------------------------------------------------- HQQ


@pytest.mark.parametrize(("bits", "group", "kind"), [
    (2, 16, "normal"), (4, 32, "normal"), (8, 128, "normal"),
    (2, 128, "heavy-tailed"), (4, 16, "heavy-tailed"), (8, 32, "heavy-tailed")])
def test_hqq_weight_error_is_no_worse_than_asymmetric_rtn(bits, group, kind):
    rng = np.random.default_rng(bits * 100 + group)
    shape = (64, 256)
    w = (rng.standard_normal(shape) if kind == "normal" else rng.standard_t(3, shape)).astype(np.float32)
    h = hqq(w, bits=bits, group_size=group)
    r = rtn(w, bits=bits, group_size=group, symmetric=False)
    e_hqq = float(np.mean(np.abs(h.dequantize() - w)))
    e_rtn = float(np.mean(np.abs(r.dequantize() - w)))
    assert e_hqq <= e_rtn * (1 + 1e-6), (
        f"HQQ mean |error| {e_hqq:.6g} > asymmetric RTN's {e_rtn:.6g} "
        f"({100 * (e_hqq / e_rtn - 1):.2f}% worse)")


def test_hqq_no_group_is_worse_than_rtn_with_the_same_scale():
    """Where a group spans zero, HQQ and asymmetric RTN use the same min-max scale and
    RTN's zero point, rint(-min/scale), is HQQ's starting point. A search that keeps the
    best zero point seen can then never end worse than RTN in any such group, provided
    it scores the zero point it will store (the rounded one)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    h = hqq(w, bits=4, group_size=32)
    r = rtn(w, bits=4, group_size=32, symmetric=False)
    np.testing.assert_allclose(h.scales, r.scales, rtol=1e-6)  # every group spans zero here

    def per_group(q):
        return np.abs(q.dequantize() - w).reshape(64, -1, 32).mean(axis=-1)

    worse = per_group(h) > per_group(r) * (1 + 1e-6)
    assert not worse.any(), (
        f"{int(worse.sum())} of {worse.size} groups end with a larger mean |error| than RTN "
        f"(zero point differs from RTN's in {int((h.zero_points != r.zero_points).sum())})")


def test_hqq_output_is_asymmetric_and_well_formed():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((8, 100)).astype(np.float32)
    h = hqq(w, bits=4, group_size=32)
    assert h.symmetric is False and h.k == 100 and h.codes.shape == (8, 128)
    assert h.dequantize().shape == (8, 100)
    assert int(h.codes.max()) <= 15 and int(h.zero_points.max()) <= 15
    assert np.all(np.isfinite(h.scales)) and np.all(h.scales > 0)
    # constant and all-zero rows stay finite
    w2 = np.zeros((2, 32), dtype=np.float32)
    w2[0] = 0.5
    h2 = hqq(w2, bits=4, group_size=32)
    assert np.all(np.isfinite(h2.dequantize())) and np.all(h2.scales > 0)
    assert np.all(h2.dequantize()[1] == 0.0)


# ---------------------------------------------------------------- option validation


def _all_algorithms(bits, group):
    w = np.ones((2, 64), dtype=np.float32)
    return [lambda: rtn(w, bits=bits, group_size=group),
            lambda: gptq(w, np.eye(64), bits=bits, group_size=group),
            lambda: hqq(w, bits=bits, group_size=group),
            lambda: WeightOnlyConfig(bits=bits, group_size=group)]


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, 2.5, True])
def test_bits_outside_2_to_8_raise_naming_bits(bits):
    for call in _all_algorithms(bits, 32):
        with pytest.raises(ValidationError, match="bits"):
            call()


@pytest.mark.parametrize("group", [0, 8, 24, 48, 100, 512])
def test_group_sizes_not_in_the_list_raise_naming_group_size(group):
    for call in _all_algorithms(4, group):
        with pytest.raises(ValidationError, match="group_size"):
            call()


def test_unknown_algorithm_and_accuracy_level_raise_naming_the_option():
    with pytest.raises(ValidationError, match="algorithm"):
        WeightOnlyConfig(algorithm="bogus")
    with pytest.raises(ValidationError, match="accuracy_level"):
        WeightOnlyConfig(accuracy_level=7)
    assert WeightOnlyConfig(algorithm="hqq").is_symmetric is False  # HQQ fits zero points
