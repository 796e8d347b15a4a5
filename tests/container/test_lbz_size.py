""".lbz sizes: sparse + clustered tensors near their entropy, the chosen encodings, breakdown sums."""

from __future__ import annotations

import numpy as np
import pytest
from lbz_models import identity_model, lenet5, prune_and_cluster
from onnx import numpy_helper

from lowbit.container import breakdown, decode, encode
from lowbit.container.format import CHECKSUM_SIZE, HEADER_SIZE

N = 100_000


def _one(name: str, arr: np.ndarray) -> tuple[bytes, dict]:
    data = encode(identity_model([numpy_helper.from_array(arr, name)]))
    assert decode(data).graph.initializer[0].raw_data == arr.tobytes()
    return data, breakdown(data)["initializers"][0]


def test_sparse_clustered_tensor_near_deep_compression_bound():
    rng = np.random.default_rng(0)
    codes = rng.normal(0, 0.1, 32).astype(np.float32)
    w = np.zeros(N, dtype=np.float32)
    w[rng.choice(N, N // 20, replace=False)] = codes[rng.integers(0, 32, N // 20)]  # 95% zeros
    data, row = _one("w", w)
    bound = 0.05 * N * (5 + 4) / 8 * 1.3  # 5-bit indices + ~4-bit gaps, 30% slack: 7312
    assert len(data) < bound  # measured 7 101 bytes in all (0.57 bits/weight)
    assert (row["encoding"], row["clusters"], row["bits"]) == ("sparse+codebook", 32, 5)
    assert row["sparsity"] == pytest.approx(0.95)


def test_dense_4bit_clustered_tensor_takes_half_a_byte_per_weight():
    rng = np.random.default_rng(1)
    codes = np.linspace(-0.2, 0.2, 16).astype(np.float32)
    w = codes[rng.integers(0, 16, N)]  # every code equally likely: 4 bits of entropy each
    data, row = _one("w", w)
    assert (row["encoding"], row["bits"], row["clusters"]) == ("codebook", 4, 16)
    assert 0.45 * N < len(data) < 0.51 * N  # measured 50 218 bytes


def test_skewed_clusters_use_fewer_bits_than_packing():
    rng = np.random.default_rng(2)
    codes = np.linspace(-0.2, 0.2, 16).astype(np.float32)
    idx = np.clip(np.round(rng.normal(7.5, 1.5, N)), 0, 15).astype(np.int64)  # k-means-like usage
    data, row = _one("w", codes[idx])
    assert row["encoding"] == "codebook"
    assert len(data) < 0.40 * N  # below the 0.5 byte/weight of plain 4-bit packing; measured 0.34


def test_dense_float_uses_byte_planes_and_raw_fallback():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, N).astype(np.float32)
    data, row = _one("w", w)
    assert row["encoding"] == "raw-shuffled"
    assert len(data) < 0.90 * w.nbytes  # zstd on raw float32 alone saves ~7%; byte planes ~15%
    noise = rng.integers(0, 2**32, 1000, dtype=np.uint32)
    data, row = _one("noise", noise)
    empty = len(encode(identity_model([])))  # header, graph, checksum
    assert len(data) <= empty + noise.nbytes + 32  # incompressible data costs ~its size


def test_int8_sparse_and_dense_choices():
    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, N).astype(np.int8)
    q[rng.random(N) < 0.9] = 0
    data, row = _one("q", q)
    assert row["encoding"].startswith("sparse") and row["positions"] == "gaps"
    assert len(data) < 0.1 * N * (8 + 5.5) / 8 * 1.1  # measured 15 970 bytes
    half = rng.integers(-127, 128, N).astype(np.int8)
    half[rng.random(N) < 0.5] = 0
    _, row = _one("half", half)
    assert row["positions"] in ("bitmap", None)  # at 50% a bitmap (1 bit/elem) beats gaps


def test_lenet5_pruned_and_clustered_fits_in_about_2kb():
    dense = lenet5(np.random.default_rng(0))
    small = lenet5(np.random.default_rng(0), density=0.05, clusters=16)
    n_params = sum(int(np.prod(t.dims)) for t in small.graph.initializer)
    assert 21_000 < n_params < 22_000
    size_dense, size_small = len(encode(dense)), len(encode(small))
    assert size_dense < 0.9 * 4 * n_params  # measured 74 154 bytes (86 422 as .onnx)
    # measured 2 434 bytes: 1 065 nonzero weights -> 823 B positions + ~450 B 4-bit indices;
    # the 128 float biases stay dense (512 B of incompressible float32), graph + manifest 431 B
    assert size_small < 2_560
    # with biases pruned and clustered too, the whole model is under 2 KB
    model = lenet5(np.random.default_rng(0), density=0.05, clusters=16)
    for t in model.graph.initializer:
        if t.name.endswith(".b"):
            b = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(prune_and_cluster(b, np.random.default_rng(0),
                                                                 density=0.05, clusters=4), t.name))
    assert len(encode(model)) < 2_048  # measured 1 953 bytes


def test_breakdown_sums_to_file_size_and_attributes_every_byte():
    model = lenet5(np.random.default_rng(6), density=0.1, clusters=32)
    data = encode(model)
    info = breakdown(data)
    parts = info["parts"]
    assert list(parts) == ["header", "graph", "indices", "codebooks", "values", "checksum"]
    assert sum(parts.values()) == len(data) == info["file_bytes"]
    assert parts["header"] == HEADER_SIZE and parts["checksum"] == CHECKSUM_SIZE
    assert info["attribution"] == "proportional"
    rows = info["initializers"]
    assert [r["name"] for r in rows] == [t.name for t in model.graph.initializer]
    tensor_bytes = sum(r["bytes"] for r in rows)
    assert tensor_bytes == pytest.approx(parts["indices"] + parts["codebooks"] + parts["values"], abs=1)
    fc1 = next(r for r in rows if r["name"] == "fc1.w")
    assert fc1["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert fc1["encoding"] == "sparse+codebook" and 2 <= fc1["clusters"] <= 32 and fc1["bits"] <= 8
    assert fc1["dtype"] == "float32" and fc1["shape"] == [256, 64] and fc1["count"] == 256 * 64
