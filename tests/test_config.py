"""Stage configs: round trips through plain dicts, and every bad option refused by name."""

from __future__ import annotations

import json

import pytest

from lowbit.config import (
    CalibrationMethod,
    ChannelImportance,
    ClusterConfig,
    ClusterInit,
    Int8Config,
    MixedPrecisionConfig,
    Precision,
    PruneConfig,
    PruneScope,
    QuantMode,
    StageConfig,
    StructuredPruneConfig,
    WeightGranularity,
    WeightOnlyAlgorithm,
    WeightOnlyConfig,
    config_from_dict,
    parse_enum,
)
from lowbit.errors import LowbitError, ValidationError

# ------------------------------------------------------------- round trips

CONFIGS = [
    Int8Config(),
    Int8Config(mode="static", calibration="percentile", percentile=99.9,
               weight_granularity="tensor", min_cosine=0.995, smoothquant=False, strict=True,
               batch_size=4, max_calibration_samples=64, exclude_nodes=["fc1", "fc2"]),
    Int8Config(mode=QuantMode.DYNAMIC, max_drop=0.5),
    WeightOnlyConfig(),
    WeightOnlyConfig(bits=3, group_size=32, algorithm="gptq", symmetric=False, accuracy_level=0,
                     embeddings=False, exclude_nodes=("head",), batch_size=2,
                     max_calibration_samples=16),
    WeightOnlyConfig(algorithm="hqq", bits=8, group_size=16),
    MixedPrecisionConfig(),
    MixedPrecisionConfig(layers={"fc1": "int4", "fc2": Precision.INT8, "head": "float"},
                         group_size=64),
    PruneConfig(),
    PruneConfig(sparsity=0.9, scope="global", epochs=2, lr=0.01, batch_size=8, seed=7,
                layers=["fc1"]),
    PruneConfig(nm=[2, 4]),
    StructuredPruneConfig(),
    StructuredPruneConfig(sparsity=0.25, importance="bn", min_channels=4, layers=("conv1",),
                          epochs=1),
    ClusterConfig(),
    ClusterConfig(bits=3, init="density", biases=False, layers=["fc2"], epochs=1, lr=0.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{type(c).__name__}")
def test_round_trip_through_dict_and_json(config: StageConfig) -> None:
    data = config.to_dict()
    assert data["kind"] == config.kind
    text = json.dumps(data)  # plain JSON types only
    back = config_from_dict(json.loads(text))
    assert type(back) is type(config)
    assert back == config
    assert back.to_dict() == data
    # the class's own from_dict agrees with the registry
    assert type(config).from_dict(data) == config


def test_every_registered_config_type_is_covered() -> None:
    kinds = {c.kind for c in CONFIGS}
    assert kinds == {"quantize-int8", "quantize-weight-only", "quantize-mixed", "prune",
                     "prune-structured", "cluster"}
    for kind in kinds:
        assert type(config_from_dict({"kind": kind})).kind == kind


def test_to_dict_uses_plain_values() -> None:
    d = Int8Config(mode="static", exclude_nodes=["a"]).to_dict()
    assert d["mode"] == "static" and not isinstance(d["mode"], QuantMode)
    assert d["exclude_nodes"] == ["a"]
    d = MixedPrecisionConfig(layers=[("fc1", "int4")]).to_dict()
    assert d == {"kind": "quantize-mixed", "layers": {"fc1": "int4"}, "group_size": 128}
    assert PruneConfig(nm=(2, 4)).to_dict()["nm"] == [2, 4]


def test_lists_become_tuples_and_enums_parse_from_strings() -> None:
    c = Int8Config(mode="STATIC", calibration="Entropy", weight_granularity="channel",
                   exclude_nodes=["x"])
    assert c.mode is QuantMode.STATIC
    assert c.calibration is CalibrationMethod.ENTROPY
    assert c.weight_granularity is WeightGranularity.CHANNEL
    assert c.exclude_nodes == ("x",)
    p = PruneConfig(scope="GLOBAL", layers=["a", "b"])
    assert p.scope is PruneScope.GLOBAL and p.layers == ("a", "b")
    assert PruneConfig(nm=[1, 4]).nm == (1, 4)
    assert StructuredPruneConfig(importance="l2").importance is ChannelImportance.L2
    assert ClusterConfig(init="random").init is ClusterInit.RANDOM
    assert WeightOnlyConfig(algorithm="GPTQ").algorithm is WeightOnlyAlgorithm.GPTQ
    m = MixedPrecisionConfig(layers={"b": "INT8"})
    assert m.precision == {"b": Precision.INT8}


def test_configs_are_frozen_and_replace_revalidates() -> None:
    c = PruneConfig(sparsity=0.5)
    with pytest.raises(AttributeError):
        c.sparsity = 0.7  # type: ignore[misc]
    assert c.replace(sparsity=0.7).sparsity == 0.7
    with pytest.raises(ValidationError, match="sparsity"):
        c.replace(sparsity=1.5)


# ------------------------------------------------------- unknown kinds/options


@pytest.mark.parametrize("data", [{"kind": "quantize-int4"}, {"kind": "Prune"}, {}, {"kind": None}])
def test_unknown_kind_refused_with_its_name(data: dict) -> None:
    with pytest.raises(ValidationError) as info:
        config_from_dict(data)
    msg = str(info.value)
    assert repr(data.get("kind")) in msg
    assert "prune" in msg and "cluster" in msg  # lists the known kinds


def test_non_dict_refused() -> None:
    with pytest.raises(ValidationError, match="unknown stage kind"):
        config_from_dict(["prune"])  # type: ignore[arg-type]


def test_unhashable_kind_refused_as_validation_error() -> None:
    with pytest.raises(ValidationError, match="kind"):
        config_from_dict({"kind": ["prune"]})


@pytest.mark.parametrize("kind", ["quantize-int8", "quantize-weight-only", "quantize-mixed", "prune",
                                  "prune-structured", "cluster"])
def test_unknown_option_refused_with_its_name(kind: str) -> None:
    with pytest.raises(ValidationError) as info:
        config_from_dict({"kind": kind, "sparsityy": 0.5, "bogus_option": 1})
    msg = str(info.value)
    assert "sparsityy" in msg and "bogus_option" in msg
    assert kind in msg


def test_option_of_another_kind_refused() -> None:
    # ``bits`` is a cluster option, not a prune option
    with pytest.raises(ValidationError, match="bits"):
        config_from_dict({"kind": "prune", "bits": 4})


# ---------------------------------------------------------------- bad values

BAD = [
    # Int8Config
    (Int8Config, {"percentile": 50.0}, "percentile"),
    (Int8Config, {"percentile": 100.0}, "percentile"),
    (Int8Config, {"percentile": "99"}, "percentile"),
    (Int8Config, {"percentile": float("nan")}, "percentile"),
    (Int8Config, {"min_cosine": 0.0}, "min_cosine"),
    (Int8Config, {"min_cosine": 1.01}, "min_cosine"),
    (Int8Config, {"max_drop": -0.1}, "max_drop"),
    (Int8Config, {"max_drop": 101}, "max_drop"),
    (Int8Config, {"min_cosine": 0.99, "max_drop": 1.0}, "min_cosine"),
    (Int8Config, {"mode": "int4"}, "mode"),
    (Int8Config, {"calibration": "kl"}, "calibration"),
    (Int8Config, {"weight_granularity": "group"}, "weight_granularity"),
    (Int8Config, {"batch_size": 0}, "batch_size"),
    (Int8Config, {"batch_size": True}, "batch_size"),
    (Int8Config, {"max_calibration_samples": 0}, "max_calibration_samples"),
    # WeightOnlyConfig
    (WeightOnlyConfig, {"bits": 1}, "bits"),
    (WeightOnlyConfig, {"bits": 9}, "bits"),
    (WeightOnlyConfig, {"bits": 4.0}, "bits"),
    (WeightOnlyConfig, {"group_size": 100}, "group_size"),
    (WeightOnlyConfig, {"group_size": 512}, "group_size"),
    (WeightOnlyConfig, {"algorithm": "awq"}, "algorithm"),
    (WeightOnlyConfig, {"accuracy_level": 5}, "accuracy_level"),
    (WeightOnlyConfig, {"batch_size": -1}, "batch_size"),
    # MixedPrecisionConfig
    (MixedPrecisionConfig, {"layers": {"fc1": "int3"}}, "layers[fc1]"),
    (MixedPrecisionConfig, {"layers": 5}, "layers"),
    (MixedPrecisionConfig, {"group_size": 8}, "group_size"),
    # PruneConfig
    (PruneConfig, {"sparsity": 1.0}, "sparsity"),
    (PruneConfig, {"sparsity": -0.1}, "sparsity"),
    (PruneConfig, {"sparsity": "0.5"}, "sparsity"),
    (PruneConfig, {"nm": (4, 2)}, "nm"),
    (PruneConfig, {"nm": (2, 2)}, "nm"),
    (PruneConfig, {"nm": (0, 4)}, "nm"),
    (PruneConfig, {"nm": (2, 4, 8)}, "nm"),
    (PruneConfig, {"nm": (2.0, 4)}, "nm"),
    (PruneConfig, {"nm": (2,)}, "nm"),
    (PruneConfig, {"scope": "network"}, "scope"),
    (PruneConfig, {"epochs": -1}, "epochs"),
    (PruneConfig, {"epochs": 1.5}, "epochs"),
    (PruneConfig, {"lr": 0.0}, "lr"),
    (PruneConfig, {"lr": 11.0}, "lr"),
    (PruneConfig, {"batch_size": 0}, "batch_size"),
    # StructuredPruneConfig
    (StructuredPruneConfig, {"sparsity": 1.0}, "sparsity"),
    (StructuredPruneConfig, {"importance": "l3"}, "importance"),
    (StructuredPruneConfig, {"min_channels": 0}, "min_channels"),
    (StructuredPruneConfig, {"epochs": -2}, "epochs"),
    (StructuredPruneConfig, {"lr": -1e-3}, "lr"),
    # ClusterConfig
    (ClusterConfig, {"bits": 0}, "bits"),
    (ClusterConfig, {"bits": 9}, "bits"),
    (ClusterConfig, {"init": "kmeans++"}, "init"),
    (ClusterConfig, {"epochs": -1}, "epochs"),
    (ClusterConfig, {"lr": float("inf")}, "lr"),
]


@pytest.mark.parametrize(("cls", "kwargs", "option"), BAD,
                         ids=[f"{c.__name__}-{'-'.join(map(str, k))}" for c, k, _ in BAD])
def test_bad_value_refused_naming_the_option(cls: type, kwargs: dict, option: str) -> None:
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    assert option in str(info.value)
    assert isinstance(info.value, LowbitError)
    # the same refusal through a dict (as from a recipe file)
    with pytest.raises(ValidationError, match=option.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"kind": cls.kind, **kwargs})


def test_bad_enum_message_lists_choices() -> None:
    with pytest.raises(ValidationError) as info:
        PruneConfig(scope="network")
    msg = str(info.value)
    assert "'network'" in msg and "layer" in msg and "global" in msg


@pytest.mark.parametrize(("cls", "kwargs"), [
    (Int8Config, {"percentile": 50.0001}),
    (Int8Config, {"min_cosine": 1.0}),
    (Int8Config, {"max_drop": 0}),
    (Int8Config, {"max_drop": 100}),
    (WeightOnlyConfig, {"bits": 2, "group_size": 16}),
    (WeightOnlyConfig, {"bits": 8, "group_size": 256, "accuracy_level": 0}),
    (PruneConfig, {"sparsity": 0.0}),
    (PruneConfig, {"sparsity": 0.999}),
    (PruneConfig, {"lr": 10.0}),
    (ClusterConfig, {"bits": 1}),
    (ClusterConfig, {"bits": 8}),
])
def test_edge_values_accepted(cls: type, kwargs: dict) -> None:
    cls(**kwargs)


def test_nm_not_a_pair_refused_naming_the_option() -> None:
    with pytest.raises(ValidationError, match="nm"):
        PruneConfig(nm=4)  # type: ignore[arg-type]


# --------------------------------------------------- weight-only symmetric


def test_symmetric_defaults_per_algorithm() -> None:
    assert WeightOnlyConfig(algorithm="rtn").is_symmetric is True
    assert WeightOnlyConfig(algorithm="gptq").is_symmetric is True
    assert WeightOnlyConfig(algorithm="hqq").is_symmetric is False
    assert WeightOnlyConfig(algorithm="rtn", symmetric=False).is_symmetric is False
    assert WeightOnlyConfig(algorithm="hqq", symmetric=False).is_symmetric is False
    # None stays None (the algorithm decides), so changing the algorithm later works
    assert WeightOnlyConfig().replace(algorithm="hqq").is_symmetric is False
    assert WeightOnlyConfig(algorithm="hqq").to_dict()["symmetric"] is None  # as given


def test_hqq_symmetric_refused() -> None:
    with pytest.raises(ValidationError, match="symmetric") as info:
        WeightOnlyConfig(algorithm="hqq", symmetric=True)
    assert "hqq" in str(info.value)
    with pytest.raises(ValidationError, match="symmetric"):
        config_from_dict({"kind": "quantize-weight-only", "algorithm": "HQQ", "symmetric": True})


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize(("nm", "expected"), [((2, 4), 0.5), ((1, 4), 0.75), ((3, 4), 0.25),
                                              ((1, 8), 0.875), (None, 0.3)])
def test_nm_fixes_the_sparsity(nm: tuple[int, int] | None, expected: float) -> None:
    c = PruneConfig(nm=nm) if nm else PruneConfig(sparsity=0.3)
    assert c.sparsity == pytest.approx(expected)
    assert PruneConfig(sparsity=expected, nm=nm).sparsity == pytest.approx(expected)


@pytest.mark.parametrize(("kwargs", "named"), [({"sparsity": 0.9, "nm": (2, 4)}, "contradicts"),
                                               ({"nm": (2, 4), "scope": "global"}, "scope")])
def test_nm_refuses_what_it_would_ignore(kwargs: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        PruneConfig(**kwargs)


def test_quality_target_and_trains_flags() -> None:
    assert not Int8Config().has_quality_target
    assert Int8Config(min_cosine=0.99).has_quality_target
    assert Int8Config(max_drop=1.0).has_quality_target
    assert PruneConfig.trains and StructuredPruneConfig.trains and ClusterConfig.trains
    assert not Int8Config.trains and not WeightOnlyConfig.trains


def test_cluster_has_its_own_lr_default() -> None:
    assert ClusterConfig().lr == pytest.approx(1e-4)
    assert PruneConfig().lr == pytest.approx(1e-3)


def test_parse_enum() -> None:
    assert parse_enum(QuantMode, "Dynamic", "mode") is QuantMode.DYNAMIC
    assert parse_enum(QuantMode, QuantMode.AUTO, "mode") is QuantMode.AUTO
    with pytest.raises(ValidationError, match="option my_option"):
        parse_enum(QuantMode, 3, "my_option")


def test_regression_booleans_and_name_lists_are_checked() -> None:
    """reduce_range="no" was truthy, and exclude_nodes="fc1" became ('f', 'c', '1')."""
    with pytest.raises(ValidationError, match="reduce_range"):
        Int8Config(reduce_range="no")
    with pytest.raises(ValidationError, match="symmetric"):
        WeightOnlyConfig(symmetric="no")
    with pytest.raises(ValidationError, match="exclude_nodes"):
        Int8Config(exclude_nodes="fc1")
    with pytest.raises(ValidationError, match="layers"):
        PruneConfig(layers="fc1")
    with pytest.raises(ValidationError, match="biases"):
        ClusterConfig(biases=1)
