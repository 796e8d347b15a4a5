"""Quantize time and memory on large inputs (issue 12 §5): the calibration batch comes from
the activation bytes per sample, tensors are observed in groups where one run's do not fit,
the method search and candidate scoring run on a few samples, and timing is bounded by the
time budget (none at all when nothing was quantized)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.backends.onnx import calibrate as calibrate_module
from lowbit.backends.onnx import quantize as quantize_module
from lowbit.backends.onnx import speed_probe
from lowbit.backends.onnx.calibrate import run_calibration
from lowbit.backends.onnx.candidates import MIN_ROUNDS
from lowbit.backends.onnx.load import normalise
from lowbit.backends.onnx.quantize import quantize_int8, selection_size
from lowbit.config import Int8Config
from lowbit.data import Dataset
from lowbit.report import verify as verify_module


def wide_model(batch: int | str = "N", channels: int = 16, side: int = 64,
               width: int = 32, depthwise: int = 0) -> onnx.ModelProto:
    """Conv 3x3 (+Relu) x3 at full resolution, optional depthwise 3x3 convs, then global
    pooling and a Gemm: wide activations, a small model."""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", channels
    for i in range(3):
        w = (rng.standard_normal((width, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32),
                                          f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, c = f"r{i}", width
    for i in range(depthwise):  # reduction 1 x 3 x 3 = 9: probed for speed
        w = (rng.standard_normal((c, 1, 3, 3)) / 3.0).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"dw{i}"))
        nodes += [helper.make_node("Conv", [x, f"dw{i}"], [f"d{i}"], pads=[1, 1, 1, 1], group=c),
                  helper.make_node("Relu", [f"d{i}"], [f"dr{i}"])]
        x = f"dr{i}"
    inits += [numpy_helper.from_array((rng.standard_normal((10, c)) / np.sqrt(c)).astype(
        np.float32), "fc_w"), numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      [batch, channels, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _data(n: int, channels: int = 16, side: int = 64) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, channels, side, side)).astype(np.float32)


def _row_bytes(observers, inputs=("x",)) -> float:
    """Bytes per row of the observed tensors the model computes (not its inputs)."""
    return float(sum(np.prod(o.batch_shape[1:]) * 4 for t, o in observers.items()
                     if t not in inputs))


# ----------------------------------------------------------------- calibration batch


def test_calibration_batch_is_chosen_from_activation_bytes_per_sample():
    fm = normalise(wide_model())
    data = Dataset({"x": _data(20)})
    tensors = ["x", "r0", "r1", "r2"]
    full = run_calibration(fm, data, tensors, batch_size=32)
    per_row = _row_bytes(full.observers)
    assert full.bytes_per_sample == pytest.approx(per_row)  # (from the inferred shapes)
    assert full.batch == 32 and full.passes == 1  # small enough: the configured batch
    budget = int(3.5 * per_row)
    small = run_calibration(fm, data, tensors, batch_size=32, run_bytes=budget)
    assert small.batch == 3 and small.passes == 1
    assert all(o.batch_shape[0] == 3 for o in small.observers.values())
    for t in tensors:  # every value was seen, in runs of 3 rows
        assert small.observers[t].seen == full.observers[t].seen
        assert small.observers[t].min == full.observers[t].min
        assert small.observers[t].max == full.observers[t].max


def test_unknown_shapes_are_measured_on_one_row():
    model = wide_model()
    fm = normalise(model)
    del fm.proto.graph.value_info[:]  # no inferred shapes: one probe row measures them
    data = Dataset({"x": _data(6)})
    run = run_calibration(fm, data, ["r0", "r1", "r2"], batch_size=32)
    assert run.bytes_per_sample == pytest.approx(_row_bytes(run.observers))
    assert run.observers["r2"].seen == 6 * 32 * 64 * 64  # the probe row is not counted


def test_tensors_are_observed_in_groups_when_one_run_does_not_fit():
    fm = normalise(wide_model(batch=1))  # a fixed batch: nothing to shrink
    data = Dataset({"x": _data(5)}, fixed_batch=1)
    tensors = ["x", "r0", "r1", "r2"]
    one_pass = run_calibration(fm, data, tensors, batch_size=32)
    per_tensor = 32 * 64 * 64 * 4
    grouped = run_calibration(fm, data, tensors, batch_size=32, run_bytes=per_tensor + 1)
    assert one_pass.passes == 1 and grouped.passes == 3
    for t in tensors:  # the same runs: the same histograms
        a, b = one_pass.observers[t], grouped.observers[t]
        assert (a.min, a.max, a.seen, a.radius) == (b.min, b.max, b.seen, b.radius)
        assert np.array_equal(a.counts, b.counts)


def test_quantize_uses_the_chosen_batch(monkeypatch):
    fm = normalise(wide_model())
    x = _data(12)
    per_row = 3 * 32 * 64 * 64 * 4  # r0, r1, r2 (the rest is tiny)
    monkeypatch.setattr(calibrate_module, "RUN_BYTES", int(2.5 * per_row))
    out = quantize_int8(fm, Dataset({"x": x}), Int8Config(mode="static", calibration="minmax"))
    assert out.calibration["batch"] == 2 and out.calibration["passes"] == 1
    assert out.calibration["activation_mb_per_sample"] == pytest.approx(per_row / 2**20, rel=0.01)


# --------------------------------------------------------- selection and timing


def test_selection_is_a_few_samples_for_large_activations():
    mb = 2**20
    assert selection_size(48, 155 * mb) == 4  # the DBNet-style detector at 736x1216 (L1)
    assert selection_size(48, 434 * mb) == 4  # PP-OCRv4's detector at 736x1216
    assert selection_size(256, 42 * mb) == 12  # PP-OCRv4's recognizer at 3x48x320
    assert selection_size(48, 1200 * mb) == 4  # never fewer than MIN_SELECTION_SAMPLES
    assert selection_size(128, 6.75 * mb) == 64  # MiniLM at seq 64: unchanged
    assert selection_size(500, 10 * 1024) == 64  # small models: unchanged
    assert selection_size(3, 1200 * mb) == 3
    assert selection_size(500, None) == 64


@pytest.fixture(scope="module")
def slow_wide(tmp_path_factory):
    """A fixed-batch model whose runs take tens of milliseconds, with a Gemm so that auto
    has several candidates."""
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    onnx.save(wide_model(batch=1, channels=16, side=160, width=32), str(path))
    return {"path": path, "x": _data(10, 16, 160)}


def test_timing_is_bounded_by_the_budget(slow_wide, monkeypatch):
    monkeypatch.setattr(quantize_module, "SELECTION_BYTES", 1)  # score on 4 samples
    qm = lowbit.quantize(str(slow_wide["path"]), slow_wide["x"], threads=1, verify=False,
                         config=Int8Config(search_time=0.2))
    search, cal = qm.report["candidates"], qm.report["calibration"]
    assert len(search["candidates"]) >= 2
    # one round of 4+ models takes longer than the budget: the fewest rounds, no second
    assert search["iterations"] == MIN_ROUNDS
    assert cal["batch"] == 1 and cal["selection_samples"] == 4
    assert {"calibrate", "speed_probe", "choose_and_write", "search"} <= set(qm.report["seconds"])


def test_verification_timing_is_bounded(monkeypatch):
    import time

    class Slow:
        def run(self, outputs, feed):
            time.sleep(0.02)

    monkeypatch.setattr(verify_module, "TIMING_SECONDS", 0.1)
    assert verify_module._timing_runs([Slow(), Slow()], {}, 50) == (5, 1)
    monkeypatch.setattr(verify_module, "TIMING_SECONDS", 100.0)
    assert verify_module._timing_runs([Slow(), Slow()], {}, 50) == (50, 5)


def test_nothing_quantized_is_not_timed(tmp_path, monkeypatch):
    model = wide_model(side=16)
    model.graph.node.pop()  # drop the Gemm: Convs only, which dynamic mode leaves float
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("flat", TensorProto.FLOAT,
                                                                 ["N", 32]))
    onnx.save(model, str(tmp_path / "convs.onnx"))

    def no_timing(*args, **kwargs):
        raise AssertionError("timed a model that was not changed")

    monkeypatch.setattr(verify_module, "measure_side_by_side", no_timing)
    qm = lowbit.quantize(str(tmp_path / "convs.onnx"), _data(10, side=16), mode="dynamic")
    ver = qm.report["verification"]
    assert "latency" not in ver and "not timed" in ver["latency_note"]
    assert not any(f["kind"] == "not_faster" for f in ver["flags"])
    assert ver["agreement"]["sqnr_db"] >= 100


def test_speed_probe_times_alike_convs_once(monkeypatch):
    fm = normalise(wide_model(side=16, depthwise=3))
    calls = []

    def fake(node, weight, bias, in_shape, *, threads=1, budget_s=0.3):
        calls.append(node.name)
        return 2.0, 1.0, 2.0

    monkeypatch.setattr(speed_probe, "conv_int8_slowdown", fake)
    observers = run_calibration(fm, Dataset({"x": _data(4, side=16)}), ["r2", "dr0", "dr1"],
                                batch_size=4).observers
    convs = [n.name for n in fm.proto.graph.node if n.op_type == "Conv"]
    slow = speed_probe.slow_int8_convs(fm, convs, observers, threads=1)
    assert len(calls) == 1  # three depthwise convs alike: timed once
    assert len(slow) == 3 and all("2.00x slower" in why for why in slow.values())


# ------------------------------------------------------- threads of untimed runs


def _timed_sessions(monkeypatch, fast: int, many: int = 4):
    """Calibration sessions made through ``calibrate._session``, recorded by thread count;
    a run at ``fast`` threads is quick, any other sleeps (a stand-in for a busy or an idle
    machine)."""
    import time

    made: list[int] = []
    real = calibrate_module._session

    class Timed:
        def __init__(self, session, threads):
            self.session, self.threads = session, threads

        def run(self, names, feed):
            if self.threads != fast:
                time.sleep(0.05)
            return self.session.run(names, feed)

    def fake(model, group, threads):
        made.append(threads)
        return Timed(real(model, group, threads), threads)

    monkeypatch.setattr(calibrate_module, "work_threads", lambda threads=1: max(threads, many))
    monkeypatch.setattr(calibrate_module, "_session", fake)
    return made


@pytest.mark.parametrize("fast, chosen, sessions", [(4, 4, [4, 1, 4]), (1, 1, [4, 1])])
def test_calibration_runs_at_the_threads_that_measure_faster(monkeypatch, fast, chosen, sessions):
    fm = normalise(wide_model(batch=1, side=16))
    data = Dataset({"x": _data(10, side=16)}, fixed_batch=1)
    tensors = ["x", "r0", "r1", "r2"]
    plain = run_calibration(fm, data, tensors, batch_size=8)  # (this machine's CPUs)
    made = _timed_sessions(monkeypatch, fast)
    run = run_calibration(fm, data, tensors, batch_size=8)
    assert made == sessions and run.threads == chosen
    for t in tensors:  # every sample observed once, whatever the sessions: the same histograms
        a, b = plain.observers[t], run.observers[t]
        assert (a.min, a.max, a.seen) == (b.min, b.max, b.seen)
        assert np.array_equal(a.counts, b.counts)


def test_a_short_calibration_runs_at_the_given_threads(monkeypatch):
    fm = normalise(wide_model(batch=1, side=16))
    made = _timed_sessions(monkeypatch, fast=4)
    run = run_calibration(fm, Dataset({"x": _data(calibrate_module.TRIAL_RUNS - 1, side=16)},
                                      fixed_batch=1), ["r0", "r2"], batch_size=8, threads=2)
    assert made == [2] and run.threads == 2  # too few runs to try: no second session


def test_methods_are_scored_at_the_calibration_threads(monkeypatch):
    fm = normalise(wide_model(batch=1, side=16))
    _timed_sessions(monkeypatch, fast=4)
    made: list[tuple[str, int]] = []
    real = quantize_module.make_session

    def spy(model, *, threads=1, name="model", **kwargs):
        made.append((name, threads))
        return real(model, threads=threads, name=name, **kwargs)

    monkeypatch.setattr(quantize_module, "make_session", spy)
    out = quantize_int8(fm, Dataset({"x": _data(10, side=16)}, fixed_batch=1),
                        Int8Config(mode="static", calibration="auto"), batch=1)
    assert out.calibration["threads"] == 4
    assert made and all(threads == 4 for _, threads in made)  # the reference and 4 methods
    assert sum(name == "quantized candidate" for name, _ in made) == 4
