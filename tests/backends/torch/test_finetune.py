"""The ONNX-to-PyTorch bridge (``from_onnx``) and fine-tuning under masks, schedules and clusters."""

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
from lowbit.backends.torch.finetune import FinetuneSpec, finetune, steps_per_epoch, with_weights
from lowbit.backends.torch.from_onnx import build_torch_module
from lowbit.backends.torch.train import train_classifier
from lowbit.clustering.kmeans import kmeans_1d
from lowbit.config import PruneScope
from lowbit.data import Dataset, digits_split
from lowbit.errors import DataError, UnsupportedOpError
from lowbit.pruning.magnitude import layer_mask
from lowbit.pruning.schedules import polynomial_decay_schedule
from lowbit.stages.prune import gradual_masks


def weight_names(fm: FloatModel) -> list[str]:
    return weight_initializers(fm)


def bias_names(fm: FloatModel) -> list[str]:
    return [n for n in weight_initializers(fm, biases=True) if n not in weight_names(fm)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ort(fm: FloatModel, x: np.ndarray) -> np.ndarray:
    sess = make_session(fm)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _torch(fm: FloatModel, x: np.ndarray) -> np.ndarray:
    module = build_torch_module(fm)
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x))[0].numpy()


def _loss(fm: FloatModel, x: np.ndarray, y: np.ndarray) -> float:
    logits = torch.from_numpy(_ort(fm, x))
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.fixture(scope="module")
def trained_cnn(digits) -> FloatModel:
    x_tr, y_tr, _, _ = digits
    module = train_classifier(models.digits_cnn(), x_tr, y_tr, epochs=2, seed=0)
    fm, _ = load_model(export_module(module, x_tr[:2]))
    return fm


def _train_set(digits, n: int = 600) -> Dataset:
    x_tr, y_tr, _, _ = digits
    return Dataset({"input": x_tr[:n]}, y_tr[:n], source="digits")


# ---------------------------------------------------------------- from_onnx: parity with ORT


def _randomise_bn(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


CASES = {
    "digits_cnn": (models.digits_cnn, (5, 1, 8, 8)),
    "mlp": (lambda: models.mlp((32, 48, 24, 10)), (5, 32)),
    "lenet_300_100": (lambda: models.lenet_300_100(64), (5, 64)),
    "vgg_style_cnn": (lambda: models.vgg_style_cnn(widths=(4, 8)), (3, 3, 32, 32)),
    "lenet5": (lambda: models.lenet5(8), (4, 1, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fold_bn", [True, False])
def test_onnx_module_matches_onnx_runtime(case, fold_bn):
    make, shape = CASES[case]
    torch.manual_seed(0)
    module = make()
    _randomise_bn(module)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    fm, _ = load_model(export_module(module, x[:2]), fold_bn=fold_bn)
    expected = _ort(fm, x)
    got = _torch(fm, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(got, module.eval()(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_onnx_module_matches_onnx_runtime_on_a_handmade_graph():
    """BatchNormalization (torch's export folds it away), asymmetric Conv pads, AveragePool,
    Reshape, Transpose, Concat, Clip, Softmax: the less common ops of the bridge."""
    rng = np.random.default_rng(1)

    def init(name, *shape, positive=False):
        a = rng.standard_normal(shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)

    inits = [init("cw", 4, 2, 3, 3), init("cb", 4), init("g", 4, positive=True), init("b", 4),
             init("m", 4), init("v", 4, positive=True), init("fw", 10, 2 * 4 * 3 * 3),
             init("fb", 10), numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
             numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
             numpy_helper.from_array(np.array(0.5, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[0, 2, 2, 0]),  # (N, 4, 6, 6)
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("LeakyRelu", ["bn"], ["r"], alpha=0.2),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),  # (N,4,3,3)
        helper.make_node("Clip", ["p", "lo", "hi"], ["pc"]),
        helper.make_node("Transpose", ["pc"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Concat", ["t", "p"], ["cat"], axis=1),  # (N, 8, 3, 3)
        helper.make_node("Reshape", ["cat", "shape"], ["f"]),  # (N, 72)
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["N", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    fm, _ = load_model(model, fold_bn=False)
    assert "BatchNormalization" in [n.op_type for n in fm.proto.graph.node]
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_torch(fm, x), _ort(fm, x), atol=1e-5, rtol=1e-5)


def test_weight_and_bias_names_of_digits_cnn(trained_cnn):
    weights, biases = weight_names(trained_cnn), bias_names(trained_cnn)
    assert len(weights) == 2 and len(biases) == 2
    assert [trained_cnn.constant(n).ndim for n in weights] == [4, 2]
    assert [trained_cnn.constant(n).ndim for n in biases] == [1, 1]
    module = build_torch_module(trained_cnn)
    assert set(module.parameter_values()) == set(weights) | set(biases)


def _single_op_model(op: str, **attrs) -> FloatModel:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node(op, ["h"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return FloatModel.split(model)


def test_unsupported_op_is_named():
    with pytest.raises(UnsupportedOpError, match="Hardmax"):
        build_torch_module(_single_op_model("Hardmax"))


def test_supported_elementwise_op_runs():
    fm = _single_op_model("Tanh")
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(_torch(fm, x), _ort(fm, x), atol=1e-6)


# ---------------------------------------------------------------- finetune: masks


def test_masks_keep_pruned_weights_zero_and_train_the_rest(trained_cnn, digits):
    names = weight_names(trained_cnn)
    masks = {n: layer_mask(trained_cnn.constant(n), 0.7) for n in names}
    start = {n: np.where(masks[n], trained_cnn.constant(n), np.float32(0)) for n in names}
    fm = with_weights(trained_cnn, start)
    values = finetune(fm, _train_set(digits), FinetuneSpec(epochs=1, lr=1e-2, masks=masks))
    for n in names:
        assert np.all(values[n][~masks[n]] == 0.0), n  # exactly zero, not just small
        live = masks[n]
        changed = values[n][live] != start[n][live]
        assert changed.mean() > 0.9, n  # the kept weights really trained
    for b in bias_names(trained_cnn):
        assert not np.array_equal(values[b], trained_cnn.constant(b))


def test_finetune_does_not_change_the_graph(trained_cnn, digits):
    values = finetune(trained_cnn, _train_set(digits, 64), FinetuneSpec(epochs=1))
    after = with_weights(trained_cnn, values)
    assert [n.op_type for n in after.proto.graph.node] == \
        [n.op_type for n in trained_cnn.proto.graph.node]
    for n, v in values.items():
        assert after.constant(n).shape == trained_cnn.constant(n).shape
        np.testing.assert_array_equal(after.constant(n), v)


def test_finetune_is_deterministic(trained_cnn, digits):
    spec = FinetuneSpec(epochs=1, seed=3)
    a = finetune(trained_cnn, _train_set(digits, 128), spec)
    b = finetune(trained_cnn, _train_set(digits, 128), spec)
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])


def test_finetune_needs_labels(trained_cnn, digits):
    x_tr = digits[0]
    with pytest.raises(DataError, match="labels"):
        finetune(trained_cnn, Dataset({"input": x_tr[:10]}, None, source="nolabels"), FinetuneSpec())


def test_finetuning_lowers_training_loss_of_a_pruned_model(trained_cnn, digits):
    x_tr, y_tr = digits[0][:600], digits[1][:600]
    names = weight_names(trained_cnn)
    masks = {n: layer_mask(trained_cnn.constant(n), 0.9) for n in names}
    pruned = with_weights(trained_cnn, {n: np.where(masks[n], trained_cnn.constant(n),
                                                    np.float32(0)) for n in names})
    tuned = with_weights(pruned, finetune(pruned, _train_set(digits),
                                          FinetuneSpec(epochs=3, lr=3e-3, masks=masks)))
    before, after = _loss(pruned, x_tr, y_tr), _loss(tuned, x_tr, y_tr)
    assert after < 0.8 * before, (before, after)
    for n in names:
        assert np.all(tuned.constant(n)[~masks[n]] == 0)


# ---------------------------------------------------------------- finetune: gradual schedule


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_schedule_ends_at_the_target_sparsity(trained_cnn, digits, scope):
    train = _train_set(digits, 320)
    names = weight_names(trained_cnn)
    steps = steps_per_epoch(train.num_samples, 32) * 2  # 20 steps
    schedule = polynomial_decay_schedule(0.0, 0.8, 0, steps - 5, frequency=3)
    values = finetune(trained_cnn, train, FinetuneSpec(
        epochs=2, lr=1e-3, mask_update=gradual_masks(schedule, PruneScope(scope)),
        mask_layers=names))
    zeros = {n: int(np.sum(values[n] == 0)) for n in names}
    sizes = {n: values[n].size for n in names}
    if scope == "layer":
        for n in names:
            assert zeros[n] == round(0.8 * sizes[n]), (n, zeros[n], sizes[n])
    else:
        assert sum(zeros.values()) == round(0.8 * sum(sizes.values()))
    assert trained_cnn.constant(names[0]).all()  # the input model is untouched


# ---------------------------------------------------------------- finetune: clusters


def test_clusters_keep_assignments_while_centroids_move(trained_cnn, digits):
    names = weight_names(trained_cnn)
    pruned = {n: np.where(layer_mask(trained_cnn.constant(n), 0.5), trained_cnn.constant(n),
                          np.float32(0)) for n in names}
    fm = with_weights(trained_cnn, pruned)
    clusters = {n: kmeans_1d(pruned[n], 3) for n in names}
    values = finetune(fm, _train_set(digits, 320), FinetuneSpec(
        epochs=1, lr=1e-3, shared={n: (c.codebook, c.indices) for n, c in clusters.items()}))
    for n in names:
        cl, out = clusters[n], values[n]
        assert out.shape == pruned[n].shape
        assert np.unique(out[out != 0]).size <= 8
        assert np.all(out[pruned[n] == 0] == 0)  # pruned stays exactly zero
        for k in range(cl.codebook.size):
            members = out[cl.indices == k]
            assert np.all(members == members[0]), (n, k)  # one cluster, one shared value
        moved = np.array([out[cl.indices == k][0] for k in range(cl.codebook.size)])
        assert not np.array_equal(moved, cl.codebook), n  # the centroids trained
        # and the assignment itself did not change: the same positions share a value
        np.testing.assert_array_equal(cl.indices >= 0, out != 0)
