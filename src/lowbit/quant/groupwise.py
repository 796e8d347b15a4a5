"""Group-wise low-bit weight quantization (2-8 bits) on numpy arrays.

Layout follows ONNX Runtime's ``MatMulNBits``: the weight is viewed as
``(N, K)`` (one row per output feature), each row is cut along K into blocks
of ``group_size``, and every block has its own scale and unsigned zero point.
Codes are unsigned ``[0, 2**bits - 1]``; symmetric quantization uses the
fixed zero point ``2**(bits-1)``. K that is not a multiple of the group size
is padded with zeros (the padding never meets an activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import ValidationError

GROUP_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class GroupQuantized:
    """``codes`` (N, K_padded) uint8; ``scales``/``zero_points`` (N, blocks)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    group_size: int
    k: int  # the real K (before padding)
    symmetric: bool

    def dequantize(self) -> np.ndarray:
        """(N, K) float32 weights these codes stand for."""
        n, kp = self.codes.shape
        blocks = kp // self.group_size
        q = self.codes.reshape(n, blocks, self.group_size).astype(np.float32)
        w = (q - self.zero_points[..., None].astype(np.float32)) * self.scales[..., None]
        return w.reshape(n, kp)[:, : self.k]


def check_weight_only(bits: int, group_size: int) -> None:
    if isinstance(bits, bool) or int(bits) != bits or not 2 <= int(bits) <= 8:
        raise ValidationError(f"option bits: {bits} must be an integer from 2 to 8 for weight-only")
    if group_size not in GROUP_SIZES:
        raise ValidationError(
            f"option group_size: {group_size} must be one of {', '.join(map(str, GROUP_SIZES))}")


def pad_k(w_nk: np.ndarray, group_size: int) -> np.ndarray:
    n, k = w_nk.shape
    kp = -(-k // group_size) * group_size
    if kp == k:
        return np.ascontiguousarray(w_nk, dtype=np.float32)
    out = np.zeros((n, kp), dtype=np.float32)
    out[:, :k] = w_nk
    return out


def group_params(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per block; ``blocks`` is (..., group_size)."""
    levels = 2**bits - 1
    if symmetric:
        absmax = np.max(np.abs(blocks), axis=-1)
        scale = absmax / (2 ** (bits - 1) - 1)
        zp = np.full(scale.shape, 2 ** (bits - 1), dtype=np.int64)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / levels
        zp = np.clip(np.rint(-lo / np.where(scale > 0, scale, 1.0)), 0, levels).astype(np.int64)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zp


def quantize_blocks(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    q = np.rint(blocks / scale[..., None]) + zp[..., None]
    return np.clip(q, 0, 2**bits - 1).astype(np.uint8)


def rtn(w_nk: np.ndarray, *, bits: int, group_size: int, symmetric: bool = True) -> GroupQuantized:
    """Round-to-nearest group-wise quantization of an (N, K) weight."""
    check_weight_only(bits, group_size)
    n, k = w_nk.shape
    padded = pad_k(w_nk, group_size)
    blocks = padded.reshape(n, -1, group_size)
    scale, zp = group_params(blocks, bits, symmetric)
    codes = quantize_blocks(blocks, scale, zp, bits).reshape(n, -1)
    return GroupQuantized(codes, scale, zp.astype(np.uint8), bits, group_size, k, symmetric)


def pack_codes(codes: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """(N, K_padded) codes -> MatMulNBits ``B`` (N, blocks, group_size*bits/8), low bits first.

    Bit widths that do not divide 8 (3, 5, 6, 7) are not packed by ONNX Runtime's
    kernel; lowbit stores them in the next supported width (see ``storage_bits``).
    """
    n, kp = codes.shape
    per_byte = 8 // bits
    grouped = codes.reshape(n, kp // group_size, group_size // per_byte, per_byte)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i].astype(np.uint8) << np.uint8(bits * i)).astype(np.uint8)
    return packed


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """(N, blocks) zero points -> MatMulNBits layout: per row, ``bits``-wide, low first,
    each row padded to whole bytes; flattened."""
    n, blocks = zp.shape
    per_byte = 8 // bits
    row_bytes = -(-blocks // per_byte)
    padded = np.zeros((n, row_bytes * per_byte), dtype=np.uint8)
    padded[:, :blocks] = zp
    grouped = padded.reshape(n, row_bytes, per_byte)
    packed = np.zeros((n, row_bytes), dtype=np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] << np.uint8(bits * i)).astype(np.uint8)
    return packed.reshape(-1)


def storage_bits(bits: int) -> int:
    """The packed width ONNX Runtime's MatMulNBits runs for a requested width."""
    return {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}[bits]
