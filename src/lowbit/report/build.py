"""The one report every run writes: what was asked, what each stage did, what the
model became (sizes, layers, decisions) and the verification of the result."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weight_initializers
from lowbit.quant.plan import QuantizationPlan
from lowbit.runtime.environment import cpu_info, versions


def layer_table(fm: FloatModel) -> list[dict[str, Any]]:
    """Per weight: shape, parameters, sparsity, distinct nonzero values and their bits."""
    rows = []
    for name in weight_initializers(fm):
        w = np.asarray(fm.constant(name))
        nonzero = w[w != 0]
        distinct = int(np.unique(nonzero).size)
        rows.append({"name": name, "shape": list(w.shape), "params": int(w.size),
                     "sparsity": round(1.0 - nonzero.size / max(1, w.size), 4),
                     "distinct_nonzero_values": distinct,
                     "bits": int(np.ceil(np.log2(distinct))) if 1 < distinct <= 256 else None})
    return rows


def weight_section(original_bytes: int, output_bytes: int, lbz_bytes: int | None,
                   fm: FloatModel) -> dict[str, Any]:
    """Sizes and per-layer sparsity/clusters of a model whose weights were compressed."""
    layers = layer_table(fm)
    total = sum(r["params"] for r in layers)
    zeros = sum(r["params"] * r["sparsity"] for r in layers)
    sizes: dict[str, Any] = {"float_onnx_bytes": original_bytes,
                             "compressed_onnx_bytes": output_bytes}
    if lbz_bytes:
        sizes.update({"lbz_bytes": lbz_bytes, "lbz_ratio": round(original_bytes / lbz_bytes, 2)})
    return {"sizes": sizes, "layers": layers, "weight_sparsity": round(zeros / max(1, total), 4)}


def build_report(*, tool: str, name: str, input_size: int | None,
                 stages: list[tuple[dict[str, Any], dict[str, Any]]], sections: dict[str, Any],
                 plan: QuantizationPlan | None, notes: list[str], warnings: list[str],
                 skipped: dict[str, str], verification: dict[str, Any] | None,
                 seconds: dict[str, float]) -> dict[str, Any]:
    """``stages``: (config dict, settings) per stage, in order."""
    report: dict[str, Any] = {"tool": tool, "input": {"model": name, "size_bytes": input_size}}
    if len(stages) == 1:
        report["config"], report["settings"] = stages[0]
    else:
        report["stages"] = [c for c, _ in stages]
        report["settings"] = {}
        for c, s in stages:
            key = _short(c["kind"])
            while key in report["settings"]:  # the same technique twice: keep both
                key += "+"
            report["settings"][key] = s
    report.update(sections)
    if plan is not None:
        report["nodes"] = {"counts": plan.counts(), "decisions": plan.decision_dicts()}
    # one list of warnings where users look: the run's, then the verification's flags
    flagged = [f["message"] for f in (verification or {}).get("flags", [])]
    report.update({"skipped": skipped, "notes": notes,
                   "warnings": list(warnings) + [m for m in flagged if m not in warnings]})
    if verification is not None:
        report["verification"] = verification
    report["environment"] = {**cpu_info(), **versions()}
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return report


def _short(kind: str) -> str:
    return {"prune-structured": "structured_prune"}.get(kind, kind.split("-")[0])
