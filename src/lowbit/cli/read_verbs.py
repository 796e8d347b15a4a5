"""Verbs that read models: bench, eval, inspect."""

from __future__ import annotations

from pathlib import Path

import typer

from lowbit.cli.common import (
    app,
    emit,
    out_console,
)


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX, .lbz or .tflite models; ratios are "
                                        "against the first."),
    data: Path | None = typer.Option(None, "--data", help=".npz inputs (with 'y' for accuracy)."),
    batch: int | None = typer.Option(None, help="Batch size; default the models' fixed "
                                     "batch, else 8."),
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
        emit(result, True)
    else:
        from lowbit.report.table import render_bench

        render_bench(result, out_console)


@app.command(name="eval")
def evaluate(
    model: Path = typer.Argument(..., help="ONNX, .lbz or .tflite model."),
    data: Path = typer.Option(..., "--data", help=".npz with 'x' and 'y'."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Accuracy of a model on labelled data.

    Example: lowbit eval model.int8.onnx --data test.npz
    """
    from lowbit.api import evaluate as api_evaluate

    result = api_evaluate(str(model), str(data))
    if as_json:
        emit(result, True)
    else:
        acc = result.get("accuracy")
        why = (f" (labels given, but the output {result['output_shapes'][0]} is not class "
               "scores [N, K]: no accuracy)") if "accuracy" in result else \
            " (no labels 'y': no accuracy)"
        out_console.print(f"{model}: {result['samples']} samples"
                          + (f", accuracy {100 * acc:.2f}%" if acc is not None else why))


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="ONNX, .lbz or .tflite model."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Operators, parameters, dtypes, per-layer sizes; what is quantized and why not.

    Example: lowbit inspect model.int8.onnx
    """
    from lowbit.report.inspect import inspect_file

    info = inspect_file(model)
    if as_json:
        emit(info, True)
    else:
        from lowbit.report.table import render_inspect

        render_inspect(info, out_console)

