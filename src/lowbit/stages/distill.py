"""Knowledge distillation: the check that a student can learn from its teacher, and the
stage that trains the current float model on the teacher's outputs (the teacher is the
run's original model unless the user names one; ``backends/onnx/teacher.py`` runs it)."""

from __future__ import annotations

from typing import Any

from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.teacher import onnx_teacher
from lowbit.backends.torch.finetune import finetune, with_weights
from lowbit.config import DistillConfig
from lowbit.errors import ValidationError
from lowbit.stages.base import RunContext, register


def check_student(teacher: FloatModel, student: FloatModel) -> None:
    """Refuse a student whose inputs or first output cannot meet the teacher's, naming
    both shapes (dynamic dimensions match anything)."""
    def shapes(fm: FloatModel, kind: str) -> list[list[Any]]:
        values = fm.proto.graph.input if kind == "input" else fm.proto.graph.output
        init = {t.name for t in fm.proto.graph.initializer}
        return [[d.dim_value if d.HasField("dim_value") else "?"
                 for d in v.type.tensor_type.shape.dim] for v in values if v.name not in init]

    t_in, s_in = shapes(teacher, "input"), shapes(student, "input")
    t_out, s_out = shapes(teacher, "output")[0], shapes(student, "output")[0]
    if len(t_in) != len(s_in) or any(len(a) != len(b) for a, b in zip(t_in, s_in)):
        raise ValidationError(f"student: its inputs {s_in} do not match the teacher's {t_in}")
    if len(t_out) != len(s_out) or any(a != b and "?" not in (a, b)
                                       for a, b in zip(t_out, s_out)):
        raise ValidationError(f"student: its output shape {s_out} differs from the teacher's "
                              f"{t_out}")


@register(DistillConfig)
def distill_stage(config: DistillConfig, ctx: RunContext) -> dict[str, Any]:
    train = ctx.require_train("distillation")
    if ctx.teacher is None:
        ctx.teacher_model = ctx.original
        ctx.teacher = onnx_teacher(ctx.original, threads=ctx.threads)
    if not ctx.fine_tune_possible(config.epochs):
        raise ValidationError(f"distill: cannot train this model ({'; '.join(ctx.notes[-1:])})")
    spec = ctx.training_spec(config, ctx.fm, distill=config.settings)
    values = finetune(ctx.fm, train, spec, ctx.epoch_progress("distilling"))
    ctx.fm = with_weights(ctx.fm, values)
    return {"epochs": config.epochs, **config.settings.to_dict(),
            "labels": train.labels is not None}
