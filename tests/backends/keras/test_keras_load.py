"""Keras files (.keras, .h5) and TensorFlow SavedModel folders in: load_keras."""

from __future__ import annotations

import zipfile

import pytest

pytest.importorskip("keras", reason="lowbit[tf] is not installed: the Keras/TFLite tests need it")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from lowbit.backends.keras import load_keras  # noqa: E402
from lowbit.errors import ModelLoadError, UnsupportedOpError  # noqa: E402

TOL = 1e-4


def run_onnx(proto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12, 12, 2), name="pixels"),
        layers.Conv2D(8, 3, activation="relu"),
        layers.BatchNormalization(),
        layers.DepthwiseConv2D(3, padding="same", activation="relu6"),
        layers.MaxPooling2D(2),
        layers.Conv2D(6, 3, strides=2, padding="same"),
        layers.BatchNormalization(),
        layers.AveragePooling2D(2),
        layers.GlobalAveragePooling2D(keepdims=True),
        layers.Flatten(),
        layers.Dense(4),
        layers.Softmax(),
    ], name="small_cnn")
    rng = np.random.default_rng(0)
    for bn in (layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)):
        c = bn.gamma.shape[0]
        bn.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c),
                        rng.uniform(0.5, 2.0, c)])
    return model


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(1).random((3, 12, 12, 2), dtype=np.float32)


def test_dot_keras_file_round_trips(cnn, x, tmp_path):
    path = tmp_path / "model.keras"
    cnn.save(path)
    proto = load_keras(path)
    assert proto.graph.input[0].name == "pixels"
    assert max_diff(run_onnx(proto, x)[0], cnn(x)) <= TOL


def test_an_h5_file_keras_3_can_read_is_accepted(cnn, x, tmp_path):
    path = tmp_path / "model.h5"
    cnn.save(path)
    assert max_diff(run_onnx(load_keras(path), x)[0], cnn(x)) <= TOL


def test_an_h5_file_keras_3_cannot_read_is_refused_in_one_line(tmp_path):
    path = tmp_path / "weights_only.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kernel", data=np.zeros(3))
    with pytest.raises(ModelLoadError, match="Keras 3 cannot read this legacy HDF5 model") as err:
        load_keras(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "not.hdf5").write_bytes(b"plain text, not HDF5")
    with pytest.raises(ModelLoadError, match="not an HDF5 file"):
        load_keras(tmp_path / "not.hdf5")


def test_a_custom_class_is_refused_naming_the_file_and_class(tmp_path):
    @keras.saving.register_keras_serializable(package="lowbit_test")
    class Doubler(layers.Layer):
        def call(self, x):
            return x * 2

    path = tmp_path / "custom.keras"
    keras.Sequential([keras.Input((4,)), layers.Dense(3), Doubler()]).save(path)
    keras.saving.get_custom_objects().pop("lowbit_test>Doubler")  # a fresh process: unknown
    with pytest.raises(ModelLoadError) as err:
        load_keras(path)
    message = str(err.value)
    assert str(path) in message and "'Doubler'" in message and "\n" not in message


def test_a_lambda_layer_is_not_deserialised(tmp_path):
    path = tmp_path / "lambda.keras"
    keras.Sequential([keras.Input((4,)), layers.Lambda(lambda t: t * 2)]).save(path)
    with pytest.raises(ModelLoadError, match="Lambda layer"):
        load_keras(path)


def test_corrupt_keras_files_are_refused_naming_the_file(cnn, tmp_path):
    good = tmp_path / "good.keras"
    cnn.save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=f"{truncated}.*not a readable .keras file"):
        load_keras(truncated)
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("config.json", "{not json")
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_keras(broken)
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_keras(empty)
    with pytest.raises(ModelLoadError, match="not found"):
        load_keras(tmp_path / "missing.keras")


def test_a_savedmodel_from_keras_export_converts(cnn, x, tmp_path):
    folder = tmp_path / "exported"
    cnn.export(str(folder), verbose=False)
    proto = load_keras(folder)
    assert [o.name for o in proto.graph.output] == ["output_0"]
    ops = [n.op_type for n in proto.graph.node]
    assert ops[0] == "Transpose" and ops.count("Conv") == 3 and "Gemm" in ops
    # the BatchNorm after a Conv (exported as multiply-add) went into the Conv; the one
    # after a ReLU stays a Mul and an Add
    assert (ops.count("Mul"), ops.count("Add")) == (1, 1)
    assert max_diff(run_onnx(proto, x)[0], cnn(x)) <= TOL


class _Module(tf.Module):
    """A hand-written TF model: conv + bias + relu, pool, mean, two dense heads."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(2)
        self.k = tf.Variable(rng.normal(size=(3, 3, 3, 6)).astype(np.float32))
        self.cb = tf.Variable(rng.normal(size=6).astype(np.float32))
        self.w = tf.Variable(rng.normal(size=(6, 4)).astype(np.float32))
        self.b = tf.Variable(rng.normal(size=4).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
    def serve(self, x):
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, self.k, 1, "SAME"), self.cb))
        y = tf.pad(tf.nn.max_pool2d(y, 2, 2, "VALID"), [[0, 0], [1, 1], [1, 1], [0, 0]])
        y = tf.reduce_mean(y, [1, 2])
        return {"logits": tf.matmul(y, self.w) + self.b, "probs": tf.nn.softmax(y * 2.0 - 1.0)}


def test_a_tf_module_savedmodel_with_a_serving_signature_converts(tmp_path):
    module = _Module()
    folder = tmp_path / "module"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    proto = load_keras(folder)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["logits", "probs"]
    assert [n.op_type for n in proto.graph.node].count("Gemm") == 1  # the bias went in
    x = np.random.default_rng(3).random((2, 8, 8, 3), dtype=np.float32)
    want = module.serve(tf.constant(x))
    got = run_onnx(proto, x)
    assert max_diff(got[0], want["logits"]) <= TOL and max_diff(got[1], want["probs"]) <= TOL


def test_a_savedmodel_without_a_serving_signature_is_refused(tmp_path):
    class NoSignature(tf.Module):
        @tf.function
        def f(self, x):
            return x * 2

    module = NoSignature()
    module.f(tf.constant(1.0))
    folder = tmp_path / "nosig"
    tf.saved_model.save(module, str(folder), signatures={"other": module.f.get_concrete_function(
        tf.TensorSpec([None], tf.float32))})
    with pytest.raises(ModelLoadError) as err:
        load_keras(folder)
    message = str(err.value)
    assert str(folder) in message and "'serving_default'" in message and "other" in message


def test_an_unsupported_tf_op_is_named(tmp_path):
    class Cumulative(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32)])
        def serve(self, x):
            return tf.math.cumsum(x, axis=1)

    module = Cumulative()
    folder = tmp_path / "cumsum"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    with pytest.raises(UnsupportedOpError, match=r"operation '[^']*' \(Cumsum\) cannot be converted"):
        load_keras(folder)


def test_a_folder_without_saved_model_pb_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a TensorFlow SavedModel"):
        load_keras(tmp_path)
