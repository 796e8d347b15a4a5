"""GPTQ (Frantar et al., 2023): quantize a layer's weight column by column and
push each column's rounding error onto the columns not yet quantized, weighted
by the inverse Hessian ``H = 2 X^T X`` of the layer's inputs, so the layer's
*output* error on the calibration data is what gets minimised.

Pure numpy; the weight is (N, K) (rows = output features) and ``hessian`` is
(K, K), accumulated from calibration activations by the caller.
"""

from __future__ import annotations

import numpy as np

from lowbit.quant import affine
from lowbit.quant.groupwise import (
    GroupQuantized,
    check_weight_only,
    code_offset,
    pad_k,
    quantize_blocks,
)


def gptq(w_nk: np.ndarray, hessian: np.ndarray, *, bits: int, group_size: int,
         symmetric: bool = True, damp: float = 0.01, block: int = 128) -> GroupQuantized:
    check_weight_only(bits, group_size)
    n, k = w_nk.shape
    W = pad_k(w_nk, group_size).astype(np.float64)  # (N, Kp)  # noqa: N806
    kp = W.shape[1]
    H = np.zeros((kp, kp), dtype=np.float64)  # noqa: N806
    H[:k, :k] = hessian
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += np.eye(kp) * damp * float(np.mean(np.diag(H)))
    # upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    except np.linalg.LinAlgError:
        H += np.eye(kp) * float(np.mean(np.diag(H)))
        hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    blocks = kp // group_size
    scales = np.zeros((n, blocks), dtype=np.float32)
    zps = np.zeros((n, blocks), dtype=np.int64)
    codes = np.zeros((n, kp), dtype=np.uint8)
    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        w1 = W[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # parameters from the (already corrected) group
                g = col // group_size
                group = np.concatenate([w1[:, i:], W[:, i2:]], axis=1)[:, :group_size]  # (N, g)
                p = affine.group_params(group, bits=bits, group_size=group_size, axis=1,
                                        symmetric=symmetric)  # (N, 1)
                scales[:, g] = p.scale[:, 0]
                zps[:, g] = p.zero_point[:, 0] + code_offset(p)  # stored (unsigned) zero point
            g = col // group_size
            s, z = scales[:, g].astype(np.float64), zps[:, g]
            q = quantize_blocks(w1[:, i:i + 1][:, None, :], s[:, None], z[:, None], bits)[:, 0, 0]
            codes[:, col] = q
            deq = (q.astype(np.float64) - z) * s
            err = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= np.outer(err, h1[i, i:])
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return GroupQuantized(codes, scales, zps.astype(np.uint8), bits, group_size, k, symmetric)
