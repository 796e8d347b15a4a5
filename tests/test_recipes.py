"""Recipes (issue 10): the YAML format, the built-in recipes, every refusal naming the
file and line before any work, and ``lowbit compress --recipe`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from lowbit.cli import main
from lowbit.config import (
    ClusterConfig,
    DistillSettings,
    PruneConfig,
    QatConfig,
    StructuredPruneConfig,
)
from lowbit.config.recipe import (
    STAGE_ALIASES,
    Recipe,
    builtin_recipe_text,
    builtin_recipes,
    load_recipe,
    recipe_from_text,
)
from lowbit.errors import DataError, ValidationError
from lowbit.pipeline import check_stages

FULL = """\
name: my-edge
description: a small model for a phone
distill: {temperature: 3, alpha: 0.5}
stages:
  - structured-prune: {sparsity: 0.5, epochs: 2}
  - prune:
      sparsity: 0.8
      epochs: 3
      lr: 1e-4
  - cluster: {bits: 4, epochs: 1}
  - qat
"""


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ----------------------------------------------------------------- the format


def test_a_full_recipe_parses_into_configs():
    r = recipe_from_text(FULL, "edge.yaml")
    assert r.name == "my-edge" and r.description == "a small model for a phone"
    assert r.distill == DistillSettings(temperature=3, alpha=0.5)
    assert [type(c) for c in r.stages] == [StructuredPruneConfig, PruneConfig, ClusterConfig,
                                           QatConfig]
    assert r.stages[0].sparsity == 0.5 and r.stages[0].epochs == 2
    assert r.stages[1].lr == 1e-4  # a YAML 1.2 float without a dot is a number, not text
    assert r.stages[2].bits == 4
    assert r.stages[3] == QatConfig()  # a bare name: the stage's defaults
    assert r.to_dict()["stages"][1]["kind"] == "prune"


@pytest.mark.parametrize("alias", sorted(STAGE_ALIASES))
def test_every_short_name_is_its_kind(alias):
    options = {"mixed": "{layers: {fc: int8}}", "mixed-precision": "{layers: {fc: int8}}"}
    r = recipe_from_text(f"stages:\n  - {alias}: {options.get(alias, '{}')}\n", "a.yaml")
    assert r.stages[0].kind == STAGE_ALIASES[alias]


def test_the_other_stage_forms_and_distill_true():
    r = recipe_from_text("distill: true\nstages:\n  - {kind: prune, sparsity: 0.3}\n"
                         "  - cluster:\n", "x.yaml", name="fallback")
    assert r.name == "fallback" and r.distill == DistillSettings()
    assert r.stages == (PruneConfig(sparsity=0.3), ClusterConfig())
    assert recipe_from_text("distill: false\nstages: [int8]\n").distill is None


def test_every_builtin_recipe_loads_and_can_run():
    names = builtin_recipes()
    assert {"int8", "int8-qat", "deep-compression", "edge"} <= set(names)
    for name, description in names.items():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description == description and description
        check_stages(list(recipe.stages))  # the pipeline's own order check agrees
        # the YAML shown to users reads back as the same recipe
        assert recipe_from_text(builtin_recipe_text(name), "copy.yaml") == recipe
    edge = load_recipe("edge")
    assert [c.kind for c in edge.stages] == ["prune-structured", "prune", "cluster",
                                             "quantize-qat"]
    assert edge.distill is not None and edge.stages[2].bits == 4


def test_a_recipe_file_is_named_after_it(tmp_path):
    path = tmp_path / "tiny.yml"
    path.write_text("stages:\n  - prune: {sparsity: 0.5}\n")
    assert load_recipe(path).name == "tiny" and lowbit.load_recipe(str(path)).name == "tiny"
    with pytest.raises(ValidationError, match=r"recipe .*nope\.yaml: not found$"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ValidationError, match="built-in recipes: int8, "):
        load_recipe("edgy")


# ----------------------------------------------------------------- refusals

BAD = [
    ("unknown key", "stages:\n  - prune: {sparsity: 0.5}\nstagse: []\n", 3,
     ["unknown key 'stagse'", "name, description, distill, stages"]),
    ("unknown stage", "stages:\n  - int8\n  - prun: {sparsity: 0.5}\n", 3,
     ["stage 2: unknown stage 'prun'", "known: cluster, distill, prune", "qat (quantize-qat)"]),
    ("unknown option", "stages:\n  - prune:\n      sparsity: 0.5\n      epoch: 3\n", 4,
     ["stage 1 (prune): unknown option 'epoch'", "known: epochs"]),
    ("bad value", "stages:\n  - prune:\n      epochs: 1\n      sparsity: 1.5\n", 4,
     ["stage 1 (prune): option sparsity: 1.5 must be a number in [0.0, 1.0)"]),
    ("wrong type", "stages:\n  - prune: {sparsity: 0.5}\n  - cluster: {bits: four}\n", 3,
     ["stage 2 (cluster): option bits: 'four' must be an integer"]),
    ("wrong type of options", "stages:\n  - prune: 0.5\n", 2,
     ["stage 1 (prune): expected a mapping of options"]),
    ("cluster after QAT", "stages:\n  - prune: {sparsity: 0.5}\n  - qat: {weight_bits: 4}\n"
     "  - cluster: {bits: 4}\n", 4,
     ["stage 3 (cluster) comes after stage 2 (quantize-qat)", "quantizes at most once"]),
    ("prune after cluster", "stages:\n  - cluster: {bits: 4}\n  - structured-prune\n", 3,
     ["stage 2 (prune-structured) comes after stage 1 (cluster)", "prune before clustering"]),
    ("empty stages", "name: x\nstages: []\n", 2, ["'stages' is empty"]),
    ("no stages", "name: x\n", 1, ["no 'stages' key"]),
    ("stages not a list", "stages: {prune: {}}\n", 1, ["'stages' must be a list"]),
    ("options not indented", "stages:\n  - prune:\n    sparsity: 0.5\n", 2,
     ["one stage per list item", "got keys prune, sparsity"]),
    ("a key twice", "stages:\n  - cluster:\n      bits: 4\n      bits: 5\n", 4,
     ["key 'bits' is given twice (first on line 3)"]),
    ("bad distill", "distill: {temperature: 4, alpha: 2}\nstages: [qat]\n", 1,
     ["distill: option alpha: 2 must be a number in [0.0, 1.0]"]),
    ("not YAML", "stages:\n  - prune: {sparsity: 0.5\n", 3, ["not valid YAML"]),
    ("a python tag", "stages:\n  - !!python/object/apply:os.system [ls]\n", 2,
     ["tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"]),
    ("not a mapping", "- prune\n", 1, ["a recipe is a mapping"]),
]


@pytest.mark.parametrize("what,text,line,fragments", BAD, ids=[b[0] for b in BAD])
def test_a_bad_recipe_names_the_file_and_line(what, text, line, fragments):
    with pytest.raises(ValidationError) as info:
        recipe_from_text(text, "my.yaml")
    message = str(info.value)
    assert message.startswith(f"my.yaml:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ValidationError, match="empty.yaml: empty recipe"):
        load_recipe(path)


def test_a_recipe_made_in_python_is_checked_too():
    with pytest.raises(ValidationError, match=r"stage 2 \(cluster\) comes after stage 1"):
        Recipe(name="x", stages=(QatConfig(), ClusterConfig()))
    with pytest.raises(ValidationError, match="stages must be a list of configs"):
        Recipe(name="x", stages=("prune",))  # type: ignore[arg-type]


def test_the_api_refuses_before_reading_the_model(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ValidationError, match="option sparsity, bits: does not apply with a "
                                              "recipe"):
        lowbit.compress(missing, "train.npz", recipe="edge", sparsity=0.5, bits=4)
    with pytest.raises(DataError, match=r"recipe int8-qat: stage 1 \(quantize-qat\) fine-tunes "
                                        r"for 2 epoch\(s\) and needs data with labels"):
        lowbit.compress(missing, recipe="int8-qat")


def test_the_cli_refuses_a_bad_recipe_in_one_line_before_the_model(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stages:\n  - prune: {sparsity: 0.5}\n  - qat: {weight_bits: 4}\n"
                      "  - cluster: {bits: 4}\n")
    # the model does not exist: the recipe's error comes first, so nothing was read
    rc, out, err = run_cli(capsys, "compress", tmp_path / "missing.onnx", "-o",
                           tmp_path / "o.lbz", "--recipe", recipe, "--data", tmp_path / "d.npz")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {recipe}:4: stage 3 (cluster)"), err
    assert not (tmp_path / "o.lbz").exists()
    rc, _, err = run_cli(capsys, "compress", tmp_path / "missing.onnx", "-o",
                         tmp_path / "o.lbz", "--recipe", "edge", "--sparsity", "0.5")
    assert rc == 2 and "option --sparsity: does not apply with --recipe" in err


def test_the_cli_lists_and_shows_the_builtin_recipes(capsys):
    rc, out, _ = run_cli(capsys, "compress", "--list-recipes")
    assert rc == 0 and all(name in out for name in builtin_recipes())
    rc, out, _ = run_cli(capsys, "compress", "--show-recipe", "edge")
    assert rc == 0 and recipe_from_text(out) == load_recipe("edge")


# ----------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[str, Path]:
    """digits_cnn trained 1 epoch, its training and validation data (the tests that
    use it fine-tune on one torch thread)."""
    from lowbit.backends.torch.export import export_module
    from lowbit.backends.torch.train import train_classifier
    from lowbit.data import digits_split
    from lowbit.models import digits_cnn

    d = tmp_path_factory.mktemp("recipes")
    x_tr, y_tr, x_te, y_te = digits_split(0)
    x_tr, y_tr = x_tr[:600], y_tr[:600]
    module = train_classifier(digits_cnn(), x_tr, y_tr, epochs=1, seed=0)
    onnx.save(export_module(module, x_tr[:2]), str(d / "cnn.onnx"))
    np.savez(d / "train.npz", x=x_tr, y=y_tr)
    np.savez(d / "val.npz", x=x_te[:200], y=y_te[:200])
    return {"dir": d, "model": d / "cnn.onnx", "train": d / "train.npz", "val": d / "val.npz"}


def test_compress_runs_a_yaml_recipe_end_to_end(digits, tmp_path, capsys):
    recipe = tmp_path / "small.yaml"
    recipe.write_text("name: small\nstages:\n  - prune: {sparsity: 0.5, epochs: 1}\n"
                      "  - qat: {epochs: 1, search_time: 0}\n")
    out = tmp_path / "cnn.small.onnx"
    rc, _, err = run_cli(capsys, "compress", digits["model"], "-o", out, "--recipe", recipe,
                         "--data", digits["train"], "--val", digits["val"], "--quiet")
    assert rc == 0, err
    model = onnx.load(str(out))
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node} or \
        "DynamicQuantizeLinear" in {n.op_type for n in model.graph.node}
    report = json.loads((tmp_path / "cnn.small.onnx.report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["prune", "quantize-qat"]
    assert report["stages"][0]["sparsity"] == 0.5 and report["stages"][1]["epochs"] == 1
    assert report["recipe"]["name"] == "small"
    assert report["tool"] == "lowbit compress (recipe small)"
    assert report["verification"]["agreement"]["accuracy"]["compressed"] > 0.5
    assert not (tmp_path / "cnn.small.onnx.checkpoints").exists()  # removed once saved


def test_resume_refuses_checkpoints_of_another_recipe(digits, tmp_path, capsys):
    first = tmp_path / "first.yaml"
    first.write_text("stages:\n  - prune: {sparsity: 0.5}\n  - cluster: {bits: 4}\n")
    other = tmp_path / "other.yaml"
    other.write_text("stages:\n  - prune: {sparsity: 0.6}\n  - cluster: {bits: 4}\n")
    out = tmp_path / "cnn.lbz"
    folder = tmp_path / "cnn.lbz.checkpoints"
    # a run that stopped before saving leaves its checkpoints
    lowbit.compress(str(digits["model"]), str(digits["train"]), recipe=first,
                    checkpoints=folder)
    assert folder.is_dir()
    rc, _, err = run_cli(capsys, "compress", digits["model"], "-o", out, "--recipe", other,
                         "--data", digits["train"], "--resume", "--quiet")
    assert rc == 2 and "another recipe" in err and err.count("\n") == 1, err
    assert not out.exists() and folder.is_dir()
    rc, _, err = run_cli(capsys, "compress", digits["model"], "-o", out, "--recipe", first,
                         "--data", digits["train"], "--resume", "--quiet")
    assert rc == 0, err
    report = json.loads((tmp_path / "cnn.lbz.report.json").read_text())
    assert any(note.startswith("resumed after stage 2 (cluster)") for note in report["notes"])
    assert not folder.exists()
