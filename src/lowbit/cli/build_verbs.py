"""Verbs that write a model: demo, quantize, prune, cluster, compress, unpack, sensitivity."""

from __future__ import annotations

from pathlib import Path

import typer

from lowbit.cli import compress_verb, export_verb
from lowbit.cli.common import (
    app,
    check_output,
    emit,
    finish,
    out_console,
    parse_nm,
    progress_bar,
    refuse_options,
)


@app.command()
def demo(
    output: Path = typer.Option(Path("lowbit-demo"), "-o", "--output", help="Output folder."),
    epochs: int = typer.Option(6, help="Training epochs of the float CNN."),
    seed: int = typer.Option(0, help="Seed for the split and the training."),
    batch: int = typer.Option(64, help="Batch size for the latency measurement."),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for timing."),
    quiet: bool = typer.Option(False, "--quiet", help="No table or progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    framework: str = typer.Option("torch", "--framework", help="torch (ONNX out) | keras "
                                  "(the TFLite tutorial: Keras in, .tflite out; lowbit[tf])."),
) -> None:
    """Train the tutorial CNN on the bundled digits (28x28), compress it with the edge
    recipe (channels, pruning, weight sharing, INT8 QAT, distillation), verify and compare
    every stage.

    Example: lowbit demo -o lowbit-demo
    Example: lowbit demo --framework keras -o lowbit-keras-demo
    """
    from lowbit.demo import run_demo, run_keras_demo
    from lowbit.errors import ValidationError

    if framework not in ("torch", "keras"):
        raise ValidationError(f"option --framework: expected torch or keras, got {framework!r}")
    runner = run_keras_demo if framework == "keras" else run_demo

    show = not quiet and not as_json
    with progress_bar(show) as update:
        def on_epoch(done: int, total: int, loss: float) -> None:
            if update is not None:
                update(f"training the float CNN (loss {loss:.3f})", done, total)
        report = runner(output, epochs=epochs, seed=seed, threads=threads, batch=batch,
                        on_epoch=on_epoch, progress=update)
    if show:
        from lowbit.report.table import render_report

        render_report(report, out_console, title="digits CNN (28x28): float vs edge recipe",
                      label="compressed")
        targets = report["demo"].get("targets", {})
        if targets:
            m, met = targets["measured"], targets["met"]
            drop = m["accuracy_drop_points"]
            change = "n/a" if drop is None else f"{0.0 - drop:+.2f}"
            out_console.print(
                "targets (final vs float): "
                f"speed {m['speedup']}x (>= 2x: {'met' if met['speedup'] else 'MISSED'}), "
                f"ONNX {m['onnx_ratio']}x smaller (>= 4x: {'met' if met['onnx_ratio'] else 'MISSED'}), "
                f".lbz {m['lbz_ratio']}x smaller (>= 20x: {'met' if met['lbz_ratio'] else 'MISSED'}), "
                f"accuracy {change} points (drop <= 0.5: "
                f"{'met' if met['accuracy_drop_points'] else 'MISSED'})")
        if framework == "keras":
            export_verb.render_export(report["tflite"])
            files = ["digits_cnn.keras", "digits_cnn.edge.tflite"]
        else:
            files = ["digits_cnn.float.onnx", "digits_cnn.edge.onnx", "digits_cnn.edge.lbz"]
        out_console.print(f"wrote {', '.join(f'{output}/{f}' for f in files)}, {output}/"
                          f"report.json in {report['seconds']['demo_total']:.1f} s")
    emit(report, as_json)


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
    group_size: int | None = typer.Option(None, "--group-size", help="Weight-only: block of K "
                                          "sharing a scale (16, 32, 64, 128 (default), 256)."),
    algorithm: str | None = typer.Option(None, help="Weight-only: rtn (default) | gptq | hqq."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="Weight-only: zero point per "
                                    "group (default symmetric)."),
    accuracy_level: int | None = typer.Option(None, "--accuracy-level", help="Weight-only "
                                              "MatMulNBits: 0 float math, 4 int8 activations "
                                              "(fast, the default)."),
    calibration: str | None = typer.Option(None, help="INT8: auto (default) | minmax | "
                                           "percentile | mse | entropy"),
    weights: str | None = typer.Option(None, "--weights", help="INT8 static MatMul/Gemm weight "
                                       "granularity: auto (default) | channel | tensor."),
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
    search_time: float | None = typer.Option(None, "--search-time", help="INT8 auto: seconds "
                                             "for timing its candidate models whole (default: "
                                             "3 s or 30% of the run; 0: fixed rule only)."),
    no_smoothquant: bool = typer.Option(False, "--no-smoothquant", help="INT8: never try "
                                        "SmoothQuant (default: kept where it measures >= 1 dB "
                                        "better and not slower, or to meet a target)."),
    batch: int | None = typer.Option(None, help="Batch size the model is timed (and chosen) "
                                     "at; default the model's fixed batch, else 8."),
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

    check_output(output, model, data, eval_data, plan)
    weight_only = {"--group-size": group_size, "--algorithm": algorithm,
                   "--accuracy-level": accuracy_level, "--asymmetric": asymmetric or None}
    int8 = {"--calibration": calibration, "--weights": weights, "--strict": strict or None,
            "--min-cosine": min_cosine, "--max-drop": max_drop, "--search-time": search_time,
            "--no-smoothquant": no_smoothquant or None}
    config: StageConfig
    if mode.lower() not in ("auto", "static", "dynamic", "weight-only"):
        from lowbit.errors import ValidationError

        raise ValidationError(f"option --mode: {mode!r} is not one of: auto, static, dynamic, "
                              "weight-only")
    if plan is not None:
        refuse_options({**weight_only, **int8, "--exclude": exclude or None,
                        "--mode": None if mode == "auto" else mode,
                        "--bits": None if bits == 8 else bits}, "--plan (the plan sets them)")
        config = read_mixed_plan(plan)
        label = "mixed"
    elif mode.lower() == "weight-only":
        refuse_options(int8, "--mode weight-only")
        config = WeightOnlyConfig(bits=bits, group_size=128 if group_size is None else group_size,
                                  algorithm="rtn" if algorithm is None else algorithm,
                                  symmetric=False if asymmetric else None,
                                  accuracy_level=4 if accuracy_level is None else accuracy_level,
                                  exclude_nodes=tuple(exclude), max_calibration_samples=max_samples)
        label = f"INT{bits} weight-only"
    else:
        if bits != 8:
            from lowbit.errors import ValidationError

            raise ValidationError(f"option --bits: {bits} needs --mode weight-only (static, "
                                  "dynamic and auto modes are INT8)")
        refuse_options(weight_only, f"--mode {mode} (INT8)")
        config = Int8Config(mode=mode, strict=strict, exclude_nodes=tuple(exclude),
                            calibration="auto" if calibration is None else calibration,
                            weight_granularity="auto" if weights is None else weights,
                            max_calibration_samples=max_samples, min_cosine=min_cosine,
                            max_drop=max_drop, search_time=search_time,
                            smoothquant=not no_smoothquant)
        label = "INT8"
    show = not quiet and not as_json
    with progress_bar(show) as update:
        result = api_quantize(str(model), str(data), config=config,
                              eval_data=str(eval_data) if eval_data else None,
                              threads=threads, batch=batch, progress=update)
    finish(result, output, show, as_json, require, f"float vs {label}", label)


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Float ONNX model (or .lbz)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output: .onnx, or .lbz (compressed)."),
    sparsity: float | None = typer.Option(None, help="Fraction of weights (or channels) to "
                                          "remove, [0, 1); N:M fixes it (2:4 is 0.5)."),
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

    check_output(output, model, data, eval_data)
    show = not quiet and not as_json
    with progress_bar(show) as update:
        cm = api_prune(str(model), str(data) if data else None, sparsity=sparsity,
                       structured=structured, importance=importance, scope=scope,
                       nm=parse_nm(nm), epochs=epochs, lr=lr, threads=threads,
                       eval_data=str(eval_data) if eval_data else None, progress=update)
    finish(cm, output, show, as_json, require, "original vs pruned")


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

    check_output(output, model, data, eval_data)
    show = not quiet and not as_json
    with progress_bar(show) as update:
        cm = api_cluster(str(model), str(data) if data else None, bits=bits, epochs=epochs, lr=lr,
                         init=init, threads=threads,
                         eval_data=str(eval_data) if eval_data else None, progress=update)
    finish(cm, output, show, as_json, require, "original vs clustered")


app.command(name="compress")(compress_verb.compress)  # its own file; listed here, in order
app.command(name="export")(export_verb.export)


@app.command()
def unpack(
    model: Path = typer.Argument(..., help="A .lbz file."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
) -> None:
    """Decode a .lbz file into a runnable ONNX model (weights bit for bit).

    Example: lowbit unpack model.lbz -o model.onnx
    """
    from lowbit.container import read_lbz_file
    from lowbit.fileio import write_bytes_atomic
    from lowbit.model_io import decode_lbz

    check_output(output, model, report=False, suffixes=(".onnx",))  # no report
    proto = decode_lbz(read_lbz_file(model), str(model))  # checked like any model read
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

    check_output(output, model, data, report=False, suffixes=(".json",))  # the plan only
    with progress_bar(not quiet) as update:
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

