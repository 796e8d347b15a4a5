"""Accuracy-aware search: the most compressed configuration (by .lbz size or by latency)
whose quality on validation data stays within a target, found within a time budget.

1. The validation data (``eval_data``, else the last 20% of ``data``) is never trained
   or calibrated on; the float model's accuracy (or cosine 1) there is the reference.
2. The float model is the valid start (#0); INT8 post-training comes next (and, if it
   misses, INT8 with its most sensitive layers kept in float). Each valid result better
   for the objective replaces the best so far: the search never ends with nothing.
3. Per-layer sensitivity, post-training, on calibration samples of the training part.
4. A greedy path of ever stronger per-layer choices (``path.py``); each configuration
   tried runs through ``lowbit.pipeline.run`` with short fine-tuning and is measured on
   the validation data. The search grows (x4 in predicted loss) after a success and
   bisects after a failure; once converged it retries the first failure with twice the
   fine-tuning. A step starts only if its estimated time (from the steps before) fits.

    >>> out = search_compression("cnn.onnx", "train.npz", max_drop=0.5, budget_s=600)  # doctest: +SKIP
    >>> print(out.summary); out.save("cnn.lbz")                                           # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any

from lowbit.autosearch.costs import QUANTIZE_KINDS, Costs
from lowbit.autosearch.outcome import SearchOutcome, Trial, search_section, summary_text
from lowbit.autosearch.path import (
    Plan,
    Quantization,
    greedy_path,
    index_within,
    int8_saving,
    midpoint,
    stages_for,
)
from lowbit.autosearch.sensitivity import (
    Measured,
    Scorer,
    measure_sensitivity,
    spread,
    subset,
)
from lowbit.autosearch.space import LEVELS, check_options, model_layers, total_macs
from lowbit.autosearch.start import SearchData, float_start, latency_ratio, load
from lowbit.config import Int8Config, StageConfig, check_run_settings
from lowbit.container import encode
from lowbit.errors import ValidationError
from lowbit.pipeline import CompressedModel, run
from lowbit.report.verify import verify
from lowbit.stages.base import ProgressFn

SENSITIVITY_SHARE = 0.35  # of the time left, at most, for the sensitivity measurements
SENSITIVITY_SAMPLES = (64, 512)
GROW = 4.0  # after a success, the next try predicts up to this many times the loss
EPOCH_DOUBLINGS = 2  # retries of the first failure with more fine-tuning, once converged


def search_compression(model: Any, data: Any, *, max_drop: float | None = None,
                       min_cosine: float | None = None, budget_s: float = 600.0,
                       objective: str = "size", eval_data: Any = None,
                       techniques: Any = None, epochs: int = 2, threads: int = 1,
                       batch: int | None = None, seed: int = 0,
                       progress: ProgressFn | None = None) -> SearchOutcome:
    """The most compressed configuration (``objective`` "size": .lbz bytes; "latency":
    time beside the float model) whose accuracy drop on validation data is at most
    ``max_drop`` points (labels needed), or whose output cosine is at least
    ``min_cosine``, found within ``budget_s`` seconds of wall-clock time.

    ``techniques``: any of "prune", "structured", "cluster", "int8" (default: prune,
    cluster, int8 for size; structured, int8 for latency). ``epochs``: fine-tuning of
    each configuration tried (without labels: distilled from the float model).
    ``eval_data``: the validation data (default: the last 20% of ``data``, held back).
    Returns the best valid result found, always (at worst the float model), with the
    trajectory of every configuration tried and a summary."""
    options = check_options(max_drop=max_drop, min_cosine=min_cosine, budget_s=budget_s,
                            objective=objective, techniques=techniques, epochs=epochs,
                            threads=threads, seed=seed)
    if data is None:
        raise ValidationError("data: the search needs data to fine-tune, calibrate and "
                              "validate on")
    if batch is not None:
        check_run_settings(batch=batch)
    start = time.perf_counter()
    return _Search(load(model, data, eval_data, options, batch), options, start,
                   progress).search()


class _Search:
    def __init__(self, d: SearchData, options: Any, start: float,
                 progress: ProgressFn | None) -> None:
        self.d, self.options, self.progress = d, options, progress
        self.start, self.deadline = start, start + options.budget_s
        self.trials: list[Trial] = []
        self.best_model: CompressedModel = float_start(d)
        self.best = Trial(0, "float model (the reference; valid by definition)", [],
                          size_bytes=d.float_bytes, latency_ratio=1.0, drop_points=0.0,
                          cosine=1.0, valid=True, best_so_far=True)
        self.trials.append(self.best)
        self.costs = Costs(d)
        self.quant: Quantization | None = None
        self.quant_trial: Trial | None = None
        self.stopped = ""
        self.layers = model_layers(d.fm)
        self.units_match = True  # sensitivities in the target's units (labels in training data)
        self.can_train = d.tunes  # until a run says the graph cannot be fine-tuned
        self.details: dict[str, Any] = {}
        self.last_report: dict[str, Any] = {}

    # ------------------------------------------------------------------ the phases

    def search(self) -> SearchOutcome:
        if "int8" in self.options.techniques:
            self._int8()
        if not self.stopped:
            path = self._path()
            if not self.stopped:
                self._walk(path)
        return self._finish()

    def _int8(self) -> None:
        """INT8 post-training; if it misses, INT8 with the layers its own search (on
        calibration samples) keeps in float. A valid one sets how candidates quantize."""
        search_time = 0.0 if self.options.objective == "size" else None
        first = self._try([Int8Config(search_time=search_time)], "INT8 post-training")
        if first is None:
            return
        method = (self.last_report.get("calibration") or {}).get("method") or "auto"
        chosen, kept = first, ()
        if not first.valid and first.note == "":
            target = {"max_drop": self.options.max_drop, "min_cosine": self.options.min_cosine}
            chosen = self._try([Int8Config(calibration=method, search_time=search_time,
                                           **target)],
                               "INT8 post-training, sensitive layers kept in float")
            if chosen is None:
                return
            kept = tuple((self.last_report.get("quality_target") or {}).get("kept_in_float", ()))
        faster = self.options.objective == "size" or (chosen.latency_ratio or 2.0) < 1.0
        self.details["int8"] = {"valid": chosen.valid, "faster": faster,
                                "kept_in_float": list(kept), "calibration": method}
        if chosen.valid and faster:
            self.quant, self.quant_trial = Quantization(kept, method, search_time), chosen

    def _levels(self) -> dict[str, tuple[float, ...]]:
        chosen = self.options.techniques
        if self.options.objective == "latency":
            skipped = [t for t in ("prune", "cluster") if t in chosen]
            if skipped:
                self.details["not_searched"] = {t: "ONNX Runtime's CPU kernels run no faster "
                                                   "for it: no use to the latency objective"
                                                for t in skipped}
            return {"structured": LEVELS["structured"]} if "structured" in chosen else {}
        levels = {t: LEVELS[t] for t in ("structured", "prune", "cluster") if t in chosen}
        if self.quant is not None and "cluster" not in chosen:
            levels["int8"] = LEVELS["int8"]  # (clustering, where chosen, shares values better)
        return levels

    def _path(self) -> list[Plan]:
        levels = self._levels()
        if not levels:
            return []
        fm, train = self.d.fm, self.d.train
        by_accuracy = self.options.max_drop is not None and train.labels is not None
        self.units_match = by_accuracy == (self.options.max_drop is not None)
        latency = self.options.objective == "latency"
        layers = sorted(self.layers, key=lambda la: -(la.macs if latency else la.params))
        part = subset(train, spread(train.num_samples, SENSITIVITY_SAMPLES[1]))
        calib = Scorer.of(fm, part, by_accuracy=by_accuracy, threads=self.options.threads)
        share = SENSITIVITY_SHARE * self._left()
        evaluations = len(layers) * sum(len(v) for v in levels.values())
        if evaluations * calib.pass_seconds > share:  # fewer samples, as many as fit
            per_sample = calib.run_seconds / calib.data.num_samples
            room = share / evaluations - calib.session_seconds
            calib = calib.take(max(SENSITIVITY_SAMPLES[0], int(room / max(per_sample, 1e-9))))
        table = measure_sensitivity(fm, layers, levels, calib,
                                    deadline=time.perf_counter() + share,
                                    progress=self.progress)
        self.details["sensitivity"] = table.to_dict()
        if table.evaluations == 0 and not table.complete:
            self.stopped = (f"budget spent after {len(self.trials) - 1} configurations, before "
                            "any layer's sensitivity was measured")
            return []
        always_int8 = self.quant is not None and (latency or "int8" in levels)
        base_loss = self._loss(self.quant_trial) if always_int8 and self.units_match else 0.0
        path = greedy_path(layers, table, objective=self.options.objective,
                           target=self.options.target, base_bits=8 if "int8" in levels else 32,
                           base_loss=base_loss, total_macs=total_macs(fm))
        self.details["path"] = {"length": len(path), "strongest": path[-1].describe()
                                if path else None}
        return path

    def _walk(self, path: list[Plan]) -> None:
        """Grow along the path after a success, bisect after a failure."""
        if not path:
            self.stopped = "converged: no per-layer choice to search (see the sensitivity)"
            return
        end = len(path) + 1
        lo, hi = 0, end  # last index known valid (0: the start), first known invalid
        k = max(1, index_within(path, self.options.target) if self.units_match else len(path) // 4)
        epochs, doublings = self.options.epochs, 0
        seen: dict[str, Trial] = {}
        while True:
            if lo + 1 >= hi:
                if hi < end and epochs and doublings < EPOCH_DOUBLINGS and self.can_train:
                    epochs, doublings, k, hi = epochs * 2, doublings + 1, hi, end
                    continue
                self.stopped = (f"converged: step {lo} of the {len(path)}-step path meets the "
                                f"target and step {hi} does not (fine-tuning {epochs} epochs)"
                                if hi < end else "converged: the strongest configuration "
                                "considered meets the target")
                return
            k = min(max(k, lo + 1), hi - 1)
            plan = path[k - 1]
            stages = stages_for(plan, epochs=epochs if self.can_train else 0,
                                seed=self.options.seed,
                                quantize=self._quantize_for(plan))
            key = repr([s.to_dict() for s in stages])
            trial = seen.get(key)
            if trial is None:
                label = f"path step {k}/{len(path)}: {plan.describe()}" + (
                    " + INT8" if any(s.kind == "quantize-qat" for s in stages) else "") + (
                    f" ({epochs} epochs)" if epochs != self.options.epochs else "")
                trial = self._try(stages, label, path_index=k, predicted=plan.predicted_loss)
                if trial is None:
                    return
                seen[key] = trial
            if trial.valid:
                lo = k
                k = max(k + 1, index_within(path, GROW * max(plan.predicted_loss,
                                                             self.options.target))) \
                    if hi == end else midpoint(lo, hi)
            else:
                hi = k
                k = midpoint(lo, hi)

    def _quantize_for(self, plan: Plan) -> Quantization | None:
        """Whether candidates quantize: for latency always (INT8 was valid and faster);
        for size when it saves more than the INT8 graph costs (measured on the INT8 run)."""
        if self.quant is None or self.quant_trial is None:
            return None
        if self.options.objective == "latency" or plan.levels("int8"):
            return self.quant
        overhead = (self.quant_trial.size_bytes or 0) - (
            self.d.float_bytes - int8_saving(Plan((), 0.0, 0.0), self.layers))
        return self.quant if int8_saving(plan, self.layers) > max(0.0, overhead) else None

    # ------------------------------------------------------------------ one configuration

    def _left(self) -> float:
        return self.deadline - time.perf_counter()

    def _loss(self, trial: Trial | None) -> float:
        if trial is None:
            return 0.0
        if self.options.max_drop is not None:
            return max(0.0, trial.drop_points or 0.0)
        return 1.0 - (trial.cosine if trial.cosine is not None else 0.0)

    def _meets(self, m: Measured) -> bool:
        if self.options.max_drop is not None:
            return m.drop_points is not None and m.drop_points <= self.options.max_drop + 1e-9
        return m.cosine >= float(self.options.min_cosine) - 1e-12

    def _try(self, stages: list[StageConfig], label: str, *, path_index: int | None = None,
             predicted: float | None = None) -> Trial | None:
        """Run and measure one configuration; None (and ``stopped`` says why) when its
        estimated time does not fit in what is left of the budget."""
        need, left = self.costs.estimate(stages), self._left()
        if need > left:
            self.stopped = (f"budget spent after {len(self.trials) - 1} configurations (the "
                            f"next needed about {need:.1f} s; {max(0.0, left):.1f} s were left)")
            return None
        t = time.perf_counter()
        trial = Trial(len(self.trials), label, [s.to_dict() for s in stages],
                      path_index=path_index, predicted_loss=predicted)
        result, run_s = None, 0.0
        try:
            result = run(self.d.source, stages, data=self.d.train_arrays,
                         eval_data=self.d.val_arrays, threads=self.options.threads,
                         batch=self.d.batch, verify=False, distill=self.d.distill,
                         tool="lowbit search")
            run_s = time.perf_counter() - t
            m = self.d.val.measure(result.model)
            trial.size_bytes = int((result.report.get("sizes") or {}).get("lbz_bytes")
                                   or len(encode(result.model)))
            if self.options.objective == "latency":
                trial.latency_ratio = latency_ratio(self.d, result.model)
            trial.drop_points, trial.cosine, trial.valid = m.drop_points, m.cosine, self._meets(m)
            self.last_report = result.report
            if any("post-training only" in note for note in result.report.get("notes", [])):
                self.can_train = False  # (the next configurations do not ask for epochs)
        except Exception as exc:  # noqa: BLE001  a configuration that cannot be built is a
            # miss, recorded with its reason; the search goes on with the best so far
            trial.note = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.last_report = {}
        trial.seconds = time.perf_counter() - t
        self.costs.learn(stages, self.last_report.get("seconds", {}), run_s or trial.seconds,
                         trial.seconds - run_s if run_s else 0.0)
        value, best = trial.objective_value(self.options.objective), \
            self.best.objective_value(self.options.objective)
        if trial.valid and result is not None and value is not None and \
                (best is None or value < best):
            self.best, self.best_model, trial.best_so_far = trial, result, True
        self.trials.append(trial)
        if self.progress is not None:
            self.progress(f"searching ({len(self.trials) - 1} configurations)",
                          min(int(time.perf_counter() - self.start), int(self.options.budget_s)),
                          int(self.options.budget_s))
        return trial

    # ------------------------------------------------------------------ the outcome

    def _finish(self) -> SearchOutcome:
        seconds = time.perf_counter() - self.start
        cm, d = self.best_model, self.d
        quantized = any(s["kind"] in QUANTIZE_KINDS for s in self.best.stages)
        verification = verify(d.fm, cm.model, d.val.data, threads=self.options.threads,
                              batch=d.batch, quantized=quantized, claims_speed=False,
                              timed=False)
        verification.pop("latency_note", None)
        verification["latency"] = ("timed by the search: section search, latency_ratio"
                                   if self.options.objective == "latency" else
                                   "not timed: the search's objective is size")
        cm.report["verification"] = verification
        cm.report.setdefault("warnings", []).extend(
            f["message"] for f in verification["flags"]
            if f["message"] not in cm.report["warnings"])
        cm.report["tool"] = "lowbit search"
        validation = {"source": d.val.data.source, "samples": d.val.data.num_samples,
                      "float_accuracy": None if d.val.float_accuracy is None
                      else round(d.val.float_accuracy, 4),
                      "note": "the validation data judged every configuration (never trained "
                              "or calibrated on); a fresh test set gives the unbiased number"}
        stopped = self.stopped or "converged"
        summary = summary_text(self.options, self.trials, self.best, stopped, seconds,
                               d.float_bytes, d.val.data.num_samples, d.latency_setting)
        section = search_section(self.options, self.trials, self.best, stopped=stopped,
                                 seconds=seconds, float_bytes=d.float_bytes,
                                 validation=validation, details=self.details)
        section["summary"] = summary
        cm.report["search"] = section
        return SearchOutcome(cm, self.trials, stopped, summary)

