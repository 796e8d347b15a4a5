"""Quantization-aware training and distillation through the pipeline: the written model
is the trained QAT model, pruning and clustering survive QAT, a teacher trains a student."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lowbit import models
from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.quantize import quantize_int8
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.writer import write_model
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.finetune import FinetuneSpec, finetune, with_weights
from lowbit.backends.torch.from_onnx import build_torch_module
from lowbit.backends.torch.train import train_classifier
from lowbit.config import (
    ClusterConfig,
    DistillConfig,
    DistillSettings,
    Int8Config,
    PruneConfig,
    QatConfig,
)
from lowbit.data import Dataset
from lowbit.errors import ValidationError
from lowbit.metrics import accuracy
from lowbit.pipeline import run
from lowbit.stages.qat import (
    activation_fake_quants,
    bias_fake_quants,
    requantized,
    weight_fake_quants,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cnn(digits):
    x_tr, y_tr, _, _ = digits
    module = train_classifier(models.digits_cnn(), x_tr, y_tr, epochs=3, seed=0)
    return export_module(module, x_tr[:2])


def _ort(model, x):
    sess = make_session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8}


@pytest.mark.parametrize("learned", [False, True])
def test_onnx_runtime_runs_the_trained_qat_model_within_one_step(cnn, digits, learned):
    x_tr, y_tr, x_te, _ = digits
    fm, _ = load_model(cnn)
    train = Dataset({"input": x_tr[:400]}, y_tr[:400], source="digits")
    outcome = quantize_int8(fm, train.take(0, 128), Int8Config(mode="static"))
    config = QatConfig(epochs=1, mode="static", weight_bits=4, layer_bits={"/4/Gemm": 8},
                       activation_range="learned" if learned else "ema")
    quants = weight_fake_quants(outcome.plan, config,
                                bool(outcome.plan.metadata.get("reduce_range")), set(), fm)
    hooks = activation_fake_quants(outcome.plan, fm, learned=learned)
    assert quants and hooks
    biases = bias_fake_quants(outcome.plan, fm, quants, hooks)
    assert biases
    values = finetune(fm, train, FinetuneSpec(epochs=1, lr=1e-3, weight_transforms={
        **quants, **biases}, tensor_hooks=hooks))
    trained = with_weights(fm, values)
    plan = requantized(outcome.plan, trained, quants,
                       {t: hooks[t].export_params() for t in outcome.plan.observed if t in hooks})
    written = write_model(trained, plan)
    transforms = {**quants, **biases}
    params = {w: torch.from_numpy(np.array(trained.constant(w), np.float32)) for w in transforms}
    module = build_torch_module(trained, weight_override={
        w: (lambda w=w: transforms[w](params[w])) for w in transforms}, tensor_hooks=hooks)
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(x_te))[0].numpy()
    got = _ort(written, x_te)
    out = written.graph.output[0].name
    step = float(plan.activation_params(out).scale) if out in plan.tensors or out in \
        plan.shared else None
    tolerance = step if step is not None else 1e-3 * float(np.abs(expected).max())
    diff = np.abs(got - expected)
    assert diff.max() <= tolerance + 1e-6
    # bit-exact but for rare ties that the integer and float sums round differently
    assert np.mean(diff > 1e-4) < 0.01
    codes = _codes(written)
    conv = [c for n, c in codes.items() if c.ndim == 4]
    assert conv and all(np.abs(c).max() <= 7 for c in conv)  # 4-bit grid in INT8
    assert any(np.abs(c).max() > 7 for n, c in codes.items() if c.ndim == 2)  # Gemm_4 at 8 bits


def test_qat_keeps_pruned_zeros_and_clustered_values(cnn, digits):
    x_tr, y_tr, _, _ = digits
    result = run(cnn, [PruneConfig(sparsity=0.6, epochs=1), ClusterConfig(bits=3, epochs=1),
                       QatConfig(epochs=1, mode="static")], data=(x_tr, y_tr), verify=False)
    float_weights = {t.name: onnx.numpy_helper.to_array(t) for t in cnn.graph.initializer}
    pruned_model = result.fm
    for name, codes in _codes(result.model).items():
        base = name[: -len("_quantized")]
        if base not in float_weights or float_weights[base].ndim < 2:
            continue
        w = np.asarray(pruned_model.constant(base))
        assert np.count_nonzero(codes == 0) >= np.count_nonzero(w == 0) >= 0.55 * w.size
        assert len(np.unique(codes[codes != 0])) <= 2 ** 3, base
    assert result.report["qat"]["epochs"] == 1


def test_qat_improves_on_post_training_at_w4a8(cnn, digits):
    x_tr, y_tr, x_te, y_te = digits
    outcomes = {}
    for epochs in (0, 2):
        result = run(cnn, [QatConfig(epochs=epochs, weight_bits=3, mode="static", lr=1e-3)],
                     data=(x_tr, y_tr), verify=False)
        outcomes[epochs] = accuracy(_ort(result.model, x_te), y_te)
    assert outcomes[2] >= outcomes[0]


def test_distillation_trains_a_student_from_the_teacher_without_labels(cnn, digits):
    x_tr, _, x_te, _ = digits
    torch.manual_seed(1)
    student = export_module(models.digits_cnn(), x_tr[:2])  # untrained
    teacher_out = _ort(cnn, x_te)
    before = (np.argmax(_ort(student, x_te), 1) == np.argmax(teacher_out, 1)).mean()
    result = run(student, [DistillConfig(epochs=3, lr=3e-3, loss="kl")], data=x_tr,
                 teacher=cnn, verify=False)
    after = (np.argmax(_ort(result.model, x_te), 1) == np.argmax(teacher_out, 1)).mean()
    assert before < 0.5 < 0.8 < after
    assert result.report["teacher"]["model"] == "ModelProto"


def test_a_student_whose_output_differs_is_refused_naming_both_shapes(cnn, digits):
    x_tr, y_tr, _, _ = digits
    student = export_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7)),
                            x_tr[:2])
    with pytest.raises(ValidationError, match=r"output shape \['\?', 7\].*\['\?', 10\]"):
        run(student, [DistillConfig(epochs=1)], data=x_tr, teacher=cnn)


def test_distill_settings_wrap_a_training_stage(cnn, digits):
    x_tr, y_tr, _, _ = digits
    result = run(cnn, [PruneConfig(sparsity=0.5, epochs=1)], data=(x_tr, y_tr), verify=False,
                 distill=DistillSettings(temperature=2.0, alpha=0.5))
    assert result.report["distillation"] == {"temperature": 2.0, "alpha": 0.5, "loss": "auto",
                                             "features": 0.0}


def test_qat_options_are_checked_before_any_work(cnn, digits):
    x_tr, y_tr, _, _ = digits
    with pytest.raises(ValidationError, match="weight_bits"):
        QatConfig(weight_bits=1)
    with pytest.raises(ValidationError, match=r"layer_bits\[conv\]"):
        QatConfig(layer_bits={"conv": 9})
    with pytest.raises(ValidationError, match="layer_bits: no node named"):
        run(cnn, [QatConfig(layer_bits={"nope": 4})], data=(x_tr, y_tr))


def _gpt_tokens(rng, n: int, t: int) -> np.ndarray:
    """Repeating token patterns (period 2-5) of a 32-token vocabulary."""
    out = np.empty((n, t), np.int64)
    for i in range(n):
        pattern = rng.integers(0, 32, rng.integers(2, 6))
        out[i] = np.resize(pattern, t)
    return out


def test_weight_only_qat_of_a_gpt_distilled_from_the_float_model_beats_round_to_nearest():
    from lowbit.metrics import sqnr_db

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    module = models.tiny_gpt(vocab=32, d_model=32, heads=2, layers=1, max_len=16)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(60):  # realistic weights: learn to continue the patterns
        ids = torch.as_tensor(_gpt_tokens(rng, 32, 13))
        loss = torch.nn.functional.cross_entropy(module(ids[:, :-1]).reshape(-1, 32),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    gpt = export_module(module.eval(), _gpt_tokens(rng, 2, 12), dynamic_dims=(0, 1))
    train, test = _gpt_tokens(rng, 256, 12), _gpt_tokens(rng, 64, 12)
    reference = _ort(gpt, test)
    sqnr = {}
    for epochs in (0, 3):
        result = run(gpt, [QatConfig(scheme="weight-only", weight_bits=2, group_size=16,
                                     epochs=epochs, lr=2e-3)], data=train, verify=False,
                     distill=DistillSettings(loss="mse"))
        assert {n.op_type for n in result.model.graph.node} >= {"MatMulNBits"}
        sqnr[epochs] = sqnr_db(reference, _ort(result.model, test))
    assert sqnr[3] > sqnr[0] + 1.0, sqnr


def test_a_second_cluster_stage_keeps_the_first_ones_shared_values(cnn, digits):
    """Regression: fine-tuning a later cluster stage used to train the earlier stage's
    layers freely (655 distinct values where 16 were shared)."""
    x_tr, y_tr, _, _ = digits
    result = run(cnn, [ClusterConfig(bits=4, layers=("/4/Gemm",), epochs=1),
                       ClusterConfig(bits=3, layers=("/0/Conv",), epochs=1)],
                 data=(x_tr, y_tr), verify=False)
    for node, bits in (("4.weight", 4), ("0.weight", 3)):
        w = np.asarray(result.fm.constant(node))
        assert len(np.unique(w[w != 0])) <= 2 ** bits, node


def test_a_training_stage_without_labels_or_teacher_is_refused_naming_it(cnn, digits):
    from lowbit.errors import DataError

    x_tr, _, _, _ = digits
    with pytest.raises(DataError, match=r"stage 2 \(prune\) fine-tunes for 1 epoch"):
        run(cnn, [PruneConfig(sparsity=0.3), PruneConfig(sparsity=0.5, epochs=1)], data=x_tr)
    # with a teacher (distillation), labels are not needed
    run(cnn, [PruneConfig(sparsity=0.5, epochs=1)], data=x_tr, verify=False,
        distill=DistillSettings())


def test_a_student_run_is_compared_with_its_teacher(cnn, digits):
    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(2)
    student = export_module(models.digits_cnn(), x_tr[:2])
    result = run(student, [DistillConfig(epochs=2, lr=3e-3)], data=(x_tr, y_tr),
                 eval_data=(x_te, y_te), teacher=cnn)
    teacher_accuracy = accuracy(_ort(cnn, x_te), y_te)
    assert result.report["verification"]["agreement"]["accuracy"]["float"] == \
        pytest.approx(teacher_accuracy)
    assert "teacher" in result.report["teacher"]["compared_with"]


def test_feature_distillation_matches_the_layers_both_graphs_share(cnn, digits):
    from lowbit.backends.onnx.teacher import matching_features
    from lowbit.config import StructuredPruneConfig

    x_tr, y_tr, _, _ = digits
    fm, _ = load_model(cnn)
    assert matching_features(fm, fm) == ("/0/Conv_output_0", "/1/Relu_output_0")
    slim = run(cnn, [StructuredPruneConfig(sparsity=0.5)], data=(x_tr, y_tr), verify=False)
    assert matching_features(fm, slim.fm) == ()  # 16 of 32 channels: no shape in common
    result = run(cnn, [PruneConfig(sparsity=0.7, epochs=2)], data=(x_tr, y_tr),
                 eval_data=(x_tr[:200], y_tr[:200]),
                 distill=DistillSettings(features=1.0))
    assert result.report["distillation"]["features"] == 1.0
    assert result.report["verification"]["agreement"]["top1_agreement"] > 0.9


def test_low_bit_weights_are_per_channel_and_labelled_with_their_bits(cnn, digits):
    x_tr, y_tr, _, _ = digits
    result = run(cnn, [QatConfig(epochs=0, weight_bits=4, mode="static")], data=(x_tr, y_tr),
                 verify=False)
    labels = {d["name"]: d.get("weights") for d in result.report["nodes"]["decisions"]}
    assert labels["/0/Conv"] == labels["/4/Gemm"] == "per-channel, 4-bit"


@pytest.mark.parametrize("native", [False, True])
def test_bf16_training_runs_where_the_cpu_computes_it_and_says_so_where_not(
        cnn, digits, monkeypatch, native):
    from lowbit.runtime import environment

    x_tr, y_tr, _, _ = digits
    info = {**environment.cpu_info(), "bf16": native}
    monkeypatch.setattr(environment, "cpu_info", lambda: info)
    result = run(cnn, [PruneConfig(sparsity=0.5, epochs=1, precision="bf16")],
                 data=(x_tr[:256], y_tr[:256]), verify=False)
    noted = any(n.startswith("precision bf16: this CPU has no bfloat16") for n in
                result.report["notes"])
    assert noted is not native
    assert result.report["training"]  # it trained either way
