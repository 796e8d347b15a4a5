"""OC (issue 12): the operator coverage graphs side by side with onnxruntime's quantizers.

Every graph of the operator coverage suite (``tests/backends/onnx/test_op_coverage.py``,
built in code by ``op_graphs.py``) is quantized by lowbit in auto (its defaults, as a user
calls it), static and dynamic mode, and by onnxruntime's ``quantize_static`` (QDQ,
per-channel, QUInt8 activations / QInt8 weights, after ``quant_pre_process``) and
``quantize_dynamic`` (per-channel, QInt8), called as ``benchmarks/zoo.py`` calls them.
Every tool gets the suite's calibration inputs (seed 1; lowbit holds back its default 20%
of them); SQNR is measured against the float graph on held-out inputs (seed 2). No timing.

Quantized op types are read from ONNX Runtime's optimized graph (ORT_ENABLE_EXTENDED,
saved with ``optimized_model_filepath``): an integer kernel counts as the op it replaces
(QLinearConv / ConvInteger -> Conv; QGemm / MatMulInteger / MatMulIntegerToFloat /
DynamicQuantizeMatMul / QLinearMatMul -> MatMul; QAttention -> Attention; QLinearAdd ->
Add, ...), and any other op whose data input is an 8-bit tensor (the output of a
QuantizeLinear, an integer kernel or another such op) counts as itself (listed by name
only: lowbit adds Reshapes around a 3-D MatMul). A bias Add fused into an integer MatMul,
or a QLinearAdd with a constant operand, counts as "Add (bias)". An op that reads
DequantizeLinear outputs but runs a float kernel (ONNX Runtime's QDQ ConvTranspose, for
example) is listed apart, as "QDQ, float kernel": it is not an integer kernel.

    .venv/bin/python benchmarks/coverage.py [--table PATH]
    .venv/bin/python benchmarks/run.py --only OC
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "backends" / "onnx"))

import op_graphs as g  # noqa: E402
from test_op_coverage import CASES  # noqa: E402

import lowbit  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.metrics import sqnr_db  # noqa: E402

SLACK_DB = 1.0
HELD_ROWS, SEQ = 32, 8
LOWBIT_MODES = ("auto", "static", "dynamic")
ORT_TOOLS = ("ort-static", "ort-dynamic")

# integer kernels in ONNX Runtime's optimized graph -> the float op they replace
KERNELS = {
    "QLinearConv": "Conv", "ConvInteger": "Conv",
    "QGemm": "MatMul", "MatMulInteger": "MatMul", "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul", "QLinearMatMul": "MatMul",
    "QAttention": "Attention", "DynamicQuantizeLSTM": "LSTM",
    "GatherBlockQuantized": "Gather",
    "QLinearAdd": "Add", "QLinearMul": "Mul", "QLinearConcat": "Concat",
    "QLinearSoftmax": "Softmax", "QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu",
    "QLinearAveragePool": "AveragePool", "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearReduceMean": "ReduceMean", "QLinearWhere": "Where",
    "QLinearConvTranspose": "ConvTranspose", "QEmbedLayerNormalization": "EmbedLayerNormalization",
}
# kernels whose output is 8-bit (the others end in float or int32)
EIGHT_BIT_OUT = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
                 "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
                 "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearWhere",
                 "QLinearConvTranspose", "QuantizeLinear", "DynamicQuantizeLinear"}
# the bias input of an integer MatMul: a MatMul + Add fused into it (counted as "Add (bias)";
# the graphs here have no Gemm, so every such bias was an Add in the float graph)
BIAS_INPUT = {"QGemm": 6, "MatMulIntegerToFloat": 6, "DynamicQuantizeMatMul": 4}
QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# ops that move or select values: on an 8-bit data input they run on 8-bit data
DATA_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice",
            "Gather", "GatherElements", "Split", "Concat", "Resize", "Tile", "DepthToSpace",
            "SpaceToDepth", "MaxPool", "Pad", "Identity", "ReduceMax", "ReduceMin", "TopK"}


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:160]}" if msg else type(exc).__name__


def _session(model: str | onnx.ModelProto, optimized: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = optimized
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _run(model: str | onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return _session(model).run(None, feed)[0]


def quantized_ops(path: str, optimized: str) -> tuple[dict[str, int], dict[str, int]]:
    """({float op: count} run by integer kernels or on 8-bit data, {op: count} that read
    DequantizeLinear outputs with a float kernel) in ONNX Runtime's optimized graph."""
    _session(path, optimized)
    graph = onnx.load(optimized).graph
    consts = {t.name for t in graph.initializer}
    eight = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.UINT8,
                                                                   onnx.TensorProto.INT8)}
    dq_out = set()
    integer: collections.Counter[str] = collections.Counter()
    fake: collections.Counter[str] = collections.Counter()
    for n in graph.node:  # ORT writes the optimized graph in topological order
        op = n.op_type
        data_in = n.input[0] if n.input else ""
        if op == "DequantizeLinear":
            dq_out.add(n.output[0])
            continue
        if op in QDQ:
            eight.add(n.output[0])
            continue
        if op in KERNELS:
            kind = KERNELS[op]
            if op == "QLinearAdd" and any(n.input[k] in consts for k in (0, 3)):
                kind = "Add (bias)"  # a QDQ bias Add after a QLinearMatMul
            integer[kind] += 1
            bias = BIAS_INPUT.get(op)
            if bias is not None and len(n.input) > bias and n.input[bias]:
                integer["Add (bias)"] += 1  # fused into the integer MatMul
            if op in EIGHT_BIT_OUT or (op == "QGemm" and len(n.input) > 7 and n.input[7]):
                eight.add(n.output[0])
            continue
        if op in DATA_OPS and data_in in eight:  # moves 8-bit data
            integer[f"8-bit {op}"] += 1
            eight.update(o for o in n.output if o)
        elif any(i in dq_out for i in n.input if i):
            fake[op] += 1
    return dict(integer), dict(fake)


def _lowbit(model: onnx.ModelProto, mode: str, calib: dict, out: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, calib, mode=mode, threads=1, verify=False)
    qm.save(out, report=False)


def _reader(calib: dict[str, np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    rows = len(next(iter(calib.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{k: v[i:i + 8] for k, v in calib.items()}
                                 for i in range(0, rows, 8)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def _ort_static(pre: str, calib: dict, out: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(pre, out, _reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _ort_dynamic(pre: str, calib: dict, out: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(pre, out, per_channel=True, weight_type=QuantType.QInt8)


def _preprocess(float_path: str, pre: str) -> tuple[str, str]:
    """onnxruntime's recommended pre-processing (as in zoo.py): retried with
    ``skip_symbolic_shape=True`` where symbolic shape inference fails; the float model
    itself if that fails too."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    for skip in (False, True):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                quant_pre_process(float_path, pre, skip_symbolic_shape=skip)
            return pre, "; ".join(notes)
        except Exception as exc:  # noqa: BLE001 - recorded
            notes.append(f"quant_pre_process{' (skip_symbolic_shape)' if skip else ''}: "
                         f"{_first_line(exc)}")
    return float_path, "; ".join(notes) + "; ort quantizes the float model"


def bench_case(tmp: Path, case) -> dict:
    model = case.build()
    calib = g.inputs_for(model, case.rows, SEQ, seed=1)
    held = g.inputs_for(model, HELD_ROWS, SEQ, seed=2)
    float_path = str(tmp / f"{case.name}.float.onnx")
    onnx.save(model, float_path)
    ref = _run(float_path, held)
    pre, note = _preprocess(float_path, str(tmp / f"{case.name}.pre.onnx"))
    results: dict[str, dict] = {}
    jobs = [(m, lambda out, m=m: _lowbit(model, m, calib, out)) for m in LOWBIT_MODES]
    jobs += [("ort-static", lambda out: _ort_static(pre, calib, out)),
             ("ort-dynamic", lambda out: _ort_dynamic(pre, calib, out))]
    for tool, fn in jobs:
        out = str(tmp / f"{case.name}.{tool}.onnx")
        r: dict = {"status": "ok"}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                fn(out)
        except LowbitError as exc:
            r = {"status": "refused", "error": _first_line(exc)}
        except Exception as exc:  # noqa: BLE001 - an internal error, recorded
            r = {"status": "error", "error": _first_line(exc)}
        r["seconds"] = time.perf_counter() - t0
        if r["status"] == "ok":
            try:
                r["sqnr"] = sqnr_db(ref, _run(out, held))
                r["ops"], r["qdq_float"] = quantized_ops(out, str(tmp / f"{case.name}.{tool}.opt.onnx"))
            except Exception as exc:  # noqa: BLE001 - the written model does not run
                r = {"status": "error", "error": f"runs: {_first_line(exc)}",
                     "seconds": r["seconds"]}
        results[tool] = r
    return {"case": case.name, "results": results, "note": note}


def _ops(d: dict[str, int]) -> str:
    """Kernels with their counts, then the 8-bit data-movement ops by name (lowbit writes
    extra Reshapes around a 3-D MatMul, so their counts are not comparable)."""
    kernels = [f"{k} {v}" if v > 1 else k for k, v in sorted(d.items()) if not k.startswith("8-bit")]
    moves = [k[6:] for k in sorted(d) if k.startswith("8-bit")]
    return ", ".join(kernels + ([f"8-bit {'/'.join(moves)}"] if moves else [])) or "none"


def _cell(r: dict) -> str:
    if r["status"] != "ok":
        return f"{'refused' if r['status'] == 'refused' else '**error**'}: {r['error']}"
    extra = f"; QDQ, float kernel: {_ops(r['qdq_float'])}" if r["qdq_float"] else ""
    return f"{r['sqnr']:.1f} dB: {_ops(r['ops'])}{extra}"


def _best(run: dict, tools) -> tuple[str | None, float]:
    ok = [(t, run["results"][t]["sqnr"]) for t in tools if run["results"][t]["status"] == "ok"]
    return max(ok, key=lambda x: x[1]) if ok else (None, float("nan"))


def _checks(run: dict) -> dict[str, bool | None]:
    """auto >= the best onnxruntime result - 1 dB; auto and static >= quantize_static's -
    1 dB; dynamic >= quantize_dynamic's - 1 dB. None: no onnxruntime result to compare."""
    res = run["results"]

    def ge(lb: str, tools: tuple[str, ...]) -> bool | None:
        best, best_sqnr = _best(run, tools)
        if best is None:
            return None
        return res[lb]["status"] == "ok" and res[lb]["sqnr"] >= best_sqnr - SLACK_DB

    return {"auto": ge("auto", ORT_TOOLS), "auto-static": ge("auto", ("ort-static",)),
            "static": ge("static", ("ort-static",)), "dynamic": ge("dynamic", ("ort-dynamic",))}


def table(runs: list[dict]) -> str:
    lines = ["| graph | lowbit auto | lowbit static | lowbit dynamic | ort quantize_static | "
             "ort quantize_dynamic | auto >= best ort - 1 dB |", "|---|---|---|---|---|---|---|"]
    flag = {True: "yes", False: "**no**", None: "-"}
    for run in runs:
        res, chk = run["results"], _checks(run)
        lines.append(f"| {run['case']} | " + " | ".join(_cell(res[t]) for t in (*LOWBIT_MODES, *ORT_TOOLS))
                     + f" | {flag[chk['auto']]} |")
    notes = [f"- {r['case']}: {r['note']}" for r in runs if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def summary(runs: list[dict]) -> dict:
    errors = [(r["case"], t, r["results"][t]["error"]) for r in runs for t in LOWBIT_MODES
              if r["results"][t]["status"] == "error"]
    refused = [(r["case"], t) for r in runs for t in LOWBIT_MODES
               if r["results"][t]["status"] == "refused"]
    ort_errors = [(r["case"], t) for r in runs for t in ORT_TOOLS
                  if r["results"][t]["status"] == "error"]
    checks = [_checks(r) for r in runs]
    count = {k: (sum(c[k] is True for c in checks), sum(c[k] is not None for c in checks))
             for k in ("auto", "auto-static", "static", "dynamic")}
    missing: dict[str, list[str]] = collections.defaultdict(list)
    for r in runs:
        ort_ops = {op for t in ORT_TOOLS if r["results"][t]["status"] == "ok"
                   for op in r["results"][t]["ops"]}
        lb_ops = {op for t in LOWBIT_MODES if r["results"][t]["status"] == "ok"
                  for op in r["results"][t]["ops"]}
        for op in sorted(ort_ops - lb_ops):
            missing[op].append(r["case"])
    miss = "; ".join(f"{op} ({', '.join(cases)})" for op, cases in sorted(missing.items())) or "none"
    worse = [r["case"] for r, c in zip(runs, checks) if c["auto"] is False]
    return {"id": "OC", "what": "operator coverage graphs: lowbit vs onnxruntime quantize_static "
                                "(QDQ, per-channel) / quantize_dynamic (per-channel)",
            "target": f"0 internal errors; SQNR >= onnxruntime's - {SLACK_DB:g} dB on every "
                      "graph (auto and static vs quantize_static, dynamic vs quantize_dynamic; "
                      "auto vs the better of the two reported); every op onnxruntime quantizes "
                      "quantized by lowbit or kept float for a documented, measured reason",
            "measured": (f"SQNR >= onnxruntime's - {SLACK_DB:g} dB: auto vs best of static/dynamic "
                         "{0}/{1}, auto vs quantize_static {2}/{3}, static vs quantize_static "
                         "{4}/{5}, dynamic vs quantize_dynamic {6}/{7}; ".format(
                             *count["auto"], *count["auto-static"], *count["static"],
                             *count["dynamic"]) +
                         f"internal errors {len(errors)}, refused with a LowbitError "
                         f"{len(refused)}; onnxruntime quantizes, lowbit leaves float in every "
                         f"mode: {miss}"),
            "pass": not errors and all(count[k][0] == count[k][1]
                                       for k in ("auto-static", "static", "dynamic")),
            "details": (f"{len(runs)} graphs x lowbit auto/static/dynamic + onnxruntime "
                        f"quantize_static/quantize_dynamic; calibration rows per graph as in "
                        f"the suite (24, MatMul + Tile 64), SQNR on {HELD_ROWS} held-out rows "
                        f"(sequence {SEQ}); auto below the better onnxruntime result - {SLACK_DB:g} dB: "
                        f"{', '.join(worse) or 'none'}; "
                        f"lowbit errors: {'; '.join(f'{c} {t}: {e}' for c, t, e in errors) or 'none'}; "
                        f"onnxruntime errors: {', '.join(f'{c} {t}' for c, t in ort_errors) or 'none'}"),
            "table": table(runs)}


def bench_coverage(tmp: Path, only: tuple[str, ...] = (), table_path: str = "") -> list[dict]:
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs per tensor
    runs = []
    for case in CASES:
        if only and case.name not in only:
            continue
        t0 = time.perf_counter()
        runs.append(bench_case(tmp, case))
        print(f"[{case.name} done in {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    row = summary(runs)
    text = row.pop("table")
    print(text)
    if table_path:
        Path(table_path).write_text(text)
    row["details"] += "\n\n" + text
    return [row]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated graph names")
    parser.add_argument("--table", default="", help="also write the markdown table to this file")
    args = parser.parse_args()
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    from lowbit.runtime.environment import cpu_info, versions

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-coverage-") as tmp:
        rows = bench_coverage(Path(tmp), only, args.table)
    env = {**cpu_info(), **versions()}
    print(f"CPU: {env['cpu']} ({env['cores']} cores, VNNI: {env['vnni']}); onnx {env['onnx']}, "
          f"onnxruntime {env['onnxruntime']}, lowbit {env['lowbit']}; total "
          f"{time.perf_counter() - t0:.0f} s\n")
    for r in rows:
        print(f"| {r['id']} | {r['what']} | {r['target']} | {r['measured']} | "
              f"{'yes' if r['pass'] else '**no**'} |")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
