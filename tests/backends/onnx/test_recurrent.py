"""LSTM in INT8 (ONNX Runtime's DynamicQuantizeLSTM): weights per gate channel, the
activations quantized at run time; GRU/RNN stay float with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lowbit
from lowbit.backends.torch.export import export_module
from lowbit.metrics import sqnr_db


class Recurrent(torch.nn.Module):
    def __init__(self, cell: str, bidirectional: bool = False) -> None:
        super().__init__()
        kind = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
        self.rnn = kind(16, 32, batch_first=True, bidirectional=bidirectional)
        self.head = torch.nn.Linear(64 if bidirectional else 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def _model(cell: str, bidirectional: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((48, 12, 16)).astype(np.float32)
    return export_module(Recurrent(cell, bidirectional).eval(), x[:2]), x


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_becomes_dynamic_int8(bidirectional):
    proto, x = _model("lstm", bidirectional)
    qm = lowbit.quantize(proto, x, mode="dynamic", verify=False)
    ops = [n.op_type for n in qm.model.graph.node]
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    lstm = next(n for n in qm.model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    w = next(t for t in qm.model.graph.initializer if t.name == lstm.input[1])
    assert w.data_type == onnx.TensorProto.INT8
    ref, out = _run(proto, x), _run(qm.model, x)
    assert sqnr_db(ref, out) > 30.0
    decision = next(d for d in qm.report["nodes"]["decisions"] if d["op_type"] == "LSTM")
    assert decision["treatment"] == "int8-dynamic"


def test_auto_times_the_int8_lstm_against_a_float_one():
    """Whether the INT8 LSTM pays off depends on its size and the CPU: auto times both."""
    proto, x = _model("lstm")
    qm = lowbit.quantize(proto, x, verify=False)
    rows = {r["name"]: r for r in qm.report["candidates"]["candidates"]}
    assert {"auto", "all static"} <= set(rows)
    kept = next(name for name, r in rows.items() if r["kept"])
    ops = [n.op_type for n in qm.model.graph.node]
    assert ("LSTM" in ops) == (kept == "all static")
    assert ("DynamicQuantizeLSTM" in ops) == (kept != "all static")


def test_static_mode_keeps_lstm_float_and_says_why():
    proto, x = _model("lstm")
    qm = lowbit.quantize(proto, x, mode="static", verify=False)
    assert "LSTM" in [n.op_type for n in qm.model.graph.node]
    decision = next(d for d in qm.report["nodes"]["decisions"] if d["op_type"] == "LSTM")
    assert decision["treatment"] == "float" and "run time" in decision["reason"]


def test_gru_stays_float_with_the_reason():
    proto, x = _model("gru")
    qm = lowbit.quantize(proto, x, verify=False)
    decision = next(d for d in qm.report["nodes"]["decisions"] if d["op_type"] == "GRU")
    assert decision["treatment"] == "float" and "no integer kernel" in decision["reason"]
    assert sqnr_db(_run(proto, x), _run(qm.model, x)) > 30.0
