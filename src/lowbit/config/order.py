"""The order rules of a stage list (one copy: the pipeline and recipes both ask here)."""

from __future__ import annotations

from collections.abc import Sequence

from lowbit.config import (
    ClusterConfig,
    Int8Config,
    MixedPrecisionConfig,
    PruneConfig,
    StageConfig,
    StructuredPruneConfig,
    WeightOnlyConfig,
)
from lowbit.config.training import QatConfig

QUANTIZE_CONFIGS = (Int8Config, WeightOnlyConfig, MixedPrecisionConfig, QatConfig)


def order_problem(stages: Sequence[StageConfig]) -> tuple[int, str] | None:
    """(index of the first stage out of order, why), or None when the order is sound: a
    run quantizes at most once, as its last stage; pruning comes before clustering."""
    quant = [i for i, c in enumerate(stages) if isinstance(c, QUANTIZE_CONFIGS)]
    if quant and quant[0] != len(stages) - 1:
        q, bad = quant[0], quant[0] + 1
        return bad, (f"stage {bad + 1} ({stages[bad].kind}) comes after stage {q + 1} "
                     f"({stages[q].kind}): a run quantizes at most once, as its last stage")
    clustered = [i for i, c in enumerate(stages) if isinstance(c, ClusterConfig)]
    later = [i for i, c in enumerate(stages) if clustered and i > clustered[0]
             and isinstance(c, (PruneConfig, StructuredPruneConfig))]
    if later:
        c, bad = clustered[0], later[0]
        return bad, (f"stage {bad + 1} ({stages[bad].kind}) comes after stage {c + 1} "
                     "(cluster): prune before clustering (pruning a clustered model would "
                     "undo its shared values)")
    return None
