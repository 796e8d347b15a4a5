"""Training under torchrun: two CPU processes (gloo) give the result one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from lowbit import models
from lowbit.backends.torch.distributed import shard, world
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.train import train_classifier
from lowbit.data import digits_split


def test_outside_torchrun_there_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == (0, 1)


def test_shards_are_equal_and_cover_the_batch():
    import torch

    idx = torch.arange(7)
    parts = [shard(idx, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [4, 4]
    assert sorted(set(torch.cat(parts).tolist())) == list(range(7))


def _lowbit(*args: str, procs: int, cwd) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={procs}", "-m", "lowbit"] if procs > 1 else \
        [sys.executable, "-m", "lowbit"]
    done = subprocess.run([*launcher, *args, "--json"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    x_tr, y_tr, _, _ = digits_split()
    module = train_classifier(models.digits_cnn(), x_tr, y_tr, epochs=1, seed=0)
    onnx.save(export_module(module, x_tr[:2]), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "train.npz", x=x_tr[:800], y=y_tr[:800])
    args = ("prune", "cnn.onnx", "--sparsity", "0.5", "--data", "train.npz", "--epochs", "2")
    one = _lowbit(*args, "-o", "one.onnx", procs=1, cwd=tmp_path)
    two = _lowbit(*args, "-o", "two.onnx", procs=2, cwd=tmp_path)
    assert (tmp_path / "two.onnx").is_file() and (tmp_path / "two.onnx.report.json").is_file()
    assert set(one) == set(two)  # the same kind of result file
    (curve_one,), (curve_two,) = one["training"].values(), two["training"].values()
    np.testing.assert_allclose(curve_two, curve_one, rtol=1e-3)
    assert abs(one["verification"]["agreement"]["accuracy"]["compressed"]
               - two["verification"]["agreement"]["accuracy"]["compressed"]) <= 0.01
