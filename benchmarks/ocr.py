"""O1 (issue 12 §5): real OCR models quantized with defaults.

The three PP-OCR models shipped in the ``rapidocr-onnxruntime`` wheel (the ``bench``
extra; only its model files are used, found without importing the package, which
pulls OpenCV):

- ``ch_PP-OCRv4_det_infer.onnx``: DBNet text detector, input [N, 3, H, W] (dynamic),
  run here at 1x3x736x1216;
- ``ch_PP-OCRv4_rec_infer.onnx``: SVTR/CRNN text recognizer, 1x3x48x320, CTC over the
  character list in its ``character`` metadata (blank first, space last, as rapidocr
  decodes);
- ``ch_ppocr_mobile_v2.0_cls_infer.onnx``: text direction classifier (0 / 180 degrees),
  1x3x48x192.

Data is rendered with Pillow, nothing is downloaded: white pages with lines of printed
latin text and digits for the detector, single text lines for the recognizer and the
classifier (half of the classifier's turned by 180 degrees), normalised as rapidocr does
((x / 255 - 0.5) / 0.5; the recognizer's and classifier's lines resized to height 48
and padded with zeros on the right). Each sample is a whole input [1, 3, H, W], so the
models run (and are timed) at batch 1.

For each model, in its own process under ``/usr/bin/time -v`` (wall time and peak
resident memory), alternating: ``lowbit quantize`` with defaults (auto) and onnxruntime's
``quantize_static`` (QDQ, per channel) on the same .npz of calibration samples. Then on
held-out samples: output SQNR vs float, speed vs float at batch 1 and one intra-op
thread (float, lowbit and onnxruntime alternating), the recognizer's character accuracy
(CTC greedy decoding against the rendered strings), the classifier's accuracy, and the
detector's text-mask IoU vs float (probability > 0.3, rapidocr's threshold).

    .venv/bin/python benchmarks/ocr.py [--det-samples 48] [--only det,rec,cls]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_side_by_side  # noqa: E402
from large_input import (  # noqa: E402
    ORT_STATIC_SCRIPT,
    TARGET_EXTRA_MB,
    TARGET_SECONDS,
    TARGET_VS_ORT,
    _timed,
)

PACKAGE = "rapidocr_onnxruntime"
MODELS = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
          "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
DET_SIDE = (736, 1216)  # H, W: rapidocr's limit_side_len 736 on a landscape page
REC_SHAPE = (48, 320)
CLS_SHAPE = (48, 192)
ALPHABET = string.ascii_letters + string.digits
FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
         "/usr/share/fonts/dejavu/DejaVuSans.ttf")

# ---------------------------------------------------------------- models


def model_dir() -> Path:
    """The wheel's ``models`` folder, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"O1 needs the model files of {PACKAGE}: pip install "
                         "'rapidocr-onnxruntime==1.4.4' (or lowbit[bench])")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def characters(rec_path: Path) -> list[str]:
    """The recognizer's classes: blank, the ``character`` metadata lines, then space."""
    import onnx

    model = onnx.load(str(rec_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


# ---------------------------------------------------------------- rendering


def _font(size: int) -> Any:
    from PIL import ImageFont

    for path in FONTS:
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                      "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join("".join(rng.choice(list(ALPHABET), int(rng.integers(2, 8))))
                    for _ in range(n))


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, (x / 255 - 0.5) / 0.5 as rapidocr."""
    return ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def render_page(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A page of printed text lines, HxWx3 uint8."""
    from PIL import Image, ImageDraw

    paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    page = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(10, 40))
    while y < height - 30:
        size = int(rng.integers(16, 44))
        if rng.random() < 0.1:  # a rule or a box now and then
            x0 = int(rng.integers(0, width // 2))
            draw.rectangle([x0, y, x0 + int(rng.integers(100, width // 2)), y + 2], fill=(0, 0, 0))
            y += 12
            continue
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        x = int(rng.integers(10, width // 3))
        draw.text((x, y), _words(rng, int(rng.integers(2, 10))), font=_font(size), fill=ink)
        y += int(size * rng.uniform(1.3, 2.4))
    arr = np.asarray(page, np.float32)
    arr += rng.normal(0.0, 4.0, arr.shape)  # a little scanner noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_line(rng: np.random.Generator, text: str) -> np.ndarray:
    """One text line cropped with a small margin, HxWx3 uint8."""
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(28, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(3, 9))
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=ink)
    return np.asarray(img)


def line_input(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: height ``height``, width by the aspect ratio up to
    ``width``, normalised, zero padded on the right. 3 x height x width float32."""
    from PIL import Image

    h, w = rgb.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / h)))
    small = np.asarray(Image.fromarray(rgb).resize((resized_w, height), Image.BILINEAR))
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = _normalise(small)
    return out


def det_samples(n: int, seed: int, side: tuple[int, int] = DET_SIDE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, 3, *side), np.float32)
    for i in range(n):
        out[i, 0] = _normalise(render_page(rng, *side))
    return out


def line_texts(n: int, rng: np.random.Generator, max_ratio: float) -> list[tuple[str, np.ndarray]]:
    """``n`` (text, line image) whose aspect ratio fits ``max_ratio`` (no squeezing)."""
    out = []
    while len(out) < n:
        text = _words(rng, int(rng.integers(1, 4)))
        img = render_line(rng, text)
        if img.shape[1] / img.shape[0] <= max_ratio:
            out.append((text, img))
    return out


def rec_samples(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    lines = line_texts(n, rng, REC_SHAPE[1] / REC_SHAPE[0])
    x = np.stack([line_input(img, *REC_SHAPE)[None] for _, img in lines])
    return x, [t for t, _ in lines]


def cls_samples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lines, every other one turned by 180 degrees (label 1)."""
    rng = np.random.default_rng(seed)
    lines = line_texts(n, rng, 2.0 * CLS_SHAPE[1] / CLS_SHAPE[0])
    labels = np.arange(n) % 2
    x = np.stack([line_input(img[::-1, ::-1] if lab else img, *CLS_SHAPE)[None]
                  for (_, img), lab in zip(lines, labels)])
    return x, labels


# ---------------------------------------------------------------- metrics


def ctc_greedy(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Best path per row of [N, T, C]: repeats merged, blanks (class 0) dropped."""
    out = []
    for row in np.argmax(probs, axis=-1):
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append("".join(chars[c] for c in row[keep] if c != 0))
    return out


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(predicted: list[str], truth: list[str]) -> float:
    """1 - total edit distance / total characters (spaces ignored: the gaps between
    rendered words are not always read as spaces)."""
    p = [s.replace(" ", "") for s in predicted]
    t = [s.replace(" ", "") for s in truth]
    return 1.0 - sum(_edit_distance(a, b) for a, b in zip(p, t)) / max(1, sum(map(len, t)))


def _outputs(path: str, x: np.ndarray) -> np.ndarray:
    from lowbit.backends.onnx.session import make_session

    sess = make_session(path, threads=2)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: s})[0] for s in x])


# ---------------------------------------------------------------- one model


def measure_model(tmp: Path, key: str, calib: np.ndarray, held: np.ndarray,
                  iterations: int) -> dict[str, Any]:
    """Quantize ``key`` with lowbit and onnxruntime (alternating, each in its own
    process), then compare the three models on ``held``."""
    from lowbit.metrics import sqnr_db

    src = str(model_dir() / MODELS[key])
    data = tmp / f"{key}.calib.npz"
    np.savez(data, x=calib)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp / "ort_static.py"
    script.write_text(ORT_STATIC_SCRIPT)
    lb_path, ort_path = tmp / f"{key}.lowbit.onnx", tmp / f"{key}.ort.onnx"
    lb = _timed([sys.executable, "-m", "lowbit", "quantize", src, "-o", str(lb_path), "--data",
                 str(data), "--quiet"], env)
    ort = _timed([sys.executable, str(script), src, str(ort_path), str(data), "x"], env)
    report = json.loads(Path(str(lb_path) + ".report.json").read_text())
    ver = report.get("verification", {})
    cal = report.get("calibration", {})
    row: dict[str, Any] = {
        "model": MODELS[key], "model_mb": os.path.getsize(src) / 2**20,
        "data_mb": data.stat().st_size / 2**20, "samples": len(calib), "held_out": len(held),
        "lowbit": {**lb, "method": cal.get("method"), "stage_seconds": report.get("seconds", {}),
                   "calibration": {k: cal.get(k) for k in ("samples", "batch", "passes", "threads",
                                                            "activation_mb_per_sample",
                                                            "selection_samples",
                                                            "sqnr_db_by_method")},
                   "candidates": [(c["name"], c.get("speedup", c.get("speed_vs_first")),
                                   c.get("sqnr_db"), c.get("kept"))
                                  for c in report.get("candidates", {}).get("candidates", [])],
                   "report_speedup": ver.get("latency", {}).get("speedup"),
                   "report_sqnr_db": ver.get("agreement", {}).get("sqnr_db")},
        "ort": ort,
    }
    data.unlink()
    paths = [src, str(lb_path), str(ort_path)]
    outs = [_outputs(p, held) for p in paths]
    row["sqnr_db"] = {"lowbit": sqnr_db(outs[0], outs[1]), "ort": sqnr_db(outs[0], outs[2])}
    stats = time_side_by_side(paths, {"x": held[0]}, batch=1, iterations=iterations)
    row["p50_ms"] = {"float": stats[0].p50_ms, "lowbit": stats[1].p50_ms, "ort": stats[2].p50_ms}
    row["speedup"] = {"lowbit": stats[0].p50_ms / stats[1].p50_ms,
                      "ort": stats[0].p50_ms / stats[2].p50_ms}
    row["outputs"] = outs
    return row


def _task_metrics(key: str, row: dict[str, Any], truth: Any) -> None:
    outs = row.pop("outputs")
    names = ("float", "lowbit", "ort")
    if key == "rec":
        chars = characters(model_dir() / MODELS["rec"])
        texts = [ctc_greedy(o, chars) for o in outs]
        row["char_accuracy"] = {n: char_accuracy(t, truth) for n, t in zip(names, texts)}
        row["line_exact"] = {n: float(np.mean([a.replace(" ", "") == b.replace(" ", "")
                                               for a, b in zip(t, truth)]))
                             for n, t in zip(names, texts)}
        row["examples"] = [(truth[i], texts[0][i], texts[1][i], texts[2][i]) for i in range(3)]
    elif key == "cls":
        row["accuracy"] = {n: float(np.mean(o.argmax(-1) == truth)) for n, o in zip(names, outs)}
        row["agreement"] = {n: float(np.mean(o.argmax(-1) == outs[0].argmax(-1)))
                            for n, o in zip(names[1:], outs[1:])}
    else:
        mask = outs[0] > 0.3
        row["text_pixels"] = float(mask.mean())
        row["mask_iou"] = {n: float((mask & (o > 0.3)).sum() / max(1, (mask | (o > 0.3)).sum()))
                           for n, o in zip(names[1:], outs[1:])}


def measure(tmp: Path, det_samples_n: int = 48, only: tuple[str, ...] = ("det", "rec", "cls")
            ) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for key in only:
        t0 = time.perf_counter()
        if key == "det":
            calib, held, truth, iters = det_samples(det_samples_n, 0), det_samples(6, 1), None, 20
        elif key == "rec":
            calib, _ = rec_samples(256, 0)
            held, truth = rec_samples(300, 1)
            iters = 200
        else:
            calib, _ = cls_samples(256, 0)
            held, truth = cls_samples(300, 1)
            iters = 200
        render_s = time.perf_counter() - t0
        row = measure_model(tmp, key, calib, held, iters)
        del calib
        _task_metrics(key, row, truth)
        row["render_seconds"] = render_s
        row["bench_seconds"] = time.perf_counter() - t0
        rows[key] = row
        print(f"[O1 {key}] {json.dumps(row, default=str)}", file=sys.stderr)
    return rows


def _row(key: str, r: dict[str, Any]) -> dict[str, Any]:
    lb, ort = r["lowbit"], r["ort"]
    ratio = lb["seconds"] / ort["seconds"]
    extra = lb["peak_mb"] - r["model_mb"]
    ok = lb["seconds"] < TARGET_SECONDS and ratio <= TARGET_VS_ORT and extra < TARGET_EXTRA_MB
    quality = f"SQNR lowbit {r['sqnr_db']['lowbit']:.1f} dB / ort {r['sqnr_db']['ort']:.1f} dB"
    if key == "rec":
        ca = r["char_accuracy"]
        quality += (f"; char accuracy float {ca['float']:.4f} / lowbit {ca['lowbit']:.4f} / "
                    f"ort {ca['ort']:.4f}")
    elif key == "cls":
        acc = r["accuracy"]
        quality += (f"; accuracy float {acc['float']:.4f} / lowbit {acc['lowbit']:.4f} / "
                    f"ort {acc['ort']:.4f}")
    else:
        quality += (f"; text-mask IoU vs float lowbit {r['mask_iou']['lowbit']:.4f} / ort "
                    f"{r['mask_iou']['ort']:.4f}")
    side = {"det": DET_SIDE, "rec": REC_SHAPE, "cls": CLS_SHAPE}[key]
    shape = f"1x3x{side[0]}x{side[1]}"
    return {"id": f"O1 {key}",
            "what": f"quantize {r['model']} (rapidocr-onnxruntime 1.4.4), {shape}, "
                    f"{r['samples']} samples ({r['data_mb']:.0f} MB of data)",
            "target": "default quantize < 120 s and <= 3x onnxruntime quantize_static time; "
                      "peak memory < 2 GB + model",
            "measured": f"lowbit {lb['seconds']:.1f} s ({ratio:.2f}x ort's {ort['seconds']:.1f} s), "
                        f"peak {lb['peak_mb']:.0f} MB (ort {ort['peak_mb']:.0f} MB); speed vs "
                        f"float lowbit {r['speedup']['lowbit']:.2f}x / ort "
                        f"{r['speedup']['ort']:.2f}x; {quality}",
            "pass": ok,
            "details": f"model {r['model_mb']:.1f} MB; {r['held_out']} held-out samples; batch 1, "
                       f"1 thread, p50 float {r['p50_ms']['float']:.2f} ms / lowbit "
                       f"{r['p50_ms']['lowbit']:.2f} ms / ort {r['p50_ms']['ort']:.2f} ms; lowbit "
                       f"auto candidates (name, speed, SQNR on calibration samples, kept) "
                       f"{lb['candidates']}, calibration {lb['method']} "
                       f"{lb['calibration']}, stage seconds {lb['stage_seconds']}; ort "
                       "quantize_static (QDQ, per channel); each quantize in its own process "
                       "(OMP_NUM_THREADS=1), lowbit then ort"}


def bench_ocr(tmp: Path, det_samples_n: int = 48,
              only: tuple[str, ...] = ("det", "rec", "cls")) -> list[dict]:
    """The O1 rows of benchmarks/run.py."""
    r = measure(tmp, det_samples_n, only)
    return [_row(k, r[k]) for k in only]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--det-samples", type=int, default=48)
    parser.add_argument("--only", default="det,rec,cls")
    args = parser.parse_args()
    only = tuple(k for k in args.only.split(",") if k)
    with tempfile.TemporaryDirectory(prefix="lowbit-ocr-") as tmp:
        rows = bench_ocr(Path(tmp), args.det_samples, only)
    for r in rows:
        print(f"| {r['id']} | {r['measured']} | {'yes' if r['pass'] else '**no**'} |")
        print(f"  {r['details']}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
