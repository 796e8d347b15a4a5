"""Fake quantization for quantization-aware training (torch).

The forward pass rounds exactly as the exported model will (``q = clamp(round(x / s)
+ z, qmin, qmax)``, ``x' = (q - z) * s``, round half to even like ONNX
QuantizeLinear); the backward pass lets the gradient through the rounding (the
straight-through estimator) and stops it outside the grid.

- ``WeightFakeQuant``: symmetric weights, per tensor, per channel or per group; the
  scale follows the current weights (max |w| / qmax), as the writer will compute it
  from the trained weights, so training sees the export's rounding.
- ``ActivationFakeQuant``: an unsigned per-tensor activation range, started from the
  calibrated plan; in training mode it follows the batches by an exponential moving
  average (``ema``) or learns scale and zero point by gradient (``learned``, LSQ+
  style with the LSQ gradient scale). In eval mode it uses exactly the parameters
  ``export_params`` gives the plan, so the torch model and the written ONNX model
  quantize with the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lowbit.quant import affine
from lowbit.quant.scheme import Granularity, TensorQuantParams

EMA_MOMENTUM = 0.05  # share of each training batch's range in the running range


def _torch() -> Any:
    import torch

    return torch


def round_ste(x: Any) -> Any:
    """``round(x)`` forward (half to even), identity backward."""
    return x + (x.round() - x).detach()


def fake_quantize(x: Any, scale: Any, zero_point: Any, qmin: int, qmax: int) -> Any:
    """Quantize then dequantize ``x``; ``scale`` and ``zero_point`` broadcast against it.

    The gradient reaches ``x`` inside the grid (STE) and ``scale``/``zero_point``
    where they are tensors that require it (LSQ)."""
    q = round_ste(x / scale) + zero_point
    return (q.clamp(qmin, qmax) - zero_point) * scale


def _grad_scaled(value: Any, factor: float) -> Any:
    """``value`` forward, its gradient times ``factor`` backward (LSQ's step-size scale)."""
    return (value - value * factor).detach() + value * factor


class WeightFakeQuant:
    """Symmetric fake quantization of one weight at ``bits`` (narrow range).

    ``granularity`` tensor, channel (one scale per index of ``axis``) or group (``axis``
    cut into consecutive groups of ``group_size``)."""

    def __init__(self, bits: int, granularity: Granularity, axis: int | None = None,
                 group_size: int | None = None) -> None:
        self.bits, self.granularity, self.axis, self.group_size = bits, granularity, axis, group_size
        self.qmax = 2 ** (bits - 1) - 1
        self.last_scale: Any = None  # the scale of the latest call, (channels,) or ()

    def __call__(self, w: Any) -> Any:
        torch = _torch()
        if self.granularity is Granularity.GROUP:
            return self._grouped(w)
        with torch.no_grad():
            if self.granularity is Granularity.CHANNEL:
                axis = self.axis % w.dim()
                dims = [d for d in range(w.dim()) if d != axis]
                absmax = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()
            else:
                absmax = w.abs().max()
            scale = (absmax.double() / self.qmax).float().clamp_min(affine.MIN_SCALE)
            self.last_scale = scale.reshape(-1) if scale.dim() else scale
        return fake_quantize(w, scale, 0.0, -self.qmax, self.qmax)

    def _grouped(self, w: Any) -> Any:
        torch = _torch()
        axis, g = self.axis % w.dim(), int(self.group_size or 1)
        moved = w.movedim(axis, -1)  # (..., K)
        k = moved.shape[-1]
        pad = (-k) % g
        padded = torch.nn.functional.pad(moved, (0, pad)) if pad else moved
        groups = padded.reshape(*padded.shape[:-1], -1, g)  # (..., K/g, g)
        with torch.no_grad():
            scale = (groups.abs().amax(dim=-1, keepdim=True) / self.qmax).clamp_min(affine.MIN_SCALE)
        out = fake_quantize(groups, scale, 0.0, -self.qmax, self.qmax)
        out = out.reshape(*padded.shape)[..., :k]
        return out.movedim(-1, axis)

    def params(self, w: np.ndarray) -> TensorQuantParams:
        """The writer's parameters for the trained weight ``w`` (same rule as forward)."""
        if self.granularity is Granularity.CHANNEL:
            return affine.weight_params_per_channel(w, axis=self.axis, bits=self.bits)
        if self.granularity is Granularity.TENSOR:
            return affine.weight_params_per_tensor(w, bits=self.bits)
        return affine.group_params(w, bits=self.bits, group_size=int(self.group_size or 1),
                                   axis=int(self.axis or 0), symmetric=True)


class BiasFakeQuant:
    """A static node's bias on the INT32 grid the writer stores it on: scale = input
    scale x weight scale (per output channel). It reads the weight's scale from that
    weight's latest fake quantization (the bridge reads a node's weight before its
    bias) and the input's from its activation module."""

    def __init__(self, weight: WeightFakeQuant, activation: Any) -> None:
        self.weight, self.activation = weight, activation

    def __call__(self, b: Any) -> Any:
        torch = _torch()
        if self.weight.last_scale is None:
            return b
        with torch.no_grad():
            scale = (self.activation.scale_now().double() * self.weight.last_scale.double())
            scale = scale.float().clamp_min(affine.MIN_SCALE).double()
        q = round_ste(b.double() / scale)
        return (q * scale).to(b.dtype)


def make_activation_fake_quant(params: TensorQuantParams, *, learned: bool,
                               cap: tuple[float, float] | None = None) -> Any:
    """An ``ActivationFakeQuant`` module started from calibrated ``params``."""
    torch = _torch()

    class ActivationFakeQuant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qmin, self.qmax, self.bits = params.qmin, params.qmax, params.bits
            self.learned = learned
            self.cap = cap
            s, z = float(params.scale), float(params.zero_point)
            lo, hi = (self.qmin - z) * s, (self.qmax - z) * s
            self.register_buffer("lo", torch.tensor(lo, dtype=torch.float64))
            self.register_buffer("hi", torch.tensor(hi, dtype=torch.float64))
            if learned:
                self.scale = torch.nn.Parameter(torch.tensor(s, dtype=torch.float32))
                self.zero_point = torch.nn.Parameter(torch.tensor(z, dtype=torch.float32))
            self._fixed: tuple[Any, Any] | None = None  # (scale, zero point) of the state

        def train(self, mode: bool = True) -> Any:
            self._fixed = None  # eval parameters are recomputed from the trained state
            return super().train(mode)

        def forward(self, x: Any) -> Any:
            if self.training and not self.learned:
                with torch.no_grad():
                    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                    self.lo.mul_(1 - EMA_MOMENTUM).add_(EMA_MOMENTUM * lo)
                    self.hi.mul_(1 - EMA_MOMENTUM).add_(EMA_MOMENTUM * hi)
                    self._fixed = None  # the range moved
            return self.apply_to(x)

        def fixed(self) -> tuple[Any, Any]:
            """(scale, zero point) tensors of ``export_params``, computed once per state."""
            if self._fixed is None:
                p = self.export_params()
                self._fixed = (torch.tensor(float(p.scale), dtype=torch.float32),
                               torch.tensor(float(p.zero_point), dtype=torch.float32))
            return self._fixed

        def apply_to(self, x: Any) -> Any:
            """Fake quantize ``x`` with the current parameters (no range update)."""
            if self.training and self.learned:
                factor = 1.0 / math.sqrt(max(1, x[0].numel()) * self.qmax)
                scale = _grad_scaled(self.scale.abs().clamp_min(1e-8), factor)
                zp = round_ste(_grad_scaled(self.zero_point, factor)).clamp(self.qmin, self.qmax)
                return fake_quantize(x, scale, zp, self.qmin, self.qmax)
            return fake_quantize(x, *self.fixed(), self.qmin, self.qmax)

        def scale_now(self) -> Any:
            """The scale this module quantizes with now (no gradient)."""
            if self.training and self.learned:
                return self.scale.detach().abs().clamp_min(1e-8)
            return self.fixed()[0]

        def shared(self) -> Any:
            """A module for a tensor that shares these parameters (an 8-bit passthrough
            op's output): it quantizes with them and never moves them."""
            return _Shared(self)

        def export_params(self) -> TensorQuantParams:
            """The plan's parameters for this tensor, from the trained state."""
            if self.learned and self.cap is None:
                s = abs(float(self.scale.detach()))
                z = int(np.clip(np.rint(float(self.zero_point.detach())), self.qmin, self.qmax))
                if s > affine.MIN_SCALE:
                    return TensorQuantParams(bits=self.bits, signed=False, symmetric=False,
                                             granularity=Granularity.TENSOR,
                                             scale=np.float32(s), zero_point=np.int64(z))
            lo, hi = float(self.lo), float(self.hi)
            if self.learned:  # a capped learned range: the learned one, within the cap
                s = abs(float(self.scale.detach()))
                z = float(np.rint(float(self.zero_point.detach())))
                lo, hi = (self.qmin - z) * s, (self.qmax - z) * s
            if self.cap is not None:
                lo, hi = max(lo, self.cap[0]), min(hi, self.cap[1])
            return affine.activation_params(lo, hi, bits=self.bits)

    class _Shared(torch.nn.Module):
        def __init__(self, source: Any) -> None:
            super().__init__()
            self.source = [source]  # (a list: not a submodule, trained once, by its owner)

        def forward(self, x: Any) -> Any:
            return self.source[0].apply_to(x)

        def scale_now(self) -> Any:
            return self.source[0].scale_now()

    return ActivationFakeQuant()
