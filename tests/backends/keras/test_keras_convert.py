"""Keras 3 models -> lowbit's float ONNX model: ONNX Runtime agrees with ``model(x)``."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("keras", reason="lowbit[tf] is not installed: the Keras/TFLite tests need it")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from keras import layers  # noqa: E402

from lowbit.backends.keras import is_keras_model, is_keras_path, keras_to_onnx  # noqa: E402
from lowbit.backends.keras.models import classic_cnn, tutorial_cnn  # noqa: E402
from lowbit.errors import UnsupportedOpError, ValidationError  # noqa: E402

TOL = 1e-4


def run_onnx(proto: onnx.ModelProto, *xs: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs)})


def agree(model: keras.Model, *xs: np.ndarray) -> onnx.ModelProto:
    """Convert ``model``, check the ONNX graph and that ORT matches Keras within TOL."""
    proto = keras_to_onnx(model, name=model.name)
    onnx.checker.check_model(proto, full_check=True)
    want = model(list(xs) if len(xs) > 1 else xs[0], training=False)
    want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
    got = run_onnx(proto, *xs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float(np.abs(g - w).max()) <= TOL
    return proto


def images(n: int, side: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, side, side, channels), dtype=np.float32)


def randomise_batchnorm(model: keras.Model, seed: int = 0) -> None:
    """Non-trivial moving statistics, so folding them is really tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c),
                               rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)][:len(layer.weights)])


@pytest.fixture(scope="module", autouse=True)
def seeded():
    keras.utils.set_random_seed(0)


def test_tutorial_cnn_agrees_and_keeps_nhwc_input():
    model = tutorial_cnn()
    proto = agree(model, images(5, 28, 1))
    (inp,) = proto.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "image" and dims == ["batch", 28, 28, 1]
    ops = [n.op_type for n in proto.graph.node]
    # NHWC in, one Transpose to NCHW for the Conv, back to NHWC before Flatten
    assert ops == ["Transpose", "Conv", "Relu", "MaxPool", "Transpose", "Flatten", "Gemm"]
    names = {n.op_type: n.name for n in proto.graph.node}  # layer names, for exclude/layers=
    assert (names["Conv"], names["Gemm"]) == (model.layers[0].name, model.layers[-1].name)
    assert [o.name for o in proto.graph.output] == [model.layers[-1].name]  # Keras' output name


def test_classic_cnn_agrees():
    model = classic_cnn()
    proto = agree(model, images(4, 28, 1, seed=1))
    assert "Dropout" not in {n.op_type for n in proto.graph.node}


def test_functional_branches_agree():
    inp = keras.Input((16, 16, 3), name="img")
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(max_value=6.0)(x)
    a = layers.DepthwiseConv2D(3, padding="same", activation="swish")(x)
    b = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2)(x)
    c = layers.Add()([a, b])
    d = layers.Concatenate()([c, x])
    d = layers.ZeroPadding2D(1)(d)
    d = layers.Conv2D(4, 3, dilation_rate=1)(d)
    e = layers.AveragePooling2D(3, strides=2, padding="same")(d)
    e = layers.UpSampling2D(2)(e)
    e = layers.Multiply()([e, layers.Conv2D(4, 1, activation="sigmoid")(d)])
    f = layers.GlobalAveragePooling2D()(e)
    g = layers.Flatten()(layers.GlobalMaxPooling2D(keepdims=True)(d))
    h = layers.Dense(5, activation="gelu")(layers.Concatenate()([f, g]))
    model = keras.Model(inp, [h, layers.Softmax()(h)], name="branches")
    randomise_batchnorm(model)
    proto = agree(model, images(3, 16, 3, seed=2))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Transpose") == 2  # the input, and before the keepdims Flatten
    assert "Pad" not in ops  # ZeroPadding2D went into the next Conv's pads


def test_mobile_style_block_agrees():
    """Normalization, scalar arithmetic on Keras tensors (MobileNetV3's hard-swish), a
    squeeze-excite block: its Reshape to (1, 1, C) needs no Transpose."""
    inp = keras.Input((16, 16, 3))
    x = layers.Normalization(mean=[0.4, 0.5, 0.6], variance=[0.05, 0.1, 0.2])(inp)
    x = layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = layers.Multiply()([x, layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])
    se = layers.Reshape((1, 1, 8))(layers.GlobalAveragePooling2D()(x))
    se = layers.Conv2D(8, 1, activation="hard_sigmoid")(layers.Conv2D(4, 1, activation="relu")(se))
    x = layers.Multiply()([x, se])
    model = keras.Model(inp, layers.GlobalAveragePooling2D()(x - 0.5))
    proto = agree(model, images(2, 16, 3, seed=9))
    assert [n.op_type for n in proto.graph.node].count("Transpose") == 1


def test_grouped_strided_conv_and_pools_agree():
    inp = keras.Input((15, 15, 4))
    x = layers.Conv2D(8, 3, strides=2, padding="same", groups=2, activation="elu")(inp)
    x = layers.Conv2D(8, 3, padding="same", dilation_rate=2, activation="leaky_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.BatchNormalization(axis=-1)(x)
    x = layers.Rescaling(0.5, offset=0.1)(x)
    x = layers.Subtract()([x, layers.Conv2D(8, 1)(x)])
    x = layers.Maximum()([x, layers.Average()([x, layers.LeakyReLU(0.1)(x)])])
    x = layers.Permute((3, 1, 2))(x)
    x = layers.Reshape((8, -1))(x)
    model = keras.Model(inp, layers.Dense(3)(x))
    randomise_batchnorm(model, seed=3)
    agree(model, images(2, 15, 4, seed=3))


def test_mlp_agrees():
    model = keras.Sequential([keras.Input((20,)), layers.Dense(32, activation="relu"),
                              layers.BatchNormalization(), layers.Dropout(0.3),
                              layers.Dense(16, activation="tanh"), layers.Dense(4),
                              layers.Activation("softmax")], name="mlp")
    randomise_batchnorm(model, seed=4)
    proto = agree(model, np.random.default_rng(4).normal(size=(7, 20)).astype(np.float32))
    assert [n.op_type for n in proto.graph.node].count("Gemm") == 3


def test_transformer_block_agrees():
    ids = keras.Input((12,), dtype="int32", name="ids")
    e = layers.Embedding(50, 16)(ids)
    h = layers.LayerNormalization(epsilon=1e-5)(e)
    h = layers.Dense(32, activation="gelu")(h)  # Dense on a 3-D input: the last axis
    h = layers.Dense(16)(h)
    h = layers.LayerNormalization()(layers.Add()([e, h]))
    pooled = layers.GlobalAveragePooling1D()(h)
    model = keras.Model(ids, [layers.Dense(3)(pooled), h], name="block")
    x = np.random.default_rng(5).integers(0, 50, size=(4, 12)).astype(np.int32)
    proto = agree(model, x)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Gather", "LayerNormalization", "MatMul", "Erf"} <= ops


@pytest.mark.parametrize("name", ["relu", "relu6", "sigmoid", "tanh", "softmax", "linear",
                                  "swish", "silu", "gelu", "hard_sigmoid", "elu", "leaky_relu",
                                  "softplus", "hard_swish", "selu", "mish"])
def test_activation_strings_agree(name):
    model = keras.Sequential([keras.Input((6, 6, 2)), layers.Conv2D(3, 3, activation=name),
                              layers.Activation(name)])
    x = images(2, 6, 2, seed=6) * 8 - 4
    agree(model, x)


@pytest.mark.parametrize("kwargs", [dict(), dict(max_value=1.0), dict(negative_slope=0.1),
                                    dict(max_value=2.0, negative_slope=0.2)])
def test_relu_layer_variants_agree(kwargs):
    model = keras.Sequential([keras.Input((10,)), layers.ReLU(**kwargs)])
    agree(model, np.linspace(-4, 4, 30, dtype=np.float32).reshape(3, 10))


def test_nested_sequential_inside_functional_is_inlined():
    head = keras.Sequential([layers.Dense(8, activation="relu"), layers.Dense(3)], name="head")
    inp = keras.Input((5, 5, 2))
    x = layers.Conv2D(4, 3, padding="same")(inp)
    out = head(layers.Flatten()(x))
    model = keras.Model(inp, out, name="outer")
    proto = agree(model, images(3, 5, 2, seed=7))
    assert [o.name for o in proto.graph.output] == ["head"]


def test_two_inputs_and_a_shared_layer():
    a, b = keras.Input((6, 6, 3), name="a"), keras.Input((4,), name="b")
    shared = layers.Dense(5, name="shared")
    x = layers.Flatten()(layers.Conv2D(2, 3)(a))
    x = layers.Concatenate()([shared(b), layers.Dense(5)(x)])
    y = shared(layers.Dense(4)(x))
    model = keras.Model([a, b], [y, x])
    rng = np.random.default_rng(8)
    proto = agree(model, images(2, 6, 3, seed=8), rng.random((2, 4), dtype=np.float32))
    assert [i.name for i in proto.graph.input] == ["a", "b"]
    assert sum(t.name.startswith("shared.") for t in proto.graph.initializer) == 2  # stored once


def test_keras_ops_in_a_functional_graph():
    i = keras.Input((4,))
    h = layers.Dense(4)(i)
    agree(keras.Model(i, 2.0 / (h - 1.0) + h * h), np.linspace(-1, 1, 8, dtype=np.float32)
          .reshape(2, 4) + 3.0)
    with pytest.raises(UnsupportedOpError, match=r"operation 'exp(_\d+)?' \(keras.ops Exp\)"):
        keras_to_onnx(keras.Model(i, keras.ops.exp(h)), name="m")


def test_unsupported_layer_names_the_layer_and_class():
    class Doubler(layers.Layer):
        def call(self, x):
            return x * 2

    model = keras.Sequential([keras.Input((4,)), layers.Dense(3), Doubler(name="twice")])
    with pytest.raises(UnsupportedOpError) as err:
        keras_to_onnx(model, name="model.keras")
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 2
    assert message.startswith("model.keras: layer 'twice' (Doubler) cannot be converted; "
                              "supported: ")
    assert "Conv2D" in message


def test_a_subclass_of_a_builtin_layer_is_not_taken_for_it():
    class MyDense(layers.Dense):
        def call(self, x):
            return super().call(x) + 1.0

    model = keras.Sequential([keras.Input((4,)), MyDense(2, name="mine")])
    with pytest.raises(UnsupportedOpError, match=r"layer 'mine' \(MyDense\)"):
        keras_to_onnx(model, name="m")


def test_unsupported_option_of_a_supported_layer_is_named():
    model = keras.Sequential([keras.Input((4,)), layers.ReLU(threshold=0.5, name="thr")])
    with pytest.raises(UnsupportedOpError, match=r"layer 'thr' \(ReLU\).*threshold=0.5"):
        keras_to_onnx(model, name="m")


def test_unbuilt_sequential_and_subclassed_models_are_refused_clearly():
    with pytest.raises(ValidationError, match="has not been built"):
        keras_to_onnx(keras.Sequential([layers.Dense(2)], name="s"), name="s")

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UnsupportedOpError, match="subclassed Keras model"):
        keras_to_onnx(Sub(name="sub"), name="sub")


def test_is_keras_model_and_path(tmp_path):
    assert is_keras_model(tutorial_cnn())
    assert not is_keras_model(object()) and not is_keras_model("m.keras")
    assert is_keras_path("m.keras") and is_keras_path(tmp_path / "M.H5") and is_keras_path("m.hdf5")
    assert not is_keras_path("m.onnx") and not is_keras_path(tmp_path) and not is_keras_path(3)
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert is_keras_path(tmp_path)


def test_without_keras_a_keras_feature_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` raises ImportError
    assert not is_keras_model(object())
    with pytest.raises(ValidationError, match=r'needs TensorFlow: pip install "lowbit\[tf\]"'):
        keras_to_onnx(object(), name="m")
    from lowbit.backends.keras.models import tutorial_cnn as build

    with pytest.raises(ValidationError, match="lowbit\\[tf\\]"):
        build()
