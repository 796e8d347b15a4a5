"""Group-wise low-bit weight quantization (2-8 bits) on numpy arrays.

Layout follows ONNX Runtime's ``MatMulNBits``: the weight is viewed as
``(N, K)`` (one row per output feature), each row is cut along K into blocks
of ``group_size``, and every block has its own scale and unsigned zero point.
Codes are unsigned ``[0, 2**bits - 1]``; symmetric quantization uses the
fixed zero point ``2**(bits-1)``. K that is not a multiple of the group size
is padded with zeros (the padding never meets an activation).

Scales and zero points come from ``affine.group_params``: a ``GroupQuantized`` is the
storage form of a group-granularity ``TensorQuantParams`` on the (N, K) layout, axis 1
(``to_params`` / ``from_params``). Symmetric groups are signed affine params (zero
point 0) stored with the unsigned offset ``2**(bits-1)`` (``code_offset``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import ValidationError
from lowbit.quant import affine
from lowbit.quant.scheme import Granularity, TensorQuantParams

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

    def to_params(self) -> TensorQuantParams:
        """The equivalent group-granularity params on the (N, K) weight, axis 1.

        ``from_params(w, q.to_params())`` gives back ``q``: for RTN with ``w`` the
        original weight; for GPTQ and HQQ, whose codes are not round(w / scale), with
        ``w = q.dequantize()``, which requantizes exactly to the same codes.
        """
        signed = self.symmetric  # symmetric: signed codes, stored with an offset
        offset = 2 ** (self.bits - 1) if signed else 0
        return TensorQuantParams(
            bits=self.bits, signed=signed, symmetric=self.symmetric,
            granularity=Granularity.GROUP, scale=self.scales.astype(np.float32),
            zero_point=self.zero_points.astype(np.int64) - offset, axis=1,
            group_size=self.group_size,
        )

    @classmethod
    def from_params(cls, w_nk: np.ndarray, params: TensorQuantParams) -> GroupQuantized:
        """Quantize an (N, K) weight with group params on axis 1 (e.g. ``to_params()``);
        codes are ``affine.quantize(w, params) + code_offset(params)``."""
        if params.granularity is not Granularity.GROUP or params.axis not in (1, -1):
            raise ValueError("from_params needs group granularity on axis 1 of an (N, K) weight")
        bits, group = params.bits, int(params.group_size or 0)
        check_weight_only(bits, group)
        k = w_nk.shape[1]
        offset = code_offset(params)
        padded = pad_k(w_nk, group)  # (N, Kp); padding quantizes to the zero point
        codes = affine.quantize(padded, params) + offset  # (N, Kp)
        zp = np.asarray(params.zero_point, dtype=np.int64) + offset  # (N, blocks)
        if codes.size and (codes.min() < 0 or codes.max() > 2**bits - 1):
            raise ValueError("codes do not fit the unsigned storage range")
        return cls(codes.astype(np.uint8), np.asarray(params.scale, dtype=np.float32),
                   zp.astype(np.uint8), bits, group, k, params.symmetric)


def code_offset(params: TensorQuantParams) -> int:
    """What MatMulNBits storage adds to an affine code: 2**(bits-1) for signed params
    (symmetric groups, fixed stored zero point 2**(bits-1)), 0 for unsigned ones."""
    return 2 ** (params.bits - 1) if params.signed else 0


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
    """Scale and stored (unsigned) zero point per block; ``blocks`` is (..., group_size).
    Back-compat wrapper of ``affine.group_params``."""
    p = affine.group_params(blocks, bits=bits, group_size=blocks.shape[-1], axis=-1,
                            symmetric=symmetric)
    return p.scale[..., 0], np.asarray(p.zero_point)[..., 0] + code_offset(p)  # (...,)


def quantize_blocks(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Stored codes of (..., group_size) blocks for per-block scale and stored zero point."""
    q = np.rint(blocks / scale[..., None]) + zp[..., None]
    return np.clip(q, 0, 2**bits - 1).astype(np.uint8)


def rtn(w_nk: np.ndarray, *, bits: int, group_size: int, symmetric: bool = True) -> GroupQuantized:
    """Round-to-nearest group-wise quantization of an (N, K) weight."""
    check_weight_only(bits, group_size)
    params = affine.group_params(w_nk, bits=bits, group_size=group_size, axis=1,
                                 symmetric=symmetric)  # scale, zero point (N, blocks)
    return GroupQuantized.from_params(w_nk, params)


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
