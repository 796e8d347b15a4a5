"""float16 models (issue 12): the float16 model as given vs lowbit's INT8 result (which
keeps float16 inputs/outputs) vs the same weights in float32, in ONNX Runtime, one
intra-op thread, alternating, median of many runs. Models with random weights are built
in code. Run: ``.venv/bin/python benchmarks/float16_models.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(elem: int, sizes: tuple[int, ...] = (1024, 2048, 2048, 10)) -> onnx.ModelProto:
    """MatMul + Add (+ Relu) layers."""
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype),
                                          f"W{i}"),
                  numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(dtype), f"B{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes[-1].output[0] = "y"
    return _model(nodes, inits, elem, ["N", sizes[0]], ["N", sizes[-1]])


def cnn(elem: int, chans: tuple[int, ...] = (16, 64, 64, 64), side: int = 32) -> onnx.ModelProto:
    """Conv3x3 + Relu layers."""
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(chans, chans[1:])):
        w = rng.standard_normal((b, a, 3, 3)) / np.sqrt(9 * a)  # (out_ch, in_ch, kh, kw)
        inits += [numpy_helper.from_array(w.astype(dtype), f"W{i}"),
                  numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(dtype), f"B{i}")]
        nodes += [helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes[-1].output[0] = "y"
    return _model(nodes, inits, elem, ["N", chans[0], side, side], ["N", chans[-1], side, side])


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], elem: int,
           x_shape: list[object], y_shape: list[object]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape)],
                              [helper.make_tensor_value_info("y", elem, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _feed(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    elem = model.graph.input[0].type.tensor_type.elem_type
    return {"x": x.astype(helper.tensor_dtype_to_np_dtype(elem))}


def main() -> None:
    import lowbit
    from lowbit.backends.onnx.session import make_session
    from lowbit.metrics import sqnr_db
    from lowbit.runtime.latency import measure_side_by_side

    rng = np.random.default_rng(0)
    for name, build, shape, batch in (("MLP 1024-2048-2048-10", mlp, (1024,), 32),
                                      ("3 x Conv3x3 16-64-64-64, 32x32", cnn, (16, 32, 32), 8)):
        f16, f32 = build(TensorProto.FLOAT16), build(TensorProto.FLOAT)
        calib = rng.standard_normal((160, *shape)).astype(np.float16)
        test = rng.standard_normal((64, *shape)).astype(np.float16)
        models = [("float16 as given", f16), ("float32, same weights", f32)]
        for mode in ("auto", "static", "dynamic"):
            models.append((f"lowbit {mode}", lowbit.quantize(f16, calib, mode=mode,
                                                             batch=batch).model))
        sessions = [make_session(m, threads=1) for _, m in models]
        stats = measure_side_by_side(sessions, [_feed(m, test[:batch]) for _, m in models],
                                     batch=batch, threads=1, iterations=200, min_time_s=2.0)
        reference = sessions[0].run(None, _feed(f16, test))[0].astype(np.float64)
        print(f"\n{name}, batch {batch}, 1 thread")
        for (label, model), session, st in zip(models, sessions, stats):
            out = session.run(None, _feed(model, test))[0].astype(np.float64)
            print(f"  {label:24s} p50 {st.p50_ms:8.3f} ms  {stats[0].p50_ms / st.p50_ms:5.2f}x  "
                  f"SQNR {sqnr_db(reference, out):6.1f} dB  {model.ByteSize() / 1024:9.1f} KB")


if __name__ == "__main__":
    main()
