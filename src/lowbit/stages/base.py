"""What a stage sees (``RunContext``: the one in-memory model and the run's data) and
the registry that maps each config type to the stage that applies it.

A new technique is a config (``lowbit.config``) plus one function here::

    @register(MyConfig)
    def my_stage(config: MyConfig, ctx: RunContext) -> dict:
        ctx.fm = transform(ctx.fm)          # float weights/graph, in memory
        return {"setting": 1}               # this stage's part of the report
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx

from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.torch.finetune import FinetuneSpec, Teacher
from lowbit.config import DistillSettings, StageConfig, TrainingOptions, TrainingPrecision
from lowbit.data import Dataset
from lowbit.errors import ValidationError
from lowbit.quant.plan import QuantizationPlan

ProgressFn = Callable[[str, int, int], None]


@dataclass
class RunContext:
    """The state a run threads through its stages.

    ``fm`` is the current float model: weight stages (prune, cluster) replace it;
    a quantization stage leaves it and fills ``plan`` (and ``written``, the plan
    rendered, when it had to write it anyway to verify a decision)."""

    fm: FloatModel
    original: FloatModel  # the normalised input, the reference of the verification
    train: Dataset | None  # calibration / fine-tuning data (held-back part excluded)
    threads: int = 1
    batch: int = 8
    progress: ProgressFn | None = None
    plan: QuantizationPlan | None = None
    written: onnx.ModelProto | None = None
    sections: dict[str, Any] = field(default_factory=dict)  # report parts by key
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sparse: set[str] = field(default_factory=set)  # weights whose zeros later stages keep
    # weight -> (codebook, indices) of clustered weights, whose shared values later
    # training stages keep (index -1: a pruned zero)
    clusters: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    teacher: Teacher | None = None  # outputs that training stages distill from
    teacher_model: FloatModel | None = None  # the teacher itself (feature distillation)
    distill: DistillSettings | None = None
    _trainable: str | None = None  # "" if the bridge runs this graph, else why not

    def require_train(self, what: str) -> Dataset:
        if self.train is None:
            raise ValidationError(f"{what} needs data (--data)")
        return self.train

    def fine_tune_possible(self, epochs: int) -> bool:
        """True if ``epochs`` > 0 and the data and graph allow fine-tuning; else the
        reason goes into the notes once and the stage stays post-training."""
        if epochs <= 0:
            return False
        if self.train is None or (self.train.labels is None and self.teacher is None):
            note = ("no data given (--data): post-training only, no fine-tuning"
                    if self.train is None else
                    "no labels ('y') in the data: post-training only, no fine-tuning")
            if note not in self.notes:
                self.notes.append(note)
            return False
        if self._trainable is None:
            from lowbit.backends.torch.from_onnx import check_trainable
            from lowbit.errors import UnsupportedOpError

            try:
                check_trainable(self.fm)
                self._trainable = ""
            except UnsupportedOpError as exc:
                self._trainable = f"post-training only: {exc}"
        if self._trainable:
            if self._trainable not in self.notes:
                self.notes.append(self._trainable)
            return False
        return True

    def zero_masks(self, fm: FloatModel) -> dict[str, np.ndarray]:
        """Masks (True = keep) of the weights earlier stages pruned: every later training
        stage passes them to the trainer, so pruned weights stay exactly zero."""
        out = {}
        for name in sorted(self.sparse):
            value = fm.constant(name)
            if value is not None:
                out[name] = np.asarray(value) != 0
        return out

    def check_node_names(self, names: tuple[str, ...], option: str) -> None:
        """Refuse node names the model does not have (``OpType_i`` for unnamed nodes)."""
        from lowbit.backends.onnx.graph import node_name

        known = {node_name(n, i) for i, n in enumerate(self.fm.proto.graph.node)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValidationError(f"option {option}: no node named {unknown[:5]} in the model")

    def training_spec(self, config: TrainingOptions, fm: FloatModel, **extra: Any
                      ) -> FinetuneSpec:
        """The fine-tuning of a training stage: its options, the zeros and shared values
        of earlier stages kept, and the run's teacher (distillation), if any."""
        settings: dict[str, Any] = {"masks": self.zero_masks(fm), "shared": dict(self.clusters),
                                    "teacher": self.teacher, "distill": self.distill}
        settings.update(extra)
        distill = settings["distill"]
        if distill is not None and distill.features > 0 and self.teacher_model is not None:
            from lowbit.backends.onnx.teacher import matching_features, onnx_teacher

            names = matching_features(self.teacher_model, fm)
            if names:  # the teacher also gives the intermediate tensors both graphs share
                settings["features"] = names
                settings["teacher"] = onnx_teacher(self.teacher_model, threads=self.threads,
                                                   features=names)
        return FinetuneSpec(epochs=config.epochs, lr=config.lr, seed=config.seed,
                            batch_size=config.batch_size, bf16=self._bf16(config), **settings)

    def _bf16(self, config: TrainingOptions) -> bool:
        """bf16 where asked and the CPU computes it: without bfloat16 instructions torch
        emulates it (measured 0.07x fp32 per step on an AVX2 CPU), so training stays fp32
        and the notes say so."""
        if config.precision is not TrainingPrecision.BF16:
            return False
        from lowbit.runtime.environment import cpu_info

        if cpu_info().get("bf16") is False:
            note = ("precision bf16: this CPU has no bfloat16 instructions (avx512_bf16 / "
                    "amx_bf16), where bf16 training measured 14x slower than fp32; trained "
                    "in fp32")
            if note not in self.notes:
                self.notes.append(note)
            return False
        return True

    def epoch_progress(self, stage: str) -> Callable[[int, int, float], None]:
        """The per-epoch callback of a training loop: progress, and the loss curve in the
        report (section "training", by stage)."""
        progress = self.progress
        curve: list[float] = []
        self.sections.setdefault("training", {})[f"{len(self.sections['training']) + 1}. "
                                                 f"{stage}"] = curve

        def report(done: int, total: int, loss: float) -> None:
            curve.append(round(float(loss), 6))
            if progress is not None:
                progress(f"{stage} (loss {loss:.3f})", done, total)
        return report


StageFn = Callable[[Any, RunContext], dict[str, Any]]
_HANDLERS: dict[type[StageConfig], StageFn] = {}
C = TypeVar("C", bound=StageConfig)


def register(config_type: type[C]) -> Callable[[Callable[[C, RunContext], dict[str, Any]]],
                                               Callable[[C, RunContext], dict[str, Any]]]:
    """Register the stage that applies ``config_type``."""
    def wrap(fn: Callable[[C, RunContext], dict[str, Any]]) -> Callable[[C, RunContext], dict[str, Any]]:
        _HANDLERS[config_type] = fn
        return fn
    return wrap


def handler_for(config: StageConfig) -> StageFn:
    fn = _HANDLERS.get(type(config))
    if fn is None:
        raise ValidationError(f"no stage is registered for {type(config).__name__}")
    return fn
