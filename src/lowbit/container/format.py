"""The byte layout of a ``.lbz`` file: header, four zstd frames, checksum.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"LBZ\\x00"
    4       1     format version (this lowbit writes and reads 1)
    5       1     flags (none defined in version 1; must be 0)
    6       32    for each part (graph, indices, codebooks, values):
                  u32 compressed length, u32 uncompressed length
    38      ...   the parts' zstd frames, in that order (a part that is empty has no frame)
    end-4   4     CRC-32 (zlib) of every byte before it

The four parts are separate zstd frames (magicless, no frame checksum: the
file's CRC covers them) because they hold very different data: one frame
for gap bytes and bit-packed indices together made zstd share one Huffman
table between them and cost ~7% on a 95%-sparse clustered tensor, while a
frame costs only ~5 bytes. Separate frames also make the per-part byte
counts in ``breakdown`` exact.

Everything a reader needs to check sizes comes first, so ``unpack`` checks
magic, version, every length against the real data size, the checksum, and
each frame's declared content size before it decompresses anything.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import zstandard

from lowbit.errors import ModelLoadError, ValidationError

MAGIC = b"LBZ\x00"
VERSION = 1
PART_NAMES = ("graph", "indices", "codebooks", "values")
_HEADER = struct.Struct("<4sBB" + "II" * len(PART_NAMES))
HEADER_SIZE = _HEADER.size  # 38
CHECKSUM_SIZE = 4
MAX_PART_BYTES = 0xFFFF_FFFF
# A zstd frame can expand by at most ~32768x (an RLE block: 4 bytes for 128 KiB);
# a part that claims more than this ratio is rejected before any allocation.
MAX_EXPANSION = 1 << 16
# zstd level by part size: 19 costs ~10 MB/s and saves ~0.5% over 12 on float weights, so
# large parts step down to keep encoding a 100 MB model within seconds, not minutes.
ZSTD_LEVELS = ((16 << 20, 19), (128 << 20, 15), (MAX_PART_BYTES, 12))
_ZSTD_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS


class ContainerError(ModelLoadError):
    """A ``.lbz`` file is not one, is of an unsupported version, truncated, or corrupted."""


@dataclass(frozen=True)
class Frames:
    """Where each part's compressed bytes lie in a file, and how long each becomes."""

    compressed: tuple[int, ...]  # bytes on disk, one per part
    raw: tuple[int, ...]  # bytes after decompression, one per part
    flags: int

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + sum(self.compressed) + CHECKSUM_SIZE


def zstd_level(size: int) -> int:
    """The level ``pack`` uses for a part of ``size`` bytes (deterministic in the size alone)."""
    return next(level for limit, level in ZSTD_LEVELS if size <= limit)


def compress_part(data: bytes, *, level: int | None = None) -> bytes:
    """One magicless zstd frame with its content size; empty input gives no frame."""
    if not data:
        return b""
    level = zstd_level(len(data)) if level is None else level
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), format=_ZSTD_FORMAT,
        write_content_size=True, write_checksum=False, write_dict_id=False,
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def estimate_size(data: bytes) -> int:
    """Compressed size at a fast level: used to choose between encodings of one tensor."""
    if not data:
        return 0
    return len(zstandard.ZstdCompressor(level=3, write_content_size=False).compress(data))


def pack(parts: list[bytes], *, level: int | None = None) -> bytes:
    """Header + frames + CRC for the four uncompressed parts (graph, indices, codebooks, values)."""
    if len(parts) != len(PART_NAMES):
        raise ValueError(f"internal: expected {len(PART_NAMES)} parts, got {len(parts)}")
    frames = [compress_part(p, level=level) for p in parts]
    lengths: list[int] = []
    for name, raw, frame in zip(PART_NAMES, parts, frames):
        if len(raw) > MAX_PART_BYTES or len(frame) > MAX_PART_BYTES:
            raise ValidationError(
                f"model too large for .lbz version {VERSION}: the {name} part has {len(raw)} bytes "
                f"(at most {MAX_PART_BYTES})")
        lengths += [len(frame), len(raw)]
    body = _HEADER.pack(MAGIC, VERSION, 0, *lengths) + b"".join(frames)
    return body + struct.pack("<I", zlib.crc32(body))


def read_frames(data: bytes, source: str) -> Frames:
    """Check magic, version, lengths and checksum; return the frame table."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ContainerError(f"{source}: expected bytes, got {type(data).__name__}")
    size = len(data)
    if size < len(MAGIC):
        if size and bytes(data) == MAGIC[:size]:
            raise ContainerError(f"{source}: truncated .lbz file ({size} bytes)")
        raise ContainerError(f"{source}: not a .lbz file (too short: {size} bytes)")
    if bytes(data[:4]) != MAGIC:
        raise ContainerError(f"{source}: not a .lbz file (bad magic bytes {bytes(data[:4])!r})")
    if size < 5:
        raise ContainerError(f"{source}: truncated .lbz file ({size} bytes)")
    if data[4] != VERSION:
        raise ContainerError(
            f"{source}: unsupported .lbz format version {data[4]} "
            f"(this lowbit reads version {VERSION}; a newer lowbit may read it)")
    if size < HEADER_SIZE + CHECKSUM_SIZE:
        raise ContainerError(
            f"{source}: truncated .lbz file ({size} bytes, shorter than the "
            f"{HEADER_SIZE + CHECKSUM_SIZE}-byte header and checksum)")
    fields = _HEADER.unpack_from(data, 0)
    flags, lengths = fields[2], fields[3:]
    frames = Frames(compressed=tuple(lengths[0::2]), raw=tuple(lengths[1::2]), flags=flags)
    if size < frames.file_size:
        raise ContainerError(
            f"{source}: truncated .lbz file ({size} bytes; its header says {frames.file_size})")
    if size > frames.file_size:
        raise ContainerError(
            f"{source}: inconsistent .lbz file: {size} bytes but its header says {frames.file_size} "
            "(trailing data or a corrupted length)")
    (stored,) = struct.unpack_from("<I", data, size - CHECKSUM_SIZE)
    actual = zlib.crc32(memoryview(data)[: size - CHECKSUM_SIZE])
    if stored != actual:
        raise ContainerError(
            f"{source}: corrupted .lbz file (checksum mismatch: stored {stored:08x}, computed {actual:08x})")
    if flags != 0:
        raise ContainerError(
            f"{source}: unsupported .lbz flags 0x{flags:02x} (version {VERSION} defines none)")
    for name, comp, raw in zip(PART_NAMES, frames.compressed, frames.raw):
        if (comp == 0) != (raw == 0):
            raise ContainerError(
                f"{source}: inconsistent .lbz file: the {name} part has {comp} compressed "
                f"and {raw} uncompressed bytes")
        if raw > comp * MAX_EXPANSION:
            raise ContainerError(
                f"{source}: inconsistent .lbz file: the {name} part claims {raw} bytes from a "
                f"{comp}-byte frame (more than zstd can expand)")
    return frames


def decompress_parts(data: bytes, frames: Frames, source: str) -> list[bytes]:
    """Each part's bytes, after checking that its frame declares exactly the expected size."""
    view = memoryview(data)
    out: list[bytes] = []
    offset = HEADER_SIZE
    for name, comp, raw in zip(PART_NAMES, frames.compressed, frames.raw):
        frame = bytes(view[offset: offset + comp])
        offset += comp
        out.append(_decompress_frame(frame, raw, f"{source}: {name} part"))
    return out


def _decompress_frame(frame: bytes, raw: int, where: str) -> bytes:
    if not frame:
        return b""
    try:
        declared = zstandard.get_frame_parameters(frame, format=_ZSTD_FORMAT).content_size
    except zstandard.ZstdError as exc:
        raise ContainerError(f"{where}: bad zstd frame header ({exc})") from None
    if declared != raw:
        raise ContainerError(
            f"{where}: inconsistent lengths (frame declares {declared} bytes, header says {raw})")
    try:
        # The frame's content size is checked above, so the decoder's output is bounded by it.
        obj = zstandard.ZstdDecompressor(format=_ZSTD_FORMAT).decompressobj()
        out = obj.decompress(frame)
        complete, unused = obj.eof, obj.unused_data
    except zstandard.ZstdError as exc:
        raise ContainerError(f"{where}: corrupted zstd data ({exc})") from None
    except MemoryError:
        raise ContainerError(f"{where}: too large to decompress ({raw} bytes)") from None
    if not complete or unused or len(out) != raw:
        raise ContainerError(
            f"{where}: corrupted zstd data (incomplete frame, trailing bytes or wrong length)")
    return out
