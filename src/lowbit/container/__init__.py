"""The ``.lbz`` compressed model file: an ONNX model stored losslessly and small.

Each initializer gets the smallest of: raw bytes (or byte planes), a codebook
of its distinct values with b-bit indices (weight sharing), or sparse
positions plus nonzero values (pruning), all entropy-coded by zstd. Decoding
gives back every initializer bit for bit and the graph unchanged.

Example::

    from lowbit.container import write_lbz, read_lbz, breakdown
    write_lbz("lenet.lbz", model)
    assert read_lbz("lenet.lbz") == model
"""

from lowbit.container.breakdown import breakdown
from lowbit.container.format import ContainerError
from lowbit.container.lbz import decode, encode, read_lbz, read_lbz_file, write_lbz

__all__ = ["ContainerError", "breakdown", "decode", "encode", "read_lbz", "read_lbz_file", "write_lbz"]
