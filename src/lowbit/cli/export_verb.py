"""``lowbit export MODEL --to tflite -o model.tflite``: write a model (ONNX, Keras, or a
recipe's result) as TFLite from lowbit's plan, timed and verified in LiteRT. Registered by
``build_verbs``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lowbit.cli.common import check_output, emit, out_console, progress_bar


def export(
    model: Path = typer.Argument(..., help="Float model: ONNX, .keras, or a SavedModel folder."),
    to: str = typer.Option("tflite", "--to", help="Target format: tflite."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .tflite file."),
    data: Path | None = typer.Option(None, "--data", help=".npz calibration data (x, y); needed "
                                     "by modes auto and int8 and by --recipe."),
    eval_data: Path | None = typer.Option(None, "--eval-data", "--val", help=".npz verification "
                                          "data; default: the last 20% of --data, held back."),
    mode: str = typer.Option("auto", help="auto | int8 | dynamic | int4 | float16 | float"),
    io: str = typer.Option("float", "--io", help="float | int8: the inputs' and outputs' type "
                           "(int8 needs --mode int8)."),
    recipe: str | None = typer.Option(None, "--recipe", help="Compress with this recipe first "
                                      "(see lowbit compress --list-recipes)."),
    batch: int | None = typer.Option(None, help="Batch the candidates are timed at (default "
                                     "the model's, else 8)."),
    threads: int = typer.Option(1, help="LiteRT threads for timing."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Write a TFLite model from lowbit's quantization plan; auto keeps the fastest
    candidate that holds the quality, timed in LiteRT (float when nothing is faster).

    Example: lowbit export cnn.keras --to tflite -o cnn.tflite --data train.npz
    Example: lowbit export cnn.onnx --to tflite -o cnn.int8.tflite --mode int8 --io int8 --data train.npz
    Example: lowbit export cnn.keras --to tflite -o cnn.edge.tflite --recipe edge --data train.npz
    """
    from lowbit.errors import ValidationError
    from lowbit.export import export_tflite

    if to != "tflite":
        raise ValidationError(f"option --to: expected tflite, got {to!r}")
    recipe_file = Path(recipe) if recipe is not None and Path(recipe).is_file() else None
    loaded = None
    if recipe is not None:  # a bad recipe is refused before anything is read
        from lowbit.config.recipe import load_recipe

        loaded = load_recipe(recipe)
    check_output(output, model, data, eval_data, recipe_file, suffixes=(".tflite",))
    show = not quiet and not as_json
    with progress_bar(show) as update:
        report = export_tflite(str(model), output, data=str(data) if data else None,
                               eval_data=str(eval_data) if eval_data else None, mode=mode,
                               io=io, recipe=loaded, batch=batch, threads=threads,
                               progress=update)
    if show:
        render_export(report)
    emit(report, as_json)


def render_export(report: dict[str, Any]) -> None:
    from rich.table import Table

    t, v = report["tflite"], report["verification"]
    lat = v["latency"]
    if t.get("candidates"):
        table = Table(title=f"TFLite candidates, timed in LiteRT (batch {lat['batch']}, "
                            f"{lat['threads']} thread(s))")
        for col in ("candidate", "speed vs float", "SQNR dB", "bytes", "kept"):
            table.add_column(col)
        for row in t["candidates"]:
            table.add_row(row["name"], f"{row['speedup']:.2f}x",
                          "-" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}",
                          f"{row['bytes']:,}", "yes" if row["kept"] else "")
        out_console.print(table)
    if t.get("note"):
        out_console.print(t["note"], soft_wrap=True)
    acc = v.get("accuracy")
    accuracy = (f", accuracy {100 * acc['tflite']:.2f}% (float {100 * acc['float onnx']:.2f}%)"
                if acc and acc.get("tflite") is not None else "")
    out_console.print(
        f"{report['output']['path']}: {report['output']['size_bytes']:,} bytes "
        f"({v['size_ratio_vs_float_tflite']:.3f}x the float TFLite file), "
        f"{lat['speedup_vs_float_tflite']:.2f}x the float TFLite speed, "
        f"{lat['speedup_vs_float_onnx']:.2f}x the float ONNX speed{accuracy}; runs in LiteRT "
        f"on {v['samples']} samples", soft_wrap=True)
