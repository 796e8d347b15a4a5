"""Load an ONNX model from disk (or take one in memory) and normalise it.

Normalising means: weights held in Constant nodes become initializers,
initializers are removed from the graph inputs (old exporters list them there,
which stops constant folding), the default-domain opset is raised to at least
13 (per-channel QuantizeLinear needs it), shapes are inferred, and a float16 or
bfloat16 graph becomes a float32 working copy (``precision.py``).
"""

from __future__ import annotations

import os

import onnx

from lowbit.backends.onnx.checks import check_finite_weights
from lowbit.backends.onnx.graph import node_name
from lowbit.backends.onnx.precision import low_float_types, snapshot, to_float32
from lowbit.backends.onnx.store import FloatModel
from lowbit.errors import ModelLoadError
from lowbit.fileio import input_file

MIN_OPSET = 13


def read_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check an ONNX file, with one clear error for each way it can be bad."""
    p = input_file(path, "model", ModelLoadError)
    try:
        # The checker on the path first: it reads the file in C++ and frees it,
        # so peak memory stays at one parse of the model.
        onnx.checker.check_model(str(p))
    except Exception as exc:
        checker_error: Exception | None = exc
    else:
        checker_error = None
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelLoadError(
            f"model file {p} is not a readable ONNX model (truncated or another format): "
            f"{_first_line(exc)}"
        ) from None
    if not model.graph.node or not model.opset_import or model.ir_version <= 0:
        raise ModelLoadError(
            f"model file {p} is not a valid ONNX model (no graph, opset or IR version; "
            "truncated or another format?)"
        )
    check_opset(model, str(p))
    check_graph(model, str(p))
    if checker_error is not None:
        raise ModelLoadError(
            f"model file {p} fails the ONNX checker: {_first_line(checker_error)}") from None
    return model


def check_graph(model: onnx.ModelProto, name: str, *, compressing: bool = False) -> None:
    """A model needs inputs to feed and outputs to read; and (for now) compressing it needs
    a graph without control flow (If/Loop/Scan subgraphs), which lowbit does not rewrite."""
    init = {t.name for t in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in init]:
        raise ModelLoadError(f"{name}: the model has no inputs to feed data to")
    if not model.graph.output:
        raise ModelLoadError(f"{name}: the model has no outputs")
    if compressing:
        for i, node in enumerate(model.graph.node):
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):
                raise ModelLoadError(
                    f"{name}: node {node.name or i} ({node.op_type}) holds a subgraph; lowbit "
                    "does not compress models with control flow (If/Loop/Scan) yet")


def check_opset(model: onnx.ModelProto, name: str) -> None:
    """Refuse a model stamped with an ONNX opset newer than the installed onnx knows (and so
    newer than ONNX Runtime and lowbit's rules were made for)."""
    newest = onnx.defs.onnx_opset_version()
    opset = default_opset(model)
    if opset > newest:
        raise ModelLoadError(f"{name}: opset {opset} is newer than this onnx/onnxruntime "
                             f"support (up to opset {newest}); export with an older opset")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def normalise(model: onnx.ModelProto, *, name: str = "model", fold_bn: bool = True) -> FloatModel:
    """Normalised float model: constants as initializers, opset >= 13, shapes inferred,
    float32 (``given`` records a float16/bfloat16 model's own types), BatchNorm folded;
    large weights split out as numpy arrays (see ``store``)."""
    fm = FloatModel.split(model)
    del model  # the caller's proto is not touched; our copy holds no large weights
    as_given = snapshot(fm) if low_float_types(fm.proto) else None
    _name_unnamed_nodes(fm.proto)
    model = _constants_to_initializers(fm.proto)
    _bypass_constant_identities(model)
    init_names = {t.name for t in model.graph.initializer}
    kept_inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(kept_inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept_inputs)
    check_opset(model, name)
    check_graph(model, name, compressing=True)
    opset = default_opset(model)
    if opset < MIN_OPSET:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise ModelLoadError(
                f"{name}: could not upgrade opset {opset} to {MIN_OPSET}: {_first_line(exc)}"
            ) from None
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise ModelLoadError(f"{name}: shape inference failed: {_first_line(exc)}") from None
    fm.proto = model
    if as_given is not None:  # before folding: the folds compute and store float32
        fm.given = to_float32(fm, as_given)
    check_finite_weights(fm, name=name)
    from lowbit.backends.onnx.fold import fold_batchnorm, fold_gemm_scalars

    fold_gemm_scalars(fm)
    if fold_bn:
        fold_batchnorm(fm)
    from lowbit.runtime.memory import release_memory

    release_memory()
    return fm


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """In place: an unnamed node is named ``OpType_i`` after its position in the file as
    given, before anything moves, so reports, ``inspect`` of that file, ``layers=`` and
    ``exclude`` all use one name for it, and the written model keeps it."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if node.name:
            continue
        base = name = node_name(node, i)
        k = 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        used.add(name)


def _bypass_constant_identities(model: onnx.ModelProto) -> None:
    """In place: consumers of ``Identity(initializer)`` read the initializer directly.

    The TorchScript exporter de-duplicates equal parameters (e.g. freshly initialised
    zero biases) and hands the copies out through Identity nodes; without this they
    would not look constant to the quantizers."""
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits
             and n.output[0] not in outputs}
    if not alias:
        return
    for node in model.graph.node:
        for k, x in enumerate(node.input):
            if x in alias:
                node.input[k] = alias[x]
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _constants_to_initializers(out: onnx.ModelProto) -> onnx.ModelProto:
    """In place: Constant nodes holding a tensor become initializers."""
    graph = out.graph
    keep = []
    moved = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            moved.append(tensor)
        else:
            keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(moved)
    return out


def load_model(source: str | os.PathLike[str] | onnx.ModelProto, *,
               fold_bn: bool = True) -> tuple[FloatModel, str]:
    """Read (if a path) and normalise a model. Returns (model, display name)."""
    if isinstance(source, onnx.ModelProto):
        name = "model"
        try:
            onnx.checker.check_model(source)
        except Exception as exc:
            raise ModelLoadError(f"model fails the ONNX checker: {_first_line(exc)}") from None
        return normalise(source, name=name, fold_bn=fold_bn), name
    name = str(source)
    return normalise(read_model(source), name=name, fold_bn=fold_bn), name
