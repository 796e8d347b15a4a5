"""Small ONNX graphs, one per operator family, built with onnx.helper for the operator
coverage tests: random weights of sensible scale (He / 1/sqrt(fan-in)), dynamic batch
(and sequence) dimensions so the models run at more than one size."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

node = helper.make_node


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto], *, contrib: bool = False,
           value_info: list[onnx.ValueInfoProto] = (),
           output_dims: list[int | str] | None = None) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)]
                                              if contrib else [])
    out = nodes[-1].output[0]
    output = helper.make_tensor_value_info(out, TensorProto.FLOAT, output_dims)
    graph = helper.make_graph(nodes, "g", inputs, [output], inits, value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model) if not contrib else model


def _f(name: str, value: np.ndarray | float | list[float]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _i(name: str, value: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def _x(name: str, dims: list[int | str], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def _linear(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    return rng.standard_normal((k, n)) / np.sqrt(k)  # (K, N)


def cnn(middle: list[onnx.NodeProto], extra: list[onnx.TensorProto] = (), *, first: int = 16,
        mid: int = 16, width: int = 12, seed: int = 0) -> onnx.ModelProto:
    """x [N, 8, W, W] -> Conv 3x3 (8 -> ``first``) -> Relu -> ``middle`` ('a' -> 'b', ``mid``
    channels out) -> Conv 3x3 (-> 8) -> y. Both Convs' reductions (>= 72) are past auto's
    tiny-Conv timing (<= 64), so decisions do not depend on the machine."""
    rng = np.random.default_rng(seed)
    inits = [_f("w1", rng.standard_normal((first, 8, 3, 3)) * np.sqrt(2 / 72)),
             _f("b1", 0.1 * rng.standard_normal(first)),
             _f("w2", rng.standard_normal((8, mid, 3, 3)) * np.sqrt(2 / (9 * mid))),
             _f("b2", 0.1 * rng.standard_normal(8)), *extra]
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             node("Relu", ["c1"], ["a"], name="relu1"), *middle,
             node("Conv", ["b", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    return _model(nodes, [_x("x", ["N", 8, width, width])], inits)


def conv_transpose() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    return cnn([node("ConvTranspose", ["a", "wt", "bt"], ["t"], strides=[2, 2],
                     kernel_shape=[2, 2], name="convT"),
                node("Relu", ["t"], ["b"], name="relu2")],
               [_f("wt", rng.standard_normal((16, 16, 2, 2)) * 0.2),
                _f("bt", 0.1 * rng.standard_normal(16))])


def instance_norm() -> onnx.ModelProto:
    return cnn([node("InstanceNormalization", ["a", "g", "be"], ["b"], name="inorm")],
               [_f("g", np.ones(16)), _f("be", np.zeros(16))])


def pad(mode: str) -> onnx.ModelProto:
    return cnn([node("Pad", ["a", "pads"], ["b"], mode=mode, name="pad")],
               [_i("pads", [0, 0, 1, 1, 0, 0, 1, 1])])


def data_movement(op: str) -> onnx.ModelProto:
    """Conv -> Relu -> ``op`` -> Conv, ``op`` moving 8-bit data only."""
    if op == "Slice":
        return cnn([node("Slice", ["a", "st", "en", "ax"], ["b"], name="op")],
                   [_i("st", [0]), _i("en", [8]), _i("ax", [1])], mid=8)
    if op == "Split":
        return cnn([node("Split", ["a", "sp"], ["s1", "s2"], axis=1, name="op"),
                    node("Concat", ["s2", "s1"], ["b"], axis=1, name="concat")], [_i("sp", [8, 8])])
    if op == "Resize":
        return cnn([node("Resize", ["a", "", "sc"], ["b"], mode="nearest", name="op")],
                   [_f("sc", [1, 1, 2, 2])])
    if op == "DepthToSpace":
        return cnn([node("DepthToSpace", ["a"], ["b"], blocksize=2, name="op")], first=32, mid=8)
    if op == "Tile":
        return cnn([node("Tile", ["a", "rep"], ["b"], name="op")], [_i("rep", [1, 1, 2, 1])])
    if op == "Gather":
        return cnn([node("Gather", ["a", "idx"], ["b"], axis=1, name="op")],
                   [_i("idx", [0, 2, 4, 6, 8, 10, 12, 14])], mid=8)
    raise ValueError(op)


def _mlp_head(rng: np.random.Generator) -> tuple[list, list]:
    """x [N, 16] -> MatMul + bias (-> 32): the nodes and initializers, output 'h0'."""
    return ([node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
             node("Add", ["m0", "b0"], ["h0"], name="fc0_bias")],
            [_f("w0", _linear(rng, 16, 32)), _f("b0", 0.1 * rng.standard_normal(32))])


def expand() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    nodes, inits = _mlp_head(rng)
    nodes += [node("Relu", ["h0"], ["a"], name="relu0"),
              node("Unsqueeze", ["a", "ax1"], ["u"], name="unsqueeze"),
              node("Expand", ["u", "shape"], ["e"], name="op"),
              node("MatMul", ["e", "w1"], ["y"], name="fc1")]
    inits += [_i("ax1", [1]), _i("shape", [1, 4, 1]), _f("w1", _linear(rng, 32, 8))]
    return _model(nodes, [_x("x", ["N", 16])], inits)


def clip_reshape(after_matmul: bool) -> onnx.ModelProto:
    """[MatMul + bias ->] Clip -> Reshape -> MatMul. After the MatMul: Clip(-1, 1) (a
    hardtanh); standalone on the input: Clip(0, 6)."""
    rng = np.random.default_rng(3)
    nodes, inits = _mlp_head(rng) if after_matmul else ([], [])
    lo, hi = (-1.0, 1.0) if after_matmul else (0.0, 6.0)
    nodes += [node("Clip", ["h0" if after_matmul else "x", "lo", "hi"], ["a"], name="clip"),
              node("Reshape", ["a", "shape"], ["r"], name="reshape"),
              node("MatMul", ["r", "w1"], ["y"], name="fc1")]
    inits += [_f("lo", lo), _f("hi", hi), _i("shape", [-1, 8, 4]), _f("w1", _linear(rng, 4, 8))]
    return _model(nodes, [_x("x", ["N", 32 if not after_matmul else 16])], inits)


def matmul_tile() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    return _model([node("MatMul", ["x", "w0"], ["m"], name="fc0"),
                   node("Tile", ["m", "rep"], ["y"], name="tile")],
                  [_x("x", ["N", 16])], [_f("w0", _linear(rng, 16, 32)), _i("rep", [1, 3])])


def add_of_inputs() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    return _model([node("Add", ["x1", "x2"], ["s"], name="add"),
                   node("MatMul", ["s", "w1"], ["y"], name="fc1")],
                  [_x("x1", ["N", 16]), _x("x2", ["N", 16])], [_f("w1", _linear(rng, 16, 8))])


def embedding() -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    return _model([node("Gather", ["table", "ids"], ["e"], name="embed"),
                   node("MatMul", ["e", "w1"], ["y"], name="fc1")],
                  [_x("ids", ["N", 8], TensorProto.INT64)],
                  [_f("table", rng.standard_normal((256, 32))), _f("w1", _linear(rng, 32, 8))])


def self_attention(hidden: int = 32, heads: int = 4) -> onnx.ModelProto:
    """A BERT self-attention block in plain ops: Q/K/V projections, Q.K^T, Softmax, P.V,
    output projection and the residual Add. x [N, S, hidden]."""
    rng = np.random.default_rng(7)
    d = hidden // heads
    inits = [_i("split_heads", [0, 0, heads, d]), _i("merge", [0, 0, hidden]),
             _f("scale", 1 / np.sqrt(d))]
    nodes = []
    for t in "qkvo":
        inits += [_f(f"w{t}", _linear(rng, hidden, hidden)), _f(f"b{t}", 0.1 * rng.standard_normal(hidden))]
    for t in "qkv":
        nodes += [node("MatMul", ["x", f"w{t}"], [f"{t}m"], name=f"{t}_proj"),
                  node("Add", [f"{t}m", f"b{t}"], [f"{t}b"], name=f"{t}_bias"),
                  node("Reshape", [f"{t}b", "split_heads"], [f"{t}r"], name=f"{t}_heads"),
                  node("Transpose", [f"{t}r"], [f"{t}t"], name=f"{t}_T",
                       perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3])]
    nodes += [node("MatMul", ["qt", "kt"], ["s"], name="qk"),
              node("Mul", ["s", "scale"], ["ss"], name="scale"),
              node("Softmax", ["ss"], ["p"], axis=-1, name="softmax"),
              node("MatMul", ["p", "vt"], ["o"], name="pv"),
              node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3], name="o_T"),
              node("Reshape", ["ot", "merge"], ["om"], name="merge"),
              node("MatMul", ["om", "wo"], ["y0"], name="o_proj"),
              node("Add", ["y0", "bo"], ["y1"], name="o_bias"),
              node("Add", ["y1", "x"], ["y"], name="residual")]
    return _model(nodes, [_x("x", ["N", "S", hidden])], inits)


def contrib_attention(*, skip: bool, hidden: int = 32, heads: int = 4,
                      value_info: bool = True) -> onnx.ModelProto:
    """[SkipLayerNormalization ->] com.microsoft Attention -> MatMul + bias. ``value_info``
    declares the contrib ops' outputs (onnx's shape inference does not know them)."""
    rng = np.random.default_rng(8)
    inits = [_f("qkv_w", _linear(rng, hidden, 3 * hidden)),
             _f("qkv_b", 0.1 * rng.standard_normal(3 * hidden)),
             _f("o_w", _linear(rng, hidden, hidden)), _f("o_b", 0.1 * rng.standard_normal(hidden))]
    inputs, nodes, x = [_x("x", ["N", "S", hidden])], [], "x"
    if skip:
        inputs.append(_x("skip", ["N", "S", hidden]))
        inits += [_f("g", 1 + 0.1 * rng.standard_normal(hidden)),
                  _f("beta", 0.1 * rng.standard_normal(hidden))]
        nodes.append(node("SkipLayerNormalization", ["x", "skip", "g", "beta"], ["ln"],
                          domain="com.microsoft", epsilon=1e-5, name="skip_ln"))
        x = "ln"
    nodes += [node("Attention", [x, "qkv_w", "qkv_b"], ["att"], domain="com.microsoft",
                   num_heads=heads, name="attn"),
              node("MatMul", ["att", "o_w"], ["mm"], name="proj"),
              node("Add", ["mm", "o_b"], ["y"], name="proj_bias")]
    dims: list[int | str] = ["N", "S", hidden]
    names = (["ln"] if skip else []) + ["att", "mm"] if value_info else []
    return _model(nodes, inputs, inits, contrib=True, output_dims=dims,  # onnx cannot infer it
                  value_info=[_x(t, dims) for t in names])


def inputs_for(model: onnx.ModelProto, rows: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for ``model``: N(0, 1) floats, token ids in [0, 256); dynamic dims
    'N' -> ``rows``, 'S' -> ``seq``."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        dims = [rows if d.dim_param == "N" else seq if d.dim_param == "S" else d.dim_value
                for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT64:
            out[value.name] = rng.integers(0, 256, dims).astype(np.int64)
        else:
            out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out
