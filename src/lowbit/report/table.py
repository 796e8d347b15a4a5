"""Human-readable tables of reports (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lowbit.report.speed import speedup_text


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def render_report(report: dict[str, Any], console: Console, title: str,
                  label: str = "compressed") -> None:
    """The table of any run's report: quality, sizes, latency; then what the stages
    decided (calibration, nodes, skipped layers), notes, flags and warnings."""
    ver = report.get("verification", {})
    ag, lat, sizes = ver.get("agreement", {}), ver.get("latency", {}), report.get("sizes")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column(label, justify="right")
    acc = ag.get("accuracy")
    if acc:
        table.add_row("test accuracy", _pct(acc["float"]), _pct(acc["compressed"]))
    if ag.get("top1_agreement") is not None:
        table.add_row("top-1 agreement with the original", "100.00%", _pct(ag["top1_agreement"]))
    if "sqnr_db" in ag:
        table.add_row("output SQNR / cosine", "-", f"{ag['sqnr_db']:.1f} dB / {ag['cosine']:.4f}")
    if sizes:
        table.add_row("weight sparsity", "-", _pct(report.get("weight_sparsity")))
        table.add_row("size: ONNX", fmt_bytes(sizes.get("float_onnx_bytes")),
                      fmt_bytes(sizes.get("compressed_onnx_bytes")))
        if sizes.get("lbz_bytes"):
            table.add_row("size: .lbz", "-", f"{fmt_bytes(sizes['lbz_bytes'])} "
                          f"({sizes.get('lbz_ratio', 0):.1f}x smaller)")
    table.add_row("size on disk", fmt_bytes(report.get("input", {}).get("size_bytes")),
                  fmt_bytes(report.get("output", {}).get("size_bytes")))
    if lat:
        table.add_row(f"latency p50 (batch {lat['batch']}, {lat['threads']} thread)",
                      f"{lat['float']['p50_ms']:.3f} ms", f"{lat['compressed']['p50_ms']:.3f} ms")
        table.add_row("speedup", "1.00x", speedup_text(lat["speedup"], say_slower=True))
    console.print(table)
    if report.get("stages_compared"):
        render_stages(report["stages_compared"], console)
    if "nodes" in report:
        cal = report.get("calibration", {})
        if cal.get("method"):
            console.print(
                f"calibration: {cal['method']} ({cal.get('samples')} samples"
                + (f"; output SQNR by method: {cal['sqnr_db_by_method']}"
                   if cal.get("sqnr_db_by_method") else "") + ")")
        else:
            console.print("calibration: not used (no statically quantized tensor in the result)")
        console.print(f"nodes: {report['nodes'].get('counts', {})}")
    search = report.get("candidates")
    if search:
        vs = "float" if "speedup" in search["candidates"][0] else "the first candidate"
        rows = "; ".join(f"{r['name']} {speedup_text(r.get('speedup', r.get('speed_vs_first', 0)))} "
                         f"{r['sqnr_db']:.1f} dB" + (" (kept)" if r["kept"] else "")
                         for r in search["candidates"])
        console.print(f"candidates timed whole (batch {search['batch']}, {search['threads']} "
                      f"thread(s), speed vs {vs}): {rows}")
    for name, why in report.get("skipped", {}).items():
        console.print(f"skipped {name}: {why}")
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    flagged = set()
    for flag in ver.get("flags", []):
        console.print(f"[yellow]warning ({flag['kind']}):[/yellow] {flag['message']}")
        flagged.add(flag["message"])
    for note in report.get("warnings", []):
        if note not in flagged:  # (the flags' messages are also in the warnings)
            console.print(f"[yellow]warning:[/yellow] {note}")


def render_stages(rows: list[dict[str, Any]], console: Console) -> None:
    """One row per stage: quality, size (ONNX, .lbz, times smaller), speed vs the original."""
    table = Table(title="every stage (held-back data; one alternating timing run)")
    for name in ("stage", "accuracy", "agreement", "ONNX", ".lbz", "smaller (.lbz)", "speed"):
        table.add_column(name, justify="left" if name == "stage" else "right",
                         no_wrap=name == "stage")
    for r in rows:
        speed = speedup_text(r["speedup"], say_slower=True) if r.get("speedup") else "-"
        table.add_row(r["stage"], _pct(r.get("accuracy")), _pct(r.get("top1_agreement")),
                      fmt_bytes(r["onnx_bytes"]), fmt_bytes(r["lbz_bytes"]),
                      f"{r['lbz_ratio']:.1f}x", speed)
    console.print(table)


def render_bench(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"batch {result['batch']}, {result['threads']} intra-op thread(s)")
    for col in ("model", "size", "p50 ms", "p90 ms", "samples/s", "speedup", "size ratio",
                "accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    names = [Path(row["model"]).name for row in result["models"]]
    if len(set(names)) < len(names):  # file names alone would be ambiguous
        names = [row["model"] for row in result["models"]]
    for name, row in zip(names, result["models"]):
        lat = row["latency"]
        table.add_row(name, fmt_bytes(row["size_bytes"]), f"{lat['p50_ms']:.3f}",
                      f"{lat['p90_ms']:.3f}", f"{lat['throughput_per_s']:.0f}",
                      speedup_text(row["speedup_vs_first"]), f"{row['size_ratio_vs_first']:.2f}x",
                      _pct(row.get("accuracy")))
    console.print(table)


def render_inspect(info: dict[str, Any], console: Console) -> None:
    if info.get("format") == "tflite":
        return render_tflite(info, console)
    console.print(f"[bold]{info['model']}[/bold]: {fmt_bytes(info['size_bytes'])} on disk, "
                  f"{info['parameters']:,} parameters, opsets {info['opsets']}")
    console.print(f"inputs: {info['inputs']}")
    console.print(f"outputs: {info['outputs']}")
    console.print(f"operators: {info['operators']}")
    console.print(f"parameters by dtype: {info['parameters_by_dtype']}; "
                  f"bytes by dtype: {info['bytes_by_dtype']}")
    table = Table(title="layers")
    for col in ("node", "op", "status", "weights", "dtypes", "why"):
        table.add_column(col)
    for layer in info["layers"]:
        table.add_row(layer["name"], layer["op_type"], layer["status"],
                      fmt_bytes(layer["weight_bytes"]), ",".join(layer["weight_dtypes"]),
                      layer["reason"])
    console.print(table)
    lbz = info.get("lbz")
    if lbz:
        render_lbz(lbz, console)


def render_lbz(lbz: dict[str, Any], console: Console) -> None:
    table = Table(title=f".lbz v{lbz['format_version']}: {lbz['file_bytes']:,} bytes "
                        f"(per-tensor bytes: {lbz.get('attribution', '?')} share of each part)")
    for col in ("initializer", "shape", "encoding", "sparsity", "clusters", "bits", "bytes"):
        table.add_column(col, justify="left" if col in ("initializer", "encoding") else "right")
    for t in lbz["initializers"]:
        table.add_row(t["name"], "x".join(str(d) for d in t["shape"]) or "scalar", t["encoding"],
                      f"{100 * t['sparsity']:.1f}%" if t.get("sparsity") is not None else "-",
                      str(t["clusters"]) if t.get("clusters") else "-",
                      str(t["bits"]) if t.get("bits") is not None else "-",
                      f"{t['bytes']:.0f}" if t.get("bytes") is not None else "in graph")
    console.print(table)
    parts = ", ".join(f"{k} {v:,} B" for k, v in lbz["parts"].items())
    console.print(f"file breakdown: {parts}")


def render_tflite(info: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{info['model']}[/bold]: TFLite, {fmt_bytes(info['size_bytes'])} on disk; "
                  f"constants by type: {info['constant_bytes']}")
    console.print(f"inputs: {info['inputs']}")
    console.print(f"outputs: {info['outputs']}")
    table = Table(title="operators")
    for col in ("#", "op", "runs as", "weights"):
        table.add_column(col)
    for k, op in enumerate(info["operators"]):
        table.add_row(str(k), op["op"], op["execution"], ",".join(op["weights"]))
    console.print(table)
