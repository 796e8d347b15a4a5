"""The pruning / weight-sharing API verbs (``lowbit.api``): prune, cluster, compress,
``CompressedModel.save`` to .onnx and .lbz, OUT.report.json, and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit import models
from lowbit.api import CompressedModel, cluster, compress, prune
from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weight_initializers, weighted_nodes
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.train import train_classifier
from lowbit.data import digits_split
from lowbit.errors import DataError, ValidationError
from lowbit.pruning.nm import is_nm_sparse

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(model: onnx.ModelProto | FloatModel, x: np.ndarray) -> np.ndarray:
    proto = model.joined() if isinstance(model, FloatModel) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def weight_names(fm: FloatModel) -> list[str]:
    return weight_initializers(fm)


def bias_names(fm: FloatModel) -> list[str]:
    return [n for n in weight_initializers(fm, biases=True) if n not in weight_names(fm)]


def _weights(fm: FloatModel) -> dict[str, np.ndarray]:
    return {n: np.asarray(fm.constant(n)) for n in weight_names(fm)}


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.fixture(scope="module")
def cnn(digits) -> onnx.ModelProto:
    """digits_cnn trained 2 epochs: Conv(1->32, 3x3) -> MaxPool -> Flatten -> Gemm(288->10)."""
    x_tr, y_tr, _, _ = digits
    module = train_classifier(models.digits_cnn(), x_tr, y_tr, epochs=2, seed=0)
    return export_module(module, x_tr[:2])


@pytest.fixture(scope="module")
def lenet(digits) -> onnx.ModelProto:
    """LeNet-300-100 on flattened 8x8 digits, trained 3 epochs (Gemm 64->300->100->10)."""
    x_tr, y_tr, _, _ = digits
    module = train_classifier(models.lenet_300_100(64), x_tr.reshape(len(x_tr), -1), y_tr,
                              epochs=3, seed=0)
    return export_module(module, x_tr[:2].reshape(2, -1))


def _flat(digits):
    x_tr, y_tr, x_te, y_te = digits
    return (x_tr.reshape(len(x_tr), -1), y_tr), (x_te.reshape(len(x_te), -1), y_te)


# ---------------------------------------------------------------- prune


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_prune_post_training_reaches_the_per_layer_sparsity(lenet, sparsity):
    before = _weights(load_model(lenet)[0])
    cm = prune(lenet, sparsity=sparsity)
    assert isinstance(cm, CompressedModel)
    after = _weights(cm.fm)
    assert after.keys() == before.keys() and len(after) == 3
    for name, w in after.items():
        assert w.shape == before[name].shape
        assert int(np.sum(w == 0)) == round(sparsity * w.size), name
        kept = w != 0
        np.testing.assert_array_equal(w[kept], before[name][kept])  # survivors unchanged
        assert np.abs(before[name][~kept]).max() <= np.abs(before[name][kept]).min()
    rows = {r["name"]: r for r in cm.report["layers"]}
    for name, w in after.items():
        assert rows[name]["sparsity"] == pytest.approx(round(sparsity * w.size) / w.size, abs=1e-4)
    assert cm.report["settings"]["epochs"] == 0
    assert cm.report["skipped"] == {}


def test_prune_does_not_touch_the_input_model(lenet):
    copy = onnx.ModelProto()
    copy.CopyFrom(lenet)
    prune(lenet, sparsity=0.8)
    assert copy == lenet


def test_prune_global_scope_uses_one_threshold(lenet):
    before = _weights(load_model(lenet)[0])
    cm = prune(lenet, sparsity=0.8, scope="global")
    after = _weights(cm.fm)
    total = sum(w.size for w in after.values())
    zeros = sum(int(np.sum(w == 0)) for w in after.values())
    assert zeros == round(0.8 * total)
    gone = np.concatenate([np.abs(before[n][after[n] == 0]) for n in after])
    kept = np.concatenate([np.abs(before[n][after[n] != 0]) for n in after])
    assert gone.max() <= kept.min()
    per_layer = {n: float(np.mean(w == 0)) for n, w in after.items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05, per_layer  # not uniform
    assert cm.report["settings"]["unstructured"]["scope"] == "global"


def test_prune_nm_2_4(lenet, digits):
    cm = prune(lenet, sparsity=0.5, nm=(2, 4))
    for name, w in _weights(cm.fm).items():
        # torch's Linear exports Gemm(transB=1): weight (out, in), groups along the inputs
        assert is_nm_sparse(w, 2, 4, axis=1), name
        assert int(np.sum(w == 0)) == w.size // 2
    notes = " ".join(cm.report["notes"]).lower()
    assert "2:4" in notes and "no cpu speedup" in notes
    assert cm.report["settings"]["unstructured"]["nm"] == [2, 4]


def test_prune_nm_skips_a_layer_whose_inputs_are_not_a_multiple_of_m(cnn):
    # digits_cnn's Conv reduces over 1*3*3 = 9 inputs (an RGB stem: 27): no 2:4 pattern fits,
    # so that layer is reported in 'skipped' and the rest is still pruned 2:4
    conv, gemm = weight_names(load_model(cnn)[0])
    cm = prune(cnn, sparsity=0.5, nm=(2, 4))
    assert conv in cm.report["skipped"]
    w = _weights(cm.fm)
    assert np.count_nonzero(w[conv]) == w[conv].size
    assert is_nm_sparse(w[gemm], 2, 4, axis=1)


def test_prune_structured_shrinks_layers_and_keeps_outputs(cnn, digits):
    x = digits[2][:16]
    cm = prune(cnn, sparsity=0.5, structured=True)
    before, after = _weights(load_model(cnn)[0]), _weights(cm.fm)
    conv, gemm = weight_names(cm.fm)
    assert before[conv].shape == (32, 1, 3, 3) and after[conv].shape == (16, 1, 3, 3)
    assert before[gemm].shape == (10, 288) and after[gemm].shape == (10, 144)
    out = _run(cm.model, x)
    assert out.shape == (16, 10)
    onnx.checker.check_model(cm.model, full_check=True)
    kept = cm.report["settings"]["channels_kept"]  # kept channels per pruned node
    assert list(kept.values()) == [16]
    assert len(cm.report["skipped"]) == 1  # the Gemm feeds the graph output


def test_prune_structured_mlp_skips_the_output_layer(lenet):
    cm = prune(lenet, sparsity=0.5, structured=True)
    shapes = [w.shape for w in _weights(cm.fm).values()]
    assert shapes == [(150, 64), (50, 150), (10, 50)]
    assert len(cm.report["skipped"]) == 1
    assert "output" in next(iter(cm.report["skipped"].values()))
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    assert _run(cm.model, x).shape == (5, 10)


def test_prune_structured_with_fine_tuning(lenet, digits):
    (x_tr, y_tr), (x_te, y_te) = _flat(digits)
    cm = prune(lenet, (x_tr, y_tr), sparsity=0.5, structured=True, epochs=1,
               eval_data=(x_te, y_te))
    assert [w.shape for w in _weights(cm.fm).values()] == [(150, 64), (50, 150), (10, 50)]
    assert cm.report["settings"]["epochs"] == 1
    assert cm.report["verification"]["agreement"]["accuracy"]["compressed"] > 0.8


def test_prune_with_fine_tuning_beats_post_training_at_high_sparsity(cnn, digits):
    x_tr, y_tr, x_te, y_te = digits
    post = prune(cnn, (x_tr, y_tr), sparsity=0.9, eval_data=(x_te, y_te))
    tuned = prune(cnn, (x_tr, y_tr), sparsity=0.9, eval_data=(x_te, y_te), epochs=3)
    acc_post = post.report["verification"]["agreement"]["accuracy"]["compressed"]
    acc_tuned = tuned.report["verification"]["agreement"]["accuracy"]["compressed"]
    assert acc_tuned > acc_post + 0.15, (acc_post, acc_tuned)
    assert tuned.report["settings"]["epochs"] == 3
    for name, w in _weights(tuned.fm).items():  # the gradual schedule ended at the target
        assert int(np.sum(w == 0)) == round(0.9 * w.size), name


def test_prune_accepts_a_torch_module(digits):
    x_tr, y_tr, _, _ = digits
    torch.manual_seed(0)
    module = models.digits_cnn()
    cm = prune(module, (x_tr[:64], y_tr[:64]), sparsity=0.5)
    for w in _weights(cm.fm).values():
        assert int(np.sum(w == 0)) == round(0.5 * w.size)


def test_prune_accepts_an_onnx_file(lenet, tmp_path):
    path = tmp_path / "lenet.onnx"
    onnx.save(lenet, str(path))
    cm = prune(str(path), sparsity=0.5)
    assert cm.report["input"]["model"] == str(path)
    for w in _weights(cm.fm).values():
        assert int(np.sum(w == 0)) == round(0.5 * w.size)


def _tiny_two_layer() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "big.w"),
             numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "small.w")]
    nodes = [helper.make_node("MatMul", ["x", "big.w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "small.w"], ["y"])]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layer_too_small_to_prune_is_skipped_and_reported():
    model = _tiny_two_layer()
    cm = prune(model, sparsity=0.9)  # small.w: 4 weights, round(0.4) = 0 would survive
    assert "small.w" in cm.report["skipped"]
    assert "big.w" not in cm.report["skipped"]
    w = _weights(cm.fm)
    assert np.count_nonzero(w["small.w"]) == 4
    assert int(np.sum(w["big.w"] == 0)) == round(0.9 * 256)


def test_prune_only_the_named_layers(lenet):
    layers = weighted_nodes(load_model(lenet)[0])[0]
    names = [w.weight for w in layers]
    cm = prune(lenet, sparsity=0.7, layers=[layers[1].name])  # node names, as reports show
    after = _weights(cm.fm)
    assert np.count_nonzero(after[names[0]]) == after[names[0]].size
    assert int(np.sum(after[names[1]] == 0)) == round(0.7 * after[names[1]].size)


def test_prune_with_epochs_and_no_labels_is_refused_naming_the_stage(cnn, digits):
    """Fine-tuning without labels (and no teacher) has nothing to learn from: refused
    before any work (it used to fall back to post-training with a note)."""
    with pytest.raises(DataError, match=r"stage 1 \(prune\) fine-tunes for 2 epoch"):
        prune(cnn, digits[0][:100], sparsity=0.5, epochs=2)
    cm = prune(cnn, digits[0][:100], sparsity=0.5)  # post-training needs no labels
    for w in _weights(cm.fm).values():
        assert int(np.sum(w == 0)) == round(0.5 * w.size)


def test_prune_falls_back_to_post_training_for_an_unsupported_op():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Hardmax", ["h"], ["e"]),
             helper.make_node("MatMul", ["e", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "hardmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.random((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    cm = prune(model, (x, y), sparsity=0.5, epochs=1)
    assert cm.report["settings"]["epochs"] == 0
    assert any("post-training" in n and "Hardmax" in n for n in cm.report["notes"])
    w = _weights(cm.fm)
    assert int(np.sum(w["w1"] == 0)) == 256 and int(np.sum(w["w2"] == 0)) == 40


# ---------------------------------------------------------------- cluster


def test_cluster_4_bits_gives_at_most_16_values_per_tensor(cnn):
    cm = cluster(cnn, bits=4)
    names = weight_names(cm.fm) + bias_names(cm.fm)
    assert len(names) == 4
    for name in names:
        w = np.asarray(cm.fm.constant(name))
        assert np.unique(w[w != 0]).size <= 16, name
    for row in cm.report["layers"]:
        assert row["distinct_nonzero_values"] <= 16 and row["bits"] <= 4
    assert cm.report["settings"]["bits"] == 4


def test_cluster_keeps_pruned_zeros(lenet):
    pruned = prune(lenet, sparsity=0.8)
    cm = cluster(pruned.model, bits=3)
    for name, w in _weights(cm.fm).items():
        was = np.asarray(pruned.fm.constant(name))
        np.testing.assert_array_equal(w == 0, was == 0)
        assert np.unique(w[w != 0]).size <= 8


def test_cluster_with_fine_tuning_keeps_the_value_count(cnn, digits):
    x_tr, y_tr, _, _ = digits
    cm = cluster(cnn, (x_tr[:400], y_tr[:400]), bits=3, epochs=1)
    assert cm.report["settings"]["epochs"] == 1
    for name in weight_names(cm.fm) + bias_names(cm.fm):
        w = np.asarray(cm.fm.constant(name))
        assert np.unique(w[w != 0]).size <= 8, name


# ---------------------------------------------------------------- compress and save


@pytest.fixture(scope="module")
def compressed(lenet, digits, tmp_path_factory):
    (x_tr, y_tr), _ = _flat(digits)
    cm = compress(lenet, (x_tr, y_tr), sparsity=0.9, bits=4, epochs=1)
    d = tmp_path_factory.mktemp("compress")
    float_path = d / "float.onnx"
    onnx.save(lenet, str(float_path))
    lbz = cm.save(d / "lenet.lbz")
    return cm, float_path, lbz, d


def test_compress_saves_a_much_smaller_lbz(compressed):
    cm, float_path, lbz, _ = compressed
    assert lbz.suffix == ".lbz" and lbz.is_file()
    assert lbz.stat().st_size * 8 < float_path.stat().st_size
    assert cm.report["output"]["size_bytes"] == lbz.stat().st_size
    assert cm.report["output"]["format"] == "lbz"
    weights = _weights(cm.fm)
    total = sum(w.size for w in weights.values())
    # compress prunes with one global threshold by default: 90% of all weights together
    assert sum(int(np.sum(w == 0)) for w in weights.values()) == round(0.9 * total)
    assert cm.report["settings"]["prune"]["unstructured"]["scope"] == "global"
    for w in weights.values():
        assert np.unique(w[w != 0]).size <= 16


def test_lbz_decodes_to_the_same_outputs_through_lowbit_load(compressed, digits):
    cm, _, lbz, _ = compressed
    _, (x_te, _) = _flat(digits)
    decoded = lowbit.load(lbz)
    assert isinstance(decoded, onnx.ModelProto)
    assert np.array_equal(_run(decoded, x_te), _run(cm.model, x_te))


def test_lbz_decodes_bit_for_bit_with_the_container_reader(compressed, digits):
    from lowbit.container import read_lbz

    cm, _, lbz, _ = compressed
    _, (x_te, _) = _flat(digits)
    decoded = read_lbz(lbz)
    assert np.array_equal(_run(decoded, x_te), _run(cm.model, x_te))
    ref = {t.name: numpy_helper.to_array(t) for t in cm.model.graph.initializer}
    for t in decoded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), ref[t.name])


def test_report_json_is_written_beside_the_lbz(compressed):
    cm, _, lbz, d = compressed
    report = json.loads((d / "lenet.lbz.report.json").read_text())
    assert report["tool"] == "lowbit compress"
    sizes = report["sizes"]
    assert sizes["lbz_bytes"] < sizes["float_onnx_bytes"]
    assert sizes["lbz_ratio"] > 5
    assert [r["name"] for r in report["layers"]] == weight_names(cm.fm)
    assert report["weight_sparsity"] == pytest.approx(0.9, abs=0.01)
    ag = report["verification"]["agreement"]
    assert 0.0 <= ag["top1_agreement"] <= 1.0 and "accuracy" in ag
    assert report["output"]["path"] == str(lbz)
    assert set(report["settings"]) == {"prune", "cluster"}


def test_save_as_onnx_writes_a_dense_model(compressed, tmp_path, digits):
    cm, _, _, _ = compressed
    out = cm.save(tmp_path / "m.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    _, (x_te, _) = _flat(digits)
    assert np.array_equal(_run(model, x_te[:32]), _run(cm.model, x_te[:32]))
    assert json.loads((tmp_path / "m.onnx.report.json").read_text())["output"]["format"] == "onnx"


def test_compress_is_deterministic(lenet, tmp_path):
    a = compress(lenet, sparsity=0.8, bits=3).save(tmp_path / "a.lbz", report=False)
    b = compress(lenet, sparsity=0.8, bits=3).save(tmp_path / "b.lbz", report=False)
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.report.json"))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity(lenet, bad):
    with pytest.raises(ValidationError, match="sparsity"):
        prune(lenet, sparsity=bad)
    with pytest.raises(ValidationError, match="sparsity"):
        compress(lenet, sparsity=bad)


@pytest.mark.parametrize("bad", [0, 9, 2.5])
def test_bad_bits(lenet, bad):
    with pytest.raises(ValidationError, match="bits"):
        cluster(lenet, bits=bad)
    with pytest.raises(ValidationError, match="bits"):
        compress(lenet, bits=bad)


def test_compress_rejects_bad_bits_before_any_work(lenet, digits):
    (x_tr, y_tr), _ = _flat(digits)
    calls = []
    with pytest.raises(ValidationError, match="bits"):
        compress(lenet, (x_tr[:200], y_tr[:200]), bits=9, epochs=1,
                 progress=lambda *a: calls.append(a))
    assert calls == []  # not after a whole pruning + fine-tuning stage


def test_unknown_layer_name(lenet):
    with pytest.raises(ValidationError, match="layers"):
        prune(lenet, sparsity=0.5, layers=["no.such.weight"])
    with pytest.raises(ValidationError, match="layers"):
        cluster(lenet, bits=4, layers=["no.such.weight"])


def test_unknown_scope(lenet):
    with pytest.raises(ValidationError, match="scope"):
        prune(lenet, sparsity=0.5, scope="network")
