"""``lowbit export MODEL --to tflite``: any model lowbit reads (ONNX, Keras, PyTorch),
optionally compressed by a recipe, written as a ``.tflite`` file from lowbit's own
quantization plan, chosen by timing in LiteRT, verified there, with a report.

Modes: ``auto`` (the fastest of INT8 / INT8 with float layers / dynamic range / float that
keeps the quality, timed whole), ``int8`` (full integer; ``io="int8"`` for INT8 inputs
and outputs), ``dynamic`` (INT8 weights), ``int4`` (INT4 fully connected weights, INT8
convolution weights), ``float16`` and ``float``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lowbit.errors import ValidationError

MODES = ("auto", "int8", "dynamic", "int4", "float16", "float")
NEEDS_DATA = ("auto", "int8")
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
                 "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                 "GatherBlockQuantized")


def export_tflite(model: Any, output: str | os.PathLike[str], *, data: Any = None,
                  eval_data: Any = None, mode: str = "auto", io: str = "float",
                  recipe: Any = None, batch: int | None = None, threads: int = 1,
                  budget_s: float = 20.0, progress: Any = None) -> dict[str, Any]:
    """Write ``model`` as a TFLite file at ``output`` and return the report (also written
    beside it as ``OUTPUT.report.json``)."""
    from lowbit.backends.tflite import litert
    from lowbit.fileio import check_output_path

    if mode not in MODES:
        raise ValidationError(f"option mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if io not in ("float", "int8"):
        raise ValidationError(f"option io: expected float or int8, got {io!r}")
    if io == "int8" and mode != "int8":
        raise ValidationError("option io: int8 inputs and outputs need mode int8 (a full-"
                              "integer model)")
    if data is None and (mode in NEEDS_DATA or recipe is not None):
        raise ValidationError(f"mode {mode}{' with a recipe' if recipe else ''} needs data "
                              "(--data) to calibrate and verify")
    out = check_output_path(output, (model, data, eval_data), option="--output",
                            suffixes=(".tflite",))
    litert("interpreter")  # the extra is there, before any work
    t0 = time.perf_counter()
    compressed = None
    if recipe is not None:
        from lowbit.api import compress

        compressed = compress(model, data, recipe=recipe, eval_data=eval_data, threads=threads,
                              batch=batch, progress=progress)
    return write_tflite_file(model, out, compressed=compressed, data=data, eval_data=eval_data,
                             mode=mode, io=io, batch=batch, threads=threads, budget_s=budget_s,
                             progress=progress, t0=t0)


def write_tflite_file(model: Any, out: Path, *, compressed: Any = None, data: Any = None,
                      eval_data: Any = None, mode: str = "auto", io: str = "float",
                      batch: int | None = None, threads: int = 1, budget_s: float = 20.0,
                      progress: Any = None, t0: float | None = None) -> dict[str, Any]:
    """``model`` (or ``compressed``, a run's result over it) written to ``out`` as TFLite,
    verified against the float ``model``; options already checked by the caller."""
    from lowbit.backends.onnx.load import load_model
    from lowbit.model_io import resolve_model

    t0 = time.perf_counter() if t0 is None else t0
    if compressed is None:
        fm, name, _ = resolve_model(model, data if data is not None else eval_data)
        plan, original = None, fm
        quantized = sorted({n.op_type for n in fm.proto.graph.node if n.op_type in QUANTIZED_OPS})
        if quantized:
            raise ValidationError(
                f"{name}: already quantized ({', '.join(quantized)}); export the float model: "
                "lowbit makes the TFLite file's plan from it (with --recipe for QAT and more)")
    else:  # verified against the model before the recipe
        original, _ = load_model(compressed.float_model)
        name = _name(model)
        if compressed.planned is not None:
            fm, plan = compressed.planned
        else:
            fm, plan = load_model(compressed.model)[0], None
    return _finish(fm, plan, name, compressed, out, original=original, data=data,
                   eval_data=eval_data, mode=mode, io=io, batch=batch, threads=threads,
                   budget_s=budget_s, progress=progress, t0=t0)


def _name(model: Any) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else \
        getattr(model, "name", None) or type(model).__name__


def _datasets(fm: Any, data: Any, eval_data: Any) -> tuple[Any, Any]:
    from lowbit.backends.onnx.session import first_output_shape, input_specs_of_model
    from lowbit.data import as_dataset, split_holdout

    specs, shape = input_specs_of_model(fm.proto), first_output_shape(fm.proto)
    train = as_dataset(data, specs, output=shape) if data is not None else None
    if eval_data is not None:
        return train, as_dataset(eval_data, specs, output=shape)
    if train is None:
        return None, None
    work, held, _ = split_holdout(train, 0.2)
    return work, held


def _finish(fm: Any, plan: Any, name: str, compressed: Any, out: Path, *, original: Any,
            data: Any, eval_data: Any, mode: str, io: str, batch: int | None, threads: int,
            budget_s: float, progress: Any, t0: float) -> dict[str, Any]:
    from lowbit.backends.onnx.session import input_specs_of_model
    from lowbit.backends.tflite import plan as tplan
    from lowbit.backends.tflite.candidates import choose_tflite
    from lowbit.backends.tflite.inspect import read_structure
    from lowbit.backends.tflite.writer import write_tflite
    from lowbit.data import run_batch, synthetic_dataset
    from lowbit.fileio import report_path, write_bytes_atomic, write_json_atomic
    from lowbit.report.tflite import verify_tflite

    calib, held = _datasets(fm, data, eval_data)
    specs = input_specs_of_model(fm.proto)
    if held is None:
        held = synthetic_dataset(specs, 32)
    batch = run_batch(specs, batch, held)
    section: dict[str, Any] = {"mode": mode, "io": io}
    onnx_int8 = None
    if mode in NEEDS_DATA:
        if plan is None:
            from lowbit.backends.onnx.quantize import quantize_int8
            from lowbit.config import Int8Config

            outcome = quantize_int8(fm, calib, Int8Config(mode="static", reduce_range=False),
                                    threads=threads, batch=batch)
            plan, onnx_int8 = outcome.plan, outcome.model
            section["calibration"] = plan.metadata.get("calibration")
        else:
            onnx_int8 = compressed.model
        plan = tplan.complete(fm, plan, calib)
    if mode == "auto":
        choice = choose_tflite(fm, plan, held, batch=batch, threads=threads, budget_s=budget_s,
                               progress=progress)
        content, used = choice.data, choice.plan
        section.update(chosen=choice.name, note=choice.note, candidates=choice.rows,
                       search_seconds=choice.seconds)
    elif mode == "int8":
        content, used = write_tflite(fm, plan, io=io, source=name), plan
    elif mode in ("dynamic", "int4"):
        used = tplan.weight_plan(fm, dense_bits=4 if mode == "int4" else 8)
        content = write_tflite(fm, used, source=name)
    else:
        content, used = write_tflite(fm, None, weights="float16" if mode == "float16" else
                                     "float32", source=name), None
    if used is not None:
        section["decisions"] = used.decision_dicts()
    section["structure"] = read_structure(content, str(out))
    floats = [o["name"] for o in section["structure"]["inputs"] + section["structure"]["outputs"]
              if o["type"] != "int8"]
    if io == "int8" and floats:
        section["io_note"] = (f"{', '.join(floats)} stay float: the plan has no INT8 scale for "
                              "them (a float op such as Softmax computes them, or reads them)")
    verification = verify_tflite(original, content, held, batch=batch, threads=threads,
                                 onnx_int8=onnx_int8)
    write_bytes_atomic(out, content)
    report = {"tool": "lowbit export --to tflite", "model": {"name": name},
              "output": {"path": str(out), "size_bytes": out.stat().st_size, "format": "tflite"},
              "tflite": section, "verification": verification,
              "seconds": {"total": round(time.perf_counter() - t0, 2)}}
    if compressed is not None:
        report["compression"] = {k: compressed.report[k] for k in ("stages", "recipe")
                                 if k in compressed.report}
    write_json_atomic(report_path(out), report)
    return report


