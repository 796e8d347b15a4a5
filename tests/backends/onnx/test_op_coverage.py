"""Operator coverage (issue 12 §3, §4): one small graph per operator family, built in code,
through auto, static and dynamic mode. Each run must pass the ONNX checker, run in ONNX
Runtime at the calibration size and at another dynamic size with float's output shapes,
stay above a per-graph SQNR against float, quantize the nodes named (report decisions),
and, where lowbit relies on a fusion, show ONNX Runtime's integer kernel in its optimized
graph (no QuantizeLinear/DequantizeLinear pair left around an 8-bit data-movement op).
Auto runs its fixed rule (``search_time=0``) so the decisions do not depend on timing;
``test_auto_search_times_the_new_plans`` runs the search once."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import op_graphs as g
import pytest
from ort_oracle import sqnr

import lowbit
from lowbit.config import Int8Config

S, D, P, F, FOLDED = "int8-static", "int8-dynamic", "int8-passthrough", "float", "folded"
MODES = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], onnx.ModelProto]
    min_sqnr: float  # dB vs float on held-out inputs, every mode
    decisions: dict[str, dict[str, str]]  # mode -> {node: treatment}
    kernels: dict[str, dict[str, int]] = field(default_factory=dict)  # mode -> {op: count}
    reasons: dict[str, str] = field(default_factory=dict)  # node -> text in its static reason
    rows: int = 24  # calibration rows


_CONV = {"conv1": S, "conv2": S}
_CONV_DYNAMIC = {"conv1": F, "conv2": F}
_EIGHT_BIT_ONLY = {"QuantizeLinear": 1, "DequantizeLinear": 1, "QLinearConv": 2}  # in, out


def _moving(op: str, kernel: str, extra: dict[str, str] | None = None) -> Case:
    """A data-movement op between two Convs runs on 8-bit data: ONNX Runtime dropped the
    DequantizeLinear/QuantizeLinear pair around it."""
    static = {**_CONV, "op": P, **(extra or {})}
    return Case(f"moves_{op}", lambda: g.data_movement(op), 29.0,
                {"static": static, "auto": static, "dynamic": {**_CONV_DYNAMIC, "op": F}},
                {m: {**_EIGHT_BIT_ONLY, kernel: 1} for m in ("static", "auto")})


CASES = [
    Case("conv_transpose", g.conv_transpose, 29.0,
         {m: {**_CONV, "convT": F, "relu2": FOLDED} for m in ("static", "auto")} |
         {"dynamic": {**_CONV_DYNAMIC, "convT": F}},
         {m: {"QLinearConv": 2, "ConvTranspose": 1} for m in ("static", "auto")},
         {"convT": "no integer ConvTranspose"}),
    Case("instance_norm", g.instance_norm, 27.0,
         {m: {**_CONV, "inorm": F} for m in ("static", "auto")} |
         {"dynamic": {**_CONV_DYNAMIC, "inorm": F}},
         {m: {"QLinearConv": 2, "InstanceNormalization": 1} for m in ("static", "auto")},
         {"inorm": "no integer InstanceNormalization"}),
    *[Case(f"pad_{mode}", lambda mode=mode: g.pad(mode), 29.0,
           {"static": {**_CONV, "pad": P}, "auto": {**_CONV, "pad": P},
            "dynamic": {**_CONV_DYNAMIC, "pad": F}},
           {m: {**_EIGHT_BIT_ONLY, "Pad": 1} for m in ("static", "auto")})
      for mode in ("constant", "reflect")],
    _moving("Slice", "Slice"),
    _moving("Split", "Split", {"concat": S}),
    _moving("Resize", "Resize"),
    _moving("DepthToSpace", "DepthToSpace"),
    _moving("Tile", "Tile"),
    _moving("Gather", "Gather"),
    Case("expand", g.expand, 24.0,
         {m: {"fc0": S, "relu0": FOLDED, "unsqueeze": P, "op": P, "fc1": S}
          for m in ("static", "auto")} | {"dynamic": {"fc0": D, "op": F, "fc1": D}},
         {m: {"QGemm": 1, "Expand": 1, "MatMulIntegerToFloat": 1, "DequantizeLinear": 0}
          for m in ("static", "auto")}),
    Case("clip_after_matmul_reshape", lambda: g.clip_reshape(True), 31.0,
         {m: {"fc0": S, "clip": FOLDED, "reshape": P, "fc1": S} for m in ("static", "auto")} |
         {"dynamic": {"fc0": D, "clip": F, "fc1": D}},
         {m: {"QGemm": 1, "Clip": 0, "Reshape": 1, "DequantizeLinear": 0}
          for m in ("static", "auto")}),
    Case("clip_reshape", lambda: g.clip_reshape(False), 38.0,
         {m: {"clip": FOLDED, "reshape": P, "fc1": S} for m in ("static", "auto")} |
         {"dynamic": {"clip": F, "fc1": D}},
         {m: {"Clip": 0, "QuantizeLinear": 1, "MatMulIntegerToFloat": 1}
          for m in ("static", "auto")}),
    Case("matmul_tile", g.matmul_tile, 35.0,
         {m: {"fc0": S, "tile": F} for m in ("static", "auto")} |
         {"dynamic": {"fc0": D, "tile": F}},
         {m: {"MatMulIntegerToFloat": 1, "QuantizeLinear": 1, "DequantizeLinear": 0}
          for m in ("static", "auto")}, rows=64),
    Case("add_of_two_inputs", g.add_of_inputs, 34.0,
         {m: {"add": F, "fc1": S} for m in ("static",)} | {"dynamic": {"add": F, "fc1": D}},
         reasons={"add": "0.38-0.89x"}),
    Case("embedding_matmul", g.embedding, 32.0,
         {m: {"embed": S, "fc1": S} for m in ("static", "auto")} |
         {"dynamic": {"embed": "int8-weight-only", "fc1": D}},
         {m: {"Gather": 1, "GatherBlockQuantized": 0, "QuantizeLinear": 0,
              "MatMulIntegerToFloat": 1} for m in ("static", "auto")} |
         {"dynamic": {"GatherBlockQuantized": 1}}),
    Case("self_attention", g.self_attention, 31.0,
         {"static": {"q_proj": S, "qk": S, "softmax": F, "pv": S, "o_proj": S, "residual": F},
          "auto": {"q_proj": S, "qk": S, "pv": F, "o_proj": D},
          "dynamic": {"q_proj": D, "qk": F, "pv": F, "o_proj": D}},
         {"static": {"QGemm": 4, "MatMulIntegerToFloat": 1, "QLinearMatMul": 1, "MatMul": 0},
          "auto": {"QGemm": 3, "MatMulIntegerToFloat": 1}},
         {"residual": "feeds no 8-bit operator"}),
    Case("contrib_attention", lambda: g.contrib_attention(skip=False), 29.0,
         {"static": {"attn": S, "proj": S}, "auto": {"attn": S, "proj": D},
          "dynamic": {"attn": D, "proj": D}},
         {m: {"QAttention": 1, "Attention": 0} for m in MODES}),
    Case("contrib_attention_untyped", lambda: g.contrib_attention(skip=False, value_info=False),
         29.0, {"static": {"attn": S, "proj": S}, "dynamic": {"attn": D, "proj": D}},
         {m: {"QAttention": 1} for m in MODES}),
    Case("skip_layernorm_attention", lambda: g.contrib_attention(skip=True), 29.0,
         {"static": {"skip_ln": F, "attn": S, "proj": S}, "auto": {"attn": D, "proj": D},
          "dynamic": {"attn": D, "proj": D}},
         {m: {"QAttention": 1, "SkipLayerNormalization": 1} for m in MODES}),
]


def _session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def quantize(model: onnx.ModelProto, mode: str, data: dict[str, np.ndarray]) -> lowbit.CompressedModel:
    config = Int8Config(mode=mode, search_time=0 if mode == "auto" else None)
    return lowbit.quantize(model, data, config=config, verify=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_operator_family(case: Case, mode: str, tmp_path) -> None:
    model = case.build()
    qm = quantize(model, mode, g.inputs_for(model, case.rows, 8, seed=1))
    onnx.checker.check_model(qm.model)
    float_session, quant_session = _session(model), _session(
        qm.model, str(tmp_path / "optimized.onnx"))
    for rows, seq in ((8, 8), (3, 5)):  # the calibration size and another dynamic size
        feed = g.inputs_for(model, rows, seq, seed=2)
        ref, out = float_session.run(None, feed)[0], quant_session.run(None, feed)[0]
        assert out.shape == ref.shape, (rows, seq)
        assert sqnr(ref, out) >= case.min_sqnr, (rows, seq, sqnr(ref, out))
    decisions = {d["name"]: d for d in qm.report["nodes"]["decisions"]}
    assert len(decisions) == len(qm.report["nodes"]["decisions"]), "one decision per node"
    got = {name: decisions[name]["treatment"] for name in case.decisions.get(mode, {})}
    assert got == case.decisions.get(mode, {}), {n: decisions[n]["reason"] for n in got}
    for name, text in case.reasons.items() if mode == "static" else ():
        assert text in decisions[name]["reason"], decisions[name]["reason"]
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    for op, count in case.kernels.get(mode, {}).items():
        assert ops[op] == count, (op, dict(ops))


def test_pad_reads_8bit_data_directly(tmp_path) -> None:
    """The Pad is written on the 8-bit tensor (ONNX Runtime keeps a QDQ Pad in float):
    no DequantizeLinear feeds it, and it pads with the zero point (exact)."""
    model = g.pad("constant")
    qm = quantize(model, "static", g.inputs_for(model, 16, 8, seed=1))
    pad = next(n for n in qm.model.graph.node if n.op_type == "Pad")
    producers = {o: n for n in qm.model.graph.node for o in n.output}
    assert producers[pad.input[0]].op_type == "QuantizeLinear"
    zero_point = next(t for t in qm.model.graph.initializer if t.name == pad.input[2])
    assert onnx.numpy_helper.to_array(zero_point).dtype == np.uint8


def test_attention_block_static_sqnr_against_onnxruntime(tmp_path) -> None:
    """§4: static INT8 of Attention + MatMul. onnxruntime's quantize_static (QDQ,
    per-channel, QUInt8/QInt8) on the same calibration data is the reference; lowbit must
    not be worse by more than 1 dB (it measured 3-9 dB better on this no-VNNI CPU, where
    ONNX Runtime's 8-bit weights saturate)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = g.contrib_attention(skip=False)
    calib, test = g.inputs_for(model, 32, 8, seed=1), g.inputs_for(model, 8, 8, seed=2)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{"x": calib["x"][k:k + 8]} for k in range(0, 32, 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rows, None)

    onnx.save(model, tmp_path / "float.onnx")
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "ort.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    ref = _session(model).run(None, test)[0]
    theirs = sqnr(ref, _session(onnx.load(tmp_path / "ort.onnx")).run(None, test)[0])
    ours = sqnr(ref, _session(quantize(model, "static", calib).model).run(None, test)[0])
    assert ours >= theirs - 1.0, (ours, theirs)


def test_auto_search_times_the_new_plans() -> None:
    """Auto's whole-model search writes and times the plans with 8-bit attention MatMuls
    and keeps one of them."""
    model = g.self_attention()
    qm = lowbit.quantize(model, g.inputs_for(model, 16, 8, seed=1), mode="auto", verify=False)
    rows = qm.report["candidates"]["candidates"]
    assert sum(r["kept"] for r in rows) == 1 and len(rows) >= 2, rows
    out = _session(qm.model).run(None, g.inputs_for(model, 4, 6, seed=2))[0]
    assert out.shape == (4, 6, 32)


def test_regression_one_decision_per_embedding_gather() -> None:
    """An embedding Gather used to get two decisions (float from the INT8 planner, then
    weight-only), counted twice in the report."""
    model = g.embedding()
    qm = quantize(model, "dynamic", g.inputs_for(model, 16, 8, seed=1))
    names = [d["name"] for d in qm.report["nodes"]["decisions"]]
    assert names.count("embed") == 1


def test_regression_matmul_output_before_float_op_stays_float() -> None:
    """MatMul + Tile: the MatMul's output used to be quantized though the Tile after it is
    float (no 8-bit reader), adding a second quantization: 32.7 dB vs onnxruntime's 38.2."""
    model = g.matmul_tile()
    qm = quantize(model, "static", g.inputs_for(model, 64, 8, seed=1))
    quantize_inputs = [n.input[0] for n in qm.model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_inputs == ["x"], quantize_inputs


def test_regression_float_mul_reason_names_no_qlinearadd() -> None:
    """Attention's scale Mul after a float Q.K^T stayed float with the Add's reason
    ("QLinearAdd on quantized float inputs"); the Add keeps its measured reason."""
    model = g.self_attention()
    qm = quantize(model, "static", g.inputs_for(model, 16, 8, seed=1))
    decisions = {d["name"]: d for d in qm.report["nodes"]["decisions"]}
    assert decisions["scale"]["treatment"] == F
    assert decisions["scale"]["reason"].startswith("no 8-bit input next to it")
    assert "QLinearAdd on" not in decisions["scale"]["reason"], decisions["scale"]["reason"]
    model = g.add_of_inputs()
    qm = quantize(model, "static", g.inputs_for(model, 16, 8, seed=1))
    add = next(d for d in qm.report["nodes"]["decisions"] if d["name"] == "add")
    assert "QLinearAdd on quantized float inputs: 0.38-0.89x" in add["reason"]
