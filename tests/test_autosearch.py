"""Accuracy-aware search: the result meets the target on the validation data, is much
smaller than the float model, the trajectory is recorded, a tiny budget still returns a
valid model and says so, min_cosine works without labels, and bad options are refused
before any work."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import lowbit
from lowbit import models
from lowbit.autosearch import parse_budget, search_compression
from lowbit.autosearch.path import Quantization, greedy_path, stages_for
from lowbit.autosearch.sensitivity import Sensitivity
from lowbit.autosearch.space import LEVELS, Layer
from lowbit.backends.onnx.session import make_session
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.train import train_classifier
from lowbit.container import encode
from lowbit.errors import DataError, ValidationError
from lowbit.metrics import accuracy, mean_cosine
from lowbit.pipeline import check_stages

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lenet(digits):
    """LeNet-300-100 on the flattened 8x8 digits, trained briefly."""
    x_tr, y_tr, x_te, _ = digits
    flat = x_tr.reshape(len(x_tr), -1)
    module = train_classifier(models.lenet_300_100(64), flat, y_tr, epochs=4, seed=0)
    return export_module(module, flat[:2]), flat, x_te.reshape(len(x_te), -1)


@pytest.fixture(scope="module")
def cnn(digits):
    x_tr, y_tr, _, _ = digits
    return export_module(train_classifier(models.digits_cnn(), x_tr, y_tr, epochs=2, seed=0),
                         x_tr[:2])


def _outputs(model, x):
    session = make_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_the_result_meets_max_drop_on_the_validation_data_and_is_much_smaller(lenet, digits):
    model, flat, flat_te = lenet
    _, y_tr, _, y_te = digits
    out = search_compression(model, (flat, y_tr), max_drop=0.5, budget_s=12, epochs=1,
                             eval_data=(flat_te, y_te))
    float_acc = 100 * accuracy(_outputs(model, flat_te), y_te)
    best_acc = 100 * accuracy(_outputs(out.best.model, flat_te), y_te)
    assert float_acc - best_acc <= 0.5  # measured here, not taken from the report
    section = out.report["search"]
    assert section["best"]["drop_points"] == pytest.approx(float_acc - best_acc, abs=1e-6)
    float_bytes = len(encode(model))
    assert len(encode(out.best.model)) * 3 < float_bytes  # (INT8 alone gives 3.7x)
    # the trajectory: the float start, then every configuration tried, with its numbers
    trials = out.trajectory
    assert trials[0].index == 0 and trials[0].valid and len(trials) >= 2
    assert section["configurations_tried"] == len(trials) - 1 == len(section["trajectory"]) - 1
    for t in trials[1:]:
        assert t.size_bytes > 0 and t.seconds > 0 and t.stages
        assert t.drop_points is not None or t.note.startswith("failed")
        assert t.valid == (t.drop_points is not None and t.drop_points <= 0.5)
    valid = [t for t in trials if t.valid]
    assert out.best_trial.size_bytes == min(t.size_bytes for t in valid)
    assert section["stopped"] == out.stopped and out.stopped.startswith(("converged", "budget"))
    assert "smaller than the float model" in out.summary and "limit 0.5" in out.summary
    assert section["sensitivity"]["layers"] and section["seconds"] < 12 + 15
    json.dumps(out.report)  # the report is plain JSON


def test_a_tiny_budget_returns_a_valid_model_and_says_the_budget_ran_out(lenet, digits,
                                                                         tmp_path):
    model, flat, _ = lenet
    start = time.perf_counter()
    out = lowbit.search_compression(model, (flat, digits[1]), max_drop=0.5, budget_s=1.0)
    assert time.perf_counter() - start < 6  # no step was started that could not finish
    assert out.stopped.startswith("budget spent") and "budget" in out.summary
    assert out.best_trial.valid and out.report["search"]["best"]["drop_points"] <= 0.5
    saved = out.save(tmp_path / "best.lbz")
    report = json.loads((tmp_path / "best.lbz.report.json").read_text())
    assert report["search"]["stopped"] == out.stopped and saved.stat().st_size > 0
    assert report["verification"]["checker"] == "passed"


def test_min_cosine_works_without_labels(cnn, digits):
    x_tr = digits[0]
    out = search_compression(cnn, x_tr, min_cosine=0.99, budget_s=10, epochs=1)
    held = x_tr[-287:]  # the last 20%, held back from training and sensitivity
    cosine = mean_cosine(_outputs(cnn, held), _outputs(out.best.model, held))
    assert cosine >= 0.99
    assert all(t.drop_points is None for t in out.trajectory[1:])
    assert out.report["search"]["validation"]["samples"] == 287
    assert len(encode(out.best.model)) * 2 < len(encode(cnn))
    with pytest.raises(DataError, match="labels"):
        search_compression(cnn, x_tr, max_drop=0.5, budget_s=10)


def test_latency_objective_times_every_configuration(lenet, digits):
    model, flat, _ = lenet
    out = search_compression(model, (flat, digits[1]), max_drop=1.0, budget_s=8, epochs=1,
                             objective="latency", techniques=("structured",))
    assert all(t.latency_ratio is not None for t in out.trajectory[1:] if not t.note)
    assert out.best_trial.latency_ratio <= 1.0 and out.best_trial.valid
    assert out.report["search"]["objective"] == "latency"


@pytest.mark.parametrize("options, option", [
    ({"max_drop": 0.5, "min_cosine": 0.99}, "max_drop and min_cosine"),
    ({}, "max_drop and min_cosine"),
    ({"max_drop": -0.1}, "max_drop"),
    ({"min_cosine": 1.5}, "min_cosine"),
    ({"max_drop": 0.5, "budget_s": -5}, "budget_s"),
    ({"max_drop": 0.5, "budget_s": 0}, "budget_s"),
    ({"max_drop": 0.5, "objective": "speed"}, "objective"),
    ({"max_drop": 0.5, "techniques": ("prune", "quantum")}, "techniques"),
    ({"max_drop": 0.5, "techniques": ()}, "techniques"),
    ({"max_drop": 0.5, "epochs": -1}, "epochs"),
    ({"max_drop": 0.5, "threads": 0}, "threads"),
])
def test_bad_options_are_refused_before_any_work(options, option, tmp_path):
    # the model does not exist: touching it would be a ModelLoadError, not this
    with pytest.raises(ValidationError, match=option):
        search_compression(tmp_path / "missing.onnx", "missing.npz", **options)


def test_a_budget_reads_as_a_duration():
    assert [parse_budget(v) for v in ("10m", "90", "45s", "1.5h")] == [600.0, 90.0, 45.0, 5400.0]
    for bad in ("-1m", "0", "soon", "10x"):
        with pytest.raises(ValidationError, match="budget"):
            parse_budget(bad)


def test_data_is_required():
    with pytest.raises(ValidationError, match="data"):
        search_compression("missing.onnx", None, max_drop=0.5)


def _table() -> tuple[list[Layer], Sensitivity]:
    layers = [Layer("big", "w1", "Gemm", 10_000, 10_000.0, 1),
              Layer("small", "w2", "Gemm", 1_000, 1_000.0, 1)]
    levels = {"prune": LEVELS["prune"], "cluster": LEVELS["cluster"]}
    table = Sensitivity(levels=levels)
    table.losses = {"big": {"prune": [0.0, 0.1, 0.3, 1.0, 3.0],
                            "cluster": [0.0, 0.0, 0.1, 0.2, 2.0]},
                    "small": {"prune": [0.5, 0.4, 2.0, 5.0, None],  # (0.4: noise)
                              "cluster": [0.0, 0.1, 0.3, 0.6, 1.0]}}
    return layers, table


def test_the_path_grows_in_predicted_loss_and_shrinks_in_estimated_size():
    layers, table = _table()
    assert table.envelope("small", "prune") == [0.5, 0.5, 2.0, 5.0, None]
    path = greedy_path(layers, table, objective="size", target=0.5)
    losses = [p.predicted_loss for p in path]
    sizes = [p.estimate for p in path]
    assert losses == sorted(losses) and sizes == sorted(sizes, reverse=True)
    assert path[0].choices == (("big", "cluster", 6),)  # the cheapest gain first
    strongest = dict(((n, t), lv) for n, t, lv in path[-1].choices)
    assert strongest == {("big", "prune"): 0.95, ("big", "cluster"): 3,
                         ("small", "prune"): 0.9, ("small", "cluster"): 3}


def test_a_plan_becomes_stages_the_pipeline_accepts():
    layers, table = _table()
    plan = greedy_path(layers, table, objective="size", target=0.5)[-1]
    stages = stages_for(plan, epochs=2, seed=0, quantize=Quantization(("small",), "minmax"))
    check_stages(stages)
    kinds = [s.kind for s in stages]
    assert kinds == ["prune", "prune", "cluster", "quantize-qat"]
    assert [s.epochs for s in stages] == [0, 2, 1, 1]  # fine-tuning in each technique's last
    assert stages[0].layers == ("small",) and stages[1].layers == ("big",)
    assert stages[-1].exclude_nodes == ("small",)
    assert np.isclose(stages[1].sparsity, 0.95)


def test_the_cli_searches_with_max_drop_and_a_budget(cnn, digits, tmp_path, capsys):
    from lowbit.cli import main

    x_tr, y_tr, x_te, y_te = digits
    import onnx

    onnx.save(cnn, tmp_path / "cnn.onnx")
    np.savez(tmp_path / "train.npz", x=x_tr, y=y_tr)
    np.savez(tmp_path / "val.npz", x=x_te, y=y_te)
    args = ["compress", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "cnn.lbz"), "--data",
            str(tmp_path / "train.npz"), "--val", str(tmp_path / "val.npz")]
    assert main([*args, "--max-drop", "1", "--budget", "15s", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["search"]["best"]["index"] >= 0 and (tmp_path / "cnn.lbz").is_file()
    assert main([*args, "--max-drop", "1", "--recipe", "edge"]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert main([*args, "--max-drop", "1", "--budget", "soon"]) == 2
    assert "--budget" in capsys.readouterr().err
