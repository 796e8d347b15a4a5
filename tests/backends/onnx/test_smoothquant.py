"""SmoothQuant scale migration: same float function, better dynamic INT8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.quantize import quantize_int8
from lowbit.backends.onnx.scoring import output_cosine
from lowbit.backends.onnx.session import make_session, run_batches
from lowbit.backends.onnx.smoothquant import smooth
from lowbit.backends.torch.export import export_module
from lowbit.config import Int8Config
from lowbit.data import Dataset
from lowbit.models import mlp, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _outlier_matmul(k: int = 64, n: int = 64, seed: int = 0, outlier: float = 40.0,
                    damped: bool = False):
    """x @ W1 -> Relu -> @ W2 with a few activation channels ``outlier`` x larger than the
    rest; ``damped``: their weight rows that much smaller (as trained transformers do), so
    the output is carried by the ordinary channels that a per-tensor scale crushes."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    if damped:
        w1[:4] /= outlier
    w2 = (rng.standard_normal((n, 8)) / np.sqrt(n)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "outliers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((256, k)).astype(np.float32)
    x[:, :4] *= outlier
    return model, x


def test_smoothed_model_computes_the_same_function():
    model, x = _outlier_matmul()
    fm, _ = load_model(model)
    sm, n = smooth(fm, Dataset({"x": x}), alpha=0.7)
    assert n == 2
    a = make_session(fm).run(None, {"x": x})[0]
    b = make_session(sm).run(None, {"x": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert sum(node.op_type == "Mul" for node in sm.proto.graph.node) == 2


@pytest.mark.parametrize("kind", ["gemm_mlp", "gpt"])
def test_equivalence_on_exported_models(kind):
    import torch

    torch.manual_seed(0)
    if kind == "gemm_mlp":  # Gemm with transB=1
        x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
        proto, feed = export_module(mlp((32, 48, 10)), x[:2]), {"input": x}
    else:
        ids = np.random.default_rng(0).integers(0, 64, (8, 12)).astype(np.int64)
        proto = export_module(tiny_gpt(vocab=64, d_model=32, heads=4, layers=1, max_len=16), ids,
                              dynamic_dims=(0, 1))
        feed = {"input": ids}
    fm, _ = load_model(proto)
    sm, n = smooth(fm, Dataset(feed))
    assert n >= 2
    a = make_session(fm).run(None, feed)[0]
    b = make_session(sm).run(None, feed)[0]
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


def test_smoothing_improves_dynamic_int8_on_activation_outliers():
    model, x = _outlier_matmul()
    fm, _ = load_model(model)
    data, held = Dataset({"x": x[:192]}), Dataset({"x": x[192:]})
    ref = run_batches(make_session(fm), held, 64)
    cfg = Int8Config(mode="dynamic")
    base = output_cosine(quantize_int8(fm, data, cfg).model, held, ref)
    sm, _ = smooth(fm, data, alpha=0.7)
    smoothed = output_cosine(quantize_int8(sm, data, cfg).model, held, ref)
    assert smoothed > base
    assert 1 - smoothed < 0.8 * (1 - base)  # the error falls by a real margin


def test_no_matmul_means_nothing_to_smooth():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    fm, _ = load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    sm, n = smooth(fm, Dataset({"x": np.ones((2, 3), np.float32)}))
    assert n == 0 and sm is fm
    assert isinstance(sm.proto, onnx.ModelProto)


def test_default_dynamic_quantize_keeps_smoothquant_only_when_it_pays():
    import lowbit

    model, x = _outlier_matmul(outlier=400.0, damped=True)  # below 30 dB unsmoothed: worth trying
    qm = lowbit.quantize(model, x, mode="dynamic", verify=False)
    section = qm.report["smoothquant"]
    assert section["sqnr_db_without"] < 30.0
    assert set(section["sqnr_db_by_alpha"]) == {0.5, 0.7, 0.85}
    best = max(section["sqnr_db_by_alpha"].values())
    if section["kept"]:  # better by >= 1 dB and timed not slower than 0.95x
        assert best >= section["sqnr_db_without"] + 1.0
        assert section["speed_with_vs_without"] >= 0.95
        assert any("SmoothMul" in n.name for n in qm.model.graph.node)
    else:
        assert not any("SmoothMul" in n.name for n in qm.model.graph.node)
    # the outliers make per-tensor activation ranges lossy: smoothing must help here
    assert best >= section["sqnr_db_without"] + 1.0


def test_no_default_smoothquant_without_dynamic_matmuls_or_with_search_off():
    import lowbit

    model, x = _outlier_matmul(outlier=400.0, damped=True)
    assert "smoothquant" not in lowbit.quantize(model, x, mode="static", verify=False).report
    for config in (Int8Config(mode="dynamic", smoothquant=False),
                   Int8Config(mode="auto", search_time=0)):
        assert "smoothquant" not in lowbit.quantize(model, x, config=config, verify=False).report
    accurate, x = _outlier_matmul(outlier=1.0)  # >= 30 dB already: not tried
    assert "smoothquant" not in lowbit.quantize(accurate, x, mode="dynamic", verify=False).report
