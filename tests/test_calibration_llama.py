"""Calibration end to end on a tiny random Llama: measure, save, reload, static-scale attention on unseen tokens."""

import pytest
import torch
from conftest import Recorder

from quantattn_hf import QuantConfig, quantized_attention
from quantattn_hf.calibration import (
    CalibrationError,
    collect,
    compute_calibration,
    load_calibrated,
    load_calibration,
    model_fingerprint,
    read_calibration,
    save_calibrated,
    save_calibration,
)
from quantattn_hf.calibration.cli import main as cli_main
from quantattn_hf.integrations.kv_cache import QuantizedKVCache
from quantattn_hf.integrations.transformers import configure
from quantattn_hf.quant import quantize

LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def _llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _forward(model, ids):
    return model(ids, use_cache=False)


@pytest.fixture(scope="module")
def llama():
    """The model, its statistics over 4 training batches and the operands of 3 unseen batches."""
    model = _llama()
    g = torch.Generator().manual_seed(1)
    train = [torch.randint(3, 300, (2, 64), generator=g) for _ in range(4)]
    test = [torch.randint(3, 300, (2, 64), generator=g) for _ in range(3)]
    stats = collect(model, train, _forward, progress=False)
    held_out = collect(model, test, _forward, stats=Recorder(), progress=False).seen
    return model, stats, held_out, test


def _cal(llama, config, method):
    model, stats, _, _ = llama
    config = QuantConfig.preset(config) if isinstance(config, str) else config
    return compute_calibration(stats, config, method, model_fingerprint(model))


def _attention_error(held_out, config, static_by_layer=None) -> float:
    """Relative L1 error against float64 SDPA over every unseen call, with dynamic or static scales."""
    err = ref_sum = 0.0
    for name, q, k, v in held_out:
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
        )
        static = None if static_by_layer is None else static_by_layer[name]
        out = quantized_attention(q, k, v, config=config, is_causal=True, enable_gqa=True, static_scales=static)
        err += (out.double() - ref).abs().sum().item()
        ref_sum += ref.abs().sum().item()
    return err / ref_sum


def test_stats_see_kv_heads_before_gqa_repeat(llama):
    _, stats, held_out, _ = llama
    assert sorted(stats.layers) == LAYERS
    for layer in stats.layers.values():
        assert (layer["q"].heads, layer["k"].heads, layer["v"].heads) == (4, 2, 2)
        assert layer["k"].count == 4 * 2 * 64
    assert [name for name, *_ in held_out] == LAYERS * 3


def test_save_reload_byte_identical(llama, tmp_path):
    model = llama[0]
    cal = _cal(llama, "kv-int8", "mse")
    loaded = load_calibration(save_calibration(cal, tmp_path / "c.safetensors"), model)
    for name in LAYERS:
        assert set(loaded[name]) == {"k"}  # V is held per token: no static scale, dynamic at use
        assert loaded[name]["k"].scale.numpy().tobytes() == cal.layers[name]["k"].scale.numpy().tobytes()
        assert loaded[name]["k"].mean is None and cal.layers[name]["k"].mean is None  # block means at run time


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int4", "kv-int4-v8", "qk-int8-pv-fp8"])
def test_static_scales_within_1_2x_of_dynamic_on_unseen_tokens(llama, preset):
    """Measured (relative L1 of attention outputs vs float64, mse static vs dynamic): kv-int8 3.670e-3 vs 3.665e-3
    (1.00x), kv-int4 6.417e-2 vs 6.412e-2 (1.00x), kv-int4-v8 4.13e-3 vs 4.01e-3 (1.03x), qk-int8-pv-fp8 2.55e-2 vs
    2.46e-2 (1.04x). The kv presets' V (per token) stays dynamic; with a static per-head V scale they measured
    1.90x, 1.36x and 1.80x."""
    _, _, held_out, _ = llama
    cfg = QuantConfig.preset(preset)
    cal = _cal(llama, cfg, "mse")
    dynamic, static = _attention_error(held_out, cfg), _attention_error(held_out, cfg, cal.layers)
    assert 0 < static <= 1.2 * dynamic, (static, dynamic)


def test_int4_percentile_and_mse_beat_absmax(llama):
    """kv-int4's static K on unseen tokens, relative squared quantisation error: measured absmax 1.67e-2,
    percentile 1.56e-2 (0.94x), mse 1.27e-2 (0.76x). (In the attention outputs the three agree within 0.1%:
    V's dynamic INT4 error dominates.)"""
    _, _, held_out, _ = llama
    cfg = QuantConfig.preset("kv-int4")
    errors = []
    for method in ("absmax", "percentile", "mse"):
        layers = _cal(llama, cfg, method).layers
        err = total = 0.0
        for name, _, k, _ in held_out:
            err += (quantize(k, cfg.k, static=layers[name]["k"]).dequantize(torch.float32) - k).square().sum().item()
            total += k.square().sum().item()
        errors.append(err / total)
    absmax, percentile, mse = errors
    assert percentile < 0.96 * absmax and mse < 0.8 * absmax, errors


def _logits_with_cache(model, ids, cfg, static):
    with torch.no_grad():
        return model(ids, past_key_values=QuantizedKVCache(model, cfg, static_scales=static)).logits


def test_single_file_checkpoint_restores_weights_and_scales(llama, tmp_path):
    model, _, _, test = llama
    cal = _cal(llama, "kv-int4", "mse")
    path = save_calibrated(model, tmp_path / "llama.safetensors", cal)
    fresh = _llama(seed=5)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    load_calibrated(fresh, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.config._attn_implementation == "quantattn"
    by_index = fresh.quantattn_static_scales
    assert sorted(by_index) == [0, 1]
    for i, name in enumerate(LAYERS):
        attached = fresh.get_submodule(name).quantattn_static_scales
        assert set(attached) == {"k"}  # V per token: dynamic in the attention function and the cache
        assert attached["k"].scale.numpy().tobytes() == cal.layers[name]["k"].scale.numpy().tobytes()
        assert by_index[i]["k"] is attached["k"]
    static = {i: cal.layers[name] for i, name in enumerate(LAYERS)}
    configure(model, cal.config)
    try:
        expected = _logits_with_cache(model, test[0], cal.config, static)
    finally:
        model.set_attn_implementation("sdpa")
    got = _logits_with_cache(fresh, test[0], cal.config, by_index)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_calibrated_cache_takes_each_blocks_own_mean(llama):
    """The cache quantises K with the static scale and each 32-token block's own mean (kv-int4; the scale covers
    residuals about 32-token blocks, so the cache keeps that block size instead of its default 128): layer 0's keys,
    recorded without quantisation (they depend on the embeddings only), against float64 block means."""
    model, _, _, test = llama
    cal = _cal(llama, "kv-int4", "mse")
    ids = test[0][:, :40]
    with torch.no_grad():
        k = collect(model, [ids], _forward, stats=Recorder(), progress=False).seen[0][2]
        cache = QuantizedKVCache(model, cal.config, static_scales={0: cal.layers[LAYERS[0]]})
        model(ids, past_key_values=cache)
    assert (
        cache.quant_config.k.block_size == 32 and QuantizedKVCache(model, cal.config).quant_config.k.block_size == 128
    )
    held = cache.layers[0].held()[0]
    assert held.shape == (2, 2, 32, 16)  # the one whole block; the 8 newest tokens stay 16-bit
    block = k[:, :, :32].double()
    mean = block.mean(dim=2, keepdim=True)
    torch.testing.assert_close(held.mean.double(), mean, rtol=0, atol=1e-6)
    scale = cal.layers[LAYERS[0]]["k"].scale.double()
    assert torch.equal(held.scale, cal.layers[LAYERS[0]]["k"].scale.expand(2, 2, 1, 16))
    codes = torch.round((block - mean) / scale).clamp(-7, 7)
    assert (held.codes().double() - codes).abs().max() <= 1 and (held.codes().double() != codes).double().mean() < 0.01


def test_save_pretrained_checkpoint_and_another_model(llama, tmp_path):
    from transformers import LlamaForCausalLM

    model = llama[0]
    cal = _cal(llama, "kv-int8", "percentile")
    save_calibrated(model, tmp_path / "ckpt", cal)
    loaded = load_calibrated(LlamaForCausalLM, tmp_path / "ckpt")
    assert loaded.config._attn_implementation == "quantattn"
    assert read_calibration(tmp_path / "ckpt").to_metadata() == cal.to_metadata()
    with pytest.raises(CalibrationError, match="different config .*a file for another model"):
        load_calibrated(_llama(layers=3), tmp_path / "ckpt")
    with pytest.raises(CalibrationError, match="calibration is for a 'LlamaForCausalLM', not this 'FluxPipeline'"):
        from quantattn_hf.tiny import tiny_flux_pipeline

        load_calibration(tmp_path / "ckpt", tiny_flux_pipeline())


def test_cli_calibrates_a_saved_model_over_text(llama, tmp_path):
    from quantattn_hf.tiny import byte_tokenizer

    model = llama[0]
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer(512).save_pretrained(tmp_path / "m")
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 6)
    out = tmp_path / "llm.safetensors"
    args = ["--model", str(tmp_path / "m"), "--text", str(text), "--out", str(out), "--seq-len", "64"]
    assert cli_main([*args, "--config", "kv-int4", "--method", "absmax", "--no-progress"]) == 0
    cal = read_calibration(out)
    assert sorted(cal.layers) == LAYERS and cal.method == {"name": "absmax"}
    load_calibration(out, model)


def test_loaded_checkpoint_runs_static_scales_with_no_further_step(llama, tmp_path):
    from transformers import AttentionInterface, LlamaForCausalLM

    model, _, _, test = llama
    cal = _cal(llama, "kv-int4", "mse")
    save_calibrated(model, tmp_path / "ckpt", cal)
    loaded = load_calibrated(LlamaForCausalLM, tmp_path / "ckpt")
    names = {id(m): n for n, m in loaded.named_modules()}

    def expected_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """The semantics wanted: quantized_attention with this layer's calibrated scales (causal, no mask)."""
        out = quantized_attention(
            query,
            key,
            value,
            config=cal.config,
            is_causal=True,
            scale=scaling,
            enable_gqa=True,
            static_scales=cal.layers[names[id(module)]],
        )
        return out.transpose(1, 2).contiguous(), None

    with torch.no_grad():
        got = loaded(test[0], use_cache=False).logits
        got_cache = loaded(test[0], past_key_values=QuantizedKVCache(loaded)).logits
        explicit = {i: cal.layers[name] for i, name in enumerate(LAYERS)}
        want_cache = loaded(test[0], past_key_values=QuantizedKVCache(loaded, static_scales=explicit)).logits
        AttentionInterface.register("calibration_test_expected", expected_attention)
        loaded.set_attn_implementation("calibration_test_expected")
        want = loaded(test[0], use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_cache, want_cache, rtol=0, atol=0)


def test_observing_leaves_the_outputs_unchanged_with_padding(llama):
    """The observer's attention function gets SDPA's masks: a padded batch gives the same logits as without it."""
    from quantattn_hf.calibration import observe

    model = llama[0]
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        with observe(model) as stats:
            got = model(ids, attention_mask=mask, use_cache=False).logits
    assert model.config._attn_implementation == "sdpa"
    assert stats.layers[LAYERS[0]]["k"].count == 48
    torch.testing.assert_close(got, want, rtol=0, atol=0)
