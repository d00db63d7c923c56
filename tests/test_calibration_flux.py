"""Calibration end to end on the tiny random Flux pipeline: measure, save, reload, run with static scales."""

import dataclasses

import pytest
import torch
from conftest import Recorder

from quantattn_hf import OperandQuant, QuantConfig, quantized_attention
from quantattn_hf.calibration import (
    CalibrationError,
    calibrate,
    collect,
    compute_calibration,
    load_calibrated,
    load_calibration,
    load_layer_calibration,
    model_fingerprint,
    read_calibration,
    save_calibrated,
    save_calibration,
)
from quantattn_hf.calibration.cli import main as cli_main
from quantattn_hf.integrations.diffusers import apply, quantized_layers, remove
from quantattn_hf.quant import StaticQuant, quantize
from quantattn_hf.tiny import tiny_flux_pipeline

TRAIN = ["a photo of a cat", "a red car on a street", "mountains at sunset", "a bowl of fruit"]
TEST = ["a dog in the snow", "an old castle", "city skyline at night"]


def _run(pipe, prompt: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, output_type="latent", generator=g).images


@pytest.fixture(scope="module")
def flux():
    """The pipeline, its statistics over TRAIN, and its unquantised outputs on TEST."""
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stats = collect(pipe, TRAIN, _run, progress=False)
    with torch.no_grad():
        reference = [_run(pipe, p) for p in TEST]
    return pipe, stats, reference


@pytest.fixture(scope="module")
def held_out(flux):
    """The attention operands of every call on the TEST prompts."""
    return collect(flux[0], TEST, _run, stats=Recorder(), progress=False).seen


def _error(pipe, reference, calibration=None, config=None) -> float:
    """Relative L1 error of the TEST outputs against the unquantised pipeline's."""
    apply(pipe, config or calibration.config, calibration=calibration)
    try:
        with torch.no_grad():
            outs = [_run(pipe, p) for p in TEST]
    finally:
        remove(pipe)
    return (
        sum((o - r).abs().sum() for o, r in zip(outs, reference, strict=True)) / sum(r.abs().sum() for r in reference)
    ).item()


def _cal(flux, preset: str, method: str):
    pipe, stats, _ = flux
    return compute_calibration(stats, QuantConfig.preset(preset), method, model_fingerprint(pipe))


def test_stats_cover_every_flux_attention_layer(flux):
    pipe, stats, _ = flux
    assert sorted(stats.layers) == [
        "transformer.single_transformer_blocks.0.attn",
        "transformer.transformer_blocks.0.attn",
    ]
    # 4 prompts x 2 steps, each call 512 text + 64 image tokens, 2 heads of 16 channels
    for layer in stats.layers.values():
        for op in ("q", "k", "v"):
            assert (layer[op].count, layer[op].heads, layer[op].dim) == (8 * 576, 2, 16)


def test_save_reload_byte_identical(flux, tmp_path):
    pipe, _, _ = flux
    cal = _cal(flux, "qk-int8-pv-fp8", "mse")
    path = save_calibration(cal, tmp_path / "flux.safetensors")
    loaded = load_calibration(path, pipe)
    assert set(loaded) == set(cal.layers)
    for name, ops in cal.layers.items():
        assert set(loaded[name]) == {"q", "k", "v"}
        for op, s in ops.items():
            assert loaded[name][op].scale.numpy().tobytes() == s.scale.numpy().tobytes()
            for field in ("mean", "zero_point"):
                a, b = getattr(loaded[name][op], field), getattr(s, field)
                assert (a is None and b is None) or a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int4", "kv-int4-v8", "qk-int8-pv-fp8"])
def test_static_scales_within_1_2x_of_dynamic_on_unseen_prompts(flux, preset):
    """Measured (relative L1 of the final latents, mse static vs dynamic): kv-int8 9.23e-5 vs 9.22e-5 (1.00x),
    kv-int4 2.44e-3 vs 2.42e-3 (1.01x), kv-int4-v8 1.67e-4 vs 1.49e-4 (1.12x), qk-int8-pv-fp8 7.08e-4 vs 8.22e-4
    (0.86x). K's block means are taken at run time (its scale covers x less its block's mean); with static means
    kv-int4-v8 measured 4.41x. The kv presets' V (per token) stays dynamic."""
    pipe, _, reference = flux
    dynamic = _error(pipe, reference, config=QuantConfig.preset(preset))
    static = _error(pipe, reference, _cal(flux, preset, "mse"))
    assert 0 < static <= 1.2 * dynamic, (static, dynamic)
    if preset == "kv-int4-v8":
        assert static > 1.05 * dynamic, (static, dynamic)  # measured 1.12x: K's INT4 static range still costs


def test_kv_int4_v8_static_means_cost_4x_block_means_do_not(flux):
    """K per channel in 32-token blocks, INT4. Flux's padded T5 tokens have near-identical keys: a block of them less
    its own mean quantises almost exactly; less one static mean per channel over every token it does not. Absmax
    scales both ways: static means (as schema-1/2 files hold them, still run as such) measured 6.37e-4 (4.27x the
    dynamic 1.49e-4), block means at run time 1.67e-4 (1.12x)."""
    pipe, stats, reference = flux
    config = QuantConfig.preset("kv-int4-v8")
    dynamic = _error(pipe, reference, config=config)
    block_means = _cal(flux, "kv-int4-v8", "absmax")
    static_means = {}
    for name, ops in stats.layers.items():
        k = ops["k"]
        heads, dim = k.heads, k.dim
        clip = torch.maximum(k.amax - k.mean, k.mean - k.amin)
        static_means[name] = {"k": StaticQuant((clip / 7).view(1, heads, 1, dim), k.mean.view(1, heads, 1, dim))}
    old = dataclasses.replace(block_means, layers=static_means)
    assert old.schema_version == 2 and block_means.schema_version == 3
    with_block_means, with_static_means = _error(pipe, reference, block_means), _error(pipe, reference, old)
    assert 1.05 * dynamic < with_block_means <= 1.2 * dynamic, (with_block_means, dynamic)
    assert 3.8 * dynamic < with_static_means <= 4.8 * dynamic, (with_static_means, dynamic)


def test_int4_percentile_and_mse_beat_absmax(flux, held_out):
    """kv-int4's static K on unseen prompts, relative squared quantisation error: measured absmax 1.53e-3,
    percentile 1.41e-3 (0.92x), mse 1.24e-3 (0.81x). (In the final latents the three differ by < 1%: V's dynamic
    INT4 error dominates.)"""
    cfg = QuantConfig.preset("kv-int4")
    errors = []
    for method in ("absmax", "percentile", "mse"):
        layers = _cal(flux, "kv-int4", method).layers
        err = total = 0.0
        for name, _, k, _ in held_out:
            err += (quantize(k, cfg.k, static=layers[name]["k"]).dequantize(torch.float32) - k).square().sum().item()
            total += k.square().sum().item()
        errors.append(err / total)
    absmax, percentile, mse = errors
    assert percentile < 0.95 * absmax and mse < 0.85 * absmax, errors


def test_per_token_v_stays_dynamic(flux, held_out):
    """kv-int8's calibration holds no V scale: V is quantised per token at use, so scaling V by 64 scales the
    calibrated attention exactly by 64; a static per-head V scale (the former design) clips the scaled V instead."""
    pipe, _, _ = flux
    cal = _cal(flux, "kv-int8", "mse")
    assert all(set(ops) == {"k"} for ops in cal.layers.values())
    entries = load_layer_calibration(cal, pipe)
    for name, q, k, v in held_out[:2]:
        out = entries[name].attention(None, q, k, v)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(entries[name].attention(None, q, k, 64 * v), 64 * out, rtol=0, atol=0)
        per_head = StaticQuant(v.abs().amax(dim=(2, 3), keepdim=True) / 127)
        static_v = {"k": cal.layers[name]["k"], "v": per_head}
        clipped = quantized_attention(q, k, 64 * v, config=cal.config, static_scales=static_v)
        assert not torch.allclose(clipped, 64 * out, rtol=0.1, atol=0)


def test_config_with_only_per_token_operands_is_refused_before_running(flux):
    pipe, _, _ = flux
    per_token = QuantConfig.preset("kv-int8").replace(k=OperandQuant("int8", mode="row"))

    def run(*_):
        raise AssertionError("the pipeline ran although there is nothing to calibrate")

    with pytest.raises(ValueError, match="per-token, mode 'row', operands stay dynamic.; nothing to calibrate"):
        calibrate(pipe, TRAIN, per_token, run=run, progress=False)


def test_calibrated_checkpoint_loads_ready_to_run(flux, tmp_path):
    from diffusers import FluxPipeline

    pipe, _, _ = flux
    cal = _cal(flux, "kv-int4", "mse")
    apply(pipe, cal.config, calibration=cal)
    try:
        with torch.no_grad():
            expected = _run(pipe, TEST[0])
        save_calibrated(pipe, tmp_path / "ckpt")
    finally:
        remove(pipe)
    loaded = load_calibrated(FluxPipeline, tmp_path / "ckpt")
    loaded.set_progress_bar_config(disable=True)
    layers = quantized_layers(loaded)
    assert {n for n, p in layers.items() if p.calibration is not None} == set(cal.layers)
    assert all(p.config == cal.config for p in layers.values())
    with torch.no_grad():
        got = _run(loaded, TEST[0])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert read_calibration(tmp_path / "ckpt").to_metadata() == cal.to_metadata()


def test_file_for_another_model_is_refused(flux, tmp_path):
    pipe, _, _ = flux
    path = save_calibration(_cal(flux, "kv-int8", "absmax"), tmp_path / "c.safetensors")
    other = tiny_flux_pipeline(num_single_layers=2)
    with pytest.raises(CalibrationError, match="different config .*a file for another model"):
        load_calibration(path, other)
    with pytest.raises(CalibrationError, match="different config"):
        apply(other, "kv-int8", calibration=path)


def test_config_other_than_the_calibrated_one_is_refused(flux):
    pipe, _, _ = flux
    cal = _cal(flux, "kv-int8", "absmax")
    apply(pipe, "kv-int4", calibration=cal)
    try:
        with pytest.raises(CalibrationError, match="operand 'k' is configured as .* calibrated for"):
            _run(pipe, TEST[0])
    finally:
        remove(pipe)
    # K's scale covers x less its own block's mean, so it depends on K's block size: another one is refused
    apply(pipe, cal.config.replace(k=dataclasses.replace(cal.config.k, block_size=16)), calibration=cal)
    try:
        with pytest.raises(CalibrationError, match="operand 'k' is configured as .*'block_size': 16"):
            _run(pipe, TEST[0])
    finally:
        remove(pipe)
    # Q's per-head scale (block mode, no means) does not depend on the block size: another one gives the same result
    cal = _cal(flux, "qk-int8-pv-fp8", "absmax")
    other_blocks = cal.config.replace(q=dataclasses.replace(cal.config.q, block_size=16))
    outs = []
    for config in (cal.config, other_blocks):
        apply(pipe, config, calibration=cal)
        try:
            with torch.no_grad():
                outs.append(_run(pipe, TEST[0]))
        finally:
            remove(pipe)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_cli_calibrates_the_tiny_flux_pipeline(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TRAIN[:2]) + "\n")
    out = tmp_path / "cli.safetensors"
    args = ["--pipeline", "tiny-flux", "--prompts", str(prompts), "--out", str(out), "--config", "kv-int4"]
    assert cli_main([*args, "--method", "percentile", "--steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "calibrating" in captured.err and "2/2" in captured.err  # the progress bar
    assert "static scales for K; V per token, dynamic at use" in captured.out
    cal = read_calibration(out)
    assert cal.config == QuantConfig.preset("kv-int4")
    assert cal.method == {"name": "percentile", "percentile": 99.9}
    assert cal.fingerprint["class"] == "FluxPipeline"
    assert len(cal.layers) == 2


def test_quantattn_processors_report_through_their_observer_hook(flux):
    """With quantattn's processors applied (no SDPA call), the same operands are recorded (fp16 preset: exact)."""
    pipe, stats, _ = flux
    apply(pipe, "fp16")
    try:
        again = collect(pipe, TRAIN, _run, progress=False)
    finally:
        remove(pipe)
    assert sorted(again.layers) == sorted(stats.layers)
    for name, layer in stats.layers.items():
        for op, st in layer.items():
            got = again.layers[name][op]
            assert got.count == st.count
            torch.testing.assert_close(got.amax, st.amax, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.mean, st.mean, rtol=1e-5, atol=1e-5)


def test_apply_with_only_a_calibration_uses_its_config(flux, tmp_path):
    pipe, _, _ = flux
    cal = _cal(flux, "kv-int4", "mse")
    path = save_calibration(cal, tmp_path / "c.safetensors")
    apply(pipe, calibration=path)
    try:
        assert {p.config for p in quantized_layers(pipe).values()} == {cal.config}
        with torch.no_grad():
            got = _run(pipe, TEST[0])
    finally:
        remove(pipe)
    apply(pipe, cal.config, calibration=cal)
    try:
        with torch.no_grad():
            want = _run(pipe, TEST[0])
    finally:
        remove(pipe)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
