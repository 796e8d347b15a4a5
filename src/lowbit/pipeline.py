"""Run techniques as stages over ONE in-memory model.

A run loads and normalises the model once, splits the data once, applies each
stage in order in memory, writes the quantization plan (if any) once, verifies
and times the result once against the original, and encodes a ``.lbz`` at most
once. Every CLI verb and API function is a thin front-end over ``run``::

    >>> from lowbit.config import PruneConfig, ClusterConfig
    >>> result = run("lenet.onnx", [PruneConfig(sparsity=0.9, epochs=5),
    ...                             ClusterConfig(bits=5, epochs=1)], data="train.npz")  # doctest: +SKIP
    >>> result.save("lenet.lbz")                                                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import lowbit.stages  # noqa: F401  (registers every stage)
from lowbit.backends.onnx.checks import check_token_ids
from lowbit.backends.onnx.precision import (
    LOW_FLOAT_TYPES,
    as_given_dtypes,
    describe,
    restore_signature,
)
from lowbit.backends.onnx.session import first_output_shape, input_specs_of_model, make_session
from lowbit.backends.onnx.store import FloatModel, GivenPrecision
from lowbit.backends.onnx.teacher import onnx_teacher
from lowbit.backends.onnx.writer import write_model
from lowbit.backends.torch.distributed import is_main
from lowbit.config import (
    ChannelImportance,
    DistillConfig,
    DistillSettings,
    Int8Config,
    MixedPrecisionConfig,
    QatConfig,
    StageConfig,
    StructuredPruneConfig,
    check_run_settings,
)
from lowbit.config.order import QUANTIZE_CONFIGS, order_problem
from lowbit.data import Dataset, as_dataset, run_batch, split_holdout
from lowbit.errors import DataError, ValidationError
from lowbit.fileio import (
    check_output_path,
    plot_path,
    report_path,
    write_bytes_atomic,
    write_json_atomic,
)
from lowbit.model_io import external_data_files, resolve_model
from lowbit.quant.plan import QuantizationPlan, Treatment
from lowbit.report.build import build_report, weight_section
from lowbit.report.stages import compare_stages, plot_stages
from lowbit.report.verify import check_model
from lowbit.report.verify import verify as verify_model
from lowbit.stages.base import ProgressFn, RunContext, handler_for
from lowbit.stages.checkpoint import Checkpoints, Resumed, fingerprint
from lowbit.stages.distill import check_student

HOLDOUT_FRACTION = 0.2


class CompressedModel:
    """The result of a run: the model, its report, and ``save`` (``.lbz`` or ``.onnx``
    by suffix, plus ``OUT.report.json`` beside it).

    ``fm`` is the float model after the weight stages (before any quantization)."""

    def __init__(self, model: onnx.ModelProto, report: dict[str, Any], *, fm: FloatModel,
                 original: FloatModel, lbz: bytes | None = None,
                 inputs: tuple[Any, ...] = (), checkpoints: Checkpoints | None = None,
                 planned: tuple[FloatModel, QuantizationPlan] | None = None) -> None:
        self.model = model
        self.planned = planned  # (float model, plan) the output was written from, if quantized
        self._checkpoints = checkpoints
        self.report = report
        self.fm = fm
        self._original = original
        self._lbz = lbz  # the .lbz encoding, if the run already made it
        self._inputs = inputs  # files the run read: save never overwrites them

    @property
    def float_model(self) -> onnx.ModelProto:
        """The normalised input model (self-contained ONNX)."""
        return self._original.joined()

    def save(self, path: str | os.PathLike[str], *, report: bool = True) -> Path:
        """Write the model atomically: ``.lbz`` compressed, anything else ONNX; never over
        a file the run read."""
        out = check_output_path(path, self._inputs, option="path", report=report,
                                suffixes=(".onnx", ".lbz"))
        if not is_main():  # under torchrun only process 0 writes
            return out
        if out.suffix.lower() == ".lbz":
            if self._lbz is None:
                from lowbit.container import encode

                self._lbz = encode(self.model)
            data = self._lbz
        else:
            data = self.model.SerializeToString()
        write_bytes_atomic(out, data)
        size = out.stat().st_size
        self.report["output"] = {"path": str(out), "size_bytes": size,
                                 "format": "lbz" if out.suffix.lower() == ".lbz" else "onnx"}
        base = self.report.get("input", {}).get("size_bytes")
        if base:
            self.report["output"]["size_ratio"] = round(base / max(1, size), 3)
        if report:
            rows = self.report.get("stages_compared")
            if rows and plot_stages(rows, plot_path(out)):
                self.report["output"]["plot"] = str(plot_path(out))
            write_json_atomic(report_path(out), self.report)
        if self._checkpoints is not None:  # the output is safe: the checkpoints have served
            self._checkpoints.remove()
            self._checkpoints = None
        return out

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray, *, threads: int = 1) -> list[Any]:
        """Run the model in ONNX Runtime on one batch of inputs."""
        session = make_session(self.model, threads=threads)
        if not isinstance(inputs, dict):
            inputs = {session.get_inputs()[0].name: np.asarray(inputs)}
        return list(session.run(None, inputs))


def check_stages(stages: Sequence[StageConfig]) -> None:
    """Refuse a stage list that cannot run, before any work starts."""
    if isinstance(stages, StageConfig) or not isinstance(stages, (list, tuple)):
        raise ValidationError(f"stages: expected a list of configs, got {type(stages).__name__}")
    if not stages:
        raise ValidationError("a run needs at least one stage")
    for config in stages:
        if not isinstance(config, StageConfig):
            raise ValidationError(f"a stage must be a config such as PruneConfig, not "
                                  f"{type(config).__name__}")
        handler_for(config)
    problem = order_problem(stages)
    if problem is not None:
        raise ValidationError(f"stages: {problem[1]}")


def _datasets(fm: FloatModel, data: Any, eval_data: Any, stages: Sequence[StageConfig]
              ) -> tuple[Dataset | None, Dataset | None, bool]:
    """(training/calibration part, verification part, whether they are separate)."""
    specs = input_specs_of_model(fm.proto)
    trains = any(c.trains for c in stages)
    # without training, only the samples calibration uses (and the held-back part) are read
    cap = max((getattr(c, "max_calibration_samples", 0) for c in stages), default=0)
    limit = None if trains or not cap else cap * 2 + 1024
    output = first_output_shape(fm.proto)
    dataset = as_dataset(data, specs, limit=limit, output=output) if data is not None else None
    if dataset is not None:
        check_token_ids(fm, dataset)
    if eval_data is not None:
        held = as_dataset(eval_data, specs, output=output)
        check_token_ids(fm, held)
        return dataset, held, True
    if dataset is None:
        return None, None, False
    return split_holdout(dataset, HOLDOUT_FRACTION)


def run(model: Any, stages: Sequence[StageConfig], *, data: Any = None, eval_data: Any = None,
        threads: int = 1, batch: int | None = None, verify: bool = True,
        progress: ProgressFn | None = None, tool: str = "lowbit run",
        distill: DistillSettings | None = None, teacher: Any = None,
        checkpoints: str | os.PathLike[str] | None = None, resume: bool = False
        ) -> CompressedModel:
    """Apply ``stages`` in order to ``model`` (ONNX path/proto, .lbz, or torch module).

    ``data`` calibrates and fine-tunes; ``eval_data`` verifies (default: the last 20%
    of ``data``, held back from both). ``batch``: the batch the result is timed (and
    chosen) at; default the model's fixed batch, else 8 (``lowbit.layouts``).
    ``distill``: every training stage also learns from the teacher's outputs; the
    teacher is ``teacher`` (a model as ``model`` may be) or else the original model.
    ``checkpoints``: a folder where each finished weight stage is saved; ``resume``
    continues after the last one saved there (refused for another model or stages).
    A chain of stages is compared stage by stage (report section "stages_compared")."""
    check_stages(stages)
    verify = verify and is_main()  # under torchrun, process 0 verifies and writes
    if distill is not None and not isinstance(distill, DistillSettings):
        raise ValidationError(f"distill: expected DistillSettings, got {type(distill).__name__}")
    if teacher is not None and distill is None and not any(isinstance(c, DistillConfig)
                                                           for c in stages):
        distill = DistillSettings()  # naming a teacher asks for distillation
    needs = [c for c in stages if isinstance(c, (Int8Config, MixedPrecisionConfig, QatConfig,
                                                  DistillConfig))]
    if data is None and needs:
        what = "quantization" if not isinstance(needs[0], DistillConfig) else "distillation"
        raise ValidationError(f"{what} needs data (--data) to calibrate, train and verify "
                              f"(stage {needs[0].kind})")
    if data is None and any(getattr(c, "epochs", 0) > 0 for c in stages):
        raise ValidationError("option epochs: fine-tuning needs data with labels (--data)")
    check_run_settings(threads=threads)
    if batch is not None:
        check_run_settings(batch=batch)
    t0 = time.perf_counter()
    keep_bn = any(isinstance(c, StructuredPruneConfig) and c.importance is ChannelImportance.BN
                  for c in stages)
    fm, name, in_size = resolve_model(model, data if data is not None else eval_data,
                                      fold_bn=not keep_bn)
    given = fm.given  # a float16/bfloat16 model: fm is its float32 working copy
    train, holdout, separate = _datasets(fm, data, eval_data, stages)
    batch = run_batch(input_specs_of_model(fm.proto), batch,
                      train if train is not None else holdout)
    ctx = RunContext(fm=fm, original=fm, train=train, threads=threads, batch=batch,
                     progress=progress, distill=distill)
    if teacher is not None:
        teacher_fm, _, teacher_size = resolve_model(teacher, data, fold_bn=True)
        check_student(teacher_fm, fm)
        ctx.teacher, ctx.teacher_model = onnx_teacher(teacher_fm, threads=threads), teacher_fm
        ctx.sections["teacher"] = {"model": str(teacher) if isinstance(
            teacher, (str, os.PathLike)) else type(teacher).__name__}
        if _input_names(teacher_fm) == _input_names(fm):  # the result is compared with it
            ctx.original, in_size = teacher_fm, teacher_size
            ctx.sections["teacher"]["compared_with"] = "the teacher (the report's original)"
    elif distill is not None:
        ctx.teacher, ctx.teacher_model = onnx_teacher(fm, threads=threads), fm
    if distill is not None:
        ctx.sections["distillation"] = distill.to_dict()
    _need_labels(stages, train, ctx)
    if given is not None:
        quantizes = any(isinstance(c, QUANTIZE_CONFIGS) for c in stages)
        ctx.notes.append(describe(given, "quantized" if quantizes else "compressed"))
    if isinstance(data, (str, os.PathLike)) and isinstance(eval_data, (str, os.PathLike)) \
            and Path(data).resolve() == Path(eval_data).resolve():
        ctx.warnings.append("the verification data is the calibration/training data: the "
                            "quality shown may be optimistic (leave out eval data to hold "
                            "back 20% of data instead)")
    done: list[tuple[dict[str, Any], dict[str, Any]]] = []
    weights_fm = None  # the float model after the weight stages, before quantizing
    compare = verify and len(stages) > 1  # a chain: every stage's model is compared
    snapshots: list[tuple[str, onnx.ModelProto]] = []
    saved = _checkpoints(checkpoints, resume, fm, stages, distill, teacher, ctx)
    if saved is not None and saved[1].done:
        done = list(saved[1].done)
        snapshots = [(_label(i, c), m) for i, ((c, _), m) in enumerate(zip(done, saved[1].models))]
        ctx.notes.append(f"resumed after stage {len(done)} ({done[-1][0]['kind']}) from "
                         f"{saved[0].folder}")
    for i, config in enumerate(stages[len(done):], len(done)):
        if isinstance(config, QUANTIZE_CONFIGS):
            weights_fm = ctx.fm  # (a quantize stage may smooth ctx.fm for its plan)
        t = time.perf_counter()
        settings = handler_for(config)(config, ctx)
        ctx.seconds[config.kind] = time.perf_counter() - t
        if isinstance(config, QatConfig):
            weights_fm = ctx.fm  # QAT trained the float weights it quantizes
        done.append((config.to_dict(), settings))
        if saved is not None and not isinstance(config, QUANTIZE_CONFIGS):
            model = saved[0].save(i, ctx, config.to_dict(), settings)
            if compare:
                snapshots.append((_label(i, config.to_dict()), model))
        elif compare and not isinstance(config, QUANTIZE_CONFIGS):
            snapshots.append((_label(i, config.to_dict()), ctx.fm.joined()))
    weights_fm = weights_fm or ctx.fm
    sections = dict(ctx.sections)
    if ctx.plan is not None:
        output = ctx.written if ctx.written is not None else write_model(ctx.fm, ctx.plan)
    else:
        output = ctx.fm.joined()
    working_output, original = output, ctx.original
    if given is not None:  # the user's dtypes back on the inputs, outputs, float weights
        output, original = restore_signature(output, given), given.original
        sections["precision"] = _precision_section(given)
    lbz = None
    if any(not isinstance(c, QUANTIZE_CONFIGS) for c in stages):
        from lowbit.container import encode

        lbz = encode(output)
        sections.update(weight_section(original.joined().ByteSize(),
                                       output.ByteSize(), len(lbz), weights_fm))
    verification = None
    if verify:
        if progress is not None:
            progress("verifying", 0, 1)
        structured = any(isinstance(c, StructuredPruneConfig) for c in stages)
        # a trained model's outputs may move far and still classify alike: only agreement
        # and accuracy flag it (as for pruning), not the output SQNR
        trained = any(getattr(c, "epochs", 0) > 0 for c in stages)
        # a run that quantized nothing and ran no weight stage wrote the model as it was
        unchanged = ctx.plan is not None and not ctx.plan.nodes_with(
            Treatment.STATIC, Treatment.DYNAMIC, Treatment.WEIGHT_ONLY) and all(
            isinstance(c, QUANTIZE_CONFIGS) for c in stages)
        verification = _verify(ctx.original, working_output, output, holdout, given,
                               threads=threads, batch=batch,
                               quantized=ctx.plan is not None and not trained,
                               claims_speed=ctx.plan is not None or structured,
                               timed=not unchanged)
        if holdout is not None and not separate:
            verification["agreement"]["note"] = ("only one sample was given: verification "
                                                 "reuses the calibration data")
        if progress is not None:
            progress("verifying", 1, 1)
    if compare:
        if progress is not None:
            progress("comparing stages", 0, 1)
        if ctx.plan is not None:
            snapshots.append((_label(len(stages) - 1, done[-1][0]), output))
        last = snapshots[-1][0] if snapshots else ""
        sections["stages_compared"] = compare_stages(
            original.joined(), snapshots, as_given_dtypes(holdout, given)
            if given is not None and given.runs_as_given else holdout,
            threads=threads, batch=batch, lbz_bytes={last: len(lbz)} if lbz else None)
    ctx.seconds["total"] = time.perf_counter() - t0
    report = build_report(tool=tool, name=name, input_size=in_size, stages=done,
                          sections=sections, plan=ctx.plan, notes=ctx.notes,
                          warnings=ctx.warnings, skipped=ctx.skipped, verification=verification,
                          seconds=ctx.seconds)
    return CompressedModel(output, report, fm=weights_fm, original=original, lbz=lbz,
                           inputs=(model, *external_data_files(model), data, eval_data, teacher),
                           checkpoints=saved[0] if saved is not None else None,
                           planned=(ctx.fm, ctx.plan) if ctx.plan is not None else None)


def _input_names(fm: FloatModel) -> list[str]:
    return [spec.name for spec in input_specs_of_model(fm.proto)]


def _need_labels(stages: Sequence[StageConfig], train: Dataset | None, ctx: RunContext) -> None:
    """Refuse, before any work, a training stage that would have nothing to learn from:
    data without labels and no teacher to distill from."""
    if train is None or train.labels is not None or ctx.teacher is not None:
        return
    for i, config in enumerate(stages):
        epochs = getattr(config, "epochs", 0)
        if config.trains and epochs > 0 and not isinstance(config, DistillConfig):
            raise DataError(f"{train.source}: stage {i + 1} ({config.kind}) fine-tunes for "
                            f"{epochs} epoch(s) and needs labels ('y'); give labelled data, "
                            "set its epochs to 0, or distill from a teacher (distillation)")


def _label(index: int, config: dict[str, Any]) -> str:
    return f"{index + 1}. {config['kind']}"


def _checkpoints(folder: Any, resume: bool, fm: FloatModel, stages: Sequence[StageConfig],
                 distill: DistillSettings | None, teacher: Any, ctx: RunContext
                 ) -> tuple[Checkpoints, Resumed] | None:
    """The run's checkpoint folder (None: no checkpoints) and what it restored."""
    if folder is None:
        if resume:
            raise ValidationError("resume: needs a checkpoint folder (checkpoints=...)")
        return None
    model_hash, stages_hash = fingerprint(fm.joined(), [c.to_dict() for c in stages], {
        "distill": distill.to_dict() if distill else None,
        "teacher": str(teacher) if isinstance(teacher, (str, os.PathLike)) else None})
    saved = Checkpoints(folder, model_hash, stages_hash)
    if resume:
        return saved, saved.resume(ctx)
    saved.start_fresh()
    return saved, Resumed()


def _verify(working: FloatModel, working_output: onnx.ModelProto, output: onnx.ModelProto,
            holdout: Dataset | None, given: GivenPrecision | None,
            **settings: Any) -> dict[str, Any]:
    """Verify ``output`` against the model as given; where ONNX Runtime cannot run that
    (bfloat16), verify the float32 working copies and check the written model."""
    if given is None:
        return verify_model(working, output, holdout, **settings)
    if given.runs_as_given:
        return verify_model(given.original, output, as_given_dtypes(holdout, given), **settings)
    result = verify_model(working, working_output, holdout, **settings)
    result["checker"] = check_model(output)
    if result["checker"] != "passed":
        result["flags"].append({"kind": "checker", "message": f"ONNX checker {result['checker']}"})
    return result


def _precision_section(given: GivenPrecision) -> dict[str, Any]:
    def named(types: dict[str, int]) -> dict[str, str]:
        return {k: LOW_FLOAT_TYPES[v] for k, v in types.items()}

    return {"given": given.float_type, "working_copy": "float32", "inputs": named(given.inputs),
            "outputs": named(given.outputs),
            "verified_against": "the model as given" if given.runs_as_given else
            "the float32 working copy (ONNX Runtime cannot run the model as given)"}
