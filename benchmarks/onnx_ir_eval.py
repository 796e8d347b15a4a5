"""Should onnx_ir replace lowbit's FloatModel/GraphIndex?  Measured on the B5 model.

    python benchmarks/onnx_ir_eval.py

Builds B5's MLP 1024-3072-3072-2048-1000 as benchmarks/run.py does, saves it with embedded
weights and with external data, runs each path in a fresh subprocess and reports seconds and
peak RSS over the RSS right after imports (ru_maxrss; VmHWM as a cross-check).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SIZES = (1024, 3072, 3072, 2048, 1000)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith(key))


class Meter:  # per stage: seconds, and peak RSS so far minus the RSS after imports
    def __init__(self) -> None:
        self.base = _status_mb("VmRSS")
        self.stages: list[dict] = []
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.stages.append({"stage": name, "s": round(now - self.t, 3),
                            "peak_delta_mb": round(maxrss - self.base, 1),
                            "hwm_delta_mb": round(_status_mb("VmHWM") - self.base, 1),
                            "rss_delta_mb": round(_status_mb("VmRSS") - self.base, 1)})
        self.t = time.perf_counter()


def build(folder: str) -> None:
    import numpy as np
    import onnx
    import torch

    from lowbit.backends.torch.export import export_module
    from lowbit.models import mlp

    torch.manual_seed(0)
    proto = export_module(mlp(SIZES), np.zeros((2, 1024), np.float32))
    onnx.save(proto, os.path.join(folder, "big.onnx"))
    onnx.save(proto, os.path.join(folder, "big_ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="big_ext.data", size_threshold=1024)


def walk_ir(graph) -> int:
    """GraphIndex's work on the IR: producer and users of every node input/output."""
    links = 0
    for node in graph:
        for v in (*node.inputs, *node.outputs):
            if v is not None:
                links += (v.producer() is not None) + len(v.uses())
    return links


def worker(mode: str, path: str) -> dict:
    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401
    import onnxruntime  # noqa: F401

    import lowbit.api  # also binds ``lowbit`` for lowbit.quantize
    import lowbit.backends.onnx.quantize  # noqa: F401
    from lowbit.backends.onnx.graph import GraphIndex
    from lowbit.backends.onnx.load import load_model
    from lowbit.backends.onnx.session import make_session
    from lowbit.backends.onnx.store import MEMORY_LOCATION, FloatModel
    from lowbit.runtime.memory import release_memory

    m = Meter()
    info: dict = {"mode": mode}
    if mode == "lowbit_quantize":  # the whole B5 run, for scale
        qm = lowbit.quantize(path, np.random.default_rng(0).standard_normal((320, 1024)).astype(
            np.float32), verify=False)
        m.mark("lowbit.quantize (B5)")
        info["method"] = qm.report["calibration"]["method"]
    elif mode.startswith("lowbit"):
        fm, _ = load_model(path)
        m.mark("load_model (read+check+normalise+split)")
        if mode == "lowbit_full":
            gi = GraphIndex(fm.proto, fm.weights)
            links = sum(len(gi.consumers.get(x, [])) + (x in gi.producer)
                        for n in fm.proto.graph.node for x in list(n.input) + list(n.output))
            m.mark("GraphIndex + producers/consumers")
            amax = sum(float(np.abs(fm.constant(t.name)).max()) for t in fm.proto.graph.initializer)
            m.mark("read every initializer as numpy")
            sess = make_session(fm)
            m.mark("make_session(FloatModel)")
            info.update(links=links, amax=round(amax, 3), outputs=len(sess.get_outputs()))
    else:  # ir_* modes: the same checks lowbit runs, then the IR
        onnx.checker.check_model(path)
        m.mark("onnx.checker.check_model(path)")
        model = ir.load(path)
        release_memory()  # as normalise() does: glibc keeps freed protobuf buffers otherwise
        m.mark("ir.load")
        ir.passes.common.ShapeInferencePass()(model)
        m.mark("ShapeInferencePass")
        inits = list(model.graph.initializers.values())
        info["tensor_classes"] = sorted({type(v.const_value).__name__ for v in inits})
        info["links"] = walk_ir(model.graph)
        m.mark("walk: producer()/uses()")
        arrays, amax = {}, 0.0
        for v in inits:
            a = v.const_value.numpy()
            amax += float(np.abs(a).max())
            # FloatModel.split on the IR. "ir_refs_pinned" converts only the large tensors: the
            # small TensorProtoTensors left then pin the whole parsed ModelProto (upb arena)
            if mode.startswith("ir_refs") and (a.nbytes >= 64 * 1024 or mode == "ir_refs"):
                v.const_value = ir.Tensor(a, name=v.name)
                arrays.update({v.name: a} if a.nbytes >= 64 * 1024 else {})
        info["amax"] = round(amax, 3)
        release_memory()  # the parsed proto is freed once no TensorProtoTensor refers to it
        m.mark("read every initializer .numpy()" + (" -> ir.Tensor" if arrays else ""))
        for name, a in arrays.items():  # dims-only references, data handed to ORT as OrtValues
            model.graph.initializers[name].const_value = ir.ExternalTensor(
                MEMORY_LOCATION, None, None, ir.DataType.FLOAT, shape=ir.Shape(a.shape), name=name)
        proto = ir.serde.serialize_model(model)
        m.mark("serialize_model" + (" (large weights as refs)" if arrays else ""))
        if mode == "ir_external":
            os.chdir(os.path.dirname(path))  # ORT resolves a bytes model's data file from the cwd
        sess = make_session(FloatModel(proto, arrays) if arrays else proto)
        m.mark("InferenceSession" + (" (make_session, OrtValues)" if arrays else " from the proto"))
        info["outputs"] = len(sess.get_outputs())
    info["stages"], info["base_mb"] = m.stages, round(m.base, 1)
    return info


def api_facts() -> dict:
    import numpy as np
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401
    a, v = np.ones((4, 4), np.float32), ir.Value(name="x")
    return {"ir.Tensor(ndarray) wraps without copy": ir.Tensor(a).numpy() is a,
            "LazyTensor / ExternalTensor": [hasattr(ir, k) for k in ("LazyTensor", "ExternalTensor")],
            "Value.producer/uses/consumers": all(hasattr(v, k) for k in ("producer", "uses", "consumers")),
            "passes.common": sorted(ir.passes.common.__all__),
            "pattern rewriter / version converter in onnx_ir": [
                hasattr(ir, k) or hasattr(ir.passes.common, k) for k in ("rewriter", "version_converter")]}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with tempfile.TemporaryDirectory(prefix="lowbit-onnxir-") as tmp:
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                        f"import onnx_ir_eval as e; e.build({tmp!r})"], check=True, env=env)
        emb, ext = os.path.join(tmp, "big.onnx"), os.path.join(tmp, "big_ext.onnx")
        float_mb = os.path.getsize(emb) / 2**20
        budget = 3 * float_mb + 32 * sum(SIZES) * 4 / 2**20
        runs = [("lowbit_load", emb), ("lowbit_full", emb), ("ir_embedded", emb),
                ("ir_external", ext), ("ir_refs", emb), ("ir_refs_pinned", emb),
                ("lowbit_quantize", emb)]
        results = []
        for mode, path in runs:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, path],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"worker {mode} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"float file {float_mb:.1f} MB, B5 budget {budget:.0f} MB (3x float + one batch)\n")
    print("| path | stage | s | peak RSS delta MB (ru_maxrss) | (VmHWM) | RSS now |\n" + "|---" * 6 + "|")
    for r in results:
        for st in r["stages"]:
            print(f"| {r['mode']} | {st['stage']} | {st['s']:.2f} | {st['peak_delta_mb']:.0f} | "
                  f"{st['hwm_delta_mb']:.0f} | {st['rss_delta_mb']:.0f} |")
        last = r["stages"][-1]
        print(f"| {r['mode']} | **total** | {sum(st['s'] for st in r['stages']):.2f} | "
              f"**{last['peak_delta_mb']:.0f}** | {last['hwm_delta_mb']:.0f} | {last['rss_delta_mb']:.0f} |")
    for r in results:
        print(f"- {r['mode']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("stages", "mode")))
    print("\nAPI facts:", json.dumps(api_facts(), indent=1))
    import onnx_ir

    from lowbit.runtime.environment import cpu_info, versions
    v = versions()
    print(f"\nCPU {cpu_info()['cpu']} ({os.cpu_count()} cores); onnx {v['onnx']}, onnxruntime "
          f"{v['onnxruntime']}, onnx_ir {onnx_ir.__version__}, python {v['python']}, numpy {v['numpy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
