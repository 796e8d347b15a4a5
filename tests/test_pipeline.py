"""The pipeline: stages over one in-memory model, loaded once, written once, encoded at
most once, verified once; stage lists checked before any work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import lowbit
from lowbit import models, pipeline
from lowbit.backends.onnx.weights import weight_initializers
from lowbit.backends.torch.export import export_module
from lowbit.backends.torch.train import train_classifier
from lowbit.config import (
    ClusterConfig,
    Int8Config,
    PruneConfig,
    StageConfig,
    StructuredPruneConfig,
    WeightOnlyConfig,
)
from lowbit.data import digits_split
from lowbit.errors import ValidationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lenet():
    x_tr, y_tr, x_te, y_te = digits_split()
    flat = x_tr.reshape(len(x_tr), -1)[:400]
    module = train_classifier(models.lenet_300_100(64), flat, y_tr[:400], epochs=2, seed=0)
    return export_module(module, flat[:2]), (flat, y_tr[:400]), \
        (x_te.reshape(len(x_te), -1)[:120], y_te[:120])


class Counts:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, int] = {}
        self._mp = monkeypatch

    def wrap(self, module: object, name: str) -> None:
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        self._mp.setattr(module, name, counted)


@pytest.fixture
def counts(monkeypatch):
    import lowbit.container as container
    import lowbit.model_io as model_io
    import lowbit.report.verify as verify_mod

    c = Counts(monkeypatch)
    c.wrap(model_io, "normalise")
    c.wrap(model_io, "load_model")
    c.wrap(container, "encode")
    c.wrap(pipeline, "verify_model")
    c.wrap(verify_mod, "measure_side_by_side")
    return c


def test_compress_loads_encodes_and_verifies_once(lenet, counts, tmp_path):
    proto, train, test = lenet
    path = tmp_path / "lenet.onnx"
    onnx.save(proto, path)
    cm = lowbit.compress(str(path), train, eval_data=test, sparsity=0.8, bits=4, epochs=1,
                         cluster_epochs=1)
    out = cm.save(tmp_path / "lenet.lbz")
    # each model is encoded once: the original and the pruned one for the stage table,
    # the clustered one (the output) for the file and the table alike; one verification
    assert counts.calls == {"normalise": 1, "encode": 3, "verify_model": 1,
                            "measure_side_by_side": 1}
    report = json.loads((tmp_path / "lenet.lbz.report.json").read_text())
    assert report["sizes"]["lbz_bytes"] == out.stat().st_size  # the one encoding is the file
    assert [s["kind"] for s in report["stages"]] == ["prune", "cluster"]
    assert set(report["settings"]) == {"prune", "cluster"}


def test_a_chain_of_every_weight_stage_then_int8_runs_in_one_pass(lenet, counts):
    proto, train, test = lenet
    result = lowbit.run(proto, [StructuredPruneConfig(sparsity=0.25), PruneConfig(sparsity=0.5),
                                ClusterConfig(bits=4), Int8Config(mode="static")],
                        data=train, eval_data=test)
    assert counts.calls.get("load_model") == 1 and counts.calls.get("verify_model") == 1
    assert counts.calls.get("encode") == 5  # once per model: the original and each stage's
    report = result.report
    assert len(report["stages_compared"]) == 5
    assert report["nodes"]["counts"]["int8-static"] == 3
    assert report["verification"]["checker"] == "passed"
    assert report["weight_sparsity"] >= 0.5
    # the quantized model holds the clustered, pruned weights: at most 16 distinct values
    for name in weight_initializers(result.fm):
        w = np.asarray(result.fm.constant(name))
        assert np.unique(w[w != 0]).size <= 16
    agreement = report["verification"]["agreement"]
    assert agreement["accuracy"]["compressed"] > 0.5


def test_quantize_writes_the_plan_once(lenet, monkeypatch):
    import lowbit.backends.onnx.quantize as q

    proto, train, test = lenet
    writes = []
    original = q.write_model
    monkeypatch.setattr(q, "write_model", lambda *a: writes.append(1) or original(*a))
    monkeypatch.setattr(pipeline, "write_model", lambda *a: writes.append("again") or original(*a))
    qm = lowbit.quantize(proto, train[0], mode="static", calibration="minmax", verify=False)
    assert writes == [1]  # the stage wrote the chosen plan; the run did not write it again
    assert qm.report["calibration"]["method"] == "minmax"


@pytest.mark.parametrize("stages", [
    [],
    [Int8Config(), PruneConfig(sparsity=0.5)],  # quantization must come last
    [Int8Config(), WeightOnlyConfig()],  # and only once
    ["prune"],
])
def test_bad_stage_lists_are_refused_before_any_work(lenet, counts, stages):
    with pytest.raises(ValidationError):
        lowbit.run(lenet[0], stages, data=lenet[1])
    assert counts.calls == {}


def test_an_unregistered_config_type_is_refused(lenet):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Unknown(StageConfig):
        pass

    with pytest.raises(ValidationError, match="Unknown"):
        lowbit.run(lenet[0], [Unknown()], data=lenet[1])


def test_api_quantize_refuses_config_and_options_together(lenet):
    with pytest.raises(ValidationError, match="either config or"):
        lowbit.quantize(lenet[0], lenet[1][0], mode="static", config=Int8Config())


def test_the_same_run_twice_gives_byte_identical_files(lenet, tmp_path):
    proto, train, _ = lenet
    stages = [PruneConfig(sparsity=0.7, epochs=1), ClusterConfig(bits=3)]
    a = lowbit.run(proto, stages, data=train, verify=False).save(tmp_path / "a.lbz", report=False)
    b = lowbit.run(proto, stages, data=train, verify=False).save(tmp_path / "b.lbz", report=False)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("later", [StructuredPruneConfig(sparsity=0.25, epochs=1),
                                   PruneConfig(sparsity=0.5, epochs=1),
                                   ClusterConfig(bits=4, epochs=1)])
def test_regression_a_later_training_stage_keeps_earlier_zeros(lenet, later):
    """Fine-tuning in a later stage regrew the weights an earlier prune stage removed."""
    proto, train, test = lenet
    first = lowbit.run(proto, [PruneConfig(sparsity=0.8)], data=train, verify=False)
    both = lowbit.run(proto, [PruneConfig(sparsity=0.8), later], data=train, eval_data=test,
                      verify=False)
    nonzero_before = nonzero_after = 0
    for name in weight_initializers(both.fm):
        before = np.asarray(first.fm.constant(name))
        after = np.asarray(both.fm.constant(name))
        if before.shape == after.shape:  # (structured pruning slices some)
            assert np.all(after[before == 0] == 0), name
        nonzero_before += np.count_nonzero(before)
        nonzero_after += np.count_nonzero(after)
    assert nonzero_after <= nonzero_before


def test_clustering_before_pruning_is_refused(lenet, counts):
    with pytest.raises(ValidationError, match="prune before clustering"):
        lowbit.run(lenet[0], [ClusterConfig(bits=4), PruneConfig(sparsity=0.5)], data=lenet[1])
    assert counts.calls == {}


def test_later_prune_stage_is_not_limited_by_earlier_skips():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "big"),
             numpy_helper.from_array(rng.standard_normal((32, 2)).astype(np.float32), "small")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("MatMul", ["h", "small"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = lowbit.run(model, [PruneConfig(sparsity=0.999), PruneConfig(sparsity=0.5)],
                        verify=False)
    small = np.asarray(result.fm.constant("small"))
    assert int(np.sum(small == 0)) >= 32  # the second stage pruned it, the first skipped it
