"""A chain of stages: every stage compared in the report (and a PNG), checkpoints after
each finished stage, and a resumed run that gives what an uninterrupted run gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lowbit import models
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.train import train_classifier
from lowbit.config import ClusterConfig, Int8Config, PruneConfig, QatConfig
from lowbit.errors import ValidationError
from lowbit.pipeline import run
from lowbit.stages import base

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cnn(digits):
    x_tr, y_tr, _, _ = digits
    return export_module(train_classifier(models.digits_cnn(), x_tr, y_tr, epochs=2, seed=0),
                         x_tr[:2])


def test_every_stage_is_compared_and_plotted(cnn, digits, tmp_path):
    x_tr, y_tr, x_te, y_te = digits
    result = run(cnn, [PruneConfig(sparsity=0.7, epochs=1), ClusterConfig(bits=4, epochs=1),
                       QatConfig(epochs=1, mode="static")], data=(x_tr, y_tr),
                 eval_data=(x_te, y_te))
    rows = result.report["stages_compared"]
    assert [r["stage"] for r in rows] == ["original", "1. prune", "2. cluster", "3. quantize-qat"]
    for row in rows:
        assert 0.5 < row["accuracy"] <= 1.0 and row["latency_ms"] > 0
        assert row["onnx_bytes"] > 0 and row["lbz_bytes"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[0]["top1_agreement"] == 1.0
    assert rows[2]["lbz_bytes"] < rows[1]["lbz_bytes"] < rows[0]["lbz_bytes"]
    assert rows[3]["onnx_bytes"] < 0.6 * rows[0]["onnx_bytes"]  # INT8 weights (+ QDQ nodes)
    out = result.save(tmp_path / "chain.lbz")
    plot = tmp_path / "chain.lbz.report.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.report["output"]["plot"] == str(plot) and out.exists()


def test_a_single_stage_is_not_compared_stage_by_stage(cnn, digits):
    x_tr, y_tr, _, _ = digits
    result = run(cnn, [Int8Config(mode="static")], data=(x_tr, y_tr))
    assert "stages_compared" not in result.report


STAGES = [PruneConfig(sparsity=0.6, epochs=1), ClusterConfig(bits=4, epochs=1),
          Int8Config(mode="static")]


def _interrupted(monkeypatch):
    def stop(config, ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(base._HANDLERS, Int8Config, stop)


def test_an_interrupted_run_resumes_after_its_last_finished_stage(cnn, digits, tmp_path,
                                                                   monkeypatch):
    x_tr, y_tr, _, _ = digits
    folder = tmp_path / "out.lbz.checkpoints"
    whole = run(cnn, STAGES, data=(x_tr, y_tr), verify=False)
    with monkeypatch.context() as m:
        _interrupted(m)
        with pytest.raises(KeyboardInterrupt):
            run(cnn, STAGES, data=(x_tr, y_tr), verify=False, checkpoints=folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "stage_0.npz", "stage_0.onnx", "stage_1.npz", "stage_1.onnx"]
    calls = []
    original = base._HANDLERS[PruneConfig]
    monkeypatch.setitem(base._HANDLERS, PruneConfig, lambda c, ctx: calls.append(c) or original(c, ctx))
    resumed = run(cnn, STAGES, data=(x_tr, y_tr), verify=False, checkpoints=folder, resume=True)
    assert calls == []  # the finished stages did not run again
    assert any(n.startswith("resumed after stage 2 (cluster)") for n in resumed.report["notes"])
    assert [s["kind"] for s in resumed.report["stages"]] == ["prune", "cluster", "quantize-int8"]
    for a, b in zip(whole.model.graph.initializer, resumed.model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    resumed.save(tmp_path / "out.lbz")
    assert not folder.exists()  # the output is written: the checkpoints are gone


def test_resume_refuses_checkpoints_of_another_recipe_or_model(cnn, digits, tmp_path,
                                                               monkeypatch):
    x_tr, y_tr, _, _ = digits
    folder = tmp_path / "ck"
    with monkeypatch.context() as m:
        _interrupted(m)
        with pytest.raises(KeyboardInterrupt):
            run(cnn, STAGES, data=(x_tr, y_tr), verify=False, checkpoints=folder)
    other = [PruneConfig(sparsity=0.5, epochs=1), *STAGES[1:]]
    with pytest.raises(ValidationError, match="another recipe"):
        run(cnn, other, data=(x_tr, y_tr), checkpoints=folder, resume=True)
    other_model = export_module(models.digits_cnn(), x_tr[:2])
    with pytest.raises(ValidationError, match="another model"):
        run(other_model, STAGES, data=(x_tr, y_tr), checkpoints=folder, resume=True)
    with pytest.raises(ValidationError, match="checkpoint folder"):
        run(cnn, STAGES, data=(x_tr, y_tr), resume=True)
