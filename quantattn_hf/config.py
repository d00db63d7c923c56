"""Quantisation settings: per-operand precision, strategy, mode and block size, with presets.

A `QuantConfig` travels with every quantised tensor and every saved calibration file, so it
serialises to a plain dict / JSON with a schema version (see docs/quantization.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

SCHEMA_VERSION = 1
STRATEGY_VERSION = 1

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
QUANT_PRECISIONS = ("fp8_e4m3", "int8", "int4")
PRECISIONS = FLOAT_PRECISIONS + QUANT_PRECISIONS
STRATEGIES = ("symmetric", "asymmetric", "legacy")
MODES = ("tensor", "row", "channel", "block")
OPERANDS = ("q", "k", "v", "p")

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}: unknown value {value!r}; expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class OperandQuant:
    """How one attention operand (Q, K, V or P) is held: precision, strategy, group mode."""

    precision: str = "fp16"
    strategy: str = "symmetric"
    mode: str = "tensor"
    block_size: int = 64
    subtract_mean: bool = False

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("mode", self.mode, MODES)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size: must be an int, got {self.block_size!r}")
        if self.block_size < 0 or (self.block_size == 0 and self.mode == "block"):
            raise ValueError(f"block_size: must be > 0 (or 0 = whole sequence in channel mode), got {self.block_size}")
        if not isinstance(self.subtract_mean, bool):
            raise ValueError(f"subtract_mean: must be a bool, got {self.subtract_mean!r}")
        if not self.quantized:
            return
        if self.strategy == "legacy" and self.mode != "tensor":
            raise ValueError(f"mode: the legacy strategy uses one scale per tensor, got mode {self.mode!r}")
        if self.precision == "fp8_e4m3" and self.strategy == "asymmetric":
            raise ValueError("strategy: fp8_e4m3 supports symmetric and legacy scaling only")
        if self.subtract_mean and (self.strategy != "symmetric" or self.mode not in ("channel", "block")):
            raise ValueError("subtract_mean: needs the symmetric strategy and mode 'channel' or 'block'")

    @property
    def quantized(self) -> bool:
        """True for fp8/int8/int4 precisions, False for the float formats."""
        return self.precision in QUANT_PRECISIONS

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The torch dtype of a float precision, None for quantised precisions."""
        return FLOAT_DTYPES.get(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperandQuant:
        if not isinstance(data, dict):
            raise ValueError(f"operand: expected a dict, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"operand: unknown field(s) {sorted(unknown)}")
        return cls(**data)


def _fp(precision: str = "fp16") -> OperandQuant:
    return OperandQuant(precision=precision)


PRESETS: dict[str, dict[str, OperandQuant]] = {
    "fp16": {"q": _fp(), "k": _fp(), "v": _fp(), "p": _fp("fp32")},
    "kv-int8": {
        "q": _fp(),
        "k": OperandQuant("int8", mode="channel", block_size=64, subtract_mean=True),
        "v": OperandQuant("int8", mode="row"),
        "p": _fp(),
    },
    "kv-int4": {
        "q": _fp(),
        "k": OperandQuant("int4", mode="channel", block_size=32, subtract_mean=True),
        "v": OperandQuant("int4", mode="row"),
        "p": _fp(),
    },
    "kv-int4-v8": {
        "q": _fp(),
        "k": OperandQuant("int4", mode="channel", block_size=32, subtract_mean=True),
        "v": OperandQuant("int8", mode="row"),
        "p": _fp(),
    },
    "qk-int8-pv-fp8": {
        "q": OperandQuant("int8", mode="block", block_size=64),
        "k": OperandQuant("int8", mode="block", block_size=64, subtract_mean=True),
        "v": OperandQuant("fp8_e4m3", mode="channel", block_size=0),
        "p": _fp("fp8_e4m3"),
    },
}


@dataclass(frozen=True)
class QuantConfig:
    """Quantisation of the four attention operands; `QuantConfig.preset(name)` for the usual ones."""

    q: OperandQuant = field(default_factory=_fp)
    k: OperandQuant = field(default_factory=_fp)
    v: OperandQuant = field(default_factory=_fp)
    p: OperandQuant = field(default_factory=lambda: _fp("fp32"))
    strategy_version: int = STRATEGY_VERSION
    name: str | None = None

    def __post_init__(self) -> None:
        for op in OPERANDS:
            if not isinstance(getattr(self, op), OperandQuant):
                raise ValueError(f"{op}: expected an OperandQuant, got {type(getattr(self, op)).__name__}")
        if self.p.precision in ("int8", "int4"):
            raise ValueError("p.precision: P is held as a float format (fp32, fp16, bf16, fp8_e4m3)")
        if isinstance(self.strategy_version, bool) or not isinstance(self.strategy_version, int):
            raise ValueError(f"strategy_version: must be an int, got {self.strategy_version!r}")
        if not 1 <= self.strategy_version <= STRATEGY_VERSION:
            raise ValueError(
                f"strategy_version: {self.strategy_version} is not known to this version of quantattn-hf "
                f"(it knows 1..{STRATEGY_VERSION}); upgrade quantattn-hf"
            )

    @classmethod
    def preset(cls, name: str) -> QuantConfig:
        """A named preset: fp16 (off), kv-int8, kv-int4, kv-int4-v8, qk-int8-pv-fp8."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name], name=name)

    @property
    def is_off(self) -> bool:
        """True when nothing is quantised (the fp16 preset and its like)."""
        return not any(getattr(self, op).quantized for op in OPERANDS)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with operands or fields replaced; drops the preset name if anything changed."""
        if changes and "name" not in changes:
            changes["name"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "strategy_version": self.strategy_version}
        out.update({op: getattr(self, op).to_dict() for op in OPERANDS})
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a dict, got {type(data).__name__}")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"schema_version: missing or not an int ({version!r})")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version: {version} is newer than this quantattn-hf understands ({SCHEMA_VERSION}); "
                "upgrade quantattn-hf"
            )
        if version < 1:
            raise ValueError(f"schema_version: {version} is not a valid version")
        unknown = set(data) - {"schema_version", "strategy_version", "name", *OPERANDS}
        if unknown:
            raise ValueError(f"config: unknown field(s) {sorted(unknown)}")
        missing = [op for op in OPERANDS if op not in data]
        if missing:
            raise ValueError(f"config: missing operand(s) {missing}")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name: must be a string, got {name!r}")
        return cls(
            **{op: OperandQuant.from_dict(data[op]) for op in OPERANDS},
            strategy_version=data.get("strategy_version", STRATEGY_VERSION),
            name=name,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"config: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def resolve_config(config: QuantConfig | str | None) -> QuantConfig:
    """Accept a config, a preset name, or None (kv-int8, the default)."""
    if config is None:
        return QuantConfig.preset("kv-int8")
    if isinstance(config, str):
        return QuantConfig.preset(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a QuantConfig or a preset name, got {type(config).__name__}")
    return config
