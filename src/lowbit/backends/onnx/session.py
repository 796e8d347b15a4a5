"""ONNX Runtime sessions, input specs and an optimized-graph probe."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import dims_of
from lowbit.backends.onnx.store import FloatModel, is_reference
from lowbit.data import InputSpec
from lowbit.errors import ModelLoadError

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}


def work_threads(threads: int = 1) -> int:
    """Intra-op threads for untimed work (calibration passes, float references, scoring
    candidates on samples): every CPU this process may run on, at least ``threads``.

    ``threads`` is what the user times and ships at; work whose duration is not reported
    need not be slowed to it (onnxruntime's own ``quantize_static`` calibrates on every
    core). ONNX Runtime splits a kernel's work across threads by output, not by reduction
    order: the outputs are bit-identical (checked on the PP-OCR detector and recognizer).
    On a busy machine more threads can be slower (one run of the PP-OCR detector took
    1.5x as long with 2 threads as with 1 while another process held one of 2 cores):
    ``calibrate.run_calibration`` times both before it commits."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not Linux)
        cpus = os.cpu_count() or 1
    return max(int(threads), cpus, 1)


def make_session(
    model: Any,
    *,
    threads: int = 1,
    optimized_path: str | None = None,
    name: str = "model",
    lean: bool = False,
) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (all optimizations on)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if lean:  # calibration passes: no second, pre-packed copy of every weight
        opts.add_session_config_entry("session.disable_prepacking", "1")
        # nor a planned block beside the outputs: a DBNet-style model exposing all 260 MB
        # of its activations held 480 MB with the memory pattern, 290 MB without, as fast
        opts.enable_mem_pattern = False
    keepalive: list[Any] = []
    if isinstance(model, FloatModel):
        # ONNX Runtime reads the split-out weights from our arrays (no serialized copy).
        names = [t.name for t in model.proto.graph.initializer if is_reference(t)]
        keepalive = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(model.weights[n]))
                     for n in names]
        if names:
            opts.add_external_initializers(names, keepalive)
        source: Any = model.proto.SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        source = str(model)
    try:
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        session._lowbit_keepalive = keepalive  # the arrays must outlive the session
        return session
    except Exception as exc:
        raise ModelLoadError(
            f"ONNX Runtime cannot load {name}: {str(exc).strip().splitlines()[0][:400]}"
        ) from None


def input_specs(session: Any) -> list[InputSpec]:
    specs = []
    for inp in session.get_inputs():
        dtype = np.dtype(_ORT_TO_NUMPY.get(inp.type, np.float32))
        shape = tuple(d if isinstance(d, int) else (d if isinstance(d, str) else None)
                      for d in inp.shape)
        specs.append(InputSpec(inp.name, dtype, shape))
    return specs


def input_specs_of_model(model: onnx.ModelProto) -> list[InputSpec]:
    init = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in init:
            continue
        tt = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(inp.name, dtype, tuple(dims_of(tt))))
    return specs


def first_output_shape(model: Any) -> tuple[int | str | None, ...] | None:
    """The first output's shape (ints, or None/str for dynamic dims) of a session or an
    ONNX model; None when it has no tensor output."""
    if isinstance(model, onnx.ModelProto):
        outputs = model.graph.output
        return tuple(dims_of(outputs[0].type.tensor_type)) if outputs else None
    outputs = model.get_outputs()
    if not outputs or not isinstance(outputs[0].shape, list):
        return None
    return tuple(d if isinstance(d, (int, str)) else None for d in outputs[0].shape)


def run_batches(session: Any, data: Any, batch_size: int = 64) -> list[np.ndarray]:
    """Run ``data`` (a Dataset) through ``session`` run by run (rows in batches, or one
    whole sample per run); each output's results joined (``Dataset.join_outputs``)."""
    parts: list[list[np.ndarray]] = []
    for feed in data.batches(batch_size):
        outs = session.run(None, feed)
        if not parts:
            parts = [[] for _ in outs]
        for k, o in enumerate(outs):
            parts[k].append(np.asarray(o))
    return data.join_outputs(parts)


def optimized_graph(model: Any, *, threads: int = 1) -> tuple[Any, onnx.ModelProto]:
    """(a session, the graph ONNX Runtime runs after its fusions): one session does both."""
    with tempfile.TemporaryDirectory(prefix="lowbit-opt-") as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        session = make_session(model, threads=threads, optimized_path=path, name="compressed model")
        return session, onnx.load(path, load_external_data=False)


def op_counts(graph: onnx.ModelProto) -> Counter[str]:
    """Op types of an (optimized) graph, domain-qualified outside the default domain."""
    return Counter((n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}")
                   for n in graph.graph.node)


def unfused_qdq(optimized: onnx.ModelProto) -> list[str]:
    """Float compute ops that ONNX Runtime still feeds from DequantizeLinear in its
    optimized graph: QDQ patterns it did not fuse into integer kernels, which run in
    float *and* pay for the (de)quantization."""
    producer = {o: n for n in optimized.graph.node for o in n.output}
    compute = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "Add", "Mul"}
    unfused = []
    for node in optimized.graph.node:
        if node.op_type not in compute:
            continue
        srcs = [producer.get(i) for i in node.input]
        if any(s is not None and s.op_type == "DequantizeLinear" for s in srcs[:2]):
            unfused.append(node.name or node.op_type)
    return unfused
