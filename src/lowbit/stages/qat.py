"""Quantization-aware training stage.

1. The INT8 plan exactly as post-training quantization makes it (``mode``: which nodes
   are static, dynamic or float; calibrated activation ranges; auto's whole-model
   candidate search), with weights at ``weight_bits`` / ``layer_bits``.
2. Fine-tuning through the ONNX-to-torch bridge with every quantized weight fake
   quantized (the writer's own rule: symmetric, per channel or per tensor as planned)
   and every static activation fake quantized from its calibrated range (moving
   average or learned); pruned zeros stay zero and clustered layers keep their shared
   values (their codebook trains; per-tensor scales keep one code per shared value).
3. The plan rewritten from the trained state: weight parameters from the trained
   weights, activation parameters from the trained ranges, biases from both; the
   trained float model is what the writer quantizes.

Dynamic nodes train with fake-quantized weights only (their activations are
quantized at run time, per batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lowbit.backends.onnx.graph import GraphIndex, node_name
from lowbit.backends.onnx.quantize import fill_activations, quantize_int8
from lowbit.backends.onnx.weight_only import layer_group_size, linear_layers, plan_weight_only
from lowbit.backends.onnx.weights import weighted_nodes
from lowbit.backends.torch.distributed import from_main
from lowbit.backends.torch.fake_quant import (
    BiasFakeQuant,
    WeightFakeQuant,
    make_activation_fake_quant,
)
from lowbit.backends.torch.finetune import finetune, with_weights
from lowbit.config import (
    ActivationRange,
    Int8Config,
    QatConfig,
    QatScheme,
    QuantMode,
    WeightOnlyAlgorithm,
    WeightOnlyConfig,
)
from lowbit.quant.plan import QuantizationPlan, Treatment
from lowbit.quant.scheme import Granularity, TensorQuantParams
from lowbit.quant.weight_rules import granularity_label, weight_bits
from lowbit.stages.base import RunContext, register


def ptq_config(config: QatConfig) -> Int8Config:
    """The post-training config whose plan QAT starts from."""
    return Int8Config(mode=config.mode, calibration=config.calibration,
                      weight_granularity=config.weight_granularity,
                      reduce_range=config.reduce_range, exclude_nodes=config.exclude_nodes,
                      smoothquant=False, max_calibration_samples=config.max_calibration_samples,
                      search_time=config.search_time if config.mode is QuantMode.AUTO else None)


@register(QatConfig)
def qat_stage(config: QatConfig, ctx: RunContext) -> dict[str, Any]:
    ctx.check_node_names(tuple(n for n, _ in config.layer_bits), "layer_bits")
    train = ctx.require_train("quantization-aware training")
    if config.scheme is QatScheme.WEIGHT_ONLY:
        return weight_only_qat(config, ctx, train)
    int8 = ptq_config(config)
    calib = train.take(0, int8.max_calibration_samples)
    outcome = quantize_int8(ctx.fm, calib, int8, progress=ctx.progress, threads=ctx.threads,
                            batch=ctx.batch)
    chosen = from_main(outcome.variant)  # under torchrun every process trains one plan
    if chosen != outcome.variant:
        outcome = quantize_int8(ctx.fm, calib, int8, threads=ctx.threads, variant=chosen)
    plan = outcome.plan
    reduce = bool(plan.metadata.get("reduce_range"))
    quants = weight_fake_quants(plan, config, reduce, set(ctx.clusters), ctx.fm)
    tune = ctx.fine_tune_possible(config.epochs)
    hooks: dict[str, Any] = {}
    fm = ctx.fm
    if tune:
        hooks = activation_fake_quants(plan, fm, learned=config.activation_range is
                                       ActivationRange.LEARNED)
        spec = ctx.training_spec(config, fm, tensor_hooks=hooks, weight_transforms={
            **quants, **bias_fake_quants(plan, fm, quants, hooks)})
        values = finetune(fm, train, spec, ctx.epoch_progress("quantization-aware training"))
        fm = with_weights(fm, values)
    activations = {t: hooks[t].export_params() if t in hooks else plan.tensors[t]
                   for t in plan.observed}
    plan = requantized(plan, fm, quants, activations)
    ctx.fm, ctx.plan, ctx.written = fm, plan, None
    ctx.seconds.update({k: round(v, 3) for k, v in outcome.seconds.items()})
    ctx.sections["mode_by_op"] = plan.metadata.get("treatments", {})
    if outcome.search:
        ctx.sections["candidates"] = outcome.search
    low = sorted({q.bits for q in quants.values() if q.bits < 7})
    ctx.sections["qat"] = {
        "epochs": config.epochs if tune else 0,
        "activation_range": config.activation_range.value,
        "fake_quantized_weights": len(quants), "fake_quantized_activations": len(
            {id(h) for h in hooks.values()}),
        "weight_bits": {w: q.bits for w, q in quants.items()},
        "calibration": outcome.method.value if outcome.method else None,
    }
    if low:
        ctx.notes.append(f"{'/'.join(map(str, low))}-bit weights are stored in INT8 containers "
                         "(ONNX Runtime's integer kernels take 8-bit weights); .lbz stores them "
                         "at their bit width")
    return {"mode": config.mode.value, "variant": outcome.variant.name}


def weight_only_qat(config: QatConfig, ctx: RunContext, train: Any) -> dict[str, Any]:
    """Group-wise low-bit weights (round to nearest, symmetric) fake quantized while the
    model trains (on labels, or on the teacher's outputs), then planned again from the
    trained weights: the written codes are the ones training saw."""
    wo = WeightOnlyConfig(bits=config.weight_bits, group_size=config.group_size,
                          algorithm=WeightOnlyAlgorithm.RTN, symmetric=True,
                          exclude_nodes=config.exclude_nodes)
    plan = plan_weight_only(ctx.fm, wo, None, threads=ctx.threads)
    items = {w.name: w for w in linear_layers(ctx.fm, config.exclude_nodes)[0]}
    quants = {}
    for node in plan.nodes_with(Treatment.WEIGHT_ONLY):
        item = items.get(node.name)
        if item is None or node.weight is None:
            continue  # (an embedding table: planned again from the trained weights)
        k = int(np.asarray(ctx.fm.constant(node.weight)).shape[item.in_axis])
        quants[node.weight] = WeightFakeQuant(config.weight_bits, Granularity.GROUP,
                                              item.in_axis, layer_group_size(k, config.group_size))
    tune = ctx.fine_tune_possible(config.epochs)
    if tune:
        spec = ctx.training_spec(config, ctx.fm, weight_transforms=dict(quants))
        values = finetune(ctx.fm, train, spec, ctx.epoch_progress("weight-only QAT"))
        ctx.fm = with_weights(ctx.fm, values)
        plan = plan_weight_only(ctx.fm, wo, None, threads=ctx.threads)
    ctx.plan, ctx.written = plan, None
    ctx.sections["qat"] = {"scheme": config.scheme.value, "epochs": config.epochs if tune else 0,
                           "weight_bits": config.weight_bits, "group_size": config.group_size,
                           "fake_quantized_weights": len(quants)}
    return {"scheme": config.scheme.value, "bits": config.weight_bits}


def weight_fake_quants(plan: QuantizationPlan, config: QatConfig, reduce_range: bool,
                       clustered: set[str], fm: Any) -> dict[str, WeightFakeQuant]:
    """The fake quantization of every quantized weight, by initializer name: the plan's
    granularity at 8 bits (auto's per-tensor choice is measured for 8-bit weights), per
    channel below 8 bits, per tensor for clustered weights (one code per shared value);
    at the node's bits (8 becomes 7 where the plan keeps weights in the reduced range)."""
    out_axis = {w.name: w.out_axis for w in weighted_nodes(fm)[0]}
    out: dict[str, WeightFakeQuant] = {}
    for node in plan.nodes_with(Treatment.STATIC, Treatment.DYNAMIC):
        params = plan.tensors.get(node.weight) if node.weight else None
        if params is None or node.recurrence is not None:
            continue  # (an LSTM keeps its post-training weights)
        bits = config.bits_of(node.name)
        granularity, axis = params.granularity, params.axis
        if bits == 8:
            bits = weight_bits(reduce_range)
        elif node.name in out_axis:
            granularity, axis = Granularity.CHANNEL, out_axis[node.name]
        if node.weight in clustered:
            granularity = Granularity.TENSOR
        out[node.weight] = WeightFakeQuant(bits, granularity, axis)
    return out


def bias_fake_quants(plan: QuantizationPlan, fm: Any, quants: dict[str, WeightFakeQuant],
                     hooks: dict[str, Any]) -> dict[str, BiasFakeQuant]:
    """The INT32 fake quantization of each static node's bias, by initializer name."""
    inputs = {node_name(n, i): n.input[0] for i, n in enumerate(fm.proto.graph.node) if n.input}
    out: dict[str, BiasFakeQuant] = {}
    for node in plan.nodes_with(Treatment.STATIC):
        source = inputs.get(node.name)
        if node.bias and node.weight in quants and source in hooks:
            out[node.bias] = BiasFakeQuant(quants[node.weight], hooks[source])
    return out


def activation_fake_quants(plan: QuantizationPlan, fm: Any, *, learned: bool) -> dict[str, Any]:
    """One fake-quant module per observed activation of the plan, and the same module
    on the tensors that share its parameters (8-bit passthrough ops)."""
    produced = set(GraphIndex(fm.proto, fm.weights).graph_inputs)
    produced |= {o for n in fm.proto.graph.node for o in n.output}
    caps = plan.clip_caps
    hooks: dict[str, Any] = {}
    for tensor in plan.observed:
        if tensor in produced:
            hooks[tensor] = make_activation_fake_quant(plan.tensors[tensor], learned=learned,
                                                       cap=caps.get(tensor))
    for tensor, source in plan.shared.items():
        root = source
        while root in plan.shared:
            root = plan.shared[root]
        if tensor in produced and root in hooks:
            hooks[tensor] = hooks[root].shared()
    return hooks


def requantized(plan: QuantizationPlan, fm: Any, quants: dict[str, WeightFakeQuant],
                activations: dict[str, TensorQuantParams]) -> QuantizationPlan:
    """``plan`` with weight parameters from ``fm``'s (trained) weights by the same rule
    the training used, the given activation parameters, and the biases and constant
    operands that follow."""
    tensors = dict(plan.tensors)
    for name, quant in quants.items():
        tensors[name] = quant.params(np.asarray(fm.constant(name), np.float32))
    labels = {n.name: f"{granularity_label(tensors[n.weight])}, {quants[n.weight].bits}-bit"
              for n in plan.nodes.values() if n.weight in quants}
    decisions = [dataclasses.replace(d, weights=labels[d.name]) if d.name in labels else d
                 for d in plan.decisions]  # (the label said 8- or 7-bit before QAT's bits)
    out = dataclasses.replace(plan, tensors=tensors, weight_values={}, decisions=decisions)
    return fill_activations(out, fm, activations)
