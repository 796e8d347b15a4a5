"""Small ONNX models and weight generators shared by the .lbz tests (not a test file)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def prune_and_cluster(w: np.ndarray, rng: np.random.Generator, *, density: float,
                      clusters: int | None) -> np.ndarray:
    """Keep the largest ``density`` fraction of ``w``; snap survivors to ``clusters`` shared values."""
    flat = w.ravel().copy()
    keep = max(1, int(round(density * flat.size)))
    order = np.argsort(-np.abs(flat), kind="stable")
    flat[order[keep:]] = 0.0
    if clusters:
        alive = flat != 0
        centroids = np.linspace(flat[alive].min(), flat[alive].max(), clusters).astype(np.float32)
        nearest = np.abs(flat[alive, None] - centroids[None, :]).argmin(axis=1)
        flat[alive] = centroids[nearest]
    return flat.reshape(w.shape).astype(np.float32)


def lenet5(rng: np.random.Generator, *, density: float = 1.0, clusters: int | None = None) -> onnx.ModelProto:
    """A ~21k-parameter LeNet-5 on 1x28x28 input; weights optionally pruned and clustered."""
    def weight(*shape: int) -> np.ndarray:
        w = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
        return prune_and_cluster(w, rng, density=density, clusters=clusters) if density < 1 or clusters else w

    def bias(n: int) -> np.ndarray:
        return (rng.standard_normal(n) * 0.01).astype(np.float32)

    params = {
        "conv1.w": weight(6, 1, 5, 5), "conv1.b": bias(6),      # (out_ch, in_ch, kh, kw)
        "conv2.w": weight(16, 6, 5, 5), "conv2.b": bias(16),
        "fc1.w": weight(256, 64), "fc1.b": bias(64),           # (in, out) for MatMul
        "fc2.w": weight(64, 32), "fc2.b": bias(32),
        "fc3.w": weight(32, 10), "fc3.b": bias(10),
        "flat_shape": np.array([-1, 256], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], pads=[0, 0, 0, 0]),  # (N,6,24,24)
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),  # (N,6,12,12)
        helper.make_node("Conv", ["p1", "conv2.w", "conv2.b"], ["c2"]),  # (N,16,8,8)
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),  # (N,16,4,4)
        helper.make_node("Reshape", ["p2", "flat_shape"], ["f"]),  # (N,256)
        helper.make_node("Gemm", ["f", "fc1.w", "fc1.b"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "fc2.w", "fc2.b"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "fc3.w", "fc3.b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "lenet5",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit-test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def identity_model(initializers: list[TensorProto]) -> onnx.ModelProto:
    """A one-node model that carries ``initializers`` (for round trips of odd tensors)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "carrier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def initializer_bits(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    """name -> (data type, dims, raw little-endian bytes of the values) for exact comparison."""
    out = {}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.STRING:
            out[t.name] = (t.data_type, tuple(t.dims), b"\0".join(t.string_data))
        else:
            out[t.name] = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
    return out
