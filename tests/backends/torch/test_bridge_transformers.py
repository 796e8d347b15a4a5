"""The ONNX-to-PyTorch bridge on transformer graphs: tiny GPT and a BERT-style encoder
exported by lowbit match ONNX Runtime at several batch/sequence sizes (with padding),
train (embeddings, LayerNorm and MatMul weights are parameters), and each operator
follows ONNX semantics (opset variants included)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit import models
from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weight_initializers
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.finetune import FinetuneSpec, finetune, with_weights
from lowbit.backends.torch.from_onnx import (
    SUPPORTED,
    build_torch_module,
    check_trainable,
    trainable_initializers,
)
from lowbit.data import Dataset
from lowbit.errors import UnsupportedOpError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, D_MODEL, HEADS, LAYERS, MAX_LEN = 64, 32, 2, 2, 16
SIZES = [(3, 5), (2, 16)]  # (batch, sequence): both differ from the export sample's (2, 8)
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def _randomise_layer_norms(module: torch.nn.Module) -> None:
    """Fresh LayerNorms are all ones/zeros, which the exporter de-duplicates into one
    shared initializer; random values keep them apart and make them matter."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _gpt(opset: int = 17) -> FloatModel:
    torch.manual_seed(0)
    module = models.tiny_gpt(vocab=VOCAB, d_model=D_MODEL, heads=HEADS, layers=LAYERS,
                             max_len=MAX_LEN)
    _randomise_layer_norms(module)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 8)).astype(np.int64)
    fm, _ = load_model(export_module(module, ids, dynamic_dims=(0, 1), input_names=["input_ids"],
                                     opset=opset))
    return fm


def _padding_mask(batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 (batch, seq): row 0 unpadded, the others padded after a random length >= 1."""
    lengths = rng.integers(1, seq + 1, batch)
    lengths[0] = seq
    if batch > 1:
        lengths[1] = max(1, seq // 2)  # at least one row really padded
    return (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)


def _bert(pre_norm: bool, pool: str, opset: int = 17) -> FloatModel:
    torch.manual_seed(0)
    module = models.tiny_bert_encoder(vocab=VOCAB, d_model=D_MODEL, heads=HEADS, layers=LAYERS,
                                      max_len=MAX_LEN, num_classes=3, pre_norm=pre_norm, pool=pool)
    _randomise_layer_norms(module)
    rng = np.random.default_rng(0)
    sample = (rng.integers(0, VOCAB, (2, 8)).astype(np.int64), _padding_mask(2, 8, rng))
    fm, _ = load_model(export_module(module, sample, dynamic_dims=(0, 1),
                                     input_names=["input_ids", "attention_mask"], opset=opset))
    return fm


def _compare(fm: FloatModel, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sess = make_session(fm)
    expected = sess.run(None, feed)[0]
    module = build_torch_module(fm).eval()
    with torch.no_grad():
        got = module(*[torch.from_numpy(v) for v in feed.values()])[0].numpy()
    return got, expected


def _assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(got - expected).max()) <= 1e-4 * scale


# ---------------------------------------------------------------- parity with ONNX Runtime


@pytest.fixture(scope="module")
def gpt() -> FloatModel:
    return _gpt()


@pytest.mark.parametrize("opset", [14, 17])  # 14: LayerNorm as ReduceMean/Pow/Sqrt/Div
def test_tiny_gpt_matches_onnx_runtime_at_two_sizes(opset):
    fm = _gpt(opset)
    check_trainable(fm)
    for batch, seq in SIZES:
        ids = np.random.default_rng(batch).integers(0, VOCAB, (batch, seq)).astype(np.int64)
        got, expected = _compare(fm, {"input_ids": ids})
        assert got.shape == (batch, seq, VOCAB)
        _assert_close(got, expected)


BERTS = {"post-norm, first token": (False, "first", 17), "pre-norm, mean": (True, "mean", 17),
         "post-norm, mean, opset 14": (False, "mean", 14),
         "pre-norm, first, opset 18": (True, "first", 18)}


@pytest.mark.parametrize("case", sorted(BERTS))
def test_bert_encoder_matches_onnx_runtime_with_padding(case):
    fm = _bert(*BERTS[case])
    ops = {n.op_type for n in fm.proto.graph.node}
    assert {"Expand", "Where", "Erf", "Softmax", "Gather", "Shape"} <= ops
    rng = np.random.default_rng(3)
    for batch, seq in SIZES:
        feed = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
                "attention_mask": _padding_mask(batch, seq, rng)}
        assert (feed["attention_mask"] == 0).any()
        got, expected = _compare(fm, feed)
        assert got.shape == (batch, 3)
        _assert_close(got, expected)


@pytest.mark.parametrize("pool", ["first", "mean"])
def test_bert_encoder_ignores_padded_tokens(pool):
    """What sits under a zero of the attention mask cannot change the bridge's output; the
    mask itself does."""
    fm = _bert(False, pool)
    module = build_torch_module(fm).eval()
    rng = np.random.default_rng(5)
    ids = rng.integers(0, VOCAB, (4, 10)).astype(np.int64)
    mask = _padding_mask(4, 10, rng)
    other = np.where(mask == 1, ids, (ids + 7) % VOCAB)
    with torch.no_grad():
        a = module(torch.from_numpy(ids), torch.from_numpy(mask))[0]
        b = module(torch.from_numpy(other), torch.from_numpy(mask))[0]
        c = module(torch.from_numpy(ids), torch.ones(4, 10, dtype=torch.int64))[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert float((a[1:] - c[1:]).abs().max()) > 1e-4


# ---------------------------------------------------------------- parameters and training


def test_embeddings_layer_norms_and_biases_are_parameters(gpt):
    names = trainable_initializers(gpt)
    assert set(weight_initializers(gpt)) <= set(names)
    assert {"tok.weight", "pos.weight", "blocks.0.ln1.weight", "blocks.0.ln1.bias",
            "ln_f.weight", "blocks.1.qkv.bias", "blocks.0.down.bias"} <= set(names)
    module = build_torch_module(gpt)
    values = module.parameter_values()
    assert set(values) == set(names)
    for name in names:
        assert values[name].dtype == np.float32 and values[name].ndim >= 1, name
    # the shape arithmetic and the scalar constants (attention scale, GELU's 0.5, -inf)
    # stay constants
    floats = {t.name for t in gpt.proto.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert all(gpt.constant(n).ndim == 0 for n in floats - set(names))


def test_adam_steps_lower_next_token_loss_and_write_back(gpt):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (16, 12), generator=gen)
    module = build_torch_module(gpt)
    before = module.parameter_values()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    module.train()
    for _ in range(15):
        opt.zero_grad()
        logits = module(ids[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = module.parameter_values()
    for name in ["tok.weight", "pos.weight", "blocks.0.ln1.weight", *weight_initializers(gpt)]:
        assert after[name].shape == before[name].shape
        assert not np.array_equal(after[name], before[name]), name
    # only the rows of the positions used (0..10 of 16) had gradients
    np.testing.assert_array_equal(after["pos.weight"][11:], before["pos.weight"][11:])
    # written back into the same graph, ONNX Runtime computes what the bridge does
    tuned = with_weights(gpt, after)
    x = ids[:3, :7].numpy()
    got, expected = _compare(tuned, {"input_ids": x})
    _assert_close(got, expected)
    module.eval()
    with torch.no_grad():
        _assert_close(module(torch.from_numpy(x))[0].numpy(), expected)


def _ort_cross_entropy(fm: FloatModel, data: Dataset) -> float:
    sess = make_session(fm)
    logits = torch.from_numpy(sess.run(None, data.inputs)[0])
    labels = torch.from_numpy(data.labels)
    return float(torch.nn.functional.cross_entropy(logits.movedim(-1, 1) if logits.ndim > 2
                                                   else logits, labels))


def test_finetune_trains_gpt_on_next_tokens_and_bert_on_classes(gpt):
    """Through ``finetune``: int64 token inputs, a padding mask, per-token labels (the GPT)
    and per-sequence labels (the encoder); ONNX Runtime's loss on the written-back
    weights falls."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (48, 11)).astype(np.int64)
    tokens = Dataset({"input_ids": ids[:, :-1]}, ids[:, 1:], source="tokens")
    bert = _bert(False, "first")
    x = rng.integers(0, VOCAB, (48, 10)).astype(np.int64)
    classes = Dataset({"input_ids": x, "attention_mask": _padding_mask(48, 10, rng)},
                      (x[:, 0] % 3).astype(np.int64), source="classes")
    for fm, data in ((gpt, tokens), (bert, classes)):
        values = finetune(fm, data, FinetuneSpec(epochs=3, lr=1e-2, batch_size=16))
        before = _ort_cross_entropy(fm, data)
        after = _ort_cross_entropy(with_weights(fm, values), data)
        assert after < 0.9 * before, (before, after)


def test_unsupported_ops_are_still_named():
    assert "Einsum" not in SUPPORTED
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    fm = FloatModel.split(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(UnsupportedOpError, match="Einsum"):
        check_trainable(fm)
    with pytest.raises(UnsupportedOpError, match="Einsum"):
        build_torch_module(fm)


# ---------------------------------------------------------------- one operator at a time

F32 = np.float32


def _f(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


# name: (op, [first input fed; the rest initializers (None: absent)], attributes, opset, outputs)
OP_CASES = {
    "Slice negative steps, INT64 ends": ("Slice", [_f(5, 6), _i64(-1, 1), _i64(INT64_MIN, INT64_MAX),
                                                   _i64(0, -1), _i64(-2, 2)], {}, 13, 1),
    "Slice clamped reverse": ("Slice", [_f(3, 6), _i64(10), _i64(-10), _i64(1), _i64(-1)], {}, 13, 1),
    "Slice default axes": ("Slice", [_f(4, 6), _i64(1, -4), _i64(3, 100)], {}, 13, 1),
    "Slice empty": ("Slice", [_f(4, 6), _i64(3), _i64(1), _i64(0)], {}, 13, 1),
    "Split attribute (opset 11)": ("Split", [_f(2, 6)], {"axis": 1, "split": [2, 4]}, 11, 2),
    "Split input": ("Split", [_f(2, 6), _i64(1, 2, 3)], {"axis": -1}, 13, 3),
    "Split equal": ("Split", [_f(6, 2)], {}, 13, 3),
    "Split num_outputs uneven (opset 18)": ("Split", [_f(7, 2)], {"num_outputs": 3}, 18, 3),
    "ReduceMean axes attribute": ("ReduceMean", [_f(2, 3, 4)], {"axes": [-1]}, 13, 1),
    "ReduceMean axes input (opset 18)": ("ReduceMean", [_f(2, 3, 4), _i64(0, 2)],
                                         {"keepdims": 0}, 18, 1),
    "ReduceMean all (opset 18)": ("ReduceMean", [_f(2, 3, 4)], {}, 18, 1),
    "ReduceMax noop (opset 18)": ("ReduceMax", [_f(2, 3)], {"noop_with_empty_axes": 1}, 18, 1),
    "ReduceSum int64": ("ReduceSum", [_i64(1, 2, 3, 4).reshape(2, 2), _i64(1)], {"keepdims": 0},
                        13, 1),
    "ReduceSum all": ("ReduceSum", [_f(2, 3)], {"keepdims": 0}, 13, 1),
    "Squeeze attribute (opset 11)": ("Squeeze", [_f(2, 1, 3, 1)], {"axes": [1]}, 11, 1),
    "Squeeze input": ("Squeeze", [_f(2, 1, 3, 1), _i64(-1, 1)], {}, 13, 1),
    "Squeeze all": ("Squeeze", [_f(1, 2, 1)], {}, 13, 1),
    "Unsqueeze negative": ("Unsqueeze", [_f(2, 3), _i64(-1, 0)], {}, 13, 1),
    "Unsqueeze attribute (opset 11)": ("Unsqueeze", [_f(2, 3)], {"axes": [1]}, 11, 1),
    "Cast float->int32 truncates": ("Cast", [np.array([-2.7, -0.5, 0.5, 2.7], F32)],
                                    {"to": TensorProto.INT32}, 13, 1),
    "Cast float->bool": ("Cast", [np.array([0.0, -0.5, 2.0], F32)], {"to": TensorProto.BOOL}, 13, 1),
    "Cast int64->float": ("Cast", [_i64(-3, 5)], {"to": TensorProto.FLOAT}, 13, 1),
    "Cast bool->int64": ("Cast", [np.array([True, False])], {"to": TensorProto.INT64}, 13, 1),
    "Div int64 truncates": ("Div", [_i64(-7, 7, -8, 9), _i64(2, -2, 3, 4)], {}, 13, 1),
    "Mod int64": ("Mod", [_i64(-7, 7, -8, 9), _i64(3, -3, 3, 4)], {}, 13, 1),
    "Mod fmod": ("Mod", [np.array([-7.5, 7.5], F32), np.array([2.0, -2.0], F32)], {"fmod": 1}, 13, 1),
    "Gather negative indices": ("Gather", [_f(3, 5), _i64(-1, 0, 2, -5).reshape(2, 2)],
                                {"axis": 1}, 13, 1),
    "Gather scalar index": ("Gather", [_i64(4, 8, 32), np.array(-1, np.int64)], {"axis": 0}, 13, 1),
    "GatherElements": ("GatherElements", [_f(3, 4), _i64(0, -1, 2, 1, 3, 0).reshape(3, 2)],
                       {"axis": 1}, 13, 1),
    "Expand bidirectional": ("Expand", [_f(3, 1), _i64(2, 1, 4)], {}, 13, 1),
    "Expand to ones": ("Expand", [_f(2, 3), _i64(1, 1)], {}, 13, 1),
    "Range int64 negative delta": ("Range", [np.array(10, np.int64), np.array(2, np.int64),
                                             np.array(-3, np.int64)], {}, 13, 1),
    "Range float": ("Range", [np.array(0.5, F32), np.array(3.0, F32), np.array(0.75, F32)], {}, 13, 1),
    "Range empty": ("Range", [np.array(0, np.int64), np.array(5, np.int64),
                              np.array(-1, np.int64)], {}, 13, 1),
    "Trilu upper k=-1": ("Trilu", [_f(2, 4, 5), np.array(-1, np.int64)], {"upper": 1}, 14, 1),
    "Trilu lower int64": ("Trilu", [np.arange(12, dtype=np.int64).reshape(3, 4),
                                    np.array(1, np.int64)], {"upper": 0}, 14, 1),
    "Softmax 2-D coercion (opset 11)": ("Softmax", [_f(2, 3, 4)], {"axis": 1}, 11, 1),
    "Softmax axis (opset 13)": ("Softmax", [_f(2, 3, 4)], {"axis": 1}, 13, 1),
    "LogSoftmax": ("LogSoftmax", [_f(2, 5)], {}, 13, 1),
    "LayerNormalization 2 axes, 3 outputs": ("LayerNormalization", [_f(2, 3, 4), _f(3, 4, seed=1),
                                                                    _f(3, 4, seed=2)],
                                             {"axis": -2, "epsilon": 1e-3}, 17, 3),
    "LayerNormalization no bias": ("LayerNormalization", [_f(2, 5), _f(5, seed=1)], {}, 17, 1),
    "Where broadcast": ("Where", [np.array([[True], [False]]), _f(2, 3), np.array(-1e9, F32)],
                        {}, 13, 1),
    "Equal int64": ("Equal", [_i64(1, 2, 3), _i64(3, 2, 1)], {}, 13, 1),
    "Less float": ("Less", [_f(2, 3), np.array(0.0, F32)], {}, 13, 1),
    "Not": ("Not", [np.array([True, False])], {}, 13, 1),
    "ConstantOfShape int64": ("ConstantOfShape", [_i64(2, 3)],
                              {"value": numpy_helper.from_array(_i64(7))}, 13, 1),
    "ConstantOfShape default": ("ConstantOfShape", [_i64(3)], {}, 13, 1),
    "Shape start/end (opset 15)": ("Shape", [_f(2, 3, 4, 5)], {"start": 1, "end": -1}, 15, 1),
    "Size": ("Size", [_f(2, 3)], {}, 13, 1),
    "Pow int exponent": ("Pow", [_f(2, 3), np.array(2, np.int64)], {}, 15, 1),
    "Sqrt": ("Sqrt", [np.abs(_f(2, 3))], {}, 13, 1),
    "Erf": ("Erf", [_f(2, 3)], {}, 13, 1),
    "Neg int": ("Neg", [_i64(1, -2)], {}, 13, 1),
    "Gelu tanh (opset 20)": ("Gelu", [_f(2, 3)], {"approximate": "tanh"}, 20, 1),
    "Concat negative axis": ("Concat", [_f(2, 3), _f(2, 1, seed=1)], {"axis": -1}, 13, 1),
    "Concat shape pieces": ("Concat", [_i64(2), np.zeros(0, np.int64), _i64(-1, 4)], {"axis": 0},
                            13, 1),
    "Reshape 0 and -1": ("Reshape", [_f(2, 3, 4), _i64(0, -1)], {}, 13, 1),
    "Max variadic": ("Max", [_f(3, 1), _f(1, 4, seed=1), np.array(0.1, F32)], {}, 13, 1),
    "Clip int64": ("Clip", [_i64(-5, 0, 5), np.array(-1, np.int64), np.array(2, np.int64)], {}, 13, 1),
    "Tile": ("Tile", [_f(2, 3), _i64(2, 1)], {}, 13, 1),
}


def _single_op(op: str, inputs: list, attrs: dict, opset: int, n_out: int) -> FloatModel:
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    x = inputs[0]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(
            "in0", helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape))],
        [helper.make_empty_tensor_value_info(o) for o in outs],
        initializer=[numpy_helper.from_array(v, n) for n, v in zip(names[1:], inputs[1:])
                     if v is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return FloatModel.split(model)


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_matches_onnx_runtime(case):
    op, inputs, attrs, opset, n_out = OP_CASES[case]
    fm = _single_op(op, inputs, attrs, opset, n_out)
    expected = make_session(fm).run(None, {"in0": inputs[0]})
    module = build_torch_module(fm).eval()
    with torch.no_grad():
        got = [t.numpy() for t in module(torch.from_numpy(inputs[0]))]
    assert len(got) == n_out
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, e.dtype, g.shape, e.shape)
        if e.dtype.kind == "f":
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
        else:
            np.testing.assert_array_equal(g, e)


def test_tensor_hooks_apply_by_name_and_train(gpt):
    """A hook module replaces a graph tensor where it is computed; its parameters are the
    module's (so they train) and train()/eval() reach it."""

    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factor = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, x):
            return x * self.factor

    hook = Scale()
    module = build_torch_module(gpt, tensor_hooks={"output": hook})
    assert any(p is hook.factor for p in module.parameters())
    module.eval()
    assert not hook.training
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    plain = build_torch_module(gpt).eval()
    with torch.no_grad():
        hook.factor.fill_(2.0)
        torch.testing.assert_close(module(ids)[0], 2.0 * plain(ids)[0])
