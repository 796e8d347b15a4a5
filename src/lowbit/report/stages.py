"""Every stage of a chain compared: the model after each stage on the held-back data
(accuracy with labels, else agreement with the original), its size on disk as ONNX
and as ``.lbz``, and its latency against the original timed in one alternating run;
and a PNG of accuracy against size and against latency, one point per stage."""

from __future__ import annotations

import os
from typing import Any

import onnx

from lowbit.backends.onnx.session import make_session, run_batches
from lowbit.data import Dataset
from lowbit.metrics import accuracy, mean_cosine, top1_agreement
from lowbit.runtime.latency import measure_side_by_side

STAGE_TIMING_RUNS = 30  # runs of each model in the alternating comparison


def compare_stages(original: onnx.ModelProto, snapshots: list[tuple[str, onnx.ModelProto]],
                   holdout: Dataset | None, *, threads: int = 1, batch: int = 8,
                   lbz_bytes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row for the original and one per ``(label, model)`` snapshot; ``lbz_bytes``:
    the ``.lbz`` sizes already known by label (each model is encoded once)."""
    from lowbit.container import encode

    models = [("original", original), *snapshots]
    sessions = [make_session(m, threads=threads, name=label) for label, m in models]
    rows: list[dict[str, Any]] = []
    reference = run_batches(sessions[0], holdout)[0] if holdout is not None else None
    for (label, model), session in zip(models, sessions):
        known = (lbz_bytes or {}).get(label)
        row: dict[str, Any] = {"stage": label, "onnx_bytes": model.ByteSize(),
                               "lbz_bytes": known if known is not None else len(encode(model))}
        if holdout is not None and reference is not None:
            out = reference if label == "original" else run_batches(session, holdout)[0]
            acc = accuracy(out, holdout.labels) if holdout.labels is not None else None
            if acc is not None:
                row["accuracy"] = round(acc, 5)
            if out.shape == reference.shape:
                row["cosine"] = round(float(mean_cosine(reference, out)), 6)
                agree = top1_agreement(reference, out)
                if agree is not None:
                    row["top1_agreement"] = round(agree, 5)
        rows.append(row)
    if holdout is not None:
        feed = holdout.feed(batch)
        stats = measure_side_by_side(sessions, [feed] * len(sessions),
                                     batch=holdout.rows_per_run(batch), threads=threads,
                                     iterations=STAGE_TIMING_RUNS, warmup=3, min_time_s=0.3)
        base = stats[0].p50_ms
        for row, s in zip(rows, stats):
            row["latency_ms"] = round(s.p50_ms, 4)
            row["speedup"] = round(base / s.p50_ms, 3) if s.p50_ms > 0 else None
    base = rows[0]["onnx_bytes"]  # ratios: how many times smaller than the original ONNX
    for row in rows:
        row["onnx_ratio"] = round(base / max(1, row["onnx_bytes"]), 2)
        row["lbz_ratio"] = round(base / max(1, row["lbz_bytes"]), 2)
    return rows


def quality_key(rows: list[dict[str, Any]]) -> str | None:
    """The quality measure every row has: accuracy, else agreement, else cosine."""
    for key in ("accuracy", "top1_agreement", "cosine"):
        if rows and all(key in r for r in rows):
            return key
    return None


def plot_stages(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> bool:
    """Write the PNG (accuracy vs size, accuracy vs latency); False if there is nothing to
    plot or matplotlib is not installed."""
    key = quality_key(rows)
    if key is None:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    quality = [100.0 * r[key] if key != "cosine" else r[key] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("lbz_bytes", "size on disk (.lbz, KB)", 1 / 1024)]
    if all("latency_ms" in r for r in rows):
        panels.append(("latency_ms", "latency (ms, ONNX Runtime)", 1.0))
    for ax, (field, label, scale) in zip(axes, panels):
        xs = [r[field] * scale for r in rows]
        ax.plot(xs, quality, "-o", color="tab:blue")
        for x, y, r in zip(xs, quality, rows):
            ax.annotate(r["stage"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(key.replace("_", " ") + (" (%)" if key != "cosine" else ""))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("lowbit: one point per stage")
    fig.tight_layout()
    tmp = f"{os.fspath(path)}.tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return True
