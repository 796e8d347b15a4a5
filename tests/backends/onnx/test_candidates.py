"""Whole-model INT8 decisions (issue 8): auto writes its plausible variants, times each
whole at the user's batch and threads beside float, and keeps the fastest (or, nearly as
fast, a clearly more accurate one). The report lists every candidate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import lowbit
from lowbit.backends.torch.export import export_module
from lowbit.cli import main
from lowbit.errors import ValidationError
from lowbit.quant.search import pick_fast_and_accurate


@pytest.mark.parametrize(("speeds", "quality", "kept"), [
    ([1.0, 1.5, 1.2], [40.0, 40.0, 40.0], 1),   # the fastest
    ([1.0, 1.5, 1.45], [40.0, 30.0, 34.0], 2),  # 3% slower, +4 dB: the accurate one
    ([1.0, 1.5, 1.4], [40.0, 30.0, 45.0], 1),   # 7% slower: speed wins
    ([1.0, 1.5, 1.45], [40.0, 30.0, 32.0], 1),  # +2 dB is not worth 3% of speed
    ([1.2, 1.2], [40.0, 40.0], 0),              # ties go to the earlier candidate
    ([1.0, 1.1], [18.2, 6.4], 0),               # 12 dB noisier and below 30 dB: never
    ([1.0, 1.3], [45.0, 31.0], 1),              # 14 dB worse but >= 30 dB: speed wins
])
def test_pick_rule(speeds, quality, kept):
    assert pick_fast_and_accurate(speeds, quality) == kept


class MnistStyle(torch.nn.Module):
    """The issue's case: a first Conv with one input channel (a tiny reduction)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3)
        self.c2 = torch.nn.Conv2d(16, 32, 3)
        self.f1 = torch.nn.Linear(32 * 5 * 5, 64)
        self.f2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.f2(torch.relu(self.f1(x.flatten(1))))


@pytest.fixture(scope="module")
def mnist_style(tmp_path_factory):
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((96, 1, 28, 28), dtype=np.float32)
    proto = export_module(MnistStyle().eval(), x[:2])
    path = tmp_path_factory.mktemp("cand") / "m.onnx"
    onnx.save(proto, str(path))
    return {"path": path, "x": x}


def _variant(model: onnx.ModelProto) -> str:
    """The variant the written model was built with (its plan's metadata)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta["lowbit.variant"])


def test_auto_times_whole_models_and_keeps_by_the_rule(mnist_style):
    qm = lowbit.quantize(str(mnist_style["path"]), mnist_style["x"], batch=8, threads=1)
    search = qm.report["candidates"]
    assert search["batch"] == 8 and search["threads"] == 1
    rows = search["candidates"]
    names = [r["name"] for r in rows]
    # the variants, each a different model (duplicates are not timed twice)
    assert names[0] == "auto" and "all static" in names and len(set(names)) == len(names) >= 3
    assert sum(r["kept"] for r in rows) == 1
    kept = next(i for i, r in enumerate(rows) if r["kept"])
    assert kept == pick_fast_and_accurate([r["speedup"] for r in rows],
                                          [r["sqnr_db"] for r in rows])
    assert all(r["speedup"] > 0 and np.isfinite(r["sqnr_db"]) for r in rows)
    # the model written is the kept one: its plan says so
    assert _variant(qm.model) == rows[kept]["name"]


def test_no_search_with_search_time_zero_or_a_fixed_mode(mnist_style):
    for kw in ({"search_time": 0.0}, {"mode": "static"}):
        config = lowbit.Int8Config(**kw)
        qm = lowbit.quantize(str(mnist_style["path"]), mnist_style["x"], config=config,
                             verify=False)
        assert "candidates" not in qm.report


def test_search_time_only_applies_to_auto():
    with pytest.raises(ValidationError, match="search_time"):
        lowbit.Int8Config(mode="static", search_time=2.0)
    with pytest.raises(ValidationError, match="search_time"):
        lowbit.Int8Config(search_time=-1.0)


def test_quality_target_rebuilds_keep_the_chosen_variant(mnist_style):
    qm = lowbit.quantize(str(mnist_style["path"]), mnist_style["x"],
                         config=lowbit.Int8Config(min_cosine=0.9999), verify=False)
    kept = next(r["name"] for r in qm.report["candidates"]["candidates"] if r["kept"])
    assert _variant(qm.model) == kept


def test_cli_search_time_and_mode_names(mnist_style, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=mnist_style["x"])
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(mnist_style["path"]), "-o", str(out), "--data", str(data),
                 "--search-time", "0", "--quiet"]) == 0
    assert main(["quantize", str(mnist_style["path"]), "-o", str(out), "--data", str(data),
                 "--mode", "static", "--search-time", "1"]) == 2
    assert "--search-time" in capsys.readouterr().err
    assert main(["quantize", str(mnist_style["path"]), "-o", str(out), "--data", str(data),
                 "--mode", "bogus"]) == 2
    assert "weight-only" in capsys.readouterr().err


def test_a_big_model_times_one_candidate_at_a_time(mnist_style, monkeypatch):
    """Over the float-timing size limit, no float session and one candidate alive at a
    time (memory): speeds relative to the first candidate, the kept one written."""
    from lowbit.backends.onnx import candidates

    monkeypatch.setattr(candidates, "FLOAT_TIMING_MAX_BYTES", 0)
    qm = lowbit.quantize(str(mnist_style["path"]), mnist_style["x"], verify=False)
    rows = qm.report["candidates"]["candidates"]
    assert rows[0]["speed_vs_first"] == 1.0 and all("speedup" not in r for r in rows)
    kept = next(i for i, r in enumerate(rows) if r["kept"])
    assert kept == pick_fast_and_accurate([r["speed_vs_first"] for r in rows],
                                          [r["sqnr_db"] for r in rows])
    assert _variant(qm.model) == rows[kept]["name"]
