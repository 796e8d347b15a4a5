"""L1 (issue 12 §5): quantize time and memory on large inputs.

A DBNet-style text detector (ResNet-ish backbone 16-32-64-128 with strides to 1/32, an
FPN of 1x1 laterals, nearest Upsample + Add, 3x3 smoothing convs and a Concat of the
upsampled maps, a head of Conv + BN + ReLU + ConvTranspose x2 + Sigmoid) with a fixed
input [1, 3, H, W], random weights, and ``n`` smooth random images as whole samples
([n, 1, 3, H, W] in an .npz). Each quantization runs in its own process, timed, with
its peak resident memory (``/usr/bin/time -v``): ``lowbit quantize`` in auto (default),
static and dynamic mode, and onnxruntime's ``quantize_static`` (QDQ, per channel) on
the same data.

    .venv/bin/python benchmarks/large_input.py [--side 736x1216] [--samples 60]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

TARGET_SECONDS = 120.0
TARGET_VS_ORT = 3.0
TARGET_EXTRA_MB = 2048.0

ORT_STATIC_SCRIPT = r"""
import sys
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

src, dst, data, name = sys.argv[1:5]
x = np.load(data)["x"]  # [n, 1, 3, H, W]: whole samples

class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(range(len(x)))

    def get_next(self):
        i = next(self.it, None)
        return None if i is None else {name: x[i]}

quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
"""


def dbnet_module(widths: tuple[int, ...] = (16, 32, 64, 128), inner: int = 64) -> object:
    """A DBNet-like detector in PyTorch (random weights, eval mode)."""
    import torch
    from torch import nn

    def conv_bn(a: int, b: int, k: int = 3, s: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(a, b, k, s, k // 2, bias=False), nn.BatchNorm2d(b),
                             nn.ReLU())

    class Block(nn.Module):  # a ResNet basic block
        def __init__(self, a: int, b: int, s: int) -> None:
            super().__init__()
            self.c1 = conv_bn(a, b, 3, s)
            self.c2 = nn.Sequential(nn.Conv2d(b, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b))
            self.skip = nn.Sequential(nn.Conv2d(a, b, 1, s, bias=False), nn.BatchNorm2d(b)) \
                if (a, s) != (b, 1) else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.c2(self.c1(x)) + self.skip(x))

    class DBNetLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, widths[0], 3, 2), conv_bn(widths[0], widths[0]),
                                      nn.MaxPool2d(3, 2, 1))  # 1/4
            stages, a = [], widths[0]
            for k, b in enumerate(widths):  # 1/4, 1/8, 1/16, 1/32
                stages.append(nn.Sequential(Block(a, b, 1 if k == 0 else 2), Block(b, b, 1)))
                a = b
            self.stages = nn.ModuleList(stages)
            self.lateral = nn.ModuleList(nn.Conv2d(w, inner, 1) for w in widths)
            self.smooth = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, 1, 1) for _ in widths)
            self.head = nn.Sequential(
                nn.Conv2d(inner, inner // 4, 3, 1, 1, bias=False), nn.BatchNorm2d(inner // 4),
                nn.ReLU(), nn.ConvTranspose2d(inner // 4, inner // 4, 2, 2),
                nn.BatchNorm2d(inner // 4), nn.ReLU(), nn.ConvTranspose2d(inner // 4, 1, 2, 2),
                nn.Sigmoid())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = []
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            lat = [conv(f) for conv, f in zip(self.lateral, feats)]
            for k in range(len(lat) - 2, -1, -1):  # top-down: nearest x2 upsample + add
                lat[k] = lat[k] + nn.functional.interpolate(lat[k + 1], scale_factor=2.0,
                                                            mode="nearest")
            maps = [smooth(p) for smooth, p in zip(self.smooth, lat)]
            maps = [maps[0]] + [nn.functional.interpolate(m, scale_factor=2.0 ** k,
                                                          mode="nearest")
                                for k, m in enumerate(maps[1:], 1)]
            return self.head(torch.cat(maps, dim=1))

    torch.manual_seed(0)
    model = DBNetLike()
    with torch.no_grad():  # BN statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_dbnet(path: Path, height: int, width: int,
                 widths: tuple[int, ...] = (16, 32, 64, 128), inner: int = 64) -> onnx.ModelProto:
    """The DBNet-like model exported with a fixed input [1, 3, height, width]."""
    from lowbit.backends.torch.export import export_module

    proto = export_module(dbnet_module(widths, inner), np.zeros((1, 3, height, width),
                                                                np.float32), dynamic_dims=())
    onnx.save(proto, path)
    return proto


def images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth random images as whole samples, [n, 1, 3, height, width] float32:
    low-frequency colour blobs, a few sharp "text" strokes and a little noise, normalised
    like ImageNet inputs (about zero mean, unit variance)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, 3, height, width), np.float32)
    gh, gw = (height + 31) // 32, (width + 31) // 32
    for i in range(n):
        coarse = rng.standard_normal((3, gh, gw)).astype(np.float32)
        img = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)[:, :height, :width]
        for _ in range(12):  # dark horizontal strokes, like lines of text
            y, x = rng.integers(0, height - 8), rng.integers(0, width - 200)
            img[:, y:y + 6, x:x + rng.integers(50, 200)] -= 2.0
        img += 0.2 * rng.standard_normal((3, height, width)).astype(np.float32)
        out[i, 0] = img
    return out


def _timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of ``cmd`` in its own process."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):  # 1: lowbit's "work done, a target not met"
        raise RuntimeError(f"{cmd[:3]} failed ({done.returncode}): {done.stderr[-2000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return {"seconds": seconds, "peak_mb": int(peak.group(1)) / 1024 if peak else float("nan")}


def measure(tmp: Path, height: int = 736, width: int = 1216, samples: int = 60,
            modes: tuple[str, ...] = ("auto", "static", "dynamic")) -> dict[str, object]:
    """Build the model and data in ``tmp``, then time each quantization in its own process."""
    model_path, data_path = tmp / "dbnet.onnx", tmp / "calib.npz"
    export_dbnet(model_path, height, width)
    x = images(samples, height, width)
    np.savez(data_path, x=x)
    del x
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows: dict[str, object] = {"model_mb": model_path.stat().st_size / 2**20,
                               "data_mb": data_path.stat().st_size / 2**20,
                               "side": f"{height}x{width}", "samples": samples}
    for mode in modes:
        out = tmp / f"dbnet.{mode}.onnx"
        r = _timed([sys.executable, "-m", "lowbit", "quantize", str(model_path), "-o", str(out), "--data",
                    str(data_path), "--mode", mode, "--quiet"], env)
        report = json.loads((tmp / f"dbnet.{mode}.onnx.report.json").read_text())
        ver = report.get("verification", {})
        r.update({"speedup": ver.get("latency", {}).get("speedup"),
                  "sqnr_db": ver.get("agreement", {}).get("sqnr_db"),
                  "method": report.get("calibration", {}).get("method"),
                  "stage_seconds": report.get("seconds", {})})
        rows[mode] = r
    script = tmp / "ort_static.py"
    script.write_text(ORT_STATIC_SCRIPT)
    rows["ort"] = _timed([sys.executable, str(script), str(model_path),
                          str(tmp / "dbnet.ort.onnx"), str(data_path), "input"], env)
    return rows


def bench_large_input(tmp: Path, height: int = 736, width: int = 1216,
                      samples: int = 60) -> list[dict]:
    """The L1 row of benchmarks/run.py."""
    r = measure(tmp, height, width, samples)
    auto, ort = r["auto"], r["ort"]
    ratio = auto["seconds"] / ort["seconds"]
    extra = auto["peak_mb"] - r["model_mb"]
    ok = auto["seconds"] < TARGET_SECONDS and ratio <= TARGET_VS_ORT and extra < TARGET_EXTRA_MB
    others = "; ".join(f"{m} {r[m]['seconds']:.0f} s / {r[m]['peak_mb']:.0f} MB"
                       for m in ("static", "dynamic"))
    return [{"id": "L1", "what": f"quantize a DBNet-style detector, input 1x3x{r['side']}, "
                                f"{r['samples']} samples ({r['data_mb']:.0f} MB of data)",
             "target": "default quantize < 120 s and <= 3x onnxruntime quantize_static time; "
                       "peak memory < 2 GB + model",
             "measured": f"auto {auto['seconds']:.0f} s ({ratio:.2f}x ort's "
                         f"{ort['seconds']:.0f} s), peak {auto['peak_mb']:.0f} MB",
             "pass": ok,
             "details": f"model {r['model_mb']:.1f} MB; lowbit auto: calibration "
                        f"{auto['method']}, speedup {auto['speedup']}, SQNR {auto['sqnr_db']} dB, "
                        f"stage seconds {auto['stage_seconds']}; {others}; onnxruntime "
                        f"quantize_static (QDQ, per channel) peak {ort['peak_mb']:.0f} MB; "
                        "each run in its own process with verification, OMP_NUM_THREADS=1"}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", default="736x1216", help="HxW of the input")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--modes", default="auto,static,dynamic")
    args = parser.parse_args()
    height, width = (int(v) for v in args.side.split("x"))
    with tempfile.TemporaryDirectory(prefix="lowbit-large-") as tmp:
        r = measure(Path(tmp), height, width, args.samples,
                    tuple(m for m in args.modes.split(",") if m))
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
