"""The promise for bad input, as one table: every verb refuses with exit 2 and one line on
stderr naming the culprit (option, file or tensor), no traceback, no new file anywhere,
and every input byte-identical. Each case runs in a fresh copy of the fixture files."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit.backends.torch.export import export_module
from lowbit.cli import main

BOX = "╭╮╰╯│─"


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _huge_npz(path: Path, x: np.ndarray) -> None:
    """An .npz whose x.npy header declares shape (10**12, 1, 8, 8) over a few real rows."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 1, 8, 8)}
    text = repr(header).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    blob = b"\x93NUMPY\x01\x00" + (len(text) + pad + 1).to_bytes(2, "little") + text \
        + b" " * pad + b"\n" + x[:4].astype("<f4").tobytes()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", blob)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every file a case may read, made once; each case works on a copy."""
    d = tmp_path_factory.mktemp("table_src")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    onnx.save(export_module(TinyNet(), x[:2]), str(d / "model.onnx"))
    np.savez(d / "calib.npz", x=x, y=y)
    assert main(["compress", str(d / "model.onnx"), "-o", str(d / "m.lbz"), "--sparsity", "0.5",
                 "--bits", "4", "--quiet"]) == 0
    for report in d.glob("*report.json"):
        report.unlink()
    (d / "plan.json").write_text(json.dumps({"format": "lowbit.mixed-precision/1",
                                             "layers": {"/fc/Gemm": "int8"}, "group_size": 128}))
    (d / "adir").mkdir()
    # bad data
    for name, bad in (("lab57.npz", 57), ("labneg.npz", -1)):
        labels = y.copy()
        labels[5] = bad
        np.savez(d / name, x=x, y=labels)
    np.savez(d / "labfloat.npz", x=x, y=rng.random(40))
    np.savez(d / "onehot.npz", x=x, y=np.eye(10, dtype=np.int64)[y])
    np.save(d / "single.npy", x)
    (d / "single.npy").rename(d / "single.npz")
    (d / "table.npz").write_text("a,b,c\n1,2,3\n4,5,6\n")
    _huge_npz(d / "huge.npz", x)
    objects = np.empty((40, 1, 8, 8), dtype=object)
    objects[...] = 0.5
    np.savez(d / "objects.npz", x=objects, y=y)
    # bad model / container files
    raw = (d / "m.lbz").read_bytes()
    mid = len(raw) // 2
    (d / "flipped.lbz").write_bytes(raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 16])
                                    + raw[mid + 16:])
    (d / "truncated.lbz").write_bytes(raw[:mid])
    (d / "empty.lbz").write_bytes(b"")
    (d / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (d / "notes.txt").write_text("this is a text file, not a neural network\n" * 20)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "w")])
    future = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)])
    (d / "future.onnx").write_bytes(future.SerializeToString())
    np.savez(d / "flat.npz", x=x.reshape(40, 64), y=y)
    return d


@pytest.fixture
def work(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(source, w)
    monkeypatch.chdir(w)
    return w


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_refusal(rc: int, err: str, out: str, names: tuple[str, ...], forbid: tuple[str, ...],
                  usage: bool) -> None:
    text = out + err
    assert rc == 2, f"exit code {rc}, expected 2; stderr: {err!r}"
    assert "Traceback" not in text, text
    assert "internal error" not in text, text
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= (2 if usage else 1), f"{len(lines)} lines on stderr: {err!r}"
    assert not any(c in err for c in BOX), f"box drawing on stderr: {err!r}"
    for name in names:
        assert name.lower() in err.lower(), f"{name!r} not named in the message: {err!r}"
    for word in forbid:
        assert word.lower() not in err.lower(), f"{word!r} in the message: {err!r}"


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # shlex string; {model} {data} {lbz} {out} {plan} are the good files
    names: tuple[str, ...]  # every one must appear in stderr
    forbid: tuple[str, ...] = ()
    usage: bool = False  # a click usage error: at most 2 lines

    def args(self) -> list[str]:
        return shlex.split(self.argv.format(model="model.onnx", data="calib.npz", lbz="m.lbz",
                                            out="out.onnx", plan="plan.json"))


def C(id: str, argv: str, *names: str, forbid: tuple[str, ...] = (), usage: bool = False) -> Case:
    return Case(id, argv, names, forbid, usage)


Q = "quantize {model} --data {data}"
QW = Q + " --mode weight-only"
P = "prune {model} -o {out} --sparsity 0.5"
CL = "cluster {model} -o {out} --bits 4"
CO = "compress {model} -o out.lbz"
S = "sensitivity {model} --data {data} -o s.json"
OUT = "--output"

GUARD = [  # A. the output guard
    *[C(f"{v}-o-{tag}", f"{argv} -o {target}", OUT)
      for v, argv in (("quantize", Q), ("prune", "prune {model} --data {data} --sparsity 0.5"),
                      ("cluster", "cluster {model} --data {data} --bits 4"),
                      ("compress", "compress {model} --data {data}"))
      for tag, target in (("model", "{model}"), ("data", "{data}"), ("adir", "adir"),
                          ("adir-slash", "adir/"), ("empty", "''"), ("proc", "/proc/x/y.onnx"),
                          ("devnull", "/dev/null"), ("zip", "x.zip"), ("txt", "x.txt"),
                          ("noext", "noext"))],
    C("quantize-o-eval-data", Q + " --eval-data flat.npz -o flat.npz", OUT),
    C("quantize-o-plan", Q + " --plan {plan} -o {plan}", OUT),
    C("prune-lbz-o-lbz", "prune {lbz} -o {lbz} --sparsity 0.5", OUT),
    C("cluster-lbz-o-lbz", "cluster {lbz} -o {lbz} --bits 4", OUT),
    *[C(f"unpack-o-{tag}", f"unpack {{lbz}} -o {target}", OUT)
      for tag, target in (("lbz", "{lbz}"), ("adir", "adir"), ("adir-slash", "adir/"),
                          ("empty", "''"), ("proc", "/proc/x/y.onnx"), ("devnull", "/dev/null"),
                          ("zip", "x.zip"), ("lbz-ext", "x.lbz"), ("noext", "noext"))],
    *[C(f"sensitivity-o-{tag}", f"sensitivity {{model}} --data {{data}} --max-bits 6 -o {target}", OUT)
      for tag, target in (("model", "{model}"), ("data", "{data}"), ("adir", "adir"),
                          ("empty", "''"), ("proc", "/proc/x/y.json"), ("devnull", "/dev/null"),
                          ("txt", "x.txt"), ("onnx", "x.onnx"))],
    C("demo-o-proc", "demo --epochs 1 -o /proc/x", OUT),
    C("demo-o-file", "demo --epochs 1 -o {model}", OUT),
    C("demo-o-devnull", "demo --epochs 1 -o /dev/null", OUT),
]

VALUES = [  # B. option values
    *[C(f"quantize-min-cosine-{v}", Q + f" -o {{out}} --min-cosine {v}", "--min-cosine")
      for v in ("2", "-1", "nan", "0")],
    *[C(f"quantize-max-drop-{v}", Q + f" -o {{out}} --max-drop {v}", "--max-drop")
      for v in ("-1", "nan")],
    C("quantize-calibration-bogus", Q + " -o {out} --calibration bogus", "--calibration", "bogus"),
    C("quantize-mode-bogus", Q + " -o {out} --mode bogus", "--mode", "bogus"),
    C("quantize-max-samples-0", Q + " -o {out} --max-samples 0", "--max-samples"),
    C("quantize-batch-0", Q + " -o {out} --batch 0", "--batch"),
    C("quantize-threads-neg", Q + " -o {out} --threads -1", "--threads"),
    C("quantize-threads-2-31", Q + f" -o {{out}} --threads {2**31}", "--threads"),
    C("quantize-batch-10-12", Q + f" -o {{out}} --batch {10**12}", "--batch"),
    C("quantize-wo-bits-0", QW + " -o {out} --bits 0", "--bits"),
    C("quantize-wo-bits-9", QW + " -o {out} --bits 9", "--bits"),
    C("quantize-wo-group-size-7", QW + " -o {out} --group-size 7", "--group-size"),
    C("quantize-wo-algorithm-bogus", QW + " -o {out} --algorithm bogus", "--algorithm", "bogus"),
    C("quantize-bits-abc", Q + " -o {out} --bits abc", "--bits", usage=True),
    *[C(f"prune-sparsity-{v}", f"prune {{model}} -o {{out}} --sparsity {v}", "--sparsity")
      for v in ("1.5", "-0.1", "nan", "inf", "1")],
    C("prune-epochs-neg", P + " --data {data} --epochs -1", "--epochs"),
    *[C(f"prune-lr-{v}", P + f" --data {{data}} --epochs 1 --lr {v}", "--lr") for v in ("-1", "nan", "0")],
    C("prune-nm-2-x", P + " --nm 2:x", "--nm"),
    C("prune-nm-5-4", "prune {model} -o {out} --sparsity 0.5 --nm 5:4", "--nm"),
    C("prune-importance-bogus", P + " --structured --importance bogus", "--importance", "bogus"),
    C("prune-scope-bogus", P + " --scope bogus", "--scope", "bogus"),
    C("prune-threads-neg", P + " --threads -1", "--threads"),
    C("prune-threads-2-40", P + f" --threads {2**40}", "--threads"),
    C("prune-sparsity-abc", "prune {model} -o {out} --sparsity abc", "--sparsity", usage=True),
    *[C(f"cluster-bits-{v}", f"cluster {{model}} -o {{out}} --bits {v}", "--bits") for v in ("0", "9", "-1")],
    C("cluster-bits-abc", "cluster {model} -o {out} --bits abc", "--bits", usage=True),
    C("cluster-init-bogus", CL + " --init bogus", "--init", "bogus"),
    C("cluster-epochs-neg", CL + " --data {data} --epochs -1", "--epochs"),
    *[C(f"cluster-lr-{v}", CL + f" --data {{data}} --epochs 1 --lr {v}", "--lr") for v in ("-1", "nan")],
    C("cluster-threads-neg", CL + " --threads -1", "--threads"),
    *[C(f"compress-sparsity-{v}", CO + f" --sparsity {v}", "--sparsity") for v in ("1.5", "nan")],
    *[C(f"compress-bits-{v}", CO + f" --bits {v}", "--bits") for v in ("0", "9")],
    C("compress-epochs-neg", CO + " --data {data} --epochs -1", "--epochs"),
    C("compress-lr-neg", CO + " --data {data} --epochs 1 --lr -1", "--lr"),
    C("compress-threads-neg", CO + " --threads -1", "--threads"),
    *[C(f"sensitivity-min-cosine-{v}", S + f" --min-cosine {v}", "--min-cosine")
      for v in ("2", "-1", "nan", "0")],
    *[C(f"sensitivity-max-bits-{v}", S + f" --max-bits {v}", "--max-bits")
      for v in ("0", "-1", "100", "nan")],
    C("sensitivity-group-size-7", S + " --max-bits 6 --group-size 7", "--group-size"),
    C("demo-epochs-neg", "demo -o d --epochs -1", "--epochs"),
    C("demo-threads-0", "demo -o d --threads 0", "--threads"),
    C("demo-seed-neg", "demo -o d --epochs 1 --seed -1", "--seed"),
    C("bench-iterations-0", "bench {model} --iterations 0", "--iterations"),
    C("bench-batch-0", "bench {model} --batch 0", "--batch"),
    C("bench-threads-neg", "bench {model} --threads -1", "--threads"),
]

CONFLICTS = [  # C. an option that does nothing in the chosen mode is refused
    C("quantize-algorithm-int8", Q + " -o {out} --algorithm gptq", "--algorithm"),
    C("quantize-asymmetric-int8", Q + " -o {out} --asymmetric", "--asymmetric"),
    C("quantize-group-size-int8", Q + " -o {out} --group-size 64", "--group-size"),
    C("quantize-accuracy-level-int8", Q + " -o {out} --accuracy-level 4", "--accuracy-level"),
    C("quantize-bits-4-int8", Q + " -o {out} --bits 4", "--bits"),
    C("quantize-plan-mode", Q + " -o {out} --plan {plan} --mode dynamic", "--plan", "--mode"),
    C("quantize-plan-min-cosine", Q + " -o {out} --plan {plan} --min-cosine 0.99", "--min-cosine"),
    C("quantize-wo-min-cosine", QW + " -o {out} --min-cosine 0.99", "--min-cosine"),
    C("quantize-wo-calibration", QW + " -o {out} --calibration minmax", "--calibration"),
    C("quantize-wo-weights", QW + " -o {out} --weights channel", "--weights"),
    C("quantize-dynamic-calibration", Q + " -o {out} --mode dynamic --calibration minmax",
      "--calibration"),
    C("quantize-min-cosine-max-drop", Q + " -o {out} --min-cosine 0.99 --max-drop 1",
      "--min-cosine", "--max-drop"),
    C("quantize-exclude-unknown", Q + " -o {out} --exclude nosuchnode", "nosuchnode"),
    C("quantize-wo-exclude-unknown", QW + " -o {out} --exclude nosuchnode", "nosuchnode"),
    C("prune-structured-nm", P + " --structured --nm 2:4", "--nm"),
    C("prune-structured-scope", P + " --structured --scope global", "--scope"),
    C("prune-importance-unstructured", P + " --importance l2", "--importance"),
    C("prune-sparsity-vs-nm", "prune {model} -o {out} --sparsity 0.9 --nm 2:4", "--sparsity", "--nm"),
    C("prune-epochs-no-data", P + " --epochs 2", "--epochs"),
    C("cluster-epochs-no-data", CL + " --epochs 2", "--epochs"),
    C("compress-epochs-no-data", CO + " --epochs 2", "--epochs"),
    C("sensitivity-two-targets", S + " --min-cosine 0.99 --max-bits 6", "--min-cosine", "--max-bits"),
    C("sensitivity-no-target", S, "--min-cosine", "--max-bits"),
]

DATA_USERS = {  # D. how each verb reads labelled data
    "quantize": "quantize {model} -o {out} --max-drop 1 --data ",
    "eval": "eval {model} --data ",
    "prune": P + " --epochs 1 --data ",
}
BAD_DATA = [
    *[C(f"{verb}-{f.split('.')[0]}", argv + f, f, **kw) for verb, argv in DATA_USERS.items()
      for f, kw in (("lab57.npz", {}), ("labneg.npz", {}), ("labfloat.npz", {}),
                    ("single.npz", {}), ("table.npz", {"forbid": ("pickle",)}),
                    ("huge.npz", {}), ("objects.npz", {}))],
    *[C(f"{verb}-{f.split('.')[0]}", f"{verb} {{model}} -o out.lbz --epochs 1 --data {f}" +
        (" --bits 4" if verb == "cluster" else ""), f)
      for verb in ("cluster", "compress") for f in ("lab57.npz", "labneg.npz")],
    C("quantize-eval-data-huge", Q + " -o {out} --eval-data huge.npz", "huge.npz"),
    C("bench-data-huge", "bench {model} --data huge.npz --iterations 1", "huge.npz"),
    C("sensitivity-data-huge", "sensitivity {model} --data huge.npz --max-bits 6 -o s.json", "huge.npz"),
]

NOT_ONNX = "not a readable ONNX model"
BAD_MODEL = [  # E. bad model and container files
    *[C(f"{verb}-{f.split('.')[0]}", argv.format(f=f), f, forbid=(NOT_ONNX,))
      for f in ("flipped.lbz", "truncated.lbz", "empty.lbz")
      for verb, argv in (("inspect", "inspect {f}"), ("eval", "eval {f} --data {{data}}"),
                         ("unpack", "unpack {f} -o {{out}}"),
                         ("prune", "prune {f} -o {{out}} --sparsity 0.5"))],
    *[C(f"{verb}-future", argv, "future.onnx", "opset 99")
      for verb, argv in (("quantize", "quantize future.onnx -o {out} --data flat.npz"),
                         ("eval", "eval future.onnx --data flat.npz"),
                         ("prune", "prune future.onnx -o {out} --sparsity 0.5"),
                         ("cluster", "cluster future.onnx -o {out} --bits 4"),
                         ("bench", "bench future.onnx --iterations 1"))],
    *[C(f"{verb}-{f.split('.')[0]}", argv.format(f=f), f)
      for f in ("picture.png", "notes.txt")
      for verb, argv in (("inspect", "inspect {f}"), ("eval", "eval {f} --data {{data}}"),
                         ("unpack", "unpack {f} -o {{out}}"),
                         ("prune", "prune {f} -o {{out}} --sparsity 0.5"),
                         ("cluster", "cluster {f} -o {{out}} --bits 4"),
                         ("compress", "compress {f} -o x.lbz"),
                         ("sensitivity", "sensitivity {f} --data {{data}} --max-bits 6 -o s.json"),
                         ("bench", "bench {{model}} {f} --iterations 1"))],
]

USAGE = [  # F. click usage errors: short, plain
    C("quantize-unknown-option", Q + " -o {out} --bogus", "--bogus", usage=True),
    C("quantize-missing-o", Q, "--output", usage=True),
    C("quantize-missing-data", "quantize {model} -o {out}", "--data", usage=True),
    C("prune-missing-sparsity", "prune {model} -o {out}", "--sparsity", usage=True),
    C("prune-epochs-float", P + " --epochs 1.5", "--epochs", usage=True),
    C("unpack-missing-o", "unpack {lbz}", "--output", usage=True),
    C("unknown-verb", "frobnicate {model}", "frobnicate", usage=True),
    C("eval-missing-data", "eval {model}", "--data", usage=True),
]

TABLE = [*GUARD, *VALUES, *CONFLICTS, *BAD_DATA, *BAD_MODEL, *USAGE]
assert len({c.id for c in TABLE}) == len(TABLE), "duplicate case ids"


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_refused(case: Case, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(work)
    rc = main(case.args())
    cap = capsys.readouterr()
    check_refusal(rc, cap.err, cap.out, case.names, case.forbid, case.usage)
    assert snapshot(work) == before, "a file was created or an input changed"
    assert Path("/dev/null").is_char_device()


# ----------------------------------------------------------------- one-hot labels: either way


@pytest.mark.parametrize("verb", list(DATA_USERS))
def test_one_hot_labels_are_accepted_or_refused(verb: str, work: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(work)
    rc = main(shlex.split((DATA_USERS[verb] + "onehot.npz").format(model="model.onnx",
                                                                   out="out.onnx")))
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert rc in (0, 2), f"exit {rc}: {cap.err!r}"
    assert "Traceback" not in text and "internal error" not in text, text
    after = snapshot(work)
    if rc == 2:
        assert len([line for line in cap.err.splitlines() if line.strip()]) == 1, cap.err
        assert after == before
    else:
        assert {k: v for k, v in after.items() if k in before} == before


# ----------------------------------------------------------------- /dev/zero: never read forever

DEV_ZERO = {
    "inspect": ["inspect", "/dev/zero"],
    "eval": ["eval", "/dev/zero", "--data", "calib.npz"],
    "quantize": ["quantize", "/dev/zero", "-o", "out.onnx", "--data", "calib.npz"],
    "unpack": ["unpack", "/dev/zero", "-o", "out.onnx"],
}


def _limit_memory() -> None:
    """A reader of /dev/zero fails in seconds under 2 GiB instead of filling the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.skipif(not Path("/dev/zero").exists() or sys.platform != "linux", reason="Linux only")
@pytest.mark.parametrize("verb", list(DEV_ZERO))
def test_dev_zero_as_the_model(verb: str, work: Path) -> None:
    before = snapshot(work)
    try:
        proc = subprocess.run([sys.executable, "-m", "lowbit", *DEV_ZERO[verb]], cwd=work,
                              capture_output=True, text=True, timeout=10, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lowbit {verb} /dev/zero still running after 10 s (reads forever?)")
    check_refusal(proc.returncode, proc.stderr, proc.stdout, ("/dev/zero",), (), False)
    assert snapshot(work) == before
