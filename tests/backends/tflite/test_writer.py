"""The TFLite writer (issue 11): float graphs match ONNX Runtime, INT8 files carry lowbit's
plan (its scales, in LiteRT's kernels), hybrid/INT4/float16 files are what they say."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("ai_edge_litert", reason="lowbit[tf] is not installed: the TFLite tests "
                    "need ai-edge-litert")

from lowbit.backends.onnx.session import input_specs_of_model, make_session  # noqa: E402
from lowbit.backends.tflite import plan as tplan  # noqa: E402
from lowbit.backends.tflite.inspect import read_structure  # noqa: E402
from lowbit.backends.tflite.session import TfliteSession  # noqa: E402
from lowbit.backends.tflite.writer import write_tflite  # noqa: E402
from lowbit.data import as_dataset  # noqa: E402
from lowbit.errors import UnsupportedOpError  # noqa: E402
from lowbit.model_io import resolve_model  # noqa: E402


def _branchy():
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1),
                                      nn.BatchNorm2d(16), nn.ReLU6())
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pw = nn.Conv2d(16, 16, 1)
            self.side = nn.Conv2d(16, 8, 1)
            self.pool = nn.AvgPool2d(2)
            self.head = nn.Linear(24, 5)

        def forward(self, x):
            a = self.stem(x)
            b = torch.relu(self.pw(self.dw(a))) + a  # residual Add
            c = torch.cat([b, torch.sigmoid(self.side(b))], dim=1)
            c = self.pool(c).mean(dim=(2, 3))
            return torch.softmax(self.head(c), dim=1)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.stem[1].running_mean.uniform_(-0.2, 0.2)
        net.stem[1].running_var.uniform_(0.5, 1.5)
    return net


def _nhwc_graph() -> onnx.ModelProto:
    """What a Keras model looks like once converted: NHWC input, Transpose to NCHW, conv,
    Transpose back, Reshape to rows, MatMul + Add."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.asarray([-1, 6 * 5 * 5], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((150, 4)).astype(np.float32) / 12, "k"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "kb")]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["back"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["back", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "k"], ["mm"]),
             helper.make_node("Add", ["mm", "kb"], ["y"])]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 7, 7, 2])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(data: bytes, x: np.ndarray, name: str) -> np.ndarray:
    return TfliteSession(data).run(None, {name: x})[0]


def _ort(fm, x: np.ndarray) -> np.ndarray:
    s = make_session(fm)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("build,shape", [
    (lambda: _branchy(), (5, 3, 16, 16)),
    (lambda: _nhwc_graph(), (5, 7, 7, 2)),
])
def test_float_and_float16_match_onnx_runtime(build, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    fm, _, _ = resolve_model(build(), x[:2])
    name = input_specs_of_model(fm.proto)[0].name
    ref = _ort(fm, x)
    flt = write_tflite(fm)
    assert np.abs(_run(flt, x, name) - ref).max() < 1e-5
    for batch in (1, 3):  # the batch is dynamic
        assert np.abs(_run(flt, x[:batch], name) - ref[:batch]).max() < 1e-5
    half = write_tflite(fm, weights="float16")
    f32, f16 = read_structure(flt)["constant_bytes"], read_structure(half)["constant_bytes"]
    assert f16["float16"] >= 0.45 * f32["float32"] and f16.get("float32", 0) < 0.1 * f32["float32"]
    assert np.abs(_run(half, x, name) - ref).max() < 5e-3 * max(1.0, np.abs(ref).max())
    # NHWC data moves at most once (the NCHW input)
    assert read_structure(flt)["op_counts"].get("TRANSPOSE", 0) <= 1


def test_nhwc_model_needs_no_transpose_at_all():
    x = np.random.default_rng(1).standard_normal((4, 7, 7, 2)).astype(np.float32)
    fm, _, _ = resolve_model(_nhwc_graph(), x[:2])
    assert "TRANSPOSE" not in read_structure(write_tflite(fm))["op_counts"]


@pytest.fixture(scope="module")
def static_plan():
    from lowbit.backends.onnx.quantize import quantize_int8
    from lowbit.config import Int8Config

    rng = np.random.default_rng(2)
    x = rng.random((96, 3, 16, 16)).astype(np.float32)
    fm, _, _ = resolve_model(_branchy(), x[:2])
    ds = as_dataset(x[:64], input_specs_of_model(fm.proto))
    outcome = quantize_int8(fm, ds, Int8Config(mode="static", reduce_range=True, smoothquant=False))
    return fm, tplan.complete(fm, outcome.plan, ds), outcome.model, x[64:]


def test_int8_file_carries_the_plan(static_plan):
    fm, plan, onnx_int8, x = static_plan
    data = write_tflite(fm, plan)
    info = read_structure(data)
    assert info["execution"].get("int8", 0) >= 4  # the convs and the head run in INT8
    assert info["constant_bytes"].get("float32", 0) < 400  # no float weights left
    # every INT8 activation tensor's scale is one of the plan's (no second calibration)
    from lowbit.backends.tflite import litert

    it = litert("interpreter").Interpreter(model_content=data)
    planned = {round(float(np.asarray(p.scale)), 9) for p in plan.tensors.values()
               if np.asarray(p.scale).size == 1}  # activations, and per-tensor weights
    seen = {round(float(d["quantization"][0]), 9) for d in it.get_tensor_details()
            if d["dtype"] == np.int8 and d["quantization"][0] and len(d["shape"]) != 1
            and d["quantization_parameters"]["scales"].size == 1}
    assert seen and seen <= planned
    # LiteRT's INT8 model computes what ONNX Runtime's QDQ model of the same plan does
    name = input_specs_of_model(fm.proto)[0].name
    mine, ort_q, ref = _run(data, x, name), _ort(onnx_int8, x), _ort(fm, x)
    assert np.abs(mine - ort_q).max() < 0.05
    assert np.mean(mine.argmax(1) == ref.argmax(1)) >= 0.9


def test_int8_io_and_hybrid_and_int4(static_plan):
    fm, plan, _, x = static_plan
    name = input_specs_of_model(fm.proto)[0].name
    ref = _ort(fm, x)
    full = write_tflite(fm, plan, io="int8")
    info = read_structure(full)
    assert info["inputs"][0]["type"] == "int8"
    # the Softmax at the end runs in float: no INT8 scale for the output, so it stays float
    assert info["outputs"][0]["type"] == "float32"
    assert np.abs(_run(full, x, name) - _run(write_tflite(fm, plan), x, name)).max() < 0.02
    hybrid = write_tflite(fm, tplan.as_hybrid(plan))
    assert set(read_structure(hybrid)["execution"]) == {"hybrid"}
    assert np.abs(_run(hybrid, x, name) - ref).max() < 0.05
    int8w = write_tflite(fm, tplan.weight_plan(fm))
    int4w = write_tflite(fm, tplan.weight_plan(fm, dense_bits=4))
    assert "int4" in read_structure(int4w)["constant_bytes"]
    assert len(int4w) < len(int8w)


def test_unsupported_op_is_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="my_erf")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fm, _, _ = resolve_model(model, None)
    with pytest.raises(UnsupportedOpError, match="my_erf.*Erf"):
        write_tflite(fm, source="m.onnx")
