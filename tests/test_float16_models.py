"""float16 and bfloat16 models (issue 12): quantized on a float32 working copy, written
back with the dtypes they were given with, never a silent no-op."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.cli import main
from lowbit.config import Int8Config, QuantMode
from lowbit.metrics import sqnr_db

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                 "MatMulInteger", "MatMulNBits", "ConvInteger", "QLinearConv"}
MODES = ("auto", "static", "dynamic")
RNG_SEED = 0


def _model(nodes: list[onnx.NodeProto], elem: int, x_shape: list[object],
           y_shape: list[object], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A one-input model whose weights are stored as ``elem`` (float16/bfloat16)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    inits = [numpy_helper.from_array(w.astype(dtype), name) for name, w in weights.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape)],
                              [helper.make_tensor_value_info("y", elem, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def matmul_model(elem: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """MatMul + Add + Relu + MatMul, 64 -> 128 -> 10."""
    rng = np.random.default_rng(RNG_SEED)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "B"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    weights = {"W": rng.standard_normal((64, 128)) * 0.1, "B": rng.standard_normal(128) * 0.1,
               "W2": rng.standard_normal((128, 10)) * 0.1}
    return _model(nodes, elem, ["N", 64], ["N", 10], weights)


def conv_model(op: str = "Conv") -> onnx.ModelProto:
    """float16 Conv (+ BatchNormalization) + Relu, or ConvTranspose + Relu, 8 -> 16 ch."""
    rng = np.random.default_rng(RNG_SEED)
    shape = (16, 8, 3, 3) if op == "Conv" else (8, 16, 3, 3)
    weights = {"W": rng.standard_normal(shape) * 0.2, "B": rng.standard_normal(16) * 0.1}
    nodes = [helper.make_node(op, ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1])]
    if op == "Conv":
        weights.update(gamma=1 + rng.random(16), beta=rng.standard_normal(16) * 0.1,
                       mean=rng.standard_normal(16) * 0.1, var=0.5 + rng.random(16))
        nodes.append(helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                                      ["cn"]))
    nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], ["y"]))
    return _model(nodes, TensorProto.FLOAT16, ["N", 8, 12, 12], ["N", 16, 12, 12], weights)


def _data(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float16)


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _config(mode: str) -> Int8Config:
    if mode == "auto":  # the rule, without timing its candidates (test time)
        return Int8Config(mode=QuantMode.AUTO, search_time=0.0)
    return Int8Config(mode=QuantMode(mode))


def _check_written(original: onnx.ModelProto, result: lowbit.CompressedModel,
                   x: np.ndarray) -> float:
    """Checker, the original's dtypes, ONNX Runtime; returns the SQNR (dB) vs the original."""
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert _io_types(out) == _io_types(original)
    y = _run(out, x)
    assert y.dtype == np.float16
    assert result.report["verification"]["checker"] == "passed"
    return sqnr_db(_run(original, x).astype(np.float64), y.astype(np.float64))


@pytest.mark.parametrize("mode", MODES)
def test_float16_matmul_quantizes_in_every_mode(mode: str) -> None:
    model = matmul_model()
    result = lowbit.quantize(model, _data((64,), 80, 1), config=_config(mode))
    assert sum(_ops(result.model)[op] for op in QUANTIZED_OPS) > 0
    assert _check_written(model, result, _data((64,), 32, 2)) >= 30.0
    notes = " ".join(result.report["notes"])
    assert "the model is float16" in notes and "float32 working copy" in notes
    assert result.report["precision"]["given"] == "float16"
    assert result.report["precision"]["verified_against"] == "the model as given"
    assert result.report["verification"]["agreement"]["sqnr_db"] >= 30.0


@pytest.mark.parametrize("mode", ("auto", "static"))
def test_float16_conv_with_batchnorm_quantizes(mode: str) -> None:
    model = conv_model()
    result = lowbit.quantize(model, _data((8, 12, 12), 40, 1), config=_config(mode))
    assert _ops(result.model)["QuantizeLinear"] > 0
    assert _check_written(model, result, _data((8, 12, 12), 16, 2)) >= 30.0


def test_float16_conv_dynamic_says_nothing_was_quantized_and_points_to_static() -> None:
    model = conv_model()
    result = lowbit.quantize(model, _data((8, 12, 12), 40, 1), mode="dynamic")
    assert _check_written(model, result, _data((8, 12, 12), 16, 2)) >= 60.0  # float: exact
    said = [w for w in result.report["warnings"] if "quantized dynamically" in w]
    assert len(said) == 1 and "--mode static" in said[0] and "1 Conv(s)" in said[0]
    assert not any(w.startswith("no operator was quantized") for w in result.report["warnings"])


@pytest.mark.parametrize("mode", MODES)
def test_float16_conv_transpose_stays_float_and_the_report_says_why(mode: str) -> None:
    model = conv_model("ConvTranspose")
    result = lowbit.quantize(model, _data((8, 12, 12), 40, 1), config=_config(mode))
    assert not QUANTIZED_OPS & set(_ops(result.model))
    assert _check_written(model, result, _data((8, 12, 12), 16, 2)) >= 60.0
    why = {d["op_type"]: d for d in result.report["nodes"]["decisions"]}["ConvTranspose"]
    assert why["treatment"] == "float" and "no integer ConvTranspose" in why["reason"]
    assert result.report["warnings"]  # "no operator was quantized" / "nothing ... dynamically"
    # its weights stay float16 on disk (behind a Cast ONNX Runtime folds)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert stored.get("W_float16") == TensorProto.FLOAT16
    # weights, not the whole file: the decisions in its metadata are a third of a model this small
    assert _weight_bytes(result.model) < _weight_bytes(model) * 1.3


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _bf16_run(model: onnx.ModelProto, x: np.ndarray, outputs: int) -> np.ndarray:
    """Run a model with a bfloat16 input and output (ONNX Runtime's Python API takes no
    bfloat16 arrays: OrtValues over uint16 buffers)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = np.zeros((x.shape[0], outputs), dtype=np.uint16)
    io = sess.io_binding()
    io.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        np.ascontiguousarray(x.astype(ml_dtypes.bfloat16).view(np.uint16)), TensorProto.BFLOAT16))
    io.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        out, TensorProto.BFLOAT16))
    sess.run_with_iobinding(io)
    return out.view(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_matmul_quantizes_and_keeps_its_signature(mode: str) -> None:
    model = matmul_model(TensorProto.BFLOAT16)
    data = np.random.default_rng(1).standard_normal((80, 64)).astype(np.float32)
    result = lowbit.quantize(model, data, config=_config(mode))
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert _io_types(out) == [TensorProto.BFLOAT16] * 2
    assert sum(_ops(out)[op] for op in QUANTIZED_OPS) > 0
    x = np.random.default_rng(2).standard_normal((32, 64)).astype(ml_dtypes.bfloat16)
    w, b, w2 = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    reference = np.maximum(x.astype(np.float64) @ w + b, 0) @ w2  # numpy, from the bf16 values
    assert sqnr_db(reference, _bf16_run(out, x, 10)) >= 30.0
    assert result.report["precision"]["given"] == "bfloat16"
    assert "float32 working copy" in result.report["precision"]["verified_against"]
    assert result.report["verification"]["checker"] == "passed"


def test_float16_weight_only_keeps_the_signature() -> None:
    model = matmul_model()
    result = lowbit.quantize(model, _data((64,), 40, 1), mode="weight-only", bits=4,
                             group_size=32)
    assert _ops(result.model)["MatMulNBits"] == 2
    assert _check_written(model, result, _data((64,), 32, 2)) >= 15.0  # INT4 weights


def test_float16_inside_a_float32_model_quantizes() -> None:
    """float32 signature, float16 inside (Cast to float16 and back): the Casts are
    retargeted to float32 and the signature stays float32."""
    rng = np.random.default_rng(RNG_SEED)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "W"], ["h"]),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    w = numpy_helper.from_array((rng.standard_normal((64, 32)) * 0.1).astype(np.float16), "W")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 64])],
                              [helper.make_tensor_value_info("y", 1, ["N", 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((40, 64)).astype(np.float32)
    result = lowbit.quantize(model, x, config=_config("static"))
    assert _io_types(result.model) == [TensorProto.FLOAT] * 2
    assert _ops(result.model)["QuantizeLinear"] > 0
    assert sqnr_db(_run(model, x[:16]).astype(np.float64),
                   _run(result.model, x[:16]).astype(np.float64)) >= 30.0


def test_float16_matmul_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, data, out = tmp_path / "m16.onnx", tmp_path / "calib.npz", tmp_path / "m16.int8.onnx"
    model = matmul_model()
    onnx.save(model, str(src))
    np.savez(data, x=_data((64,), 60, 1))  # float16 calibration arrays
    assert main(["quantize", str(src), "-o", str(out), "--data", str(data), "--mode",
                 "static"]) == 0
    printed = capsys.readouterr().out
    assert "float16" in printed and "float32 working copy" in " ".join(printed.split())
    written = onnx.load(str(out))
    assert _io_types(written) == _io_types(model)
    assert _ops(written)["QuantizeLinear"] > 0
    x = _data((64,), 32, 2)
    assert sqnr_db(_run(model, x).astype(np.float64), _run(written, x).astype(np.float64)) >= 30.0
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["precision"]["inputs"] == {"x": "float16"}


def test_bfloat16_data_is_read_as_float32() -> None:
    import torch

    model = matmul_model(TensorProto.BFLOAT16)
    x = np.random.default_rng(1).standard_normal((80, 64)).astype(np.float32)
    for data in (x.astype(ml_dtypes.bfloat16), torch.from_numpy(x).to(torch.bfloat16)):
        result = lowbit.quantize(model, data, config=_config("static"), verify=False)
        assert sum(_ops(result.model)[op] for op in QUANTIZED_OPS) > 0
