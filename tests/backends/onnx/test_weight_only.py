"""Weight-only 2-8 bit quantization of ONNX models (lowbit.backends.onnx.weight_only through
``lowbit.quantize(..., mode="weight-only")``): MatMul/Gemm -> MatMulNBits, embeddings ->
GatherBlockQuantized, checked, run in ONNX Runtime, sized, and compared with float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from ort_oracle import run as _run
from ort_oracle import session as _session
from ort_oracle import sqnr as _sqnr

import lowbit
from lowbit import models
from lowbit.backends.torch.export import export_module
from lowbit.config import WeightOnlyConfig
from lowbit.errors import DataError, ValidationError
from lowbit.quant.groupwise import rtn

VOCAB, D_MODEL, HEADS, LAYERS = 64, 64, 4, 2
ALGORITHMS = ["rtn", "gptq", "hqq"]
SHAPES = [(1, 1), (3, 7), (2, 33)]  # (batch, sequence)
WEIGHT_MATMULS = LAYERS * 4 + 1  # qkv, proj, up, down per block + the LM head
SCORE_MATMULS = LAYERS * 2  # q @ k^T and att @ v per block


# ---------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pattern_tokens(rng: np.random.Generator, n: int, t: int) -> np.ndarray:
    """Sequences that repeat a random pattern of 2-8 tokens (the task the trained GPT learns)."""
    out = np.empty((n, t), dtype=np.int64)
    for i in range(n):
        pattern = rng.integers(0, VOCAB, int(rng.integers(2, 9)))
        out[i] = np.resize(pattern, t)
    return out








def _cosine(ref: np.ndarray, approx: np.ndarray) -> float:
    """Mean cosine over the logit vectors of every (batch, position)."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    a = approx.reshape(-1, approx.shape[-1]).astype(np.float64)
    return float(np.mean(np.sum(r * a, axis=1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(a, axis=1))))


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _weight_only(model, data, **options) -> lowbit.CompressedModel:
    config = WeightOnlyConfig(**options)
    return lowbit.quantize(model, data, config=config, verify=False)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt() -> onnx.ModelProto:
    """tiny_gpt with random weights (seed 0), dynamic batch and sequence."""
    torch.manual_seed(0)
    module = models.tiny_gpt(vocab=VOCAB, d_model=D_MODEL, heads=HEADS, layers=LAYERS)
    return export_module(module, _pattern_tokens(np.random.default_rng(0), 2, 16), dynamic_dims=(0, 1))


@pytest.fixture(scope="module")
def trained_gpt() -> onnx.ModelProto:
    """tiny_gpt trained 100 steps to continue repeating token patterns (realistic weights)."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    module = models.tiny_gpt(vocab=VOCAB, d_model=D_MODEL, heads=HEADS, layers=LAYERS)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    module.train()
    first = last = None
    for step in range(100):
        ids = torch.as_tensor(_pattern_tokens(rng, 32, 33))
        logits = module(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    assert last < 0.7 * first, "the tiny GPT did not learn the pattern task"
    return export_module(module, _pattern_tokens(rng, 2, 16), dynamic_dims=(0, 1))


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    return {"input": _pattern_tokens(np.random.default_rng(10), 64, 33)}


@pytest.fixture(scope="module")
def heldout() -> np.ndarray:
    return _pattern_tokens(np.random.default_rng(20), 24, 33)


@pytest.fixture(scope="module")
def quantized(gpt, calib) -> dict[str, lowbit.CompressedModel]:
    """The random-weight GPT at 4 bits, group 32, by each algorithm (with the report)."""
    return {alg: lowbit.quantize(gpt, calib, mode="weight-only", bits=4, group_size=32,
                                 algorithm=alg) for alg in ALGORITHMS}


# ---------------------------------------------------------------- valid, runs, agrees


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_model_passes_the_checker_and_runs_at_many_shapes(quantized, gpt, algorithm):
    qm = quantized[algorithm]
    onnx.checker.check_model(qm.model, full_check=True)
    ids_dims = [d.dim_param for d in qm.model.graph.input[0].type.tensor_type.shape.dim]
    assert all(ids_dims), f"batch and sequence must stay dynamic, got {ids_dims}"
    rng = np.random.default_rng(30)
    q_sess, f_sess = _session(qm.model), _session(gpt)
    for batch, seq in SHAPES:
        ids = _pattern_tokens(rng, batch, seq)
        out = q_sess.run(None, {"input": ids})[0]
        ref = f_sess.run(None, {"input": ids})[0]
        assert out.shape == (batch, seq, VOCAB)
        assert np.all(np.isfinite(out))
        cos = _cosine(ref, out)
        assert cos > 0.98, f"{algorithm} batch {batch} seq {seq}: cosine {cos:.4f}"
    ver = qm.report["verification"]["agreement"]
    assert ver["cosine"] > 0.98
    wo = qm.report["weight_only"]
    assert (wo["bits"], wo["group_size"], wo["algorithm"]) == (4, 32, algorithm)
    assert wo["symmetric"] is (algorithm != "hqq")
    assert len(wo["relative_weight_error_by_layer"]) == WEIGHT_MATMULS + 2  # + 2 embeddings
    assert all(0 < e < 0.2 for e in wo["relative_weight_error_by_layer"].values())
    samples = qm.report["calibration"]["samples"]
    assert samples > 0 if algorithm == "gptq" else samples == 0


def test_weight_matmuls_become_matmulnbits_and_scores_stay_float(quantized, gpt):
    qm = quantized["rtn"]
    model = qm.model
    nbits = _nodes(model, "MatMulNBits")
    assert len(nbits) == WEIGHT_MATMULS
    inits = _inits(model)
    for node in nbits:
        assert node.domain == "com.microsoft"
        a = _attrs(node)
        assert (a["bits"], a["block_size"], a["accuracy_level"]) == (4, 32, 4)
        k, n = a["K"], a["N"]
        assert inits[node.input[1]].dtype == np.uint8
        assert inits[node.input[1]].shape == (n, -(-k // 32), 16)
        assert inits[node.input[2]].shape == (n * -(-k // 32),)
        assert len(node.input) == 3, "symmetric 4-bit uses ORT's default zero point of 8"
    assert not _nodes(model, "Gemm")
    float_matmuls = _nodes(model, "MatMul")
    assert len(float_matmuls) == SCORE_MATMULS
    assert all(m.input[1] not in inits for m in float_matmuls)
    # every float weight MatMul of the original graph is gone
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node)
    assert not any(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 2
                   and v.size >= 64 * 64 for v in inits.values())
    decisions = qm.report["nodes"]["decisions"]
    floats = [d for d in decisions if d["treatment"] == "float" and d["op_type"] == "MatMul"]
    assert len(floats) == SCORE_MATMULS
    assert all("not a constant" in d["reason"] for d in floats)
    quantized_ = [d for d in decisions if d["treatment"] == "int4-weight-only" and d["op_type"] == "MatMul"]
    assert len(quantized_) == WEIGHT_MATMULS
    assert all("rtn" in d["reason"] and "group 32" in d["reason"] for d in quantized_)
    assert qm.report["nodes"]["counts"] == {"float": SCORE_MATMULS, "int4-weight-only": WEIGHT_MATMULS + 2}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["lowbit.decisions"]) == decisions


def test_embeddings_become_gather_block_quantized(quantized, gpt):
    model = quantized["rtn"].model
    gbq = _nodes(model, "GatherBlockQuantized")
    assert len(gbq) == 2  # token and position tables
    inits = _inits(model)
    assert not any(n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].ndim == 2
                   for n in model.graph.node), "a float embedding table is left"
    decisions = quantized["rtn"].report["nodes"]["decisions"]
    assert sum(d["op_type"] == "Gather" and d["treatment"] == "int4-weight-only" for d in decisions) == 2
    # the token table, looked up through ONNX Runtime, is the float table within half a step
    tok_table = next(n.input[0] for n in gpt.graph.node if n.op_type == "Gather" and n.input[1] == "input")
    table = next(numpy_helper.to_array(t) for t in gpt.graph.initializer if t.name == tok_table)
    tok = next(n for n in gbq if n.input[1] == "input")
    a = _attrs(tok)
    assert (a["bits"], a["gather_axis"], a["quantize_axis"]) == (4, 0, 1)
    assert inits[tok.input[0]].shape == (VOCAB, D_MODEL // 2)  # two 4-bit codes per byte
    block = a["block_size"]
    scales = inits[tok.input[2]]
    assert scales.shape == (VOCAB, D_MODEL // block)
    graph = helper.make_graph(
        [helper.make_node("GatherBlockQuantized", list(tok.input), ["rows"], domain="com.microsoft",
                          **a)],
        "lookup", [helper.make_tensor_value_info(tok.input[1], TensorProto.INT64, [VOCAB])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [VOCAB, D_MODEL])],
        [numpy_helper.from_array(inits[x], x) for x in tok.input if x in inits])
    lookup = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                     helper.make_opsetid("com.microsoft", 1)])
    rows = _session(lookup).run(None, {tok.input[1]: np.arange(VOCAB, dtype=np.int64)})[0]
    step = np.repeat(scales, block, axis=1)
    assert np.all(np.abs(rows - table) <= step * 0.5 * (1 + 1e-5) + 1e-7)
    np.testing.assert_allclose(rows, rtn(table, bits=4, group_size=block).dequantize(), atol=1e-6)


def test_file_is_a_quarter_of_float_and_group_128_is_smaller(gpt, calib, heldout, tmp_path):
    float_path = tmp_path / "float.onnx"
    onnx.save(gpt, str(float_path))
    sizes = {}
    for group in (32, 128):
        qm = lowbit.quantize(gpt, calib, mode="weight-only", bits=4, group_size=group, verify=False)
        out = tmp_path / f"g{group}"
        out.mkdir()
        path = qm.save(out / "model.onnx")
        assert (out / "model.onnx.report.json").is_file()
        sizes[group] = path.stat().st_size
        assert qm.report["output"]["size_bytes"] == sizes[group]
        # group 128 pads K = 64 to a whole block: the padded path must still be right
        assert _cosine(_run(gpt, heldout), _run(qm.model, heldout)) > 0.98
    float_size = float_path.stat().st_size
    assert sizes[32] <= 0.25 * float_size, f"{sizes[32]} bytes vs float {float_size}"
    assert sizes[128] < sizes[32], (
        f"group 128 file ({sizes[128]} bytes) is not smaller than group 32 ({sizes[32]} bytes): "
        "layers with K = 64 < 128 are padded to a whole 128-wide block")


def test_gptq_beats_rtn_on_heldout_tokens(trained_gpt, calib, heldout):
    ref = _run(trained_gpt, heldout)
    for bits, group in ((4, 32), (3, 128)):
        sqnr = {alg: _sqnr(ref, _run(_weight_only(trained_gpt, calib, bits=bits, group_size=group,
                                                  algorithm=alg).model, heldout))
                for alg in ("rtn", "gptq")}
        # measured margin 0.5-1.5 dB; a GPTQ that ignores the Hessian ties RTN
        assert sqnr["gptq"] >= sqnr["rtn"] + 0.1, f"bits {bits} group {group}: {sqnr}"
        assert sqnr["rtn"] > {4: 12.0, 3: 7.0}[bits], sqnr


def test_asymmetric_run_writes_zero_points(gpt, calib, heldout):
    qm = _weight_only(gpt, calib, bits=4, group_size=32, symmetric=False)
    inits = _inits(qm.model)
    nbits = _nodes(qm.model, "MatMulNBits")
    assert len(nbits) == WEIGHT_MATMULS
    for node in nbits:
        assert len(node.input) >= 4 and node.input[3], f"{node.name} has no zero points"
        zp = inits[node.input[3]]
        a = _attrs(node)
        blocks = -(-a["K"] // 32)
        assert zp.dtype == np.uint8 and zp.shape == (a["N"] * -(-blocks // 2),)
        assert len(np.unique(zp)) > 1, "asymmetric zero points should vary between groups"
    reasons = [d["reason"] for d in qm.report["nodes"]["decisions"] if d["op_type"] == "MatMul"
               and d["treatment"] != "float"]
    assert all("asymmetric" in r for r in reasons)
    assert qm.report["weight_only"]["symmetric"] is False
    assert _cosine(_run(gpt, heldout), _run(qm.model, heldout)) > 0.98


def test_bits_3_is_stored_as_4_bit_codes_and_says_so(gpt, calib, heldout):
    qm = _weight_only(gpt, calib, bits=3, group_size=32)
    inits = _inits(qm.model)
    for node in _nodes(qm.model, "MatMulNBits"):
        assert _attrs(node)["bits"] == 4
        packed = inits[node.input[1]]
        codes = np.stack([packed & 0x0F, packed >> 4])
        assert codes.max() <= 7, "3-bit codes must stay in [0, 7]"
        assert len(node.input) >= 4 and node.input[3], "3-bit codes need their zero point (4)"
        zp = inits[node.input[3]]
        assert np.all(zp == 0x44)  # symmetric 3-bit zero point 4, two per byte
    reasons = [d["reason"] for d in qm.report["nodes"]["decisions"]
               if d["treatment"] == "int3-weight-only" and d["op_type"] == "MatMul"]
    assert len(reasons) == WEIGHT_MATMULS
    assert all("stored as 4-bit" in r for r in reasons)
    assert qm.report["weight_only"]["bits"] == 3
    assert _cosine(_run(gpt, heldout), _run(qm.model, heldout)) > 0.95


@pytest.mark.parametrize("group", [32, 64])
def test_gemm_mlp_with_bias(group):
    """Gemm (transB=1, bias) -> MatMulNBits with the bias input; at accuracy level 0 the
    output is exactly the float MLP run with the dequantized weights and the float bias.
    Group 64 pads the second layer's K = 96 to 128."""
    torch.manual_seed(2)
    module = models.mlp((64, 96, 10))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((48, 64)).astype(np.float32)
    proto = export_module(module, x[:2])
    assert len(_nodes(proto, "Gemm")) == 2
    qm = _weight_only(proto, x, bits=4, group_size=group, accuracy_level=0)
    model = qm.model
    onnx.checker.check_model(model, full_check=True)
    assert not _nodes(model, "Gemm") and not _nodes(model, "MatMul")
    nbits = _nodes(model, "MatMulNBits")
    assert len(nbits) == 2
    inits = _inits(model)
    layers = [m for m in module if isinstance(m, torch.nn.Linear)]
    for node, layer in zip(sorted(nbits, key=lambda n: _attrs(n)["K"] == 96), layers):
        assert len(node.input) == 6 and node.input[5] in inits, "bias must be input 5"
        np.testing.assert_array_equal(inits[node.input[5]], layer.bias.detach().numpy())
        assert (_attrs(node)["K"], _attrs(node)["N"]) == (layer.in_features, layer.out_features)
    h = x
    for i, layer in enumerate(layers):
        w = layer.weight.detach().numpy()
        h = h @ rtn(w, bits=4, group_size=group).dequantize().T + layer.bias.detach().numpy()
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    out = _run(model, x)
    assert np.max(np.abs(out - h)) <= 1e-4 * np.max(np.abs(h))
    decisions = qm.report["nodes"]["decisions"]
    assert [d["op_type"] for d in decisions if d["treatment"] == "int4-weight-only"] == ["Gemm", "Gemm"]
    padded = [d for d in decisions if "padded" in d["reason"]]
    assert len(padded) == (1 if group == 64 else 0)
    assert qm.report["weight_only"]["accuracy_level"] == 0


def test_accuracy_levels_are_written(gpt, calib, heldout):
    for level in (0, 4):
        qm = _weight_only(gpt, calib, bits=4, group_size=32, accuracy_level=level)
        assert {_attrs(n)["accuracy_level"] for n in _nodes(qm.model, "MatMulNBits")} == {level}
        assert _cosine(_run(gpt, heldout), _run(qm.model, heldout)) > 0.98


def test_same_inputs_give_byte_identical_files(gpt, calib):
    a = _weight_only(gpt, calib, bits=4, group_size=32, algorithm="gptq").model
    b = _weight_only(gpt, calib, bits=4, group_size=32, algorithm="gptq").model
    assert a.SerializeToString() == b.SerializeToString()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("mode", ["static", "dynamic", "auto"])
def test_bits_4_needs_weight_only_mode(gpt, calib, mode):
    with pytest.raises(ValidationError, match="bits"):
        lowbit.quantize(gpt, calib, mode=mode, bits=4)


@pytest.mark.parametrize(("options", "name"), [
    ({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"group_size": 48}, "group_size"),
    ({"algorithm": "bogus"}, "algorithm")])
def test_bad_weight_only_options_name_the_option(gpt, calib, options, name):
    with pytest.raises(ValidationError, match=name):
        lowbit.quantize(gpt, calib, mode="weight-only", **options)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 40, -VOCAB - 1])
def test_token_ids_outside_the_vocabulary_are_a_data_error(gpt, calib, bad):
    ids = calib["input"].copy()
    ids[5, 7] = bad
    table = next(n.input[0] for n in gpt.graph.node if n.op_type == "Gather" and n.input[1] == "input")
    with pytest.raises(DataError) as info:
        lowbit.quantize(gpt, {"input": ids}, mode="weight-only", bits=4, group_size=32)
    message = str(info.value)
    assert "'input'" in message and table in message and str(bad) in message


def test_gptq_without_data_is_a_data_error(gpt):
    from lowbit.backends.onnx.load import load_model
    from lowbit.backends.onnx.weight_only import plan_weight_only

    fm, _ = load_model(gpt)
    with pytest.raises(DataError, match="gptq"):
        plan_weight_only(fm, WeightOnlyConfig(algorithm="gptq"), None)
