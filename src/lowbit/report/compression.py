"""The report of a pruned/clustered model: sizes on disk, per-layer sparsity and
clusters, agreement and accuracy against the original, float latency ratio."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.data import Dataset
from lowbit.onnx.store import FloatModel
from lowbit.report.verify import MAX_ACCURACY_DROP_POINTS, MIN_TOP1_AGREEMENT, agreement
from lowbit.runtime.latency import measure_side_by_side
from lowbit.runtime.session import cpu_info, input_specs_of_model, make_session, run_batches, versions
from lowbit.torch.from_onnx import weight_names


def layer_table(fm: FloatModel) -> list[dict[str, Any]]:
    rows = []
    for name in weight_names(fm):
        w = np.asarray(fm.constant(name))
        nonzero = w[w != 0]
        distinct = int(np.unique(nonzero).size)
        rows.append({"name": name, "shape": list(w.shape), "params": int(w.size),
                     "sparsity": round(1.0 - nonzero.size / max(1, w.size), 4),
                     "distinct_nonzero_values": distinct,
                     "bits": int(np.ceil(np.log2(distinct))) if 1 < distinct <= 256 else None})
    return rows


def compression_report(before: FloatModel, after: FloatModel, evals: Dataset | None, *,
                       threads: int = 1, batch: int = 8) -> dict[str, Any]:
    from lowbit.container import encode
    from lowbit.runtime.bench import feed_for

    before_proto, after_proto = before.joined(), after.joined()
    float_bytes = len(before_proto.SerializeToString())
    lbz_bytes = len(encode(after_proto))
    layers = layer_table(after)
    total = sum(r["params"] for r in layers)
    zeros = sum(r["params"] * r["sparsity"] for r in layers)
    out: dict[str, Any] = {
        "sizes": {"float_onnx_bytes": float_bytes,
                  "compressed_onnx_bytes": len(after_proto.SerializeToString()),
                  "lbz_bytes": lbz_bytes, "lbz_ratio": round(float_bytes / lbz_bytes, 2)},
        "layers": layers,
        "weight_sparsity": round(zeros / max(1, total), 4),
    }
    sess_b = make_session(before, threads=threads, name="original model")
    sess_a = make_session(after, threads=threads, name="compressed model")
    flags: list[dict[str, str]] = []
    if evals is not None:
        ag = agreement(run_batches(sess_b, evals), run_batches(sess_a, evals), evals.labels)
        ag["source"] = evals.source
        out["agreement"] = ag
        if ag.get("top1_agreement") is not None and ag["top1_agreement"] < MIN_TOP1_AGREEMENT:
            flags.append({"kind": "degradation",
                          "message": f"top-1 agreement with the original is {ag['top1_agreement']:.3f}"})
        if "accuracy" in ag and ag["accuracy"]["drop_points"] > MAX_ACCURACY_DROP_POINTS:
            flags.append({"kind": "degradation",
                          "message": f"accuracy dropped {ag['accuracy']['drop_points']:.2f} points"})
    feed_b = feed_for(evals, input_specs_of_model(before.proto), batch)
    feed_a = feed_for(evals, input_specs_of_model(after.proto), batch)
    stats = measure_side_by_side([sess_b, sess_a], [feed_b, feed_a], batch=batch, threads=threads,
                                 iterations=30, min_time_s=0.3)
    out["latency"] = {"batch": batch, "threads": threads, "original": stats[0].to_dict(),
                      "compressed": stats[1].to_dict(),
                      "speedup": round(stats[0].p50_ms / stats[1].p50_ms, 3)}
    out["flags"] = flags
    out["environment"] = {**cpu_info(), **versions()}
    return out
