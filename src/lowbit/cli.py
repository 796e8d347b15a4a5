"""The ``lowbit`` command line: ``lowbit <verb> MODEL -o OUT [options]``.

Exit codes: 0 success, 1 the work failed (e.g. ``--require`` not met),
2 a usage or input error. Errors print one line; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from lowbit.errors import LowbitError, TargetNotMetError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained neural networks smaller and faster, and prove it.")
out_console = Console()
err_console = Console(stderr=True)


@contextmanager
def _progress(enabled: bool) -> Any:
    """Yields a callback (stage, done, total) that drives a rich progress bar."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err_console, transient=True) as bar:
        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _emit(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")


@app.command()
def demo(
    output: Path = typer.Option(Path("lowbit-demo"), "-o", "--output", help="Output folder."),
    epochs: int = typer.Option(15, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed for the split, training and calibration sample."),
    batch: int = typer.Option(64, help="Batch size for the latency measurement."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for timing."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train a small CNN on the bundled digits, quantize it to INT8, verify and compare.

    Example: lowbit demo -o lowbit-demo
    """
    from lowbit.demo import run_demo

    show = not quiet and not as_json
    with _progress(show) as update:
        def on_epoch(done: int, total: int, loss: float) -> None:
            if update is not None:
                update(f"training (loss {loss:.3f})", done, total)
        report = run_demo(output, epochs=epochs, seed=seed, threads=threads, batch=batch,
                          on_epoch=on_epoch, progress=update)
    if show:
        from lowbit.report.table import render_quantize

        render_quantize(report, out_console, title="digits CNN: float vs INT8")
        out_console.print(f"wrote {output}/digits_cnn.float.onnx, {output}/digits_cnn.int8.onnx, "
                          f"{output}/report.json in {report['seconds']['demo_total']:.1f} s")
    _emit(report, as_json)


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Float ONNX model."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the INT8 model."),
    data: Path = typer.Option(..., "--data", help=".npz calibration data: 'x' (and 'y'), or "
                              "arrays named after the model's inputs."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help=".npz verification data; "
                                          "default: the last 20% of --data, held back."),
    mode: str = typer.Option("auto", help="auto | static | dynamic | weight-only"),
    bits: int = typer.Option(8, help="8 (INT8 modes), or 2-8 with --mode weight-only."),
    group_size: int = typer.Option(128, "--group-size", help="Weight-only: block of K sharing "
                                   "a scale (16, 32, 64, 128, 256)."),
    algorithm: str = typer.Option("rtn", help="Weight-only: rtn | gptq | hqq."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="Weight-only: zero point per "
                                    "group (default symmetric)."),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="Weight-only MatMulNBits: "
                                       "0 float math, 4 int8 activations (fast)."),
    calibration: str = typer.Option("auto", help="auto | minmax | percentile | mse | entropy"),
    weights: str = typer.Option("auto", "--weights", help="Static MatMul/Gemm weight "
                                "granularity: auto | channel | tensor (Conv: always channel)."),
    strict: bool = typer.Option(False, "--strict", help="Fail if an operator is not supported."),
    exclude: list[str] = typer.Option([], "--exclude", help="Node name to keep in float "
                                      "(repeatable)."),
    max_samples: int = typer.Option(256, "--max-samples", help="Calibration samples at most."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="INT8: like --min-cosine, "
                                          "with accuracy drop <= this many points (needs "
                                          "labels 'y')."),
    plan: Path | None = typer.Option(None, "--plan", help="Mixed-precision plan from "
                                     "`lowbit sensitivity` (INT4/INT8/float per layer)."),
    min_cosine: float | None = typer.Option(None, "--min-cosine", help="INT8: keep the most "
                                            "sensitive layers in float until the output cosine "
                                            "vs float reaches this (e.g. 0.995)."),
    batch: int = typer.Option(8, help="Batch size for the latency measurement."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for timing."),
    require: bool = typer.Option(False, "--require", help="Exit 1 if the report flags a "
                                 "degradation or a slowdown."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Quantize an ONNX model: INT8 (static QDQ and/or dynamic) or 2-8 bit weight-only.

    Example: lowbit quantize model.onnx -o model.int8.onnx --data calib.npz
    Example: lowbit quantize gpt.onnx -o gpt.int4.onnx --data calib.npz --mode weight-only
    --bits 4 --group-size 128 --algorithm gptq
    """
    from lowbit.api import quantize as api_quantize
    from lowbit.api import read_mixed_plan
    from lowbit.config import Int8Config, StageConfig, WeightOnlyConfig

    _check_output(output)
    config: StageConfig
    if plan is not None:
        config = read_mixed_plan(plan)
        label = "mixed"
    elif mode.lower() == "weight-only":
        config = WeightOnlyConfig(bits=bits, group_size=group_size, algorithm=algorithm,
                                  symmetric=False if asymmetric else None,
                                  accuracy_level=accuracy_level, exclude_nodes=tuple(exclude),
                                  max_calibration_samples=max_samples)
        label = f"INT{bits} weight-only"
    else:
        if bits != 8:
            from lowbit.errors import ValidationError

            raise ValidationError(f"option --bits: {bits} needs --mode weight-only (static, "
                                  "dynamic and auto modes are INT8)")
        config = Int8Config(mode=mode, calibration=calibration, strict=strict,
                            exclude_nodes=tuple(exclude), max_calibration_samples=max_samples,
                            weight_granularity=weights, min_cosine=min_cosine, max_drop=max_drop)
        label = "INT8"
    show = not quiet and not as_json
    with _progress(show) as update:
        result = api_quantize(str(model), str(data), config=config,
                              eval_data=str(eval_data) if eval_data else None,
                              threads=threads, batch=batch, progress=update)
    _finish(result, output, show, as_json, require, f"float vs {label}", label)


def _finish(result: Any, output: Path, show: bool, as_json: bool, require: bool, title: str,
            label: str | None = None) -> None:
    """Save the result, print its table (or JSON), and apply --require."""
    result.save(output)
    report = result.report
    if show:
        from lowbit.report.table import render_compression, render_quantize

        if label is not None:
            render_quantize(report, out_console, title=title, label=label)
        else:
            render_compression(report, out_console, title=title)
        out_console.print(f"wrote {output} and {output.parent / 'report.json'}")
    _emit(report, as_json)
    flags = report.get("verification", {}).get("flags", [])
    if require and flags:
        raise TargetNotMetError("--require: the report flags " + "; ".join(f["kind"] for f in flags))


def _check_output(output: Path) -> None:
    from lowbit.errors import ValidationError

    if not output.parent.is_dir():
        raise ValidationError(f"option --output: folder does not exist: {output.parent}")


def _parse_nm(nm: str | None) -> tuple[int, int] | None:
    from lowbit.errors import ValidationError

    if not nm:
        return None
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise ValidationError(f"option --nm: {nm!r} must look like 2:4") from None
    return n, m


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Float ONNX model (or .lbz)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output: .onnx, or .lbz (compressed)."),
    sparsity: float = typer.Option(..., help="Fraction of weights (or channels) to remove, [0, 1)."),
    structured: bool = typer.Option(False, "--structured", help="Remove whole channels/filters."),
    importance: str = typer.Option("l1", help="Channel importance: l1 | l2 | bn."),
    scope: str = typer.Option("layer", help="Unstructured threshold: layer | global."),
    nm: str | None = typer.Option(None, "--nm", help="N:M semi-structured, e.g. 2:4."),
    data: Path | None = typer.Option(None, "--data", help=".npz training data (x, y) for fine-tuning."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help=".npz evaluation data."),
    epochs: int = typer.Option(0, help="Fine-tuning epochs (needs --data with labels)."),
    lr: float = typer.Option(1e-3, help="Fine-tuning learning rate."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for timing."),
    require: bool = typer.Option(False, "--require", help="Exit 1 if the report flags a degradation."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Magnitude pruning: unstructured (gradual with --epochs), N:M, or --structured channels.

    Example: lowbit prune model.onnx -o model.pruned.lbz --sparsity 0.9 --data train.npz --epochs 5
    """
    from lowbit.api import prune as api_prune

    _check_output(output)
    show = not quiet and not as_json
    with _progress(show) as update:
        cm = api_prune(str(model), str(data) if data else None, sparsity=sparsity,
                       structured=structured, importance=importance, scope=scope,
                       nm=_parse_nm(nm), epochs=epochs, lr=lr, threads=threads,
                       eval_data=str(eval_data) if eval_data else None, progress=update)
    _finish(cm, output, show, as_json, require, "original vs pruned")


@app.command()
def cluster(
    model: Path = typer.Argument(..., help="Float ONNX model (or .lbz)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output: .onnx, or .lbz (compressed)."),
    bits: int = typer.Option(..., help="Bits per shared value: 1..8 (2**bits clusters per layer)."),
    data: Path | None = typer.Option(None, "--data", help=".npz training data (x, y) for "
                                     "centroid fine-tuning."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help=".npz evaluation data."),
    epochs: int = typer.Option(0, help="Centroid fine-tuning epochs."),
    lr: float = typer.Option(1e-4, help="Centroid learning rate."),
    init: str = typer.Option("linear", help="Centroid init: linear | density | random."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for timing."),
    require: bool = typer.Option(False, "--require", help="Exit 1 if the report flags a degradation."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Weight sharing: per-layer k-means; pruned zeros stay zero.

    Example: lowbit cluster model.onnx -o model.c4.lbz --bits 4 --data train.npz --epochs 2
    """
    from lowbit.api import cluster as api_cluster

    _check_output(output)
    show = not quiet and not as_json
    with _progress(show) as update:
        cm = api_cluster(str(model), str(data) if data else None, bits=bits, epochs=epochs, lr=lr,
                         init=init, threads=threads,
                         eval_data=str(eval_data) if eval_data else None, progress=update)
    _finish(cm, output, show, as_json, require, "original vs clustered")


@app.command()
def compress(
    model: Path = typer.Argument(..., help="Float ONNX model."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .lbz (or .onnx)."),
    sparsity: float = typer.Option(0.9, help="Weights to prune, [0, 1)."),
    bits: int = typer.Option(5, help="Bits per shared value, 1..8."),
    data: Path | None = typer.Option(None, "--data", help=".npz training data (x, y)."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help=".npz evaluation data."),
    epochs: int = typer.Option(0, help="Fine-tuning epochs for each stage."),
    lr: float = typer.Option(1e-3, help="Learning rate (centroids use a tenth)."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for timing."),
    require: bool = typer.Option(False, "--require", help="Exit 1 if the report flags a degradation."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prune + cluster + encode (Deep Compression) into a small .lbz file.

    Example: lowbit compress lenet.onnx -o lenet.lbz --sparsity 0.95 --bits 5 --data train.npz --epochs 10
    """
    from lowbit.api import compress as api_compress

    _check_output(output)
    show = not quiet and not as_json
    with _progress(show) as update:
        cm = api_compress(str(model), str(data) if data else None, sparsity=sparsity, bits=bits,
                          epochs=epochs, lr=lr, threads=threads,
                          eval_data=str(eval_data) if eval_data else None, progress=update)
    _finish(cm, output, show, as_json, require, "original vs compressed")


@app.command()
def unpack(
    model: Path = typer.Argument(..., help="A .lbz file."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
) -> None:
    """Decode a .lbz file into a runnable ONNX model (weights bit for bit).

    Example: lowbit unpack model.lbz -o model.onnx
    """
    from lowbit.container import read_lbz
    from lowbit.fileio import write_bytes_atomic

    _check_output(output)
    proto = read_lbz(model)
    write_bytes_atomic(output, proto.SerializeToString())
    out_console.print(f"wrote {output} ({output.stat().st_size:,} bytes) from {model} "
                      f"({model.stat().st_size:,} bytes)")


@app.command()
def sensitivity(
    model: Path = typer.Argument(..., help="Float ONNX model."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the plan (.json)."),
    data: Path = typer.Option(..., "--data", help=".npz calibration data."),
    min_cosine: float | None = typer.Option(None, "--min-cosine", help="Quality target for the plan."),
    max_bits: float | None = typer.Option(None, "--max-bits", help="Size target: average bits "
                                          "per MatMul/Gemm weight (e.g. 5)."),
    group_size: int = typer.Option(128, "--group-size", help="INT4 group size."),
    quiet: bool = typer.Option(False, "--quiet", help="No table."),
) -> None:
    """Per-layer sensitivity (only that layer INT4 / INT8) and a mixed-precision plan.

    Example: lowbit sensitivity gpt.onnx --data calib.npz --min-cosine 0.999 -o plan.json
    Then: lowbit quantize gpt.onnx --data calib.npz --plan plan.json -o gpt.mixed.onnx
    """
    from rich.table import Table

    from lowbit.api import sensitivity as api_sensitivity
    from lowbit.fileio import write_json_atomic

    _check_output(output)
    with _progress(not quiet) as update:
        plan = api_sensitivity(str(model), str(data), min_cosine=min_cosine, max_bits=max_bits,
                               group_size=group_size, progress=update)
    write_json_atomic(output, plan)
    if not quiet:
        table = Table(title="output cosine vs float with only this layer quantized")
        for col in ("layer", "params", "INT4", "INT8", "plan"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in plan["sensitivity"]:
            table.add_row(r["name"], f"{r['params']:,}", f"{r['cosine_int4']:.6f}",
                          f"{r['cosine_int8']:.6f}", plan["layers"][r["name"]])
        out_console.print(table)
        out_console.print(f"wrote {output}")


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX models; ratios are against the first."),
    data: Path | None = typer.Option(None, "--data", help=".npz inputs (with 'y' for accuracy)."),
    batch: int = typer.Option(8, help="Batch size."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads."),
    iterations: int = typer.Option(50, help="Timed runs per model (at least)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Latency (p50/p90), throughput, size and accuracy, side by side.

    Example: lowbit bench model.onnx model.int8.onnx --data test.npz
    """
    from lowbit.api import bench as api_bench

    result = api_bench([str(m) for m in models], data=str(data) if data else None,
                       batch=batch, threads=threads, iterations=iterations)
    if as_json:
        _emit(result, True)
    else:
        from lowbit.report.table import render_bench

        render_bench(result, out_console)


@app.command(name="eval")
def evaluate(
    model: Path = typer.Argument(..., help="ONNX model."),
    data: Path = typer.Option(..., "--data", help=".npz with 'x' and 'y'."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Accuracy of a model on labelled data.

    Example: lowbit eval model.int8.onnx --data test.npz
    """
    from lowbit.api import evaluate as api_evaluate

    result = api_evaluate(str(model), str(data))
    if as_json:
        _emit(result, True)
    else:
        acc = result.get("accuracy")
        out_console.print(f"{model}: {result['samples']} samples"
                          + (f", accuracy {100 * acc:.2f}%" if acc is not None else
                             " (no labels 'y': no accuracy)"))


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="ONNX model."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Operators, parameters, dtypes, per-layer sizes; what is quantized and why not.

    Example: lowbit inspect model.int8.onnx
    """
    from lowbit.report.inspect import inspect_file

    info = inspect_file(model)
    if as_json:
        _emit(info, True)
    else:
        from lowbit.report.table import render_inspect

        render_inspect(info, out_console)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        # standalone mode: typer/click print usage errors themselves and exit 2
        app(args=args, prog_name="lowbit", standalone_mode=True)
    except LowbitError as exc:
        if debug:
            raise
        err_console.print("error: " + str(exc), markup=False, emoji=False, highlight=False,
                          soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        err_console.print(str(exc.code))
        return 1
    except Exception as exc:  # anything unexpected: one line, not a traceback
        if debug:
            raise
        err_console.print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for "
                          "the traceback)", markup=False, emoji=False, highlight=False,
                          soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
