"""Fake quantization (QAT): the forward pass equals the writer's quantization, the
backward pass is the straight-through estimator, ranges move by EMA or gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.backends.torch.distill import distill_loss
from lowbit.backends.torch.fake_quant import (
    WeightFakeQuant,
    fake_quantize,
    make_activation_fake_quant,
    round_ste,
)
from lowbit.config import DistillSettings
from lowbit.quant import affine
from lowbit.quant.scheme import Granularity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _numpy_roundtrip(w: np.ndarray, params) -> np.ndarray:
    return affine.dequantize(affine.quantize(w, params), params)


@pytest.mark.parametrize("bits", [8, 7, 4, 3, 2])
@pytest.mark.parametrize("granularity,axis", [(Granularity.CHANNEL, 0), (Granularity.CHANNEL, 1),
                                              (Granularity.TENSOR, None)])
def test_weight_fake_quant_equals_the_writers_quantization(bits, granularity, axis):
    w = np.random.default_rng(bits).standard_normal((6, 10, 3)).astype(np.float32)
    quant = WeightFakeQuant(bits, granularity, axis)
    got = quant(torch.from_numpy(w)).numpy()
    expected = _numpy_roundtrip(w, quant.params(w))
    np.testing.assert_array_equal(got, expected)
    codes = affine.quantize(w, quant.params(w))
    assert codes.max() <= 2 ** (bits - 1) - 1 and codes.min() >= -(2 ** (bits - 1) - 1)


def test_group_fake_quant_equals_group_params():
    w = np.random.default_rng(3).standard_normal((5, 20)).astype(np.float32)  # groups of 8: 8+8+4
    quant = WeightFakeQuant(4, Granularity.GROUP, axis=1, group_size=8)
    got = quant(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, _numpy_roundtrip(w, quant.params(w)), atol=1e-6)
    assert len(np.unique(got[0, :8])) <= 15


def test_round_ste_passes_the_gradient_and_rounds_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_fake_quantize_stops_the_gradient_outside_the_grid():
    x = torch.tensor([-5.0, 0.3, 100.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.1), torch.tensor(10.0), 0, 255).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_activation_fake_quant_ema_follows_the_batches_and_eval_uses_the_exported_params():
    params = affine.activation_params(0.0, 1.0)
    fq = make_activation_fake_quant(params, learned=False)
    fq.train()
    for _ in range(200):
        fq(torch.rand(64) * 4.0 - 1.0)  # range [-1, 3]
    p = fq.export_params()
    lo, hi = (0 - float(p.zero_point)) * float(p.scale), (255 - float(p.zero_point)) * float(p.scale)
    assert lo == pytest.approx(-1.0, abs=0.1) and hi == pytest.approx(3.0, abs=0.15)  # batch extremes
    fq.eval()
    x = np.linspace(-2, 4, 101).astype(np.float32)
    np.testing.assert_array_equal(fq(torch.from_numpy(x)).numpy(), _numpy_roundtrip(x, p))


def test_activation_fake_quant_learned_scale_gets_a_gradient_and_is_exported():
    fq = make_activation_fake_quant(affine.activation_params(-1.0, 1.0), learned=True)
    fq.train()
    x = torch.randn(256) * 3.0  # wider than the range: clipping error pushes the scale up
    opt = torch.optim.SGD(fq.parameters(), lr=0.05)
    before = float(fq.scale.detach())
    for _ in range(50):
        opt.zero_grad()
        ((fq(x) - x) ** 2).mean().backward()
        opt.step()
    assert float(fq.scale.detach()) > before * 1.5
    fq.eval()
    p = fq.export_params()
    assert float(p.scale) == pytest.approx(abs(float(fq.scale.detach())), rel=1e-6)
    got = fq(x).detach().numpy()
    np.testing.assert_array_equal(got, _numpy_roundtrip(x.numpy(), p))


def test_a_capped_range_never_passes_its_clip():
    fq = make_activation_fake_quant(affine.activation_params(0.0, 6.0), learned=False,
                                    cap=(0.0, 6.0))
    fq.train()
    for _ in range(100):
        fq(torch.rand(32) * 20.0)
    p = fq.export_params()
    assert (255 - float(p.zero_point)) * float(p.scale) <= 6.0 + 1e-5


def test_shared_module_uses_the_source_parameters_without_moving_them():
    fq = make_activation_fake_quant(affine.activation_params(0.0, 1.0), learned=False)
    shared = fq.shared()
    fq.train()
    before = (float(fq.lo), float(fq.hi))
    shared(torch.rand(10) * 50)
    assert (float(fq.lo), float(fq.hi)) == before
    assert list(shared.parameters()) == []


def test_distill_loss_kl_is_zero_for_equal_outputs_and_scaled_by_t_squared():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 1.0, 3.0]])
    kl1 = float(distill_loss(s, t, DistillSettings(temperature=1.0, loss="kl"), classify=True))
    assert float(distill_loss(t, t, DistillSettings(loss="kl"), classify=True)) == pytest.approx(0)
    p, q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    assert kl1 == pytest.approx(float((p * (p.log() - q)).sum()), rel=1e-5)
    kl4 = float(distill_loss(s, t, DistillSettings(temperature=4.0, loss="kl"), classify=True))
    p4, q4 = torch.softmax(t / 4, -1), torch.log_softmax(s / 4, -1)
    assert kl4 == pytest.approx(16 * float((p4 * (p4.log() - q4)).sum()), rel=1e-5)


def test_distill_loss_auto_cosine_and_mse():
    s, t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    assert float(distill_loss(s, t, DistillSettings(), classify=False)) == pytest.approx(
        float(((s - t) ** 2).mean()))
    assert float(distill_loss(s, t, DistillSettings(loss="cosine"), classify=False)) == \
        pytest.approx((0.0 + 2.0) / 2)
