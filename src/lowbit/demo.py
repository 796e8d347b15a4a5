"""``lowbit demo``: the classic workflow end to end on the embedded digits data.

Train Conv2D(32, 3x3, relu) -> MaxPool(2) -> Flatten -> Dense(10) on
scikit-learn's 8x8 digits (fixed, seeded split), export to ONNX, quantize to
INT8 with calibration, verify, compare, and write both models plus
report.json into the output folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.config import check_run_settings
from lowbit.errors import ValidationError
from lowbit.fileio import check_folder_writable, write_bytes_atomic

CALIBRATION_SAMPLES = 256


def run_demo(
    out_dir: str | Path,
    *,
    epochs: int = 15,
    seed: int = 0,
    threads: int = 1,
    batch: int = 64,
    on_epoch: Callable[[int, int, float], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    import torch

    from lowbit.api import quantize
    from lowbit.backends.torch.export import export_module
    from lowbit.backends.torch.train import predict, train_classifier
    from lowbit.data import digits_split
    from lowbit.models import digits_cnn

    check_run_settings(epochs=epochs, threads=threads, batch=batch, seed=seed)
    out = Path(out_dir)
    if not str(out_dir) or (out.exists() and not out.is_dir()):
        raise ValidationError(f"option --output: '{out}' exists and is not a folder")
    try:  # every option is checked before the training starts
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValidationError(f"option --output: cannot create folder {out}: {exc.strerror}") from None
    check_folder_writable(out, "--output")
    t0 = time.perf_counter()
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, min(2, previous_threads)))
        x_tr, y_tr, x_te, y_te = digits_split(seed)
        model = train_classifier(digits_cnn(), x_tr, y_tr, epochs=epochs, seed=seed,
                                 progress=on_epoch)
        torch_acc = float(np.mean(np.argmax(predict(model, x_te), axis=1) == y_te))
        t_train = time.perf_counter() - t0
        proto = export_module(model, x_tr[:2])
    finally:
        torch.set_num_threads(previous_threads)
    float_path = out / "digits_cnn.float.onnx"
    write_bytes_atomic(float_path, proto.SerializeToString())
    rng = np.random.default_rng(seed)
    calib_idx = rng.choice(len(x_tr), size=CALIBRATION_SAMPLES, replace=False)
    qm = quantize(str(float_path), x_tr[calib_idx], eval_data=(x_te, y_te), threads=threads,
                  batch=batch, progress=progress)
    qm.report["tool"] = "lowbit demo"
    qm.report["demo"] = {
        "dataset": "scikit-learn digits (8x8), stratified 80/20 split, seed "
                   f"{seed}: {len(x_tr)} train / {len(x_te)} test",
        "model": "Conv2D(32, 3x3, relu) -> MaxPool(2) -> Flatten -> Dense(10)",
        "epochs": epochs, "torch_test_accuracy": round(torch_acc, 6),
        "train_seconds": round(t_train, 3), "calibration_samples": CALIBRATION_SAMPLES,
    }
    int8_path = out / "digits_cnn.int8.onnx"
    qm.save(int8_path, report=False)  # the demo's one report is report.json
    qm.report["seconds"]["demo_total"] = round(time.perf_counter() - t0, 3)
    from lowbit.fileio import write_json_atomic

    write_json_atomic(out / "report.json", qm.report)
    return qm.report
