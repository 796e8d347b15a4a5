"""Per-layer sensitivity and INT4/INT8/float mixed-precision plans."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from lowbit.api import read_mixed_plan, sensitivity
from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.scoring import output_cosine
from lowbit.backends.onnx.session import make_session, run_batches
from lowbit.backends.onnx.writer import write_model
from lowbit.backends.torch.export import export_module
from lowbit.cli import main
from lowbit.config import Precision
from lowbit.data import Dataset
from lowbit.errors import ValidationError
from lowbit.models import tiny_gpt
from lowbit.stages.mixed import layer_sensitivity, mixed_plan, plan_for_quality, plan_for_size


def apply_plan(fm, layers, calib):
    """The model a {layer: precision} plan describes, written in one pass."""
    return write_model(fm, mixed_plan(fm, {k: Precision(v) for k, v in layers.items()}, calib))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int64)
    proto = export_module(tiny_gpt(vocab=64, d_model=64, heads=4, layers=2, max_len=32), ids,
                          dynamic_dims=(0, 1))
    path = tmp_path_factory.mktemp("mixed") / "gpt.onnx"
    onnx.save(proto, path)
    fm, _ = load_model(str(path))
    calib = Dataset({"input": np.random.default_rng(1).integers(0, 64, (24, 16)).astype(np.int64)})
    return path, fm, calib, layer_sensitivity(fm, calib)


def test_sensitivity_covers_every_linear_layer(gpt):
    _, fm, _, rows = gpt
    matmuls = [n for n in fm.proto.graph.node if n.op_type == "MatMul" and
               n.input[1] in {t.name for t in fm.proto.graph.initializer}]
    assert len(rows) == len(matmuls) == 9
    for r in rows:
        assert 0.9 < r["cosine_int4"] <= r["cosine_int8"] + 1e-6 <= 1.0 + 1e-6


def test_apply_plan_writes_each_precision(gpt):
    _, fm, calib, rows = gpt
    names = [r["name"] for r in rows]
    plan = {names[0]: "int4", names[1]: "int8", names[2]: "float"}
    ops = Counter(n.op_type for n in apply_plan(fm, plan, calib).graph.node)
    assert ops["MatMulNBits"] == 1 and ops["MatMulInteger"] == 1
    assert ops["MatMul"] == 9 - 2 + 4  # 7 float weight MatMuls + 4 attention MatMuls


def test_search_plan_meets_the_target(gpt):
    _, fm, calib, rows = gpt
    plan, cosine = plan_for_quality(fm, calib, rows, min_cosine=0.9995)
    assert cosine >= 0.9995
    ref = run_batches(make_session(fm), calib.take(0, 16), 16)
    assert output_cosine(apply_plan(fm, plan, calib), calib.take(0, 16), ref) >= 0.9995


def test_size_target_puts_int4_where_it_hurts_least(gpt):
    _, _, _, rows = gpt
    plan = plan_for_size(rows, 6.0)
    total = sum(r["params"] for r in rows)
    bits = {Precision.INT4: 4, Precision.INT8: 8, Precision.FLOAT: 32}
    avg = sum(bits[plan[r["name"]]] * r["params"] for r in rows) / total
    assert avg <= 6.0
    int4 = [r["cosine_int4"] for r in rows if plan[r["name"]] is Precision.INT4]
    int8 = [r["cosine_int4"] for r in rows if plan[r["name"]] is Precision.INT8]
    assert not int8 or min(int4) >= max(int8)


def test_bad_plans_are_refused(gpt, tmp_path):
    path, fm, calib, _ = gpt
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValidationError, match="not valid JSON"):
        read_mixed_plan(bad)
    fmt = "lowbit.mixed-precision/1"
    bad.write_text(json.dumps({"format": fmt, "layers": {"nope": "int5"}}))
    with pytest.raises(ValidationError, match="int5"):
        read_mixed_plan(bad)
    for plan, named in (({"layers": {"a": "int4"}}, "format"),
                        ({"format": "lowbit.mixed-precision/99", "layers": {"a": "int4"}}, "/99"),
                        ({"format": fmt, "layers": {}}, "no layers")):
        bad.write_text(json.dumps(plan))
        with pytest.raises(ValidationError, match=named):
            read_mixed_plan(bad)
    bad.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValidationError, match="not valid JSON"):
        read_mixed_plan(bad)
    with pytest.raises(ValidationError, match="regular file"):
        read_mixed_plan("/dev/zero")
    bad.write_text(json.dumps({"format": fmt, "layers": {"nope": "int4"}}))
    with pytest.raises(ValidationError, match="nope"):
        mixed_plan(fm, read_mixed_plan(bad).precision, calib)
    with pytest.raises(ValidationError, match="target"):
        sensitivity(str(path), calib.inputs)


def test_cli_sensitivity_then_quantize_with_plan(gpt, tmp_path, capsys):
    path, _, calib, _ = gpt
    data = tmp_path / "tok.npz"
    np.savez(data, x=np.random.default_rng(2).integers(0, 64, (40, 16)).astype(np.int64))
    plan = tmp_path / "plan.json"
    assert main(["sensitivity", str(path), "--data", str(data), "-o", str(plan), "--quiet"]) == 2
    assert main(["sensitivity", str(path), "--data", str(data), "-o", str(plan), "--quiet",
                 "--max-bits", "6"]) == 0
    saved = json.loads(plan.read_text())
    assert saved["format"] == "lowbit.mixed-precision/1" and len(saved["sensitivity"]) == 9
    out = tmp_path / "gpt.mixed.onnx"
    assert main(["quantize", str(path), "--data", str(data), "--plan", str(plan), "-o", str(out),
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "gpt.mixed.onnx.report.json").read_text())
    assert report["verification"]["checker"] == "passed"
    assert report["verification"]["agreement"]["cosine"] > 0.99
    assert out.stat().st_size < path.stat().st_size
