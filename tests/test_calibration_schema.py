"""The calibration file format: round trips, a clear error for each broken-file case, and a fuzzed parser."""

import base64
import hashlib
import json

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantattn_hf import OperandQuant, QuantConfig
from quantattn_hf.calibration import (
    CALIBRATION_SCHEMA_VERSION,
    Calibration,
    CalibrationError,
    CalibrationStats,
    compute_calibration,
    parse_metadata,
    read_calibration,
    save_calibration,
)
from quantattn_hf.calibration.header import parse_header, read_metadata, update_metadata
from quantattn_hf.calibration.schema import KEY_FORMAT, KEY_PAYLOAD, KEY_SHA256, KEY_VERSION, decode_array, encode_array
from quantattn_hf.quant import StaticQuant, quantize

ASYM = QuantConfig.preset("kv-int8").replace(v=OperandQuant("int4", strategy="asymmetric", mode="block", block_size=16))


def _calibration(config: QuantConfig = ASYM):
    g = torch.Generator().manual_seed(0)
    stats = CalibrationStats()
    for name in ("blocks.0.attn", "blocks.1.attn"):
        stats.record(name, *(torch.randn(1, h, 40, 8, generator=g) * 3 for h in (4, 2, 2)))
    return compute_calibration(
        stats, config, "mse", {"class": "Tiny", "models": {"": {"class": "Tiny", "config_sha256": "0" * 64}}}
    )


CAL = _calibration()
META = CAL.to_metadata()


def _with_payload(payload: dict) -> dict[str, str]:
    text = json.dumps(payload)
    return {**META, KEY_PAYLOAD: text, KEY_SHA256: hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}


def _bytes(t: torch.Tensor | None) -> bytes | None:
    return None if t is None else t.numpy().tobytes()


def _with_means(payload: dict) -> dict:
    """The payload with a static mean per head and channel for K (kv-int8's K subtracts means), as schemas 1 and 2
    store them."""
    g = torch.Generator().manual_seed(7)
    for ops in payload["layers"].values():
        ops["k"]["mean"] = encode_array(torch.randn(1, 2, 1, 8, generator=g))
    return payload


META_2 = parse_metadata({**_with_payload(_with_means(json.loads(META[KEY_PAYLOAD]))), KEY_VERSION: "2"}).to_metadata()


def test_round_trip_is_byte_identical(tmp_path):
    path = save_calibration(CAL, tmp_path / "c.safetensors")
    back = read_calibration(path)
    assert back.config == CAL.config
    assert back.fingerprint == CAL.fingerprint
    assert back.method == CAL.method == {"name": "mse", "grid": 40, "min_ratio": 0.25}
    assert set(back.layers) == set(CAL.layers)
    for name, ops in CAL.layers.items():
        assert set(back.layers[name]) == set(ops) == {"k", "v"}
        for op, s in ops.items():
            for field in ("scale", "mean", "zero_point"):
                assert _bytes(getattr(back.layers[name][op], field)) == _bytes(getattr(s, field)), (name, op, field)
    assert back.layers["blocks.0.attn"]["v"].zero_point is not None
    assert back.layers["blocks.0.attn"]["k"].mean is None  # K's block means are taken at run time
    assert back.to_metadata() == META
    # compact: base64 of float32, not decimal text (2 layers x (K scale 2x8 floats, V scale+zero 2x2 floats))
    assert len(META[KEY_PAYLOAD]) < 1700


def test_errors_name_the_problem(tmp_path):
    good = save_calibration(CAL, tmp_path / "good.safetensors").read_bytes()
    cases = {
        "not a quantattn": lambda: safetensors.torch.save_file({"w": torch.ones(3)}, str(tmp_path / "x")),
        "truncated file": lambda: (tmp_path / "x").write_bytes(good[:5]),
        "truncated header": lambda: (tmp_path / "x").write_bytes(good[: len(good) // 2]),
        "corrupted safetensors header": lambda: (tmp_path / "x").write_bytes(good[:8] + b"#" + good[9:]),
    }
    for message, write in cases.items():
        write()
        with pytest.raises(CalibrationError, match=message):
            read_calibration(tmp_path / "x")
    weights = safetensors.torch.save({"w": torch.ones(64)}, metadata={"format": "pt"})
    (tmp_path / "x").write_bytes(weights[:-10])
    with pytest.raises(CalibrationError, match="truncated file .*tensor 'w' ends at byte 256"):
        read_metadata(tmp_path / "x")
    with pytest.raises(CalibrationError, match="no such file"):
        read_calibration(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("key", [KEY_VERSION, KEY_SHA256, KEY_PAYLOAD])
def test_missing_metadata_key(key):
    with pytest.raises(CalibrationError, match=f"missing key '{key}'"):
        parse_metadata({k: v for k, v in META.items() if k != key})


@pytest.mark.parametrize("key", ["strategy_version", "config", "method", "fingerprint", "layers"])
def test_missing_payload_key(key):
    payload = json.loads(META[KEY_PAYLOAD])
    del payload[key]
    with pytest.raises(CalibrationError, match=f"missing key '{key}'"):
        parse_metadata(_with_payload(payload))


def test_missing_operand_and_array_field():
    payload = json.loads(META_2[KEY_PAYLOAD])
    del payload["layers"]["blocks.1.attn"]["k"]["mean"]
    with pytest.raises(CalibrationError, match=r"layers\['blocks.1.attn'\].k: missing key 'mean'"):
        parse_metadata({**_with_payload(payload), KEY_VERSION: "2"})
    payload = json.loads(META[KEY_PAYLOAD])
    del payload["layers"]["blocks.1.attn"]["k"]["scale"]
    with pytest.raises(CalibrationError, match=r"layers\['blocks.1.attn'\].k: missing key 'scale'"):
        parse_metadata(_with_payload(payload))
    payload = json.loads(META[KEY_PAYLOAD])
    del payload["layers"]["blocks.0.attn"]["v"]
    with pytest.raises(CalibrationError, match="missing key 'v' .the config quantises it"):
        parse_metadata(_with_payload(payload))


def test_newer_versions_and_wrong_format():
    assert META[KEY_VERSION] == str(CALIBRATION_SCHEMA_VERSION) == "3"
    with pytest.raises(CalibrationError, match="schema_version: 4 is newer than this quantattn-hf reads .3.; upgrade"):
        parse_metadata({**META, KEY_VERSION: "4"})
    payload = json.loads(META[KEY_PAYLOAD])
    payload["strategy_version"] = 9
    with pytest.raises(CalibrationError, match="strategy_version: 9 is newer"):
        parse_metadata(_with_payload(payload))
    with pytest.raises(CalibrationError, match="is not 'quantattn-calibration'"):
        parse_metadata({**META, KEY_FORMAT: "other"})
    with pytest.raises(CalibrationError, match="not a quantattn calibration"):
        parse_metadata({"format": "pt"})


def _row_v(payload: dict) -> dict:
    """The payload with V configured per token (`row`: same stored shapes as `block`), as schema 1 wrote it."""
    payload["config"]["v"]["mode"] = "row"
    return payload


def test_schema_1_file_loads_with_per_token_scales_dropped():
    """Schema 1 stored a per-head scale for per-token (row) operands: still read, validated, and that entry dropped."""
    meta = {**_with_payload(_row_v(json.loads(META_2[KEY_PAYLOAD]))), KEY_VERSION: "1"}
    cal = parse_metadata(meta)
    assert cal.config.v.mode == "row"
    stored = parse_metadata(META_2)
    for name, ops in cal.layers.items():
        assert set(ops) == {"k"}
        for field in ("scale", "mean"):
            assert _bytes(getattr(ops["k"], field)) == _bytes(getattr(stored.layers[name]["k"], field))
    again = cal.to_metadata()
    assert again[KEY_VERSION] == "2" and "zero_point" not in again[KEY_PAYLOAD]
    assert parse_metadata(again).to_metadata() == again
    broken = json.loads(meta[KEY_PAYLOAD])
    broken["layers"]["blocks.0.attn"]["v"]["scale"]["data"] = "@@@@"
    with pytest.raises(CalibrationError, match=r"layers\['blocks.0.attn'\].v.scale.data: not valid base64"):
        parse_metadata({**_with_payload(broken), KEY_VERSION: "1"})
    del broken["layers"]["blocks.0.attn"]["v"]
    with pytest.raises(CalibrationError, match="missing key 'v' .the config quantises it"):
        parse_metadata({**_with_payload(broken), KEY_VERSION: "1"})


def test_schema_2_file_loads_and_runs_with_its_static_means():
    """Schema 2 stored a static mean per head and channel for mean-subtracting operands: read, kept, used, rewritten
    as schema 2; schema 3 stores none (the block means are taken at run time) and refuses one."""
    cal = parse_metadata(META_2)
    payload = json.loads(META_2[KEY_PAYLOAD])
    x = torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(3)) * 3
    for name, ops in cal.layers.items():
        assert _bytes(ops["k"].scale) == _bytes(CAL.layers[name]["k"].scale)
        mean = decode_array(payload["layers"][name]["k"]["mean"], "mean")
        assert _bytes(ops["k"].mean) == _bytes(mean)
        held = quantize(x, cal.config.k, static=ops["k"])
        assert torch.equal(held.mean, mean.expand(1, 2, 1, 8))  # one block of 40 tokens: the static mean, not x's
    assert cal.schema_version == 2 and cal.to_metadata() == META_2
    with pytest.raises(CalibrationError, match=r"k: field\(s\) \['mean'\] not stored in a schema-3 file .the block"):
        parse_metadata({**META_2, KEY_VERSION: "3"})
    mixed = {**cal.layers, "blocks.1.attn": CAL.layers["blocks.1.attn"]}
    with pytest.raises(CalibrationError, match="static means on some operands and run-time block means on others"):
        Calibration(config=cal.config, fingerprint=cal.fingerprint, layers=mixed)
    v_mean = {
        n: {**ops, "v": StaticQuant(ops["v"].scale, ops["k"].mean, ops["v"].zero_point)}
        for n, ops in cal.layers.items()
    }
    with pytest.raises(CalibrationError, match="operand 'v' has a mean but no subtract_mean"):
        Calibration(config=cal.config, fingerprint=cal.fingerprint, layers=v_mean)


def test_schema_2_refuses_per_token_scales():
    with pytest.raises(CalibrationError, match=r"\['v'\] are quantised per token .mode 'row'.: they take dynamic"):
        parse_metadata(_with_payload(_row_v(json.loads(META[KEY_PAYLOAD]))))
    payload = _row_v(json.loads(META[KEY_PAYLOAD]))
    payload["layers"]["blocks.0.attn"]["q"] = payload["layers"]["blocks.0.attn"]["v"]
    with pytest.raises(CalibrationError, match=r"operand\(s\) \['q'\] are not quantised by the config"):
        parse_metadata(_with_payload(payload))
    config = CAL.config.replace(v=OperandQuant("int8", mode="row"))
    with pytest.raises(CalibrationError, match=r"\['v'\] take no static scales"):
        Calibration(config=config, fingerprint=CAL.fingerprint, layers=CAL.layers)


def test_corrupted_payload_is_caught_by_its_checksum():
    text = META[KEY_PAYLOAD]
    i = text.index('"data":"') + 10
    flipped = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
    with pytest.raises(CalibrationError, match="corrupted .its SHA-256"):
        parse_metadata({**META, KEY_PAYLOAD: flipped})


def test_bad_arrays():
    def broken(fn):
        payload = json.loads(META[KEY_PAYLOAD])
        fn(payload["layers"]["blocks.0.attn"]["k"])
        return _with_payload(payload)

    def floats(values: list[float]) -> str:
        return base64.b64encode(torch.tensor(values, dtype=torch.float32).numpy().tobytes()).decode()

    cases = {
        r"shape \[1, 2, 1, 4\], expected \[1, 2, 1, 8\]": lambda k: k["scale"].update(
            shape=[1, 2, 1, 4], data=floats([1.0] * 8)
        ),
        "12 bytes, shape .* needs 64": lambda k: k["scale"].update(data=floats([1.0] * 3)),
        "not valid base64": lambda k: k["scale"].update(data="@@@@"),
        "scale must be > 0": lambda k: k["scale"].update(data=floats([1.0] * 15 + [0.0])),
        "scale holds NaN or Inf": lambda k: k["scale"].update(data=floats([1.0] * 15 + [float("inf")])),
        "is not one of": lambda k: k["scale"].update(dtype="float64"),
        "unknown field": lambda k: k["scale"].update(extra=1),
        "not used by the config": lambda k: k.update(zero_point=k["scale"]),
    }
    for message, fn in cases.items():
        with pytest.raises(CalibrationError, match=message):
            parse_metadata(broken(fn))
    payload = json.loads(META_2[KEY_PAYLOAD])
    payload["layers"]["blocks.0.attn"]["k"]["mean"]["data"] = floats([float("nan")] * 16)
    with pytest.raises(CalibrationError, match="mean holds NaN"):
        parse_metadata({**_with_payload(payload), KEY_VERSION: "2"})


def test_update_metadata_keeps_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int64)}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    update_metadata(path, META)
    assert read_metadata(path) == {"format": "pt", **META}
    back = safetensors.torch.load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert read_calibration(path).to_metadata() == META


# --- fuzzing: the parser raises CalibrationError and nothing else -------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


PAYLOAD = json.loads(META[KEY_PAYLOAD])
PATHS = list(_paths(PAYLOAD))
PATHS_2 = list(_paths(json.loads(META_2[KEY_PAYLOAD])))


def _replace(node, path, value):
    if not path:
        return value
    node = json.loads(json.dumps(node))
    parent = node
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return node


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.sampled_from(PATHS), JSON)
def test_fuzz_payload_subtree_replaced(path, value):
    try:
        parse_metadata(_with_payload(_replace(PAYLOAD, path, value)))
    except CalibrationError:
        pass


@FUZZ
@given(st.sampled_from(PATHS_2), JSON)
def test_fuzz_schema_1_payload_subtree_replaced(path, value):
    """The schema-1 path (per-token V entries validated, then dropped; static means) raises nothing but
    CalibrationError."""
    payload = _replace(_row_v(json.loads(META_2[KEY_PAYLOAD])), path, value)
    try:
        parse_metadata({**_with_payload(payload), KEY_VERSION: "1"})
    except CalibrationError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from([*META, "format", "x"]) | st.text(max_size=6), st.text(max_size=30)))
def test_fuzz_metadata_dicts(metadata):
    metadata = {**{k: v for k, v in META.items() if k not in metadata}, **metadata}
    try:
        parse_metadata(metadata)
    except CalibrationError:
        pass


@FUZZ
@given(st.integers(0, len(META[KEY_PAYLOAD]) - 1), st.text(max_size=6), st.integers(0, 5))
def test_fuzz_payload_text_edits(at, text, cut):
    payload = META[KEY_PAYLOAD][:at] + text + META[KEY_PAYLOAD][at + cut :]
    meta = {
        **META,
        KEY_PAYLOAD: payload,
        KEY_SHA256: hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest(),
    }
    try:
        parse_metadata(meta)
    except CalibrationError:
        pass


@FUZZ
@given(st.binary(max_size=200) | st.builds(lambda s: s.encode(), JSON.map(json.dumps)))
def test_fuzz_header_bytes(data):
    try:
        meta = parse_header(data, data_len=100)
        parse_metadata(meta)
    except CalibrationError:
        pass


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A small weights file carrying CAL in its metadata."""
    path = tmp_path_factory.mktemp("ckpt") / "w.safetensors"
    safetensors.torch.save_file({"w": torch.arange(24, dtype=torch.float32)}, str(path), metadata={"format": "pt"})
    update_metadata(path, META)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_every_truncation_is_refused(checkpoint_bytes, data, tmp_path_factory):
    cut = data.draw(st.integers(0, len(checkpoint_bytes) - 1))
    path = tmp_path_factory.mktemp("cut") / "w.safetensors"
    path.write_bytes(checkpoint_bytes[:cut])
    with pytest.raises(CalibrationError, match="truncated|corrupted"):
        read_calibration(path)


@FUZZ
@given(data=st.data())
def test_fuzz_byte_flips_never_give_a_wrong_calibration(checkpoint_bytes, data, tmp_path_factory):
    """A flipped byte anywhere: either an error, or (tensor bytes, other metadata) exactly the stored calibration."""
    at = data.draw(st.integers(0, len(checkpoint_bytes) - 1))
    flip = data.draw(st.integers(1, 255))
    corrupted = bytearray(checkpoint_bytes)
    corrupted[at] ^= flip
    path = tmp_path_factory.mktemp("flip") / "w.safetensors"
    path.write_bytes(bytes(corrupted))
    try:
        got = read_calibration(path)
    except CalibrationError:
        return
    assert got.to_metadata() == META
