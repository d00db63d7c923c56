"""The calibration metadata schema (docs/calibration.md): `Calibration` to and from safetensors metadata.

Safetensors metadata is string -> string. A calibration is four keys: the format name, the schema
version, a SHA-256 of the payload, and the payload: one JSON document whose arrays are base64 of
raw little-endian float32 bytes with their shape. `parse_metadata` raises only `CalibrationError`.

Operands quantised per token (`mode="row"`) get no static scale: their groups span no tokens, so a
dynamic scale needs no cross-token reduction, and one static scale per head cannot follow each
token. Schema version 2 stores no entry for them (at use they are quantised dynamically); version 1
files, which stored one, are read with that entry validated and then dropped. Schema version 3
stores no means: a mean-subtracting operand's scale covers x less its own block's mean, taken at
run time; version 1 and 2 files, which store a static mean per head and channel, are read with it
and run with it (`quant.StaticQuant.mean`), and such a calibration is written as version 2.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import STRATEGY_VERSION, OperandQuant, QuantConfig
from ..quant import StaticQuant

FORMAT_NAME = "quantattn-calibration"
CALIBRATION_SCHEMA_VERSION = 3
STATIC_MEANS_SCHEMA_VERSION = 2  # the last version that stores static means
KEY_FORMAT = "quantattn.format"
KEY_VERSION = "quantattn.schema_version"
KEY_SHA256 = "quantattn.sha256"
KEY_PAYLOAD = "quantattn.calibration"
METADATA_KEYS = (KEY_FORMAT, KEY_VERSION, KEY_SHA256, KEY_PAYLOAD)
PAYLOAD_KEYS = ("strategy_version", "config", "method", "fingerprint", "layers")
STATIC_FIELDS = ("scale", "mean", "zero_point")
ARRAY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
MAX_DIM = 1 << 20


class CalibrationError(ValueError):
    """A calibration file or payload that cannot be used: the message names the problem."""


def takes_static(spec: OperandQuant) -> bool:
    """True when calibration gives the operand static scales: quantised, in groups that span tokens (not `row`)."""
    return spec.quantized and spec.mode != "row"


def static_operands(config: QuantConfig) -> tuple[str, ...]:
    """The operands among Q, K, V that a calibration for `config` holds static scales for."""
    return tuple(op for op in ("q", "k", "v") if takes_static(getattr(config, op)))


@dataclass
class Calibration:
    """Static scales for every calibrated attention layer of one model, and what they were made for."""

    config: QuantConfig
    fingerprint: dict[str, Any]
    layers: dict[str, dict[str, StaticQuant]]
    method: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        wanted = set(static_operands(self.config))
        means = set()
        for name, ops in self.layers.items():
            extra = set(ops) - wanted
            if extra:
                raise CalibrationError(
                    f"layer {name!r:.80}: operand(s) {sorted(extra)} take no static scales with this config "
                    "(not quantised, or quantised per token, mode 'row', which stays dynamic)"
                )
            for op, st in ops.items():
                if getattr(self.config, op).subtract_mean:
                    means.add(st.mean is not None)
                elif st.mean is not None:
                    raise CalibrationError(f"layer {name!r:.80}: operand {op!r} has a mean but no subtract_mean")
        if len(means) > 1:
            raise CalibrationError("static means on some operands and run-time block means on others: use one")

    @property
    def schema_version(self) -> int:
        """The schema version `to_metadata` writes: the current one, or 2 for static means (read from a 1/2 file)."""
        static_means = any(st.mean is not None for ops in self.layers.values() for st in ops.values())
        return STATIC_MEANS_SCHEMA_VERSION if static_means else CALIBRATION_SCHEMA_VERSION

    @property
    def strategy_version(self) -> int:
        return self.config.strategy_version

    def static_scales(self) -> dict[str, dict[str, StaticQuant]]:
        """{layer name: {'q'|'k'|'v': StaticQuant}} for `quantized_attention(static_scales=...)` (no per-token ones)."""
        return {name: dict(ops) for name, ops in self.layers.items()}

    def to_metadata(self) -> dict[str, str]:
        """The four safetensors metadata entries that carry this calibration."""
        payload = {
            "strategy_version": self.strategy_version,
            "config": self.config.to_dict(),
            "method": self.method,
            "fingerprint": self.fingerprint,
            "layers": {name: {op: _encode_static(st) for op, st in ops.items()} for name, ops in self.layers.items()},
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return {
            KEY_FORMAT: FORMAT_NAME,
            KEY_VERSION: str(self.schema_version),
            KEY_SHA256: hashlib.sha256(text.encode()).hexdigest(),
            KEY_PAYLOAD: text,
        }


def encode_array(t: torch.Tensor) -> dict[str, Any]:
    """A float tensor as {"dtype": "float32", "shape": [...], "data": base64 of little-endian bytes}."""
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"dtype": "float32", "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def _encode_static(st: StaticQuant) -> dict[str, Any]:
    out = {"scale": encode_array(st.scale)}
    if st.mean is not None:
        out["mean"] = encode_array(st.mean)
    if st.zero_point is not None:
        out["zero_point"] = encode_array(st.zero_point)
    return out


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise CalibrationError(f"{where}: missing key {key!r}")
    value = data[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CalibrationError(f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CalibrationError(f"{where}: expected an int, got {value!r:.80}")
    return value


def decode_array(data: Any, where: str) -> torch.Tensor:
    """Inverse of `encode_array`, checking dtype, shape and byte count."""
    if not isinstance(data, dict):
        raise CalibrationError(f"{where}: expected an array object, got {type(data).__name__}")
    unknown = set(data) - {"dtype", "shape", "data"}
    if unknown:
        raise CalibrationError(f"{where}: unknown field(s) {sorted(unknown)}")
    dtype = _require(data, "dtype", str, where)
    if dtype not in ARRAY_DTYPES:
        raise CalibrationError(f"{where}.dtype: {dtype!r:.40} is not one of {', '.join(ARRAY_DTYPES)}")
    shape = _require(data, "shape", list, where)
    dims = [_int(n, f"{where}.shape") for n in shape]
    if any(n < 0 or n > MAX_DIM for n in dims):
        raise CalibrationError(f"{where}.shape: dims must be in 0..{MAX_DIM}, got {dims}")
    text = _require(data, "data", str, where)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise CalibrationError(f"{where}.data: not valid base64 ({exc})") from None
    np_dtype = ARRAY_DTYPES[dtype]
    expected = math.prod(dims) * np_dtype.itemsize
    if len(raw) != expected:
        raise CalibrationError(f"{where}.data: {len(raw)} bytes, shape {dims} of {dtype} needs {expected}")
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(dims)
    return torch.from_numpy(arr.astype(np.float32))


def static_shapes(
    spec: OperandQuant, heads: int, dim: int, schema: int = CALIBRATION_SCHEMA_VERSION
) -> dict[str, tuple[int, ...]]:
    """The stored shape of each statistic the spec needs ({field: shape}); `row` groups occur in schema 1 only,
    means in schemas 1 and 2 only."""
    group = {"tensor": (1, 1, 1, 1), "row": (1, heads, 1, 1), "block": (1, heads, 1, 1), "channel": (1, heads, 1, dim)}
    shapes = {"scale": group[spec.mode]}
    if spec.subtract_mean and schema <= STATIC_MEANS_SCHEMA_VERSION:
        shapes["mean"] = (1, heads, 1, dim)
    if spec.strategy == "asymmetric":
        shapes["zero_point"] = group[spec.mode]
    return shapes


def _check_values(name: str, t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise CalibrationError(f"{where}: {name} holds NaN or Inf")
    if name == "scale" and not (t > 0).all():
        raise CalibrationError(f"{where}: scale must be > 0")
    if name == "zero_point" and not torch.equal(t, torch.round(t)):
        raise CalibrationError(f"{where}: zero_point must be integral")


def _parse_fingerprint(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CalibrationError(f"fingerprint: expected an object, got {type(data).__name__}")
    _require(data, "class", str, "fingerprint")
    models = _require(data, "models", dict, "fingerprint")
    for prefix, model in models.items():
        where = f"fingerprint.models[{prefix!r:.80}]"
        if not isinstance(model, dict):
            raise CalibrationError(f"{where}: expected an object, got {type(model).__name__}")
        _require(model, "class", str, where)
        _require(model, "config_sha256", str, where)
    layers = _require(data, "layers", dict, "fingerprint")
    for name, ops in layers.items():
        where = f"fingerprint.layers[{name!r:.80}]"
        if not isinstance(ops, dict) or set(ops) != {"q", "k", "v"}:
            raise CalibrationError(f"{where}: expected an object with keys 'q', 'k', 'v'")
        for op, hd in ops.items():
            if not isinstance(hd, list) or len(hd) != 2 or any(_int(n, f"{where}.{op}") < 1 for n in hd):
                raise CalibrationError(f"{where}.{op}: expected [heads, head_dim] of positive ints, got {hd!r:.80}")
    return data


def _parse_layer(
    name: str, ops: Any, config: QuantConfig, shapes: dict[str, list[int]], schema: int
) -> dict[str, StaticQuant]:
    """One layer's static scales; schema 1 stored per-token (`row`) operands too: validated, then dropped; schemas 1
    and 2 store means."""
    where = f"layers[{name!r:.80}]"
    if not isinstance(ops, dict):
        raise CalibrationError(f"{where}: expected an object, got {type(ops).__name__}")
    quantized = [op for op in ("q", "k", "v") if getattr(config, op).quantized]
    wanted = quantized if schema == 1 else list(static_operands(config))
    unknown = set(ops) - set(wanted)
    if unknown - set(quantized):
        extra = sorted(unknown - set(quantized))
        raise CalibrationError(f"{where}: operand(s) {extra} are not quantised by the config")
    if unknown:
        raise CalibrationError(
            f"{where}: operand(s) {sorted(unknown)} are quantised per token (mode 'row'): they take dynamic "
            f"scales, and a schema-{schema} file stores none for them"
        )
    out = {}
    for op in wanted:
        if op not in ops:
            raise CalibrationError(f"{where}: missing key {op!r} (the config quantises it)")
        fields = ops[op]
        if not isinstance(fields, dict):
            raise CalibrationError(f"{where}.{op}: expected an object, got {type(fields).__name__}")
        expected = static_shapes(getattr(config, op), *shapes[op], schema)
        extra = set(fields) - set(expected)
        if extra:
            why = "not used by the config"
            if "mean" in extra and getattr(config, op).subtract_mean:
                why = f"not stored in a schema-{schema} file (the block means are taken at run time)"
            raise CalibrationError(f"{where}.{op}: field(s) {sorted(extra)} {why}")
        arrays = {}
        for fname, shape in expected.items():
            t = decode_array(_require(fields, fname, dict, f"{where}.{op}"), f"{where}.{op}.{fname}")
            if tuple(t.shape) != shape:
                raise CalibrationError(f"{where}.{op}.{fname}: shape {list(t.shape)}, expected {list(shape)}")
            _check_values(fname, t, f"{where}.{op}")
            arrays[fname] = t
        if takes_static(getattr(config, op)):
            out[op] = StaticQuant(arrays["scale"], arrays.get("mean"), arrays.get("zero_point"))
    return out


def parse_payload(text: str, schema: int = CALIBRATION_SCHEMA_VERSION) -> Calibration:
    """The JSON payload (the `quantattn.calibration` value) of a schema-`schema` file as a `Calibration`, validated."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CalibrationError(f"payload: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"payload: expected a JSON object, got {type(data).__name__}")
    for key in PAYLOAD_KEYS:
        if key not in data:
            raise CalibrationError(f"payload: missing key {key!r}")
    version = _int(data["strategy_version"], "strategy_version")
    if version > STRATEGY_VERSION:
        raise CalibrationError(
            f"strategy_version: {version} is newer than this quantattn-hf knows ({STRATEGY_VERSION}); "
            "upgrade quantattn-hf"
        )
    try:
        config = QuantConfig.from_dict(data["config"])
    except (ValueError, TypeError) as exc:
        raise CalibrationError(f"config: {exc}") from None
    if config.strategy_version != version:
        raise CalibrationError(f"config.strategy_version {config.strategy_version} differs from {version}")
    method = _require(data, "method", dict, "payload")
    fingerprint = _parse_fingerprint(data["fingerprint"])
    layers = _require(data, "layers", dict, "payload")
    known = fingerprint["layers"]
    if set(layers) != set(known):
        diff = sorted(set(layers) ^ set(known))[:5]
        raise CalibrationError(f"layers: the layer names differ from the fingerprint's (e.g. {diff})")
    parsed = {name: _parse_layer(name, ops, config, known[name], schema) for name, ops in layers.items()}
    return Calibration(config=config, fingerprint=fingerprint, layers=parsed, method=method)


def is_str_mapping(value: Any) -> bool:
    """True for a dict of str to str (what safetensors metadata must be)."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def is_calibration_metadata(metadata: Any) -> bool:
    """True when a safetensors metadata dict claims to carry a quantattn calibration."""
    return isinstance(metadata, dict) and KEY_FORMAT in metadata


def parse_metadata(metadata: Any) -> Calibration:
    """A safetensors `__metadata__` dict as a `Calibration`; raises `CalibrationError` naming the problem."""
    if not is_str_mapping(metadata):
        raise CalibrationError("metadata: expected a string-to-string mapping")
    if KEY_FORMAT not in metadata:
        raise CalibrationError(
            f"not a quantattn calibration: the safetensors metadata has no {KEY_FORMAT!r} key "
            f"(its keys: {sorted(metadata)[:8]})"
        )
    if metadata[KEY_FORMAT] != FORMAT_NAME:
        raise CalibrationError(f"{KEY_FORMAT}: {metadata[KEY_FORMAT]!r:.80} is not {FORMAT_NAME!r}")
    for key in METADATA_KEYS:
        if key not in metadata:
            raise CalibrationError(f"metadata: missing key {key!r}")
    text = metadata[KEY_VERSION]
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        raise CalibrationError(f"{KEY_VERSION}: {text!r:.40} is not a version number")
    version = int(text)
    if version > CALIBRATION_SCHEMA_VERSION:
        raise CalibrationError(
            f"{KEY_VERSION}: {version} is newer than this quantattn-hf reads ({CALIBRATION_SCHEMA_VERSION}); "
            "upgrade quantattn-hf"
        )
    if version < 1:
        raise CalibrationError(f"{KEY_VERSION}: {version} is not a valid version")
    payload = metadata[KEY_PAYLOAD]
    if hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest() != metadata[KEY_SHA256]:
        raise CalibrationError(f"{KEY_PAYLOAD}: corrupted (its SHA-256 does not match {KEY_SHA256})")
    return parse_payload(payload, version)
