"""Fusions checked in ONNX Runtime's optimized graph, not only by accuracy: a static
MatMul + bias Add (+ Relu) becomes one QGemm (any input rank), a Relu after a quantized
residual Add stays 8-bit (QLinearAdd feeds the next QLinearConv directly), and a Relu
that is a graph output is never dropped."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ort_oracle import run, sqnr

import lowbit
from lowbit.backends.torch.export import export_module


def _optimized(model: onnx.ModelProto, tmp_path) -> onnx.GraphProto:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx")).graph


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = (torch.nn.Linear(32, 64), torch.nn.Linear(64, 32),
                                     torch.nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean(dim=-2))


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_static_matmul_bias_relu_becomes_one_qgemm(rank, tmp_path):
    torch.manual_seed(0)
    shape = {2: (64, 7, 32), 3: (64, 7, 32), 4: (64, 3, 7, 32)}[rank]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    module = MLP().eval()
    if rank == 2:  # the layers see [rows, 32]: MatMul on a 2-D input
        proto = export_module(torch.nn.Sequential(module.a, torch.nn.ReLU(), module.b).eval(),
                              x[:2, 0])
        x = x[:, 0]
        # torch exports Linear on 2-D input as Gemm; make it MatMul + Add, as on 3-D input
        proto = _gemm_to_matmul_add(proto)
    else:
        proto = export_module(module, x[:2])
    assert sum(n.op_type == "MatMul" for n in proto.graph.node) >= 2
    qm = lowbit.quantize(proto, x, mode="static", verify=False)
    graph = _optimized(qm.model, tmp_path)
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["QGemm"] >= 2, ops
    assert ops["Add"] == 0 and ops["MatMul"] == 0, ops
    # the Relu before the (float) mean stays float after a float-output QGemm: folding it
    # would quantize a tensor no 8-bit op reads (as fast, less accurate; docs/NOTES.md)
    assert ops["Relu"] == (0 if rank == 2 else 1), ops
    qgemms = [n for n in graph.node if n.op_type == "QGemm"]
    assert all(len(n.input) > 6 and n.input[6] for n in qgemms), "bias not inside QGemm"
    # a Relu folded: the first QGemm writes 8-bit data (y_scale given) read by the next
    producers = _producers(graph)
    second = qgemms[1]
    fed = producers.get(second.input[0])
    assert fed is not None and fed.op_type in ("QGemm", "Reshape"), fed
    assert sqnr(run(proto, x), run(qm.model, x)) > 30.0
    decisions = {d["name"]: d for d in qm.report["nodes"]["decisions"]}
    folded = [d for d in decisions.values() if d["op_type"] == "Add"]
    assert folded and all(d["treatment"] == "folded" for d in folded)


def _gemm_to_matmul_add(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        w = onnx.numpy_helper.to_array(inits[node.input[1]])
        trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
        name = node.input[1] + "_kn"
        out.graph.initializer.append(onnx.numpy_helper.from_array(
            np.ascontiguousarray(w.T if trans else w), name))
        mm = node.output[0] + "_mm"
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], name], [mm]))
        nodes.append(onnx.helper.make_node("Add", [mm, node.input[2]], [node.output[0]]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


class Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.c1, self.c2 = (torch.nn.Conv2d(16, 16, 3, padding=1),
                            torch.nn.Conv2d(16, 16, 3, padding=1))
        self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        return self.c3(h)


def test_relu_after_a_residual_add_stays_8bit(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((32, 8, 12, 12)).astype(np.float32)
    proto = export_module(Residual().eval(), x[:2])
    qm = lowbit.quantize(proto, x, mode="static", verify=False)
    graph = _optimized(qm.model, tmp_path)
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["QLinearAdd"] == 1 and ops["Relu"] == 0, ops
    add = next(n for n in graph.node if n.op_type == "QLinearAdd")
    readers = [n for n in graph.node if add.output[0] in n.input]
    assert readers and all(n.op_type in ("QLinearConv", "Transpose") for n in readers), \
        [n.op_type for n in readers]
    assert ops["DequantizeLinear"] <= 1, ops  # only the graph output is dequantized
    assert sqnr(run(proto, x), run(qm.model, x)) > 25.0


def test_relu_that_is_a_graph_output_is_kept():
    torch.manual_seed(0)
    x = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    proto = export_module(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval(),
                          x[:2])
    for mode in ("static", "auto"):
        qm = lowbit.quantize(proto, x, mode=mode, verify=False)
        out = run(qm.model, x)
        assert out.min() >= 0.0, mode
        assert sqnr(run(proto, x), out) > 25.0
