"""Benchmarks of the low-bit transformer issue that lowbit covers so far (W1, W2):
INT4 weight-only on a GPT-style decoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from common import time_side_by_side  # noqa: I001

import lowbit
from lowbit.backends.onnx.session import make_session
from lowbit.backends.torch.export import export_module
from lowbit.metrics import mean_cosine, sqnr_db


def pattern_tokens(n: int, seq: int, vocab: int, seed: int) -> np.ndarray:
    """Token sequences that repeat a random motif (period 3-8): a next-token task a
    small decoder learns quickly, giving it realistic (trained) weights."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, seq), dtype=np.int64)
    for i in range(n):
        period = int(rng.integers(3, 9))
        motif = rng.integers(0, vocab, period)
        out[i] = np.resize(motif, seq)
    return out


def train_gpt(model, vocab: int, steps: int, seq: int = 64, batch: int = 16, lr: float = 3e-3):
    import torch

    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        ids = torch.from_numpy(pattern_tokens(batch, seq + 1, vocab, seed=step))
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


def bench_int4_decoder(tmp: Path) -> list[dict]:
    from lowbit.models import tiny_gpt

    vocab = 512
    model = tiny_gpt(vocab=vocab, d_model=256, heads=8, layers=4, max_len=128)
    loss = train_gpt(model, vocab, steps=300)
    path = tmp / "gpt.float.onnx"
    sample = pattern_tokens(2, 64, vocab, seed=10_000)
    onnx.save(export_module(model, sample, dynamic_dims=(0, 1)), path)
    calib = pattern_tokens(128, 64, vocab, seed=20_000)
    held = pattern_tokens(64, 64, vocab, seed=30_000)
    rows, outs, sizes, paths = [], {}, {}, {}
    sess_f = make_session(str(path))
    ref = np.concatenate([sess_f.run(None, {"input": held[i:i + 16]})[0] for i in range(0, 64, 16)])
    for alg in ("rtn", "gptq", "hqq"):
        t0 = time.perf_counter()
        qm = lowbit.quantize(str(path), calib, eval_data=held, mode="weight-only", bits=4,
                             group_size=128, algorithm=alg, batch=1, verify=False)
        secs = time.perf_counter() - t0
        out = tmp / f"gpt.{alg}.onnx"
        qm.save(out, report=False)
        s = make_session(str(out))
        outs[alg] = (np.concatenate([s.run(None, {"input": held[i:i + 16]})[0]
                                     for i in range(0, 64, 16)]), secs)
        sizes[alg] = out.stat().st_size
        paths[alg] = out
    f_size = path.stat().st_size
    err = {a: (sqnr_db(ref, o), mean_cosine(ref.reshape(-1, vocab), o.reshape(-1, vocab)))
           for a, (o, _) in outs.items()}
    timing = {}
    for seq in (1, 64):
        st = time_side_by_side([str(path), str(paths["gptq"])], {"input": held[:1, :seq]},
                               batch=1, iterations=300)
        timing[seq] = (st[0].p50_ms / st[1].p50_ms, st[0].p50_ms, st[1].p50_ms)
    rows.append({"id": "W1a", "what": "INT4 weight-only (group 128) file size, GPT-style decoder",
                 "target": "<= 0.18x of float",
                 "measured": ", ".join(f"{a} {sizes[a] / f_size:.3f}x" for a in sizes),
                 "pass": all(sizes[a] / f_size <= 0.18 for a in sizes),
                 "details": (f"decoder d=256, 8 heads, 4 layers, vocab {vocab} "
                             f"({f_size:,} bytes float), trained 300 steps on a repeating-motif "
                             f"next-token task (final loss {loss:.2f}); MatMuls -> MatMulNBits, "
                             "embeddings -> GatherBlockQuantized")})
    rows.append({"id": "W1b", "what": "GPTQ vs round-to-nearest output error (same model, data)",
                 "target": "GPTQ error lower than RTN",
                 "measured": "; ".join(f"{a}: SQNR {e[0]:.2f} dB, cosine {e[1]:.5f} "
                                      f"({outs[a][1]:.1f} s)" for a, e in err.items()),
                 "pass": err["gptq"][0] > err["rtn"][0],
                 "details": "logits on 64 held-out sequences of 64 tokens; 128 calibration "
                            "sequences; symmetric 4-bit, group 128 (HQQ asymmetric)"})
    rows.append({"id": "W1c", "what": "INT4 decoder at batch 1 vs float",
                 "target": "at least as fast",
                 "measured": ", ".join(f"seq {s}: {r[0]:.2f}x ({r[1]:.3f} vs {r[2]:.3f} ms)"
                                       for s, r in timing.items()),
                 "pass": all(r[0] >= 1.0 for r in timing.values()),
                 "details": "1 intra-op thread; MatMulNBits accuracy_level 4 (int8 activations)"})
    return rows


_BIG = r"""
import json, sys, time
import numpy as np, lowbit
sys.path.insert(0, sys.argv[3])
from weight_only import pattern_tokens
def status_mb(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
path, vocab = sys.argv[1], int(sys.argv[2])
calib = pattern_tokens(128, 128, vocab, seed=1)
base = status_mb('VmRSS')
t0 = time.perf_counter()
qm = lowbit.quantize(path, calib, mode="weight-only", bits=4, group_size=128, algorithm="gptq",
                     verify=False)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "base_mb": base, "peak_mb": status_mb('VmHWM')}))
"""


def bench_gptq_100m(tmp: Path) -> list[dict]:
    from lowbit.models import tiny_gpt

    vocab = 8192
    model = tiny_gpt(vocab=vocab, d_model=768, heads=12, layers=12, max_len=256)
    params = sum(p.numel() for p in model.parameters())
    path = tmp / "gpt100m.onnx"
    onnx.save(export_module(model, pattern_tokens(1, 16, vocab, 0), dynamic_dims=(0, 1)), path)
    del model
    script = tmp / "big_gptq.py"
    script.write_text(_BIG)
    out = subprocess.run([sys.executable, str(script), str(path), str(vocab),
                          str(Path(__file__).resolve().parent)], capture_output=True, text=True,
                         check=True, env=os.environ.copy())
    r = json.loads(out.stdout.strip().splitlines()[-1])
    f_mb = path.stat().st_size / 2**20
    return [{"id": "W2", "what": f"GPTQ INT4 of a {params / 1e6:.0f}M-parameter decoder, 128 "
                                 "calibration sequences of 128 tokens",
             "target": "< 10 minutes on 2 cores, memory bounded",
             "measured": (f"{r['seconds'] / 60:.1f} min; peak RSS +{r['peak_mb'] - r['base_mb']:.0f} MB "
                          f"over {r['base_mb']:.0f} MB (float file {f_mb:.0f} MB)"),
             "pass": r["seconds"] < 600,
             "details": "d=768, 12 heads, 12 layers, vocab 8192 (random weights); Hessians "
                        "accumulated in passes that each hold at most 512 MB of them"}]
