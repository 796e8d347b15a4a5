"""HQQ (Badri & Shaji, 2023): calibration-free group-wise quantization that fits
each group's zero point to minimise an l_p (p < 1) error with half-quadratic
splitting, which ignores the few large outliers that least-squares fitting
chases. Scales come from the min-max range (widened to contain 0, as in
asymmetric RTN: ``affine.group_params``); only zero points move (kept as real
numbers during the fit, rounded to the integer grid at the end).
"""

from __future__ import annotations

import numpy as np

from lowbit.quant import affine
from lowbit.quant.groupwise import GroupQuantized, check_weight_only, pad_k


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft-thresholding, the proximal step of |x|^p."""
    mag = np.abs(x)
    return np.sign(x) * np.maximum(mag - np.power(mag + 1e-8, p - 1) / beta, 0.0)


def hqq(w_nk: np.ndarray, *, bits: int, group_size: int, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, iterations: int = 20) -> GroupQuantized:
    check_weight_only(bits, group_size)
    n, k = w_nk.shape
    levels = 2**bits - 1
    W = pad_k(w_nk, group_size).reshape(n, -1, group_size).astype(np.float32)  # (N, G, g)  # noqa: N806
    init = affine.group_params(W, bits=bits, group_size=group_size, axis=2, symmetric=False)
    scale = init.scale  # (N, G, 1), asymmetric RTN's scale
    # start from RTN's zero point before rounding: -lo / scale over the same range
    zero = -np.minimum(W.min(axis=-1, keepdims=True), 0.0) / scale  # (N, G, 1), real-valued
    best_err = np.full(scale.shape, np.inf, dtype=np.float32)
    best_zero = zero.copy()
    for _ in range(iterations):
        q = np.clip(np.rint(W / scale + zero), 0, levels)
        recon = (q - zero) * scale
        # score the zero point that would be stored (an integer), so the kept result is
        # never worse than round-to-nearest, which is the first candidate
        z_int = np.rint(zero)
        q_int = np.clip(np.rint(W / scale + z_int), 0, levels)
        err_now = np.mean(np.abs(W - (q_int - z_int) * scale), axis=-1, keepdims=True)
        better = err_now < best_err
        best_err = np.where(better, err_now, best_err)
        best_zero = np.where(better, z_int, best_zero)
        we = _shrink(W - recon, beta, p)
        zero = np.mean(q - (W - we) / scale, axis=-1, keepdims=True)
        beta *= kappa
    zp = np.clip(np.rint(best_zero), 0, levels)
    codes = np.clip(np.rint(W / scale + zp), 0, levels).astype(np.uint8)
    return GroupQuantized(codes.reshape(n, -1), scale[..., 0], zp[..., 0].astype(np.uint8), bits,
                          group_size, k, symmetric=False)
