"""QuantConfig: presets, validation errors that name the field, JSON round trips."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantattn_hf.config import MODES, PRECISIONS, PRESETS, STRATEGIES, OperandQuant, QuantConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = QuantConfig.preset(name)
    assert cfg.name == name
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["schema_version"] == 1


def test_fp16_preset_is_off_and_the_others_are_not():
    assert QuantConfig.preset("fp16").is_off
    assert not any(QuantConfig.preset(n).is_off for n in PRESETS if n != "fp16")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"precision": "int3"}, "precision"),
        ({"strategy": "weird"}, "strategy"),
        ({"mode": "diagonal"}, "mode"),
        ({"mode": "block", "block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"precision": "int8", "strategy": "legacy", "mode": "row"}, "mode"),
        ({"precision": "fp8_e4m3", "strategy": "asymmetric"}, "strategy"),
        ({"precision": "int8", "mode": "row", "subtract_mean": True}, "subtract_mean"),
    ],
)
def test_bad_operand_fields_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        OperandQuant(**change)


def test_bad_config_dicts_name_the_field():
    good = QuantConfig.preset("kv-int8").to_dict()
    with pytest.raises(ValueError, match="schema_version"):
        QuantConfig.from_dict({**good, "schema_version": 2})
    with pytest.raises(ValueError, match="schema_version"):
        QuantConfig.from_dict({k: v for k, v in good.items() if k != "schema_version"})
    with pytest.raises(ValueError, match="strategy_version"):
        QuantConfig.from_dict({**good, "strategy_version": 99})
    with pytest.raises(ValueError, match="precision"):
        QuantConfig.from_dict({**good, "k": {**good["k"], "precision": "int2"}})
    with pytest.raises(ValueError, match="missing operand"):
        QuantConfig.from_dict({k: v for k, v in good.items() if k != "v"})
    with pytest.raises(ValueError, match="unknown field"):
        QuantConfig.from_dict({**good, "extra": 1})
    with pytest.raises(ValueError, match="p.precision"):
        QuantConfig(p=OperandQuant("int8"))
    with pytest.raises(ValueError, match="JSON"):
        QuantConfig.from_json("{not json")
    with pytest.raises(ValueError, match="preset"):
        QuantConfig.preset("int2-everything")


def _operand(precision, strategy, mode, block, mean):
    try:
        return OperandQuant(precision, strategy, mode, block, mean)
    except ValueError:
        return None


operands = st.builds(
    _operand,
    st.sampled_from(PRECISIONS),
    st.sampled_from(STRATEGIES),
    st.sampled_from(MODES),
    st.integers(0, 512),
    st.booleans(),
).filter(lambda o: o is not None)


@given(operands, operands, operands, st.sampled_from(["fp32", "fp16", "bf16", "fp8_e4m3"]))
def test_any_valid_config_round_trips(q, k, v, p):
    cfg = QuantConfig(q=q, k=k, v=v, p=OperandQuant(p))
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
