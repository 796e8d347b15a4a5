""".lbz round trips: every initializer bit for bit, the graph unchanged, ORT outputs equal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lbz_models import identity_model, initializer_bits, lenet5
from onnx import TensorProto, helper, numpy_helper

from lowbit.container import ContainerError, breakdown, decode, encode, read_lbz, write_lbz
from lowbit.errors import ModelLoadError, ValidationError

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

_DTYPES = {  # ONNX type -> numpy dtype whose bytes are the raw_data
    TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
    TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32, TensorProto.INT64: np.int64,
    TensorProto.UINT32: np.uint32, TensorProto.UINT64: np.uint64, TensorProto.BOOL: np.bool_,
    TensorProto.BFLOAT16: np.uint16,
}
_SPECIAL_F32 = np.array([0x80000000, 0x7FC00001, 0xFFFFFFFF, 0x7F800000, 0x00000001], dtype=np.uint32)


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Serialized equality: graph, attributes and every initializer byte (NaN-safe)."""
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def _roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    data = encode(model)
    back = decode(data)
    assert _same(back, model)
    assert initializer_bits(back) == initializer_bits(model)
    assert encode(back) == data  # determinism through a round trip
    info = breakdown(data)
    assert sum(info["parts"].values()) == len(data)
    return back


@st.composite
def tensor_bits(draw) -> tuple[int, np.ndarray]:
    """(ONNX type, array) with dense / sparse / clustered / sparse+clustered bit patterns."""
    onnx_type = draw(st.sampled_from(sorted(_DTYPES)))
    np_type = np.dtype(_DTYPES[onnx_type])
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)))
    n = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u = np.dtype(f"<u{np_type.itemsize}")
    if np_type == np.bool_:
        bits = rng.integers(0, 2, n).astype(np.uint8)
    else:
        clusters = draw(st.sampled_from([None, 1, 2, 3, 16, 32, 200, 256, 257]))
        if clusters is None:
            bits = rng.integers(0, np.iinfo(u).max, n, dtype=u, endpoint=True)
        else:
            pool = rng.integers(0, np.iinfo(u).max, clusters, dtype=u, endpoint=True)
            if u.itemsize == 4:
                pool[: len(_SPECIAL_F32)] = _SPECIAL_F32[: clusters]  # -0.0, NaN payloads, inf
            bits = pool[rng.integers(0, clusters, n)]
    density = draw(st.sampled_from([1.0, 0.5, 0.2, 0.05, 0.001, 0.0]))
    if density < 1.0:
        bits = np.where(rng.random(n) < density, bits, 0).astype(bits.dtype)
    return onnx_type, bits.view(np_type).reshape(shape)


@SETTINGS
@given(st.lists(tensor_bits(), min_size=1, max_size=4))
def test_random_tensors_round_trip_bit_exact(arrays):
    inits = []
    for n, (onnx_type, arr) in enumerate(arrays):
        t = numpy_helper.from_array(arr, f"t{n}")
        t.data_type = onnx_type  # bfloat16 arrives as its uint16 bits
        inits.append(t)
    _roundtrip(identity_model(inits))


@SETTINGS
@given(tensor_bits())
def test_typed_fields_round_trip(case):
    onnx_type, arr = case
    if onnx_type == TensorProto.BFLOAT16:
        values = arr.view(np.uint16).astype(np.int32).ravel().tolist()
        t = TensorProto(name="typed", data_type=onnx_type, dims=arr.shape)
        t.int32_data.extend(values)
    else:
        t = helper.make_tensor("typed", onnx_type, arr.shape, arr.ravel(), raw=False)
    _roundtrip(identity_model([t]))


def test_negative_zero_is_not_a_zero_and_nan_payloads_survive():
    bits = np.zeros(1000, dtype=np.uint32)
    bits[::50] = 0x80000000  # -0.0
    bits[7] = 0x7FC00123  # a NaN with a payload
    bits[9] = 0xFFA00001  # a negative signalling-style NaN
    back = _roundtrip(identity_model([numpy_helper.from_array(bits.view(np.float32), "w")]))
    out = numpy_helper.to_array(back.graph.initializer[0]).view(np.uint32)
    assert np.array_equal(out, bits)
    row = breakdown(encode(back))["initializers"][0]
    assert row["sparsity"] == pytest.approx(1 - 22 / 1000)  # -0.0 counted as nonzero


def test_odd_tensors_stay_in_graph_and_round_trip():
    strings = helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"bc"])
    int4 = helper.make_tensor("q", TensorProto.INT4, [3], [1, -2, 3])
    complex64 = helper.make_tensor("c", TensorProto.COMPLEX64, [1], [1 + 2j])
    mixed = numpy_helper.from_array(np.arange(4, dtype=np.float32), "both")
    mixed.float_data.extend([9.0])  # malformed: data in two places is kept as it is
    empty = numpy_helper.from_array(np.zeros((0, 3), dtype=np.float32), "empty")
    scalar = numpy_helper.from_array(np.array(-0.0, dtype=np.float32), "scalar")
    model = identity_model([strings, int4, complex64, mixed, empty, scalar])
    _roundtrip(model)
    rows = {r["name"]: r for r in breakdown(encode(model))["initializers"]}
    assert [rows[k]["encoding"] for k in ("s", "q", "c", "both")] == ["in-graph"] * 4
    assert rows["empty"]["count"] == 0 and rows["scalar"]["shape"] == []


def test_graph_fields_survive(tmp_path):
    model = lenet5(np.random.default_rng(1), density=0.1, clusters=8)
    model.doc_string = "doc"
    model.graph.initializer[0].doc_string = "weights of conv1"
    helper.set_model_props(model, {"author": "lowbit"})
    back = _roundtrip(model)
    assert back.graph.initializer[0].doc_string == "weights of conv1"
    path = tmp_path / "m.lbz"
    write_lbz(path, model)
    assert _same(read_lbz(path), model)


def test_onnxruntime_outputs_exactly_equal():
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(2).standard_normal((4, 1, 28, 28)).astype(np.float32)
    models = (lenet5(np.random.default_rng(3)), lenet5(np.random.default_rng(3), density=0.05, clusters=16))
    for model in models:
        outs = []
        for m in (model, decode(encode(model))):
            sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            outs.append(sess.run(None, {"x": x})[0])
        assert outs[0].shape == (4, 10)
        assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))


def test_encode_is_deterministic():
    a = encode(lenet5(np.random.default_rng(4), density=0.05, clusters=32))
    b = encode(lenet5(np.random.default_rng(4), density=0.05, clusters=32))
    assert a == b


def test_encode_does_not_touch_the_callers_model():
    model = lenet5(np.random.default_rng(5), density=0.2)
    before = model.SerializeToString()
    encode(model)
    assert model.SerializeToString() == before


def test_external_data_is_refused_naming_the_tensor():
    t = numpy_helper.from_array(np.ones(4, dtype=np.float32), "far_away")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    with pytest.raises(ValidationError, match="far_away"):
        encode(identity_model([t]))
    with pytest.raises(ValidationError):
        encode(b"not a model")  # type: ignore[arg-type]


def test_read_lbz_missing_empty_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*nope.lbz"):
        read_lbz(tmp_path / "nope.lbz")
    empty = tmp_path / "empty.lbz"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.*empty.lbz"):
        read_lbz(empty)
    with pytest.raises(ModelLoadError, match="folder"):
        read_lbz(tmp_path)
    bad = tmp_path / "bad.lbz"
    bad.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ContainerError, match=r"bad.lbz: not a \.lbz file"):
        read_lbz(bad)


def test_write_lbz_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep.lbz"
    path.write_bytes(b"old")
    with pytest.raises(ValidationError):
        write_lbz(path, "not a model")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.lbz"]
