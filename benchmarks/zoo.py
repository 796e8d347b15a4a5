"""Z1-Z10: the conformance zoo (issue 8). Ten architectures built in code with torch,
trained for a few seconds on the bundled digits (upsampled) or on synthetic sequences,
exported to ONNX, and quantized by lowbit (default auto) and by its peers: onnxruntime
``quantize_static`` (QDQ, per-channel, after ``quant_pre_process``), onnxruntime
``quantize_dynamic`` (per-channel) and NNCF's ONNX post-training quantization.

    python benchmarks/zoo.py [--only Z1,Z8]

Every timing is a ratio measured in one run per model and batch: float, lowbit and every
peer alternate in one ``time_side_by_side`` call (warmed up, median, one intra-op thread).
Every tool calibrates on the same 128 training samples; SQNR is measured against the
float model on 64 held-out samples. A peer that fails is recorded and left out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import digits_upsampled, time_side_by_side  # noqa: E402

import lowbit  # noqa: E402
from lowbit.backends.onnx.session import make_session  # noqa: E402
from lowbit.backends.torch.export import export_module  # noqa: E402
from lowbit.metrics import accuracy, sqnr_db  # noqa: E402
from lowbit.runtime.environment import cpu_info, versions  # noqa: E402

CALIB, HELD = 128, 64
SPEED_RATIO_TARGET = 0.97  # lowbit speed >= this x the fastest peer's
SQNR_SLACK_DB = 1.0  # lowbit SQNR >= the fastest peer's - this
GEOMEAN_TARGET = 1.3  # geometric mean of lowbit speed / fastest peer speed
MEASURE_SECONDS = 6.0  # about this long per timing call
PEERS = ("ort-static", "ort-dynamic", "nncf")


# ---------------------------------------------------------------- data


def _digits(side: int, channels: int):
    """Digits at side x side: nearest (np.kron-like) when side is a multiple of 8, else bilinear."""
    if side % 8 == 0:
        return digits_upsampled(side, channels)
    import torch
    import torch.nn.functional as F

    from lowbit.data import digits_split

    x_tr, y_tr, x_te, y_te = digits_split(0)

    def up(x: np.ndarray) -> np.ndarray:
        big = F.interpolate(torch.from_numpy(x), size=(side, side), mode="bilinear",
                            align_corners=False).numpy()
        return np.ascontiguousarray(np.repeat(big, channels, axis=1), dtype=np.float32)

    return up(x_tr), y_tr, up(x_te), y_te


def _digit_masks():
    """U-Net task: the digit's mask (pixels > 0.5) from a noisy 1x32x32 digit."""
    x_tr, _, x_te, _ = digits_upsampled(32, 1)
    rng = np.random.default_rng(1)

    def noisy(x: np.ndarray) -> np.ndarray:
        return (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)

    return noisy(x_tr), (x_tr > 0.5).astype(np.float32), noisy(x_te), (x_te > 0.5).astype(np.float32)


def _sequences(seq: int, dim: int, n_train: int = 2048, n_test: int = 512, seed: int = 0):
    """Synthetic sequence classification: each class has a prototype vector, added (with
    a random sign-free scale) at 4 random positions of a Gaussian-noise sequence."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((10, dim)).astype(np.float32)

    def make(n: int):
        y = rng.integers(0, 10, n)
        x = rng.standard_normal((n, seq, dim)).astype(np.float32)
        for i in range(n):
            pos = rng.choice(seq, 4, replace=False)
            x[i, pos] += protos[y[i]] * rng.uniform(0.5, 1.5)
        return x, y.astype(np.int64)

    x_tr, y_tr = make(n_train)
    x_te, y_te = make(n_test)
    return x_tr, y_tr, x_te, y_te


def _audio(length: int = 4000, n_train: int = 1024, n_test: int = 256, seed: int = 0):
    """Synthetic 'audio' at 8 kHz: class c is a tone of 200 + 150 c Hz (random phase,
    amplitude and a weaker second harmonic) in noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float32) / 8000.0

    def make(n: int):
        y = rng.integers(0, 10, n)
        f = (200.0 + 150.0 * y)[:, None] * rng.uniform(0.97, 1.03, (n, 1))
        ph = rng.uniform(0, 2 * np.pi, (n, 1))
        amp = rng.uniform(0.5, 1.0, (n, 1))
        x = amp * np.sin(2 * np.pi * f * t + ph) + 0.3 * amp * np.sin(4 * np.pi * f * t + ph)
        x += 0.5 * rng.standard_normal((n, length))
        return x[:, None, :].astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = make(n_train)
    x_te, y_te = make(n_test)
    return x_tr, y_tr, x_te, y_te


# ---------------------------------------------------------------- models


def _resnet18ish():
    """ResNet-18 structure (3x3 stem, 4 stages of 2 BasicBlocks, 1x1 downsampling),
    widths 16-32-64-128, for 3x32x32."""
    import torch.nn as nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.b2(self.c2(self.relu(self.b1(self.c1(x)))))
            return self.relu(y + (x if self.down is None else self.down(x)))

    layers: list[Any] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2), (128, 2)):
        layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)]
    return nn.Sequential(*layers)


def _mobilenetv2():
    """MobileNetV2 (inverted residuals, depthwise 3x3, ReLU6, linear bottlenecks), reduced
    widths, stride-1 stem for 3x32x32."""
    import torch.nn as nn

    def cbr(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        mods = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return mods + ([nn.ReLU6()] if act else [])

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
            super().__init__()
            hid = cin * t
            mods = (cbr(cin, hid) if t != 1 else []) + cbr(hid, hid, 3, stride, hid) + \
                cbr(hid, cout, act=False)
            self.body = nn.Sequential(*mods)
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.res else self.body(x)

    layers: list[Any] = cbr(3, 16, 3, 1)
    cin = 16
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1)):
        for i in range(n):
            layers.append(Inverted(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += cbr(cin, 320) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(320, 10)]
    return nn.Sequential(*layers)


def _efficientnet():
    """EfficientNet-style MBConv (SiLU, squeeze-excitation, depthwise 3x3/5x5), small."""
    import torch.nn as nn

    def cbs(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        mods = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return mods + ([nn.SiLU()] if act else [])

    class SE(nn.Module):
        def __init__(self, ch: int, squeeze: int) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, squeeze, 1), nn.SiLU(),
                                   nn.Conv2d(squeeze, ch, 1), nn.Sigmoid())

        def forward(self, x):
            return x * self.f(x)

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, k: int, stride: int, t: int) -> None:
            super().__init__()
            hid = cin * t
            mods = (cbs(cin, hid) if t != 1 else []) + cbs(hid, hid, k, stride, hid) + \
                [SE(hid, max(1, cin // 4))] + cbs(hid, cout, act=False)
            self.body = nn.Sequential(*mods)
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.res else self.body(x)

    layers: list[Any] = cbs(3, 16, 3, 1)
    cin = 16
    for t, k, c, n, s in ((1, 3, 16, 1, 1), (6, 3, 24, 2, 2), (6, 5, 40, 2, 2), (6, 3, 80, 2, 2),
                          (6, 5, 112, 1, 1)):
        for i in range(n):
            layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
            cin = c
    layers += cbs(cin, 320) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(320, 10)]
    return nn.Sequential(*layers)


def _unet():
    """U-Net, 3 levels (16-32-64), ConvTranspose upsampling, Concat skips, 1x32x32 -> mask."""
    import torch
    import torch.nn as nn

    def double(cin: int, cout: int):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.mid = double(1, 16), double(16, 32), double(32, 64)
            self.pool = nn.MaxPool2d(2)
            self.u2, self.d2 = nn.ConvTranspose2d(64, 32, 2, 2), double(64, 32)
            self.u1, self.d1 = nn.ConvTranspose2d(32, 16, 2, 2), double(32, 16)
            self.out = nn.Conv2d(16, 1, 1)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(self.pool(a))
            m = self.mid(self.pool(b))
            y = self.d2(torch.cat([self.u2(m), b], 1))
            return self.out(self.d1(torch.cat([self.u1(y), a], 1)))

    return UNet()


def _mnist_cnn():
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 5 * 5, 128),
                         nn.ReLU(), nn.Linear(128, 10))


def _mlp3d():
    import torch.nn as nn

    class MLP3D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())
            self.head = nn.Linear(256, 10)

        def forward(self, x):  # (b, 16, 256)
            return self.head(self.f(x).mean(1))

    return MLP3D()


def _transformer():
    import torch
    import torch.nn as nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 32, 128))
            layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(128, 10)

        def forward(self, x):  # (b, 32, 128)
            return self.head(self.enc(x + self.pos).mean(1))

    return Encoder()


def _recurrent(kind: str):
    import torch.nn as nn

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(64, 128, batch_first=True)
            self.head = nn.Linear(128, 10)

        def forward(self, x):  # (b, 20, 64)
            return self.head(self.rnn(x)[0][:, -1])

    return Recurrent()


def _vit_tiny():
    """ViT-tiny: 4x4 patch embedding (Conv), cls token, learned positions, 4 pre-norm
    layers, d 192, 3 heads, MLP 768 (GELU), on 3x32x32."""
    import torch
    import torch.nn as nn

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 192, 4, 4)
            self.cls = nn.Parameter(torch.zeros(1, 1, 192))
            self.pos = nn.Parameter(torch.zeros(1, 65, 192))
            layer = nn.TransformerEncoderLayer(192, 3, 768, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(192)
            self.head = nn.Linear(192, 10)

        def reset_parameters(self) -> None:
            nn.init.normal_(self.cls, std=0.02)
            nn.init.normal_(self.pos, std=0.02)

        def forward(self, x):
            p = self.patch(x).flatten(2).transpose(1, 2)  # (b, 64, 192)
            h = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], 1) + self.pos
            return self.head(self.norm(self.enc(h))[:, 0])

    return ViT()


def _audio_cnn():
    """M5-style 1-D conv net on 4000 samples: Conv1d stack with BN, ReLU, pooling."""
    import torch.nn as nn

    def block(cin: int, cout: int, k: int, s: int = 1, pool: int = 4):
        mods = [nn.Conv1d(cin, cout, k, s, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]
        return mods + ([nn.MaxPool1d(pool)] if pool > 1 else [])

    return nn.Sequential(*block(1, 32, 80, 8), *block(32, 32, 3), *block(32, 64, 3),
                         *block(64, 64, 3, pool=1), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(64, 10))


@dataclass(frozen=True)
class Spec:
    id: str
    what: str
    build: Any
    data: Any
    steps: int
    lr: float = 1e-3
    loss: str = "ce"
    sequence: bool = False  # also timed at batch 1


SPECS = [
    Spec("Z1", "ResNet-18-style (16-32-64-128, BN, residual Add), 3x32x32 digits", _resnet18ish,
         lambda: _digits(32, 3), 40, lr=3e-3),
    Spec("Z2", "MobileNetV2 (depthwise, ReLU6, inverted residuals), 3x32x32 digits", _mobilenetv2,
         lambda: _digits(32, 3), 40, lr=3e-3),
    Spec("Z3", "EfficientNet-style (SiLU, squeeze-excitation, MBConv), 3x32x32 digits",
         _efficientnet, lambda: _digits(32, 3), 40, lr=3e-3),
    Spec("Z4", "U-Net (Concat skips, ConvTranspose), 1x32x32 noisy digit -> mask", _unet,
         _digit_masks, 40, lr=3e-3, loss="bce"),
    Spec("Z5", "MNIST-style CNN (1-channel first Conv), 1x28x28 digits", _mnist_cnn,
         lambda: _digits(28, 1), 200),
    Spec("Z6", "MLP on 3-D input (Linear 256-512-256 on [b, 16, 256], mean, classifier)", _mlp3d,
         lambda: _sequences(16, 256), 200, sequence=True),
    Spec("Z7", "Transformer encoder (2 layers, d 128, 4 heads) on [b, 32, 128]", _transformer,
         lambda: _sequences(32, 128), 150, lr=5e-4, sequence=True),
    Spec("Z8a", "LSTM(64, 128) on [b, 20, 64] + Linear", lambda: _recurrent("lstm"),
         lambda: _sequences(20, 64), 200, lr=3e-3, sequence=True),
    Spec("Z8b", "GRU(64, 128) on [b, 20, 64] + Linear", lambda: _recurrent("gru"),
         lambda: _sequences(20, 64), 200, lr=3e-3, sequence=True),
    Spec("Z9", "ViT-tiny (patch Conv, cls token, 4 layers, d 192, 3 heads), 3x32x32 digits",
         _vit_tiny, lambda: _digits(32, 3), 150, sequence=True),
    Spec("Z10", "1-D conv audio model (Conv1d/BN/ReLU stack) on [b, 1, 4000]", _audio_cnn,
         _audio, 40, lr=3e-3),
]


# ---------------------------------------------------------------- training and tools


def _train(module, x: np.ndarray, y: np.ndarray, steps: int, lr: float, loss: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss() if loss == "ce" else torch.nn.BCEWithLogitsLoss()
    module.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(xt), 32, replace=False))
        opt.zero_grad()
        loss_fn(module(xt[idx]), yt[idx]).backward()
        opt.step()
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:  # a few hundred steps leave running statistics behind: re-estimate them
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average
        with torch.no_grad():
            for i in range(0, min(len(xt), 512), 64):
                module(xt[i:i + 64])
    return module.eval()


def _outputs(path: str, x: np.ndarray, name: str) -> np.ndarray:
    sess = make_session(path)
    return np.concatenate([sess.run(None, {name: x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:200]}" if msg else type(exc).__name__


def _ort_static(pre: str, out: str, calib: np.ndarray, name: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _ort_dynamic(pre: str, out: str, calib: np.ndarray, name: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(pre, out, per_channel=True, weight_type=QuantType.QInt8)


def _nncf(float_path: str, out: str, calib: np.ndarray, name: str) -> None:
    import nncf

    data = nncf.Dataset([{name: calib[i:i + 1]} for i in range(len(calib))])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        q = nncf.quantize(onnx.load(float_path), data, subset_size=len(calib))
    onnx.save(q, out)


def _preprocess(float_path: str, pre: str) -> tuple[str, str]:
    """onnxruntime's recommended pre-processing: (path, note). Where symbolic shape inference
    fails, retried with ``skip_symbolic_shape=True`` (as onnxruntime's docs advise); the
    float model itself if that fails too."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(float_path, pre)
        return pre, ""
    except Exception as exc:  # noqa: BLE001 - recorded
        first = _first_line(exc)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(float_path, pre, skip_symbolic_shape=True)
        return pre, f"quant_pre_process failed ({first}); retried with skip_symbolic_shape=True"
    except Exception as exc:  # noqa: BLE001 - recorded
        return float_path, (f"quant_pre_process failed ({first}; with skip_symbolic_shape: "
                            f"{_first_line(exc)}): ort peers quantize the float model")


def _iterations(paths: list[str], feed: dict[str, np.ndarray]) -> int:
    sess = make_session(paths[0])
    sess.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(3):
        sess.run(None, feed)
    once = (time.perf_counter() - t0) / 3
    return int(min(300, max(20, MEASURE_SECONDS / (len(paths) * once))))


def _lowbit(float_path: str, calib: np.ndarray, batch: int, out: Path) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    qm = lowbit.quantize(float_path, calib, batch=batch, threads=1, verify=False)
    secs = time.perf_counter() - t0
    qm.save(out, report=False)
    found = qm.report.get("candidates") or {}
    rows = found.get("candidates", []) if isinstance(found, dict) else found
    kept = next((r["name"] for r in rows if r.get("kept")), "rule (no search)")
    table = ", ".join(f"{r['name']} {r['speedup']:.2f}x/{r['sqnr_db']:.1f} dB" for r in rows)
    return str(out), f"kept '{kept}' of [{table}]", secs


def _bench_model(tmp: Path, spec: Spec) -> dict:
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    x_tr, y_tr, x_te, y_te = spec.data()
    t0 = time.perf_counter()
    module = _train(spec.build(), x_tr, y_tr, spec.steps, spec.lr, spec.loss)
    train_s = time.perf_counter() - t0
    proto = export_module(module, x_tr[:2])
    name = proto.graph.input[0].name
    float_path = str(tmp / f"{spec.id}.float.onnx")
    onnx.save(proto, float_path)
    rng = np.random.default_rng(0)
    calib = np.ascontiguousarray(x_tr[rng.choice(len(x_tr), CALIB, replace=False)])
    held = np.ascontiguousarray(x_te[:HELD])
    ref = _outputs(float_path, held, name)
    quality = ""
    if spec.loss == "ce":
        acc = accuracy(_outputs(float_path, x_te, name), y_te)
        quality = f"float test accuracy {acc:.3f}"
    else:
        pred = _outputs(float_path, x_te, name) > 0
        quality = f"float mask pixel accuracy {float(np.mean(pred == (y_te > 0.5))):.3f}"

    failures: list[str] = []
    peer_paths: dict[str, str] = {}
    secs: dict[str, float] = {}
    pre, note = _preprocess(float_path, str(tmp / f"{spec.id}.pre.onnx"))
    if note:
        failures.append(note)
    for peer, fn, src in (("ort-static", _ort_static, pre), ("ort-dynamic", _ort_dynamic, pre),
                          ("nncf", _nncf, float_path)):
        out = str(tmp / f"{spec.id}.{peer}.onnx")
        t1 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(src, out, calib, name)
            _outputs(out, held[:8], name)
            peer_paths[peer] = out
        except Exception as exc:  # noqa: BLE001 - a failing peer is recorded and skipped
            failures.append(f"{peer}: {_first_line(exc)}")
        secs[peer] = time.perf_counter() - t1

    batches = (8, 1) if spec.sequence else (8,)
    results: dict[int, dict[str, tuple[float, float]]] = {}
    notes: list[str] = []
    checks: list[bool] = []
    for batch in batches:
        lb_path, lb_note, lb_s = _lowbit(float_path, calib, batch, tmp / f"{spec.id}.lowbit.b{batch}.onnx")
        names = ["lowbit"] + list(peer_paths)
        paths = [float_path, lb_path] + list(peer_paths.values())
        feed = {name: np.ascontiguousarray(x_te[:batch])}
        st = time_side_by_side(paths, feed, batch=batch, threads=1, iterations=_iterations(paths, feed))
        res = {n: (st[0].p50_ms / s.p50_ms, sqnr_db(ref, _outputs(p, held, name)))
               for n, s, p in zip(names, st[1:], paths[1:])}
        results[batch] = res
        peers = {k: v for k, v in res.items() if k != "lowbit"}
        lb_speed, lb_sqnr = res["lowbit"]
        if peers:
            best = max(peers, key=lambda k: peers[k][0])
            checks += [lb_speed >= SPEED_RATIO_TARGET * peers[best][0],
                       lb_speed >= 1.0 or not any(v[0] > 1.0 for v in peers.values()),
                       lb_sqnr >= peers[best][1] - SQNR_SLACK_DB]
        notes.append(f"batch {batch}: p50 float {st[0].p50_ms:.3f} ms ({st[0].iterations} iterations); "
                     f"lowbit quantize {lb_s:.1f} s, {lb_note}")
    return {"spec": spec, "results": results, "checks": checks, "notes": notes,
            "failures": failures, "train_s": train_s, "quality": quality, "peer_s": secs}


def _fastest(res: dict[str, tuple[float, float]]) -> str | None:
    peers = {k: v for k, v in res.items() if k != "lowbit"}
    return max(peers, key=lambda k: peers[k][0]) if peers else None


def _row(r: dict) -> dict:
    spec = r["spec"]
    parts = []
    for batch, res in r["results"].items():
        tools = " \\| ".join(f"{k} {v[0]:.2f}x {v[1]:.1f} dB" for k, v in res.items())
        parts.append(f"b{batch}: {tools} \\| fastest peer {_fastest(res) or 'none'}")
    peer_s = ", ".join(f"{k} {v:.1f} s" for k, v in r["peer_s"].items())
    fails = "; ".join(r["failures"]) or "none"
    return {"id": spec.id, "what": spec.what,
            "target": (f"lowbit speed >= {SPEED_RATIO_TARGET} x fastest peer; >= 1.0x if any peer "
                       f"beats float; SQNR >= fastest peer's - {SQNR_SLACK_DB:g} dB"),
            "measured": "<br>".join(parts), "pass": bool(r["checks"]) and all(r["checks"]),
            "details": (f"trained {spec.steps} steps in {r['train_s']:.1f} s, {r['quality']}; "
                        f"{'; '.join(r['notes'])}; peers quantize {peer_s}; peer notes: {fails}")}


def _summary(runs: list[dict]) -> dict:
    def geomean(batch: int) -> tuple[float, int]:
        ratios = [r["results"][batch]["lowbit"][0] / r["results"][batch][_fastest(r["results"][batch])][0]
                  for r in runs if batch in r["results"] and _fastest(r["results"][batch])]
        return (math.exp(float(np.mean(np.log(ratios)))) if ratios else float("nan")), len(ratios)

    g8, n8 = geomean(8)
    g1, n1 = geomean(1)
    env = cpu_info()
    return {"id": "Z", "what": "zoo summary: geometric mean of lowbit speed / fastest peer speed",
            "target": f">= {GEOMEAN_TARGET} at batch 8",
            "measured": f"{g8:.2f} at batch 8 ({n8} models); {g1:.2f} at batch 1 ({n1} sequence models)",
            "pass": g8 >= GEOMEAN_TARGET,
            "details": (f"CPU {env['cpu']} ({env['cores']} cores, VNNI: {env['vnni']}, AVX-512: "
                        f"{env['avx512']}); 1 intra-op thread; {CALIB} calibration samples for every "
                        f"tool, SQNR on {HELD} held-out samples")}


def bench_zoo(tmp: Path, only: tuple[str, ...] = ()) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # robust when the machine is shared; training takes seconds
    logging.getLogger("nncf").setLevel(logging.ERROR)
    runs = []
    for spec in SPECS:
        if only and spec.id not in only and spec.id.rstrip("ab") not in only:
            continue
        t0 = time.perf_counter()
        runs.append(_bench_model(tmp, spec))
        print(f"[{spec.id} done in {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return [_row(r) for r in runs] + ([_summary(runs)] if runs else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated ids, e.g. Z1,Z8")
    args = parser.parse_args()
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-zoo-") as tmp:
        rows = bench_zoo(Path(tmp), only)
    env = {**cpu_info(), **versions()}
    import nncf
    import torch

    print(f"CPU: {env['cpu']} ({env['cores']} cores, VNNI: {env['vnni']}, AVX-512: {env['avx512']}); "
          f"python {env['python']}, numpy {env['numpy']}, onnx {env['onnx']}, onnxruntime "
          f"{env['onnxruntime']}, torch {torch.__version__}, nncf {nncf.__version__}, lowbit "
          f"{env['lowbit']}; total {time.perf_counter() - t0:.0f} s\n")
    print("| id | what | target | measured | pass |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['id']} | {r['what']} | {r['target']} | {r['measured']} | "
              f"{'yes' if r['pass'] else '**no**'} |")
    print()
    for r in rows:
        print(f"- {r['id']}: {r['details']}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
