"""min_cosine: the most sensitive layers go back to float until the target is met."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit.cli import main
from lowbit.errors import ValidationError
from lowbit.models import mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def outlier_mlp():
    import torch

    torch.manual_seed(0)
    model = mlp((64, 128, 128, 10))
    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    x[:, 0] *= 300.0  # one outlier input feature ruins per-tensor quantization of layer 1
    return model, x


def _quantize(model, x, target, smoothquant=False):
    cfg = lowbit.Int8Config(mode="dynamic", min_cosine=target, smoothquant=smoothquant)
    return lowbit.quantize(model, x, config=cfg)


def test_no_target_means_no_search(outlier_mlp):
    qm = _quantize(*outlier_mlp, None)
    assert "quality_target" not in qm.report
    assert qm.report["nodes"]["counts"]["int8-dynamic"] == 3


def test_most_sensitive_layer_goes_back_to_float(outlier_mlp):
    qm = _quantize(*outlier_mlp, 0.999)
    target = qm.report["quality_target"]
    assert target["met"] and target["cosine_on_calibration_samples"] >= 0.999
    sens = {s["name"]: s["cosine_when_only_this_is_int8"] for s in target["sensitivity"]}
    worst = min(sens, key=sens.get)
    assert target["kept_in_float"] == [worst]  # exactly the one layer that needed it
    assert qm.report["nodes"]["counts"]["int8-dynamic"] == 2
    assert qm.report["verification"]["agreement"]["cosine"] >= 0.999


def test_all_float_meets_a_perfect_target(outlier_mlp):
    qm = _quantize(*outlier_mlp, 1.0)
    target = qm.report["quality_target"]
    # all float reaches cosine 1.0 exactly, so 1.0 is met by keeping every layer float
    assert target["met"] and len(target["kept_in_float"]) == 3


def test_smoothquant_meets_the_target_with_every_layer_int8(outlier_mlp):
    qm = _quantize(*outlier_mlp, 0.999, smoothquant=True)
    target = qm.report["quality_target"]
    assert target["met"] and target["kept_in_float"] == []
    assert target["smoothquant_alpha"] in (0.5, 0.7, 0.85) and target["smoothquant_inputs"] >= 1
    assert qm.report["nodes"]["counts"]["int8-dynamic"] == 3
    assert qm.report["verification"]["agreement"]["cosine"] >= 0.999


def test_unreachable_target_is_reported(outlier_mlp):
    # smoothed weights differ from the originals in the last bits: cosine 1.0 is out of reach
    qm = _quantize(*outlier_mlp, 1.0, smoothquant=True)
    assert not qm.report["quality_target"]["met"]
    assert any("min_cosine" in w for w in qm.report["warnings"])


def test_bad_target_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(ValidationError, match="min_cosine"):
        lowbit.Int8Config(min_cosine=1.5)
    rc = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
               "--data", str(tmp_path / "d.npz"), "--min-cosine", "0"])
    assert rc == 2
    assert "--min-cosine" in capsys.readouterr().err


@pytest.fixture(scope="module")
def digits_mlp():
    from lowbit.backends.torch.train import train_classifier
    from lowbit.data import digits_split
    from lowbit.models import lenet_300_100

    x_tr, y_tr, _, _ = digits_split(0)
    x = x_tr.reshape(len(x_tr), -1)
    x[:, 0] = np.random.default_rng(0).standard_normal(len(x)) * 200.0  # an outlier feature
    return train_classifier(lenet_300_100(64), x, y_tr, epochs=3, seed=0), x, y_tr


def test_max_drop_is_met_on_labelled_data(digits_mlp):
    model, x, y = digits_mlp
    cfg = lowbit.Int8Config(mode="dynamic", max_drop=0.0, smoothquant=False)
    qm = lowbit.quantize(model, (x[:400], y[:400]), config=cfg)
    target = qm.report["quality_target"]
    assert target["max_drop"] == 0.0 and target["met"]
    assert target["minus_accuracy_drop_on_calibration_samples"] >= 0.0


def test_max_drop_needs_labels_and_one_target(digits_mlp):
    from lowbit.errors import DataError

    model, x, _ = digits_mlp
    with pytest.raises(DataError, match="labels"):
        lowbit.quantize(model, x[:100], config=lowbit.Int8Config(mode="dynamic", max_drop=1.0))
    with pytest.raises(ValidationError, match="one quality target"):
        lowbit.Int8Config(min_cosine=0.99, max_drop=1.0)
