"""Structured channel pruning on ONNX graphs: shapes, exactness against a masked original, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit import models
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.structured import ChannelPlan, apply_channel_pruning, plan_channel_pruning
from lowbit.backends.torch.export import export_module
from lowbit.errors import ValidationError

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- helpers


def _fm(model: onnx.ModelProto) -> FloatModel:
    return FloatModel.split(onnx.shape_inference.infer_shapes(model))


def _run(fm: FloatModel, x: np.ndarray) -> list[np.ndarray]:
    sess = make_session(fm)
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _check(fm: FloatModel) -> None:
    onnx.checker.check_model(fm.joined(), full_check=True)


def _weight(fm: FloatModel, name: str) -> np.ndarray:
    arr = fm.constant(name)
    assert arr is not None, name
    return arr


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inits, in_shape, out_shape, inp="x", out="y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(name, x, y, w, b=None, **attrs):
    inputs = [x, f"{name}.w"] + ([f"{name}.b"] if b is not None else [])
    inits = [_init(f"{name}.w", w)] + ([_init(f"{name}.b", b)] if b is not None else [])
    return helper.make_node("Conv", inputs, [y], name=name, **attrs), inits


def _masked(fm: FloatModel, plan: ChannelPlan, rows: dict[str, list[tuple[str, int]]]) -> FloatModel:
    """Copy of ``fm`` with every removed channel zeroed in the tensors ``rows`` lists
    per producer as (initializer, channel axis)."""
    weights = dict(fm.weights)
    proto = onnx.ModelProto()
    proto.CopyFrom(fm.proto)
    out = FloatModel(proto, weights)
    for layer, kept in plan.keep.items():
        for name, axis in rows[layer]:
            arr = _weight(fm, name).copy()
            drop = np.setdiff1d(np.arange(arr.shape[axis]), kept)
            index = [slice(None)] * arr.ndim
            index[axis] = drop
            arr[tuple(index)] = 0.0
            for t in proto.graph.initializer:
                if t.name == name:
                    if name in weights:
                        t.CopyFrom(out.set_weight(name, arr))
                    else:
                        t.CopyFrom(_init(name, arr))
    return out


@pytest.fixture(scope="module")
def mlp_fm() -> FloatModel:
    torch.manual_seed(0)
    return _fm(export_module(models.mlp((32, 64, 48, 10)), _rand(2, 32)))


@pytest.fixture(scope="module")
def vgg_fm() -> FloatModel:
    torch.manual_seed(0)
    module = models.vgg_style_cnn(widths=(8, 16, 32))
    return _fm(export_module(module, _rand(2, 3, 32, 32)))


def _gemm_weights(fm: FloatModel) -> list[np.ndarray]:
    return [_weight(fm, n.input[1]) for n in fm.proto.graph.node if n.op_type == "Gemm"]


def _conv_weights(fm: FloatModel) -> list[np.ndarray]:
    return [_weight(fm, n.input[1]) for n in fm.proto.graph.node if n.op_type == "Conv"]


# ---------------------------------------------------------------- torch-exported models


@pytest.mark.parametrize("which", ["mlp", "vgg"])
def test_ratio_zero_leaves_outputs_unchanged(which, mlp_fm, vgg_fm):
    fm = mlp_fm if which == "mlp" else vgg_fm
    x = _rand(4, 32) if which == "mlp" else _rand(4, 3, 32, 32)
    plan = plan_channel_pruning(fm, ratio=0.0)
    assert plan.keep
    pruned = apply_channel_pruning(fm, plan)
    _check(pruned)
    np.testing.assert_array_equal(_run(pruned, x)[0], _run(fm, x)[0])


def test_mlp_half_shrinks_gemms(mlp_fm):
    before = [w.shape for w in _gemm_weights(mlp_fm)]
    plan = plan_channel_pruning(mlp_fm, ratio=0.5)
    assert len(plan.keep) == 2 and [len(v) for v in plan.keep.values()] == [32, 24]
    (last,) = plan.skipped.values()
    assert "graph output" in last
    pruned = apply_channel_pruning(mlp_fm, plan)
    _check(pruned)
    assert [w.shape for w in _gemm_weights(pruned)] == [(32, 32), (24, 32), (10, 24)]
    assert [w.shape for w in _gemm_weights(mlp_fm)] == before  # input untouched
    assert _run(pruned, _rand(3, 32))[0].shape == (3, 10)


def test_vgg_half_shrinks_convs_and_flatten_gemm(vgg_fm):
    plan = plan_channel_pruning(vgg_fm, ratio=0.5)
    assert len(plan.keep) == 7  # six convs and the first Gemm
    pruned = apply_channel_pruning(vgg_fm, plan)
    _check(pruned)
    convs = [w.shape for w in _conv_weights(pruned)]
    assert convs == [(4, 3, 3, 3), (4, 4, 3, 3), (8, 4, 3, 3), (8, 8, 3, 3),
                     (16, 8, 3, 3), (16, 16, 3, 3)]
    # Flatten after the last stage: 16 kept channels x 4x4 features each
    assert [w.shape for w in _gemm_weights(pruned)] == [(128, 256), (10, 128)]
    assert _run(pruned, _rand(5, 3, 32, 32))[0].shape == (5, 10)


# ---------------------------------------------------------------- exactness


def _bn_cnn() -> onnx.ModelProto:
    """Conv->BN->Relu->MaxPool->Conv->Relu->Flatten->Gemm->Relu->Gemm on (N, 3, 8, 8)."""
    c1, i1 = _conv("c1", "x", "c1o", _rand(8, 3, 3, 3), _rand(8), pads=[1, 1, 1, 1])
    bn = helper.make_node("BatchNormalization", ["c1o", "bn.s", "bn.b", "bn.m", "bn.v"], ["bno"],
                          name="bn")
    bn_inits = [_init("bn.s", _rand(8)), _init("bn.b", _rand(8)), _init("bn.m", _rand(8)),
                _init("bn.v", RNG.uniform(0.5, 2.0, 8))]
    c2, i2 = _conv("c2", "p1", "c2o", _rand(12, 8, 3, 3), _rand(12), pads=[1, 1, 1, 1])
    nodes = [
        c1, bn, helper.make_node("Relu", ["bno"], ["r1"], name="r1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="p1", kernel_shape=[2, 2], strides=[2, 2]),
        c2, helper.make_node("Relu", ["c2o"], ["r2"], name="r2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g1.w", "g1.b"], ["g1o"], name="g1", transB=1),
        helper.make_node("Relu", ["g1o"], ["r3"], name="r3"),
        helper.make_node("Gemm", ["r3", "g2.w", "g2.b"], ["y"], name="g2"),  # transB=0: (K, N)
    ]
    inits = i1 + bn_inits + i2 + [_init("g1.w", _rand(20, 12 * 4 * 4) * 0.1), _init("g1.b", _rand(20)),
                                  _init("g2.w", _rand(20, 5)), _init("g2.b", _rand(5))]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 5])


def test_pruned_equals_masked_original_through_bn_and_flatten():
    fm = _fm(_bn_cnn())
    plan = plan_channel_pruning(fm, ratio=0.5)
    assert set(plan.keep) == {"c1", "c2", "g1"} and "graph output" in plan.skipped["g2"]
    pruned = apply_channel_pruning(fm, plan)
    _check(pruned)
    assert _weight(pruned, "bn.v").shape == (4,)
    assert _weight(pruned, "c2.w").shape == (6, 4, 3, 3)
    assert _weight(pruned, "g1.w").shape == (10, 6 * 16)
    assert _weight(pruned, "g2.w").shape == (10, 5)
    # Removing a channel also removes the BN shift it carried, so the masked
    # reference zeroes gamma and beta too (then BN outputs exactly 0 there).
    masked = _masked(fm, plan, {
        "c1": [("c1.w", 0), ("c1.b", 0), ("bn.s", 0), ("bn.b", 0)],
        "c2": [("c2.w", 0), ("c2.b", 0)],
        "g1": [("g1.w", 0), ("g1.b", 0)],
    })
    x = _rand(6, 3, 8, 8)
    want = _run(masked, x)[0]
    np.testing.assert_allclose(_run(pruned, x)[0], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_run(fm, x)[0], want, atol=1e-3)  # the mask did remove something


def test_matmul_with_constant_bias_is_pruned_exactly():
    """MatMul+Add(bias) on (N, S, K) input, as torch exports Linear on 3-D tensors."""
    nodes = [
        helper.make_node("MatMul", ["x", "m1.w"], ["m1o"], name="m1"),
        helper.make_node("Add", ["m1o", "m1.b"], ["a1"], name="m1_bias"),
        helper.make_node("Tanh", ["a1"], ["t1"], name="t1"),
        helper.make_node("MatMul", ["t1", "m2.w"], ["y"], name="m2"),
    ]
    inits = [_init("m1.w", _rand(6, 10)), _init("m1.b", _rand(10)), _init("m2.w", _rand(10, 3))]
    fm = _fm(_model(nodes, inits, ["N", 4, 6], ["N", 4, 3]))
    plan = plan_channel_pruning(fm, ratio=0.3, importance="l2")
    assert list(plan.keep) == ["m1"] and len(plan.keep["m1"]) == 7
    pruned = apply_channel_pruning(fm, plan)
    _check(pruned)
    assert _weight(pruned, "m1.w").shape == (6, 7) and _weight(pruned, "m2.w").shape == (7, 3)
    # Tanh(0) = 0, so zeroing weight columns and bias entries is the reference.
    masked = _masked(fm, plan, {"m1": [("m1.w", 1), ("m1.b", 0)]})
    x = _rand(2, 4, 6)
    np.testing.assert_allclose(_run(pruned, x)[0], _run(masked, x)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- refusals


def test_residual_add_keeps_its_branches_unpruned():
    c0, i0 = _conv("c0", "x", "c0o", _rand(4, 4, 3, 3), _rand(4), pads=[1, 1, 1, 1])
    c1, i1 = _conv("c1", "r0", "c1o", _rand(8, 4, 3, 3), _rand(8), pads=[1, 1, 1, 1])
    c2, i2 = _conv("c2", "r1", "c2o", _rand(4, 8, 3, 3), _rand(4), pads=[1, 1, 1, 1])
    head, ih = _conv("head", "r2", "y", _rand(2, 4, 1, 1))
    nodes = [c0, helper.make_node("Relu", ["c0o"], ["r0"], name="r0"),
             c1, helper.make_node("Relu", ["c1o"], ["r1"], name="r1"), c2,
             helper.make_node("Add", ["c2o", "r0"], ["s"], name="/layer1/Add"),
             helper.make_node("Relu", ["s"], ["r2"], name="r2"), head]
    fm = _fm(_model(nodes, i0 + i1 + i2 + ih, [1, 4, 6, 6], [1, 2, 6, 6]))
    plan = plan_channel_pruning(fm, ratio=0.5)
    assert list(plan.keep) == ["c1"]
    for name in ("c0", "c2"):
        assert "Add /layer1/Add (residual)" in plan.skipped[name]
    assert "graph output" in plan.skipped["head"]
    pruned = apply_channel_pruning(fm, plan)
    _check(pruned)
    masked = _masked(fm, plan, {"c1": [("c1.w", 0), ("c1.b", 0)]})
    x = _rand(1, 4, 6, 6)
    np.testing.assert_allclose(_run(pruned, x)[0], _run(masked, x)[0], rtol=1e-5, atol=1e-5)


def test_concat_is_refused():
    a, ia = _conv("a", "x", "ao", _rand(4, 3, 1, 1))
    b, ib = _conv("b", "x", "bo", _rand(4, 3, 1, 1))
    c, ic = _conv("c", "cat", "y", _rand(2, 8, 1, 1))
    cat = helper.make_node("Concat", ["ao", "bo"], ["cat"], name="cat", axis=1)
    fm = _fm(_model([a, b, cat, c], ia + ib + ic, [1, 3, 4, 4], [1, 2, 4, 4]))
    plan = plan_channel_pruning(fm, ratio=0.5)
    assert not plan.keep
    assert "Concat cat" in plan.skipped["a"] and "Concat cat" in plan.skipped["b"]


def test_grouped_conv_is_refused():
    a, ia = _conv("a", "x", "ao", _rand(8, 3, 1, 1))
    g, ig = _conv("g", "ao", "go", _rand(8, 4, 3, 3), group=2, pads=[1, 1, 1, 1])
    c, ic = _conv("c", "go", "y", _rand(2, 8, 1, 1))
    fm = _fm(_model([a, g, c], ia + ig + ic, [1, 3, 4, 4], [1, 2, 4, 4]))
    plan = plan_channel_pruning(fm, ratio=0.5)
    assert "grouped Conv g (group=2)" in plan.skipped["a"]
    assert "grouped Conv (group=2)" in plan.skipped["g"]
    assert not plan.keep


def test_flatten_with_unknown_spatial_size_is_refused():
    a, ia = _conv("a", "x", "ao", _rand(4, 3, 1, 1))
    nodes = [a, helper.make_node("Flatten", ["ao"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="mm")]
    fm = _fm(_model(nodes, ia + [_init("w", _rand(64, 2))], [1, 3, "H", "W"], [1, 2]))
    plan = plan_channel_pruning(fm, ratio=0.5)
    assert "Flatten flat" in plan.skipped["a"] and "H*W" in plan.skipped["a"]


# ---------------------------------------------------------------- importance and options


def _importance_model(with_bn: bool = True) -> FloatModel:
    w = np.zeros((4, 4, 1, 1), np.float32)  # (out, in, 1, 1)
    w[0, :, 0, 0] = [1, 1, 1, 1]  # l1 4.0, l2 2.0
    w[1, :, 0, 0] = [2.5, 0, 0, 0]  # l1 2.5, l2 2.5
    w[2, :, 0, 0] = [1.6, 1.6, 0, 0]  # l1 3.2, l2 2.26
    w[3, :, 0, 0] = [0.1, 0.1, 0.1, 0.1]  # l1 0.4, l2 0.2
    a, ia = _conv("a", "x", "ao", w)
    b, ib = _conv("b", "bno" if with_bn else "ao", "y", _rand(2, 4, 1, 1))
    nodes, inits = [a], ia + ib
    if with_bn:
        nodes.append(helper.make_node("BatchNormalization", ["ao", "s", "bb", "m", "v"], ["bno"],
                                      name="bn"))
        inits += [_init("s", [0.1, -0.2, 0.05, 5.0]), _init("bb", np.zeros(4)),
                  _init("m", np.zeros(4)), _init("v", np.ones(4))]
    return _fm(_model(nodes + [b], inits, [1, 4, 2, 2], [1, 2, 2, 2]))


@pytest.mark.parametrize("importance, expected", [("l1", [0, 2]), ("l2", [1, 2]), ("bn", [1, 3])])
def test_importance_picks_expected_channels(importance, expected):
    plan = plan_channel_pruning(_importance_model(), ratio=0.5, importance=importance)
    assert plan.keep["a"].tolist() == expected


@pytest.mark.parametrize("importance, expected", [("l1", [0, 2]), ("l2", [1, 2])])
def test_gemm_importance_respects_trans_b(importance, expected):
    w = np.array([[1, 2.5, 1.6, 0.1], [1, 0, 1.6, 0.1], [1, 0, 0, 0.1], [1, 0, 0, 0.1]],
                 np.float32)  # (K, N): channels are columns, as in _importance_model
    for trans_b, weight in ((0, w), (1, w.T)):
        nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="g", transB=trans_b),
                 helper.make_node("Relu", ["h"], ["r"], name="r"),
                 helper.make_node("Gemm", ["r", "w2"], ["y"], name="out")]
        fm = _fm(_model(nodes, [_init("w", weight), _init("w2", _rand(4, 3))], ["N", 4], ["N", 3]))
        plan = plan_channel_pruning(fm, ratio=0.5, importance=importance)
        assert plan.keep["g"].tolist() == expected
        pruned = apply_channel_pruning(fm, plan)
        _check(pruned)
        assert _weight(pruned, "w").shape == ((4, 2) if trans_b == 0 else (2, 4))
        assert _weight(pruned, "w2").shape == (2, 3)


def test_bn_importance_without_bn_is_skipped_with_reason():
    plan = plan_channel_pruning(_importance_model(with_bn=False), ratio=0.5, importance="bn")
    assert "a" not in plan.keep and "BatchNormalization" in plan.skipped["a"]


def test_min_channels_and_layers():
    fm = _importance_model()
    plan = plan_channel_pruning(fm, ratio=0.9, min_channels=3, layers={"a"})
    assert len(plan.keep["a"]) == 3 and set(plan.skipped) == set()
    assert len(plan_channel_pruning(fm, ratio=0.9).keep["a"]) == 1
    assert ChannelPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


@pytest.mark.parametrize("kwargs, option", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": "half"}, "ratio"),
    ({"ratio": 0.5, "importance": "l3"}, "importance"),
    ({"ratio": 0.5, "min_channels": 0}, "min_channels"),
    ({"ratio": 0.5, "layers": {"nope"}}, "layers"),
])
def test_invalid_options_raise(kwargs, option):
    with pytest.raises(ValidationError, match=option):
        plan_channel_pruning(_importance_model(), **kwargs)


def test_apply_rejects_plan_for_unprunable_layer():
    fm = _importance_model()
    bad = ChannelPlan(keep={"b": np.array([0])}, skipped={})
    with pytest.raises(ValidationError, match="graph output"):
        apply_channel_pruning(fm, bad)


def test_conv_channels_are_kept_in_multiples_of_the_fast_block():
    """ONNX Runtime's fast float Conv layout wants channel counts in multiples of 8 (16
    with AVX-512): 13 of 32 channels ran 1.16x where 16 ran 1.73x (docs/NOTES.md)."""
    from lowbit.backends.onnx.structured import kept_channels

    assert kept_channels(32, 0.6, 1, 8) == 16  # 12.8 -> 13 -> 16
    assert kept_channels(32, 0.75, 1, 8) == 8
    assert kept_channels(32, 0.9, 1, 8) == 8  # at least one block
    assert kept_channels(64, 0.6, 1, 16) == 32  # 25.6 -> 26 -> 32
    assert kept_channels(12, 0.5, 1, 8) == 6  # not a multiple of two blocks: exact ratio
    assert kept_channels(32, 0.6, 1, 1) == 13
    assert kept_channels(32, 0.0, 1, 8) == 32


def test_channels_last_flatten_is_pruned_exactly():
    """A Keras-style graph: NHWC input, Transpose to NCHW, Conv, Relu, MaxPool, Transpose
    back to NHWC, Flatten, Gemm: each channel owns every C-th Gemm input feature."""
    conv, inits = _conv("c1", "t", "c", _rand(6, 2, 3, 3), _rand(6))
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]), conv,
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["nhwc"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g.w", "g.b"], ["y"], transB=1)]
    inits += [_init("g.w", _rand(5, 3 * 3 * 6)), _init("g.b", _rand(5))]
    fm = _fm(_model(nodes, inits, ["N", 8, 8, 2], ["N", 5]))
    plan = ChannelPlan(keep={"c1": np.asarray([0, 2, 5])}, skipped={})
    pruned = apply_channel_pruning(fm, plan)
    _check(pruned)
    assert _weight(pruned, "g.w").shape == (5, 3 * 3 * 3)
    masked = _masked(fm, plan, {"c1": [("c1.w", 0), ("c1.b", 0)]})
    x = _rand(4, 8, 8, 2)
    np.testing.assert_allclose(_run(pruned, x)[0], _run(masked, x)[0], rtol=1e-5, atol=1e-5)
