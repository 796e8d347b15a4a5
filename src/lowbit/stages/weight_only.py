"""Weight-only low-bit quantization stage (MatMulNBits, GatherBlockQuantized)."""

from __future__ import annotations

from typing import Any

from lowbit.backends.onnx.weight_only import plan_weight_only
from lowbit.config import WeightOnlyAlgorithm, WeightOnlyConfig
from lowbit.stages.base import RunContext, register


@register(WeightOnlyConfig)
def weight_only_stage(config: WeightOnlyConfig, ctx: RunContext) -> dict[str, Any]:
    ctx.check_node_names(config.exclude_nodes, "exclude_nodes")
    calib = ctx.train.take(0, config.max_calibration_samples) if ctx.train is not None else None
    plan = plan_weight_only(ctx.fm, config, calib, threads=ctx.threads, progress=ctx.progress)
    ctx.plan = plan
    if not plan.nodes:
        ctx.warnings.append("no MatMul/Gemm layer was quantized (none with a constant weight, "
                            "or all excluded); the output equals the input model")
    gptq = config.algorithm is WeightOnlyAlgorithm.GPTQ
    ctx.sections["weight_only"] = {
        "bits": config.bits, "group_size": config.group_size, "algorithm": config.algorithm.value,
        "symmetric": config.is_symmetric, "accuracy_level": config.accuracy_level,
        "relative_weight_error_by_layer": plan.layer_error}
    ctx.sections["calibration"] = {
        "method": None, "samples": calib.num_samples if gptq and calib is not None else 0,
        "source": calib.source if calib is not None else None}
    return {"bits": config.bits, "algorithm": config.algorithm.value}
