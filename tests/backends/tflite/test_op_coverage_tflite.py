"""The operator-coverage graphs (tests/backends/onnx/op_graphs.py) written to TFLite: float
files match ONNX Runtime, INT8 files from lowbit's static plan keep the output close to
float, and the ops the writer cannot express are refused by node name."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="lowbit[tf] is not installed: the TFLite tests "
                    "need ai-edge-litert")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "onnx"))  # op_graphs.py
import op_graphs as g  # noqa: E402

from lowbit.backends.onnx.quantize import quantize_int8  # noqa: E402
from lowbit.backends.onnx.session import input_specs_of_model, make_session  # noqa: E402
from lowbit.backends.tflite import plan as tplan  # noqa: E402
from lowbit.backends.tflite.session import TfliteSession  # noqa: E402
from lowbit.backends.tflite.writer import write_tflite  # noqa: E402
from lowbit.config import Int8Config  # noqa: E402
from lowbit.data import as_dataset  # noqa: E402
from lowbit.errors import UnsupportedOpError  # noqa: E402
from lowbit.metrics import sqnr_db  # noqa: E402
from lowbit.model_io import resolve_model  # noqa: E402

# graph -> least INT8 output SQNR (dB) on held-out rows; measured 20-37 dB. "expand" ends in
# an INT8 fully connected layer whose output range came from 24 rows (the held-out rows
# reach past it): TFLite's INT8 output is saturated there.
SUPPORTED = {
    "pad_constant": (lambda: g.pad("constant"), 28), "pad_reflect": (lambda: g.pad("reflect"), 28),
    **{f"moves_{op}": (lambda op=op: g.data_movement(op), 28)
       for op in ("Slice", "Split", "Resize", "DepthToSpace", "Tile", "Gather")},
    "expand": (g.expand, 17), "clip_after_matmul": (lambda: g.clip_reshape(True), 30),
    "clip_reshape": (lambda: g.clip_reshape(False), 28), "matmul_tile": (g.matmul_tile, 30),
    "add_of_inputs": (g.add_of_inputs, 28), "embedding": (g.embedding, 32),
}


def _prepared(build):
    model = build()
    feeds = g.inputs_for(model, 40, 16, 0)
    fm, _, _ = resolve_model(model, feeds)
    test = {k: v[24:] for k, v in feeds.items()}
    calib = as_dataset({k: v[:24] for k, v in feeds.items()}, input_specs_of_model(fm.proto))
    return fm, test, calib, make_session(fm).run(None, test)[0]


@pytest.mark.parametrize("case", sorted(SUPPORTED))
def test_graph_in_tflite(case):
    build, least_db = SUPPORTED[case]
    fm, test, calib, ref = _prepared(build)
    assert np.abs(TfliteSession(write_tflite(fm)).run(None, test)[0] - ref).max() < 1e-5
    plan = quantize_int8(fm, calib, Int8Config(mode="static", reduce_range=False)).plan
    out = TfliteSession(write_tflite(fm, tplan.complete(fm, plan, calib))).run(None, test)[0]
    assert sqnr_db(ref, out) >= least_db


@pytest.mark.parametrize("build,node", [(g.conv_transpose, "convT"), (g.instance_norm, "inorm")])
def test_unwritable_op_is_named(build, node):
    fm, _, _, _ = _prepared(build)
    with pytest.raises(UnsupportedOpError, match=node):
        write_tflite(fm, source="m.onnx")
