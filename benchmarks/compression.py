"""Benchmarks of the pruning / weight-sharing issue (C1-C4), run from run.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from common import digits_upsampled, time_side_by_side, train  # noqa: I001

import lowbit
from lowbit.api import compress, prune
from lowbit.backends.torch.export import export_module
from lowbit.data import digits_split


def digits_resized(side: int):
    """Digits resized (bilinear) to side x side, one channel, values in [0, 1]."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    x_tr, y_tr, x_te, y_te = digits_split(0)

    def resize(x: np.ndarray) -> np.ndarray:
        t = F.interpolate(torch.from_numpy(x), size=(side, side), mode="bilinear",
                          align_corners=False)
        return t.numpy().astype(np.float32)

    return resize(x_tr), y_tr, resize(x_te), y_te


def _deep_compression_case(tmp: Path, label: str, module, x_tr, y_tr, x_te, y_te,
                           *, sparsity: float, bits: int, epochs: int) -> dict:
    model = train(module, x_tr, y_tr, epochs=30, lr=1e-3)
    float_path = tmp / f"{label}.float.onnx"
    onnx.save(export_module(model, x_tr[:2]), float_path)
    t0 = time.perf_counter()
    cm = compress(str(float_path), (x_tr, y_tr), eval_data=(x_te, y_te), sparsity=sparsity,
                  bits=bits, epochs=epochs, cluster_epochs=max(1, epochs // 6), scope="global")
    secs = time.perf_counter() - t0
    lbz = tmp / f"{label}.lbz"
    cm.save(lbz, report=False)
    # the file must decode to a model that runs and agrees exactly with the compressed one
    decoded = lowbit.load(lbz)
    ref = lowbit.evaluate(cm.model, (x_te, y_te))["accuracy"]
    got = lowbit.evaluate(decoded, (x_te, y_te))["accuracy"]
    ratio = float_path.stat().st_size / lbz.stat().st_size
    acc = cm.report["verification"]["agreement"]["accuracy"]
    params = sum(r["params"] for r in cm.report["layers"])
    return {"ratio": ratio, "acc": acc, "secs": secs, "roundtrip_ok": ref == got,
            "float_bytes": float_path.stat().st_size, "lbz_bytes": lbz.stat().st_size,
            "sparsity": cm.report["weight_sparsity"], "params": params}


def bench_deep_compression(tmp: Path) -> list[dict]:
    from lowbit.models import lenet5, lenet_300_100

    rows = []
    x_tr, y_tr, x_te, y_te = digits_split(0)
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    x28, y28, x28_te, y28_te = digits_resized(28)
    cases = [
        ("C1", "LeNet-300-100, 8x8 digits (64 inputs)", lenet_300_100(64),
         (flat(x_tr), y_tr, flat(x_te), y_te)),
        ("C2", "LeNet-5, 8x8 digits (padded convs)", lenet5(8), (x_tr, y_tr, x_te, y_te)),
        ("C3a", "LeNet-300-100, 28x28 (784 inputs, the original size)", lenet_300_100(784),
         (flat(x28), y28, flat(x28_te), y28_te)),
        ("C3b", "LeNet-5, 28x28 (the original Caffe size)", lenet5(28), (x28, y28, x28_te, y28_te)),
    ]
    for cid, what, module, (a, b, c, d) in cases:
        r = _deep_compression_case(tmp, cid, module, a, b, c, d, sparsity=0.95, bits=5, epochs=60)
        drop = 100 * (r["acc"]["float"] - r["acc"]["compressed"])
        rows.append({
            "id": cid, "what": f"Deep Compression recipe: {what}",
            "target": ">= 40x smaller than float32 ONNX, accuracy within 0.5 points",
            "measured": (f"{r['ratio']:.1f}x ({r['float_bytes']:,} -> {r['lbz_bytes']:,} bytes); "
                         f"accuracy {100 * r['acc']['float']:.2f}% -> "
                         f"{100 * r['acc']['compressed']:.2f}% ({-drop:+.2f} points)"),
            "pass": r["ratio"] >= 40 and drop <= 0.5 and r["roundtrip_ok"],
            "details": (f"{r['params']:,} weights, global magnitude pruning to 95% with a "
                        f"polynomial schedule over 60 epochs of fine-tuning, 5-bit k-means "
                        f"(weights and biases) with centroid fine-tuning, zstd-coded .lbz; weight "
                        f"sparsity {r['sparsity']:.3f}; {r['secs']:.0f} s; .lbz decodes to the same "
                        f"accuracy: {r['roundtrip_ok']}"),
        })
    return rows


def bench_structured(tmp: Path) -> list[dict]:
    from lowbit.models import vgg_style_cnn

    x_tr, y_tr, x_te, y_te = digits_upsampled(32, 3)
    model = train(vgg_style_cnn(widths=(64, 128, 256)), x_tr, y_tr, epochs=2, lr=1e-3)
    float_path = tmp / "vgg.float.onnx"
    onnx.save(export_module(model, x_tr[:2]), float_path)
    t0 = time.perf_counter()
    pruned = prune(str(float_path), (x_tr, y_tr), eval_data=(x_te, y_te), sparsity=0.5,
                   structured=True, epochs=2)
    secs = time.perf_counter() - t0
    p_path = tmp / "vgg.pruned.onnx"
    pruned.save(p_path, report=False)
    rng = np.random.default_rng(0)
    calib = x_tr[rng.choice(len(x_tr), 256, replace=False)]
    q = lowbit.quantize(str(p_path), calib, eval_data=(x_te, y_te), mode="static", batch=8)
    q_path = tmp / "vgg.pruned.int8.onnx"
    q.save(q_path, report=False)
    name = onnx.load(float_path).graph.input[0].name
    st = time_side_by_side([str(float_path), str(p_path), str(q_path)], {name: x_te[:8]}, batch=8)
    s_pruned, s_int8 = st[0].p50_ms / st[1].p50_ms, st[0].p50_ms / st[2].p50_ms
    acc_f = lowbit.evaluate(str(float_path), (x_te, y_te))["accuracy"]
    acc_p = lowbit.evaluate(str(p_path), (x_te, y_te))["accuracy"]
    acc_q = lowbit.evaluate(str(q_path), (x_te, y_te))["accuracy"]
    common = (f"VGG-style 64-128-256 + BN on 32x32x3 upsampled digits; 50% of channels removed "
              f"(L1), fine-tuned 2 epochs ({secs:.0f} s); batch 8, 1 thread; p50 float "
              f"{st[0].p50_ms:.2f} ms, pruned {st[1].p50_ms:.2f} ms, pruned+INT8 {st[2].p50_ms:.2f} ms; "
              f"skipped: {pruned.report['skipped']}")
    return [
        {"id": "C4a", "what": "structured: 50% channels removed, float vs original float",
         "target": ">= 1.8x faster", "measured": f"{s_pruned:.2f}x", "pass": s_pruned >= 1.8,
         "details": common},
        {"id": "C4b", "what": "structured 50% + INT8 static vs original float",
         "target": ">= 5x faster, accuracy within 1 point of float",
         "measured": (f"{s_int8:.2f}x; accuracy float {100 * acc_f:.2f}% / pruned "
                      f"{100 * acc_p:.2f}% / pruned+INT8 {100 * acc_q:.2f}%"),
         "pass": s_int8 >= 5 and 100 * (acc_f - acc_q) <= 1.0, "details": common},
    ]


def bench_big_prune_cluster(tmp: Path) -> list[dict]:
    from lowbit.api import cluster
    from lowbit.models import mlp

    sizes = (1024, 3072, 3072, 2048, 1000)
    path = tmp / "big.onnx"
    onnx.save(export_module(mlp(sizes), np.zeros((2, 1024), np.float32)), path)
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    t0 = time.perf_counter()
    pruned = prune(str(path), eval_data=x, sparsity=0.9)
    t1 = time.perf_counter()
    clustered = cluster(pruned.model, eval_data=x, bits=5)
    t2 = time.perf_counter()
    params = sum(r["params"] for r in clustered.report["layers"])
    total = t2 - t0
    return [{"id": "C5", "what": f"prune (90%) + cluster (5 bits) a {params / 1e6:.1f}M-parameter "
                                 "model, post-training",
             "target": "< 60 s on 2 cores", "measured": f"{total:.1f} s", "pass": total < 60,
             "details": f"prune {t1 - t0:.1f} s, cluster {t2 - t1:.1f} s, including the reports "
                        "(sizes, .lbz encoding, latency, agreement on 64 samples)"}]
