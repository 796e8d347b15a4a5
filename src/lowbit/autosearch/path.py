"""From sensitivities to configurations: a path of ever more compressed per-layer
choices, and the stage list that applies one of them.

The path is greedy: from nothing compressed, each step takes the one move (a layer to a
stronger level of one technique) that gains the most for the objective (estimated
bytes, or multiply-accumulates) per unit of predicted loss (the sum of the layers'
post-training losses, a pessimistic guess once fine-tuning recovers some). Along the
path the predicted gain and loss only grow, so the search can bisect it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lowbit.autosearch.sensitivity import Sensitivity
from lowbit.autosearch.space import FLOAT_BITS, Layer, estimated_bytes
from lowbit.config import (
    ClusterConfig,
    DistillConfig,
    PruneConfig,
    QatConfig,
    StageConfig,
    StructuredPruneConfig,
)

WEIGHT_ORDER = ("structured", "prune", "cluster")  # the order the pipeline allows
CENTROID_LR = 1e-4  # (ClusterConfig's own default)


@dataclass(frozen=True)
class Plan:
    """Per-layer choices: (layer, technique, level), sorted; the predicted loss (sum of
    the layers' sensitivities) and the estimated objective (bytes or MACs)."""

    choices: tuple[tuple[str, str, float], ...]
    predicted_loss: float
    estimate: float

    def levels(self, technique: str) -> dict[str, float]:
        return {layer: level for layer, tech, level in self.choices if tech == technique}

    def describe(self) -> str:
        """E.g. ``prune 0.9 x2, 0.5 x1; cluster 4 bits x3``."""
        parts = []
        for tech in (*WEIGHT_ORDER, "int8"):
            groups = _groups(self.levels(tech))
            if groups:
                unit = " bits" if tech in ("cluster", "int8") else ""
                name = "int8 weights at" if tech == "int8" else tech
                parts.append(f"{name} " + ", ".join(
                    f"{level:g}{unit} x{len(names)}" for level, names in groups))
        return "; ".join(parts) or "no layer changed"


def _groups(levels: dict[str, float]) -> list[tuple[float, tuple[str, ...]]]:
    """(level, layers) groups, mildest level first."""
    by: dict[float, list[str]] = {}
    for layer, level in levels.items():
        by.setdefault(level, []).append(layer)
    return [(lv, tuple(sorted(by[lv]))) for lv in sorted(by)]


def greedy_path(layers: Sequence[Layer], table: Sensitivity, *, objective: str,
                target: float, base_bits: int = FLOAT_BITS, base_loss: float = 0.0,
                total_macs: float = 0.0) -> list[Plan]:
    """Plans from the first move to the strongest measured level of every layer.

    ``base_bits``: the bits of a weight no technique changes (32 float, 8 under INT8);
    ``base_loss``: the loss predicted before any move (the INT8 stage's)."""
    techs = [t for t in table.levels if any(table.envelope(la.name, t) for la in layers)]
    env = {(la.name, t): table.envelope(la.name, t) for la in layers for t in techs}
    by_name = {la.name: la for la in layers}
    state = {key: -1 for key in env}
    eps = max(1e-3 * target, 1e-6)

    def value(layer: Layer, changed: dict[str, int]) -> float:
        """The layer's objective estimate (lower is better) with the level indices."""
        def level(t: str) -> float | None:
            i = changed.get(t, state.get((layer.name, t), -1))
            return table.levels[t][i] if i >= 0 else None
        if objective == "latency":
            i = changed.get("structured", state.get((layer.name, "structured"), -1))
            saved = table.macs_saved.get(layer.name, [])
            return -(saved[i] or 0.0) if i >= 0 and i < len(saved) else 0.0
        ratio, sparsity = level("structured") or 0.0, level("prune") or 0.0
        cluster, coarse = level("cluster"), level("int8")
        bits = int(min(base_bits, cluster or FLOAT_BITS, coarse or FLOAT_BITS))
        return estimated_bytes(layer.params * (1.0 - ratio), sparsity=sparsity,
                               value_bits=bits, codebook=cluster is not None)

    def best_move(key: tuple[str, str]) -> tuple[float, float, int] | None:
        """(gain per loss, gain, level index) of the best stronger level for ``key``."""
        name, tech = key
        layer, losses, now = by_name[name], env[key], state[key]
        here = value(layer, {})
        lost = losses[now] if now >= 0 else 0.0
        best = None
        for j in range(now + 1, len(losses)):
            if losses[j] is None:
                break
            gain = here - value(layer, {tech: j})
            if gain <= 0:
                continue
            rate = gain / (max(0.0, losses[j] - (lost or 0.0)) + eps)
            if best is None or (rate, gain) > best[:2]:
                best = (rate, gain, j)
        return best

    moves = {key: best_move(key) for key in env}
    keys_of: dict[str, list[tuple[str, str]]] = {}
    for key in env:
        keys_of.setdefault(key[0], []).append(key)
    estimate = sum(value(la, {}) for la in layers)
    path: list[Plan] = []
    loss = base_loss
    while True:
        ready = [(m, k) for k, m in moves.items() if m is not None]
        if not ready:
            return path
        (_, _, j), key = max(ready, key=lambda p: (p[0][0], p[0][1], p[1]))
        before = env[key][state[key]] if state[key] >= 0 else 0.0
        loss += (env[key][j] or 0.0) - (before or 0.0)
        estimate -= value(by_name[key[0]], {})
        state[key] = j
        estimate += value(by_name[key[0]], {})
        for other in keys_of[key[0]]:
            moves[other] = best_move(other)
        choices = tuple(sorted((n, t, table.levels[t][i]) for (n, t), i in state.items() if i >= 0))
        path.append(Plan(choices, loss, total_macs + estimate if objective == "latency"
                         else estimate))


@dataclass(frozen=True)
class Quantization:
    """How candidates quantize (as the INT8 check found it): node names kept in float,
    the calibration method, the auto mode's timing search (None: its default)."""

    exclude_nodes: tuple[str, ...] = ()
    calibration: str = "auto"
    search_time: float | None = 0.0


def stages_for(plan: Plan, *, epochs: int, seed: int,
               quantize: Quantization | None) -> list[StageConfig]:
    """The stages that apply ``plan``: one stage per level of each technique (mildest
    first) in the pipeline's order, then quantization-aware training. Fine-tuning goes
    to the last (strongest) stage of each technique: the earlier ones cut in one shot and
    the weights recover in that stage's fine-tuning (whose masks and shared values keep
    the earlier stages' choices)."""
    stages: list[StageConfig] = []
    shared_tune = 0
    for tech in WEIGHT_ORDER:
        groups = _groups(plan.levels(tech))
        if tech == "cluster":
            groups = groups[::-1]  # 8 bits before 4 bits: the strongest last
            tune = max(1, epochs // 2) if epochs else 0  # (centroids only: fewer epochs)
            if len(groups) > 1:  # one pass that keeps every group's shared values
                tune, shared_tune = 0, tune
        else:
            tune = epochs
        for k, (level, names) in enumerate(groups):
            e = tune if k == len(groups) - 1 else 0
            if tech == "structured":
                stages.append(StructuredPruneConfig(sparsity=level, layers=names, epochs=e,
                                                    seed=seed))
            elif tech == "prune":
                stages.append(PruneConfig(sparsity=level, layers=names, epochs=e, seed=seed))
            else:
                stages.append(ClusterConfig(bits=int(level), layers=names, epochs=e, seed=seed))
    if shared_tune:
        # (a cluster stage's own fine-tuning keeps only its own layers' shared values,
        # not an earlier cluster stage's; distillation from the float model keeps all)
        stages.append(DistillConfig(epochs=shared_tune, lr=CENTROID_LR, seed=seed))
    if quantize is not None:
        coarse = {n: int(b) for n, b in plan.levels("int8").items()}
        q_epochs = epochs if coarse else min(epochs, 1)
        stages.append(QatConfig(epochs=q_epochs, layer_bits=coarse, seed=seed,
                                exclude_nodes=quantize.exclude_nodes,
                                calibration=quantize.calibration,
                                search_time=quantize.search_time))
    return stages


def int8_saving(plan: Plan, layers: Sequence[Layer]) -> float:
    """Estimated bytes INT8 saves on top of ``plan``: the weights no clustering shares
    go from 32 to 8 bits."""
    clustered = plan.levels("cluster")
    pruned = plan.levels("prune")
    ratio = plan.levels("structured")
    saved = 0.0
    for la in layers:
        if la.name in clustered:
            continue
        n = la.params * (1.0 - ratio.get(la.name, 0.0))
        s = pruned.get(la.name, 0.0)
        saved += estimated_bytes(n, sparsity=s) - estimated_bytes(n, sparsity=s, value_bits=8)
    return saved


def index_within(path: Sequence[Plan], loss: float) -> int:
    """The last path index (1-based; 0: none) whose predicted loss is at most ``loss``."""
    k = 0
    for i, plan in enumerate(path, 1):
        if plan.predicted_loss <= loss + 1e-12:
            k = i
    return k


def midpoint(lo: int, hi: int) -> int:
    """An index strictly between ``lo`` and ``hi`` (they differ by at least 2)."""
    return max(lo + 1, min(hi - 1, (lo + hi) // 2))
