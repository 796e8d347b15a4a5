"""Test oracles that deliberately do not use lowbit's own runtime or metric code."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feed: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    sess = session(model)
    if not isinstance(feed, dict):
        feed = {sess.get_inputs()[0].name: feed}
    return sess.run(None, feed)[0]


def sqnr(ref: np.ndarray, approx: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((ref - np.asarray(approx, np.float64)) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(float(np.sum(ref**2)) / noise)
