"""lowbit benchmarks B1-B5 of the foundation issue.

    python benchmarks/run.py [--only B1,B3] [--write BENCHMARKS.md]

Every timing is a ratio measured in one run (models alternate, warmed up,
median of many iterations, one intra-op thread). Results print as markdown
and, with --write, replace the results section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import digits_upsampled, time_side_by_side, train  # noqa: E402

import lowbit  # noqa: E402
from lowbit.backends.onnx.session import make_session  # noqa: E402
from lowbit.backends.torch.export import export_module  # noqa: E402
from lowbit.metrics import accuracy, sqnr_db, top1_agreement  # noqa: E402
from lowbit.runtime.environment import cpu_info, versions  # noqa: E402

HERE = Path(__file__).resolve().parent


def _ort_quantize_static(float_path: str, out_path: str, calib: np.ndarray, name: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(float_path, out_path, Reader())  # defaults, as a user would call it


def _outputs(model, x: np.ndarray) -> np.ndarray:
    sess = make_session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def vgg_models(tmp: Path) -> dict:
    """VGG-style CNN (3x3 conv stacks, BN, 32x32x3) trained briefly on upsampled digits."""
    from lowbit.models import vgg_style_cnn

    x_tr, y_tr, x_te, y_te = digits_upsampled(32, 3)
    t0 = time.perf_counter()
    model = train(vgg_style_cnn(widths=(64, 128, 256)), x_tr, y_tr, epochs=2, lr=1e-3)
    train_s = time.perf_counter() - t0
    proto = export_module(model, x_tr[:2])
    float_path = tmp / "vgg.float.onnx"
    onnx.save(proto, float_path)
    rng = np.random.default_rng(0)
    calib = x_tr[rng.choice(len(x_tr), 256, replace=False)]
    return {"float": str(float_path), "calib": calib, "x_te": x_te, "y_te": y_te,
            "train_s": train_s, "input": proto.graph.input[0].name}


def bench_b1_b3(tmp: Path) -> list[dict]:
    m = vgg_models(tmp)
    t0 = time.perf_counter()
    qm = lowbit.quantize(m["float"], m["calib"], eval_data=(m["x_te"], m["y_te"]), verify=False)
    lowbit_s = time.perf_counter() - t0
    lb_path = tmp / "vgg.lowbit.onnx"
    qm.save(lb_path, report=False)
    ort_path = tmp / "vgg.ort.onnx"
    t0 = time.perf_counter()
    _ort_quantize_static(m["float"], str(ort_path), m["calib"], m["input"])
    ort_s = time.perf_counter() - t0
    feed = {m["input"]: m["x_te"][:8]}
    st = time_side_by_side([m["float"], str(lb_path), str(ort_path)], feed, batch=8)
    ref = _outputs(m["float"], m["x_te"])
    lb, ort = _outputs(str(lb_path), m["x_te"]), _outputs(str(ort_path), m["x_te"])
    acc = {k: accuracy(v, m["y_te"]) for k, v in (("float", ref), ("lowbit", lb), ("ort", ort))}
    b1 = st[0].p50_ms / st[1].p50_ms
    b3 = st[2].p50_ms / st[1].p50_ms
    common = (f"VGG-style CNN widths 64-128-256 + BN, 32x32x3 input (upsampled digits, trained "
              f"{m['train_s']:.0f} s), batch 8, 1 thread; p50 float {st[0].p50_ms:.2f} ms, "
              f"lowbit {st[1].p50_ms:.2f} ms, onnxruntime quantize_static {st[2].p50_ms:.2f} ms")
    return [
        {"id": "B1", "what": "INT8 static vs float, VGG-style CNN", "target": ">= 3.0x",
         "measured": f"{b1:.2f}x", "pass": b1 >= 3.0, "details": common},
        {"id": "B3", "what": "lowbit vs onnxruntime quantize_static (defaults), same model/data",
         "target": "speed ratio >= 0.95, accuracy and agreement at least equal",
         "measured": (f"speed {b3:.3f}x; accuracy float {acc['float']:.4f} / lowbit "
                      f"{acc['lowbit']:.4f} / ort {acc['ort']:.4f}; top-1 agreement lowbit "
                      f"{top1_agreement(ref, lb):.4f} / ort {top1_agreement(ref, ort):.4f}; "
                      f"SQNR lowbit {sqnr_db(ref, lb):.1f} dB / ort {sqnr_db(ref, ort):.1f} dB"),
         "pass": b3 >= 0.95 and acc["lowbit"] >= acc["ort"]
         and top1_agreement(ref, lb) >= top1_agreement(ref, ort),
         "details": f"{common}; quantize time lowbit {lowbit_s:.1f} s (auto calibration: "
                    f"{qm.report['calibration']['method']}), ort {ort_s:.1f} s"},
    ]


def bench_b2(tmp: Path) -> list[dict]:
    from lowbit.models import mlp

    x_tr, y_tr, x_te, y_te = digits_upsampled(32, 1)
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731  (N, 1024)
    model = train(mlp((1024, 2048, 2048, 10)), flat(x_tr), y_tr, epochs=3, lr=1e-3)
    proto = export_module(model, flat(x_tr[:2]))
    float_path = tmp / "mlp.float.onnx"
    onnx.save(proto, float_path)
    calib = flat(x_tr[:256])
    qm = lowbit.quantize(str(float_path), calib, eval_data=(flat(x_te), y_te), verify=False)
    q_path = tmp / "mlp.lowbit.onnx"
    qm.save(q_path, report=False)
    name = proto.graph.input[0].name
    st = time_side_by_side([str(float_path), str(q_path)], {name: flat(x_te)[:32]}, batch=32)
    ref, q = _outputs(str(float_path), flat(x_te)), _outputs(str(q_path), flat(x_te))
    ratio = st[0].p50_ms / st[1].p50_ms
    return [{"id": "B2", "what": "INT8 vs float, MLP 1024-2048-2048-10", "target": ">= 3.5x",
             "measured": f"{ratio:.2f}x", "pass": ratio >= 3.5,
             "details": (f"batch 32, 1 thread; p50 float {st[0].p50_ms:.3f} ms, INT8 "
                         f"{st[1].p50_ms:.3f} ms; mode auto -> {qm.report['nodes']['counts']}; "
                         f"accuracy float {accuracy(ref, y_te):.4f} INT8 {accuracy(q, y_te):.4f}")}]


_BIG_SCRIPT = r"""
import json, sys, time
import numpy as np, onnx, lowbit
def status_mb(key):
    # VmHWM, not getrusage: ru_maxrss survives exec and would count the parent
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
path, n = sys.argv[1], int(sys.argv[2])
x = np.random.default_rng(0).standard_normal((n, 1024)).astype(np.float32)
import onnxruntime, lowbit.api, lowbit.backends.onnx.quantize  # imports are not the model's memory
base = status_mb('VmRSS')
t0 = time.perf_counter()
qm = lowbit.quantize(path, x, verify=False)
secs = time.perf_counter() - t0
peak = status_mb('VmHWM')
print(json.dumps({"seconds": secs, "base_mb": base, "peak_mb": peak,
                  "method": qm.report["calibration"]["method"]}))
"""


def bench_b5(tmp: Path) -> list[dict]:
    from lowbit.models import mlp

    sizes = (1024, 3072, 3072, 2048, 1000)
    proto = export_module(mlp(sizes), np.zeros((2, 1024), np.float32))
    path = tmp / "big.float.onnx"
    onnx.save(proto, path)
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    float_mb = path.stat().st_size / 2**20
    script = tmp / "big.py"
    script.write_text(_BIG_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(path), "320"], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    batch_mb = 32 * sum(sizes) * 4 / 2**20
    delta = r["peak_mb"] - r["base_mb"]
    budget = 3 * float_mb + batch_mb
    return [{"id": "B5", "what": f"quantize a {params / 1e6:.1f}M-parameter model, 256 "
                               "calibration samples (+64 held back)",
             "target": "< 60 s; peak memory < 3x float size + one batch",
             "measured": f"{r['seconds']:.1f} s; peak +{delta:.0f} MB (budget {budget:.0f} MB)",
             "pass": r["seconds"] < 60 and delta < budget,
             "details": f"MLP {'-'.join(map(str, sizes))}, float file {float_mb:.0f} MB; "
                        f"RSS before {r['base_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB; "
                        f"auto calibration chose {r['method']}"}]


def _module(module: str, name: str):
    def run(tmp: Path) -> list[dict]:
        import importlib

        return getattr(importlib.import_module(module), name)(tmp)
    return run


def _compression(name: str):
    def run(tmp: Path) -> list[dict]:
        import compression

        return getattr(compression, name)(tmp)
    return run


BENCHES = {"B1": bench_b1_b3, "B2": bench_b2, "B4": _module("chain", "bench_demo_chain"),
           "B5": bench_b5,
           "C1": _compression("bench_deep_compression"), "C4": _compression("bench_structured"),
           "C5": _compression("bench_big_prune_cluster"),
           "W1": _module("weight_only", "bench_int4_decoder"),
           "W2": _module("weight_only", "bench_gptq_100m"),
           "W3": _module("encoder_int8", "bench_minilm"),
           "Z": _module("zoo", "bench_zoo"),
           "L1": _module("large_input", "bench_large_input"),
           "O1": _module("ocr", "bench_ocr"),
           "OC": _module("coverage", "bench_coverage"),
           "T4": _module("chain", "bench_lenet5_chain"),
           "T2b": _module("chain", "bench_gpt_qat"),
           "T1": _module("training", "bench_distill"),
           "T2": _module("training", "bench_qat"),
           "T5": _module("training", "bench_bf16"),
           "K1": _module("tflite", "bench_k1"), "K2": _module("tflite", "bench_k2"),
           "K3": _module("tflite", "bench_k3"), "K4": _module("tflite", "bench_k4"),
           "K5": _module("tflite", "bench_k5")}


def standalone(benches: dict, doc: str | None, example: str) -> int:
    """``python benchmarks/<module>.py [--only ...]``: run, print the table, exit 1 on a miss."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated ids, e.g. {example}")
    rows = collect(benches, parser.parse_args().only)
    print(render(rows))
    return 0 if all(r["pass"] for r in rows) else 1


def collect(benches: dict, only: str) -> list[dict]:
    """The rows of the benchmarks ``only`` names (comma-separated ids; all if empty), each
    run in one temporary folder; an unknown id stops before any runs."""
    wanted = [s.strip() for s in only.split(",") if s.strip()] or list(benches)
    unknown = [w for w in wanted if w not in benches]
    if unknown:
        raise SystemExit(f"unknown ids {unknown}; known: {', '.join(benches)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        for key in wanted:
            t0 = time.perf_counter()
            rows += benches[key](Path(tmp))
            print(f"[{key} done in {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return rows


def render(rows: list[dict]) -> str:
    env = {**cpu_info(), **versions()}
    lines = [f"## Results ({date.today().isoformat()})", "",
             f"CPU: {env['cpu']} ({env['cores']} cores, VNNI: {env['vnni']}); "
             f"python {env['python']}, numpy {env['numpy']}, onnx {env['onnx']}, "
             f"onnxruntime {env['onnxruntime']}, lowbit {env['lowbit']}", "",
             "| id | what | target | measured | pass |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['what']} | {r['target']} | {r['measured']} | "
                     f"{'yes' if r['pass'] else '**no**'} |")
    lines += [""] + [f"- {r['id']}: {r['details']}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated ids, e.g. B1,B2")
    parser.add_argument("--write", default="", help="markdown file whose results section to replace")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    rows = collect(BENCHES, args.only)
    text = render(rows)
    print(text)
    if args.write:
        from lowbit.fileio import write_bytes_atomic

        target = Path(args.write)
        old = target.read_text() if target.exists() else "# Benchmarks\n\n"
        marker = "<!-- results -->"
        head = old.split(marker)[0] if marker in old else old
        write_bytes_atomic(target, (head.rstrip() + "\n\n" + marker + "\n" + text).encode())
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
