"""Static scales (absmax vs percentile vs mse) against dynamic scales, per preset, on unseen inputs.

Calibrates the tiny random Flux pipeline (4 prompts) and a tiny random Llama (4 batches of random
tokens), then measures on inputs not used for calibration: Flux, the relative L1 error of the final
latents against the unquantised pipeline; Llama, the relative L1 error of every attention output
against float64 SDPA. Per-token (`row`) operands, e.g. V of the kv presets, get no static scale and
stay dynamic; mean-subtracting operands (K) take their block means at run time. A second table:
the relative squared quantisation error of each INT4 operand that has static scales, on the unseen
calls, by method. Prints the command, device, versions and markdown tables (docs/calibration.md).

    python scripts/calibration_table.py
"""

from __future__ import annotations

import platform
import sys
import time

import torch

from quantattn_hf import OperandQuant, QuantConfig, quantized_attention
from quantattn_hf.calibration import CalibrationStats, collect, compute_calibration, model_fingerprint
from quantattn_hf.integrations.diffusers import apply, remove
from quantattn_hf.quant import quantize
from quantattn_hf.tiny import tiny_flux_pipeline

METHODS = ("absmax", "percentile", "mse")
CONFIGS = {
    "kv-int8": QuantConfig.preset("kv-int8"),
    "kv-int4": QuantConfig.preset("kv-int4"),
    "kv-int4-v8": QuantConfig.preset("kv-int4-v8"),
    "qk-int8-pv-fp8": QuantConfig.preset("qk-int8-pv-fp8"),
    "qk-int4-pv-fp8 (qk-int8-pv-fp8, Q and K in int4)": QuantConfig.preset("qk-int8-pv-fp8").replace(
        q=OperandQuant("int4", mode="block", block_size=64),
        k=OperandQuant("int4", mode="block", block_size=64, subtract_mean=True),
    ),
}
TRAIN = ["a photo of a cat", "a red car on a street", "mountains at sunset", "a bowl of fruit"]
TEST = ["a dog in the snow", "an old castle", "city skyline at night"]


def _flux_run(pipe, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, output_type="latent", generator=g).images


class _Recorder(CalibrationStats):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(self, layer_name, q, k, v) -> None:
        self.seen.append((layer_name, q.clone(), k.clone(), v.clone()))


def operand_rows(model: str, stats, seen, fingerprint) -> list[tuple[str, str, str, dict[str, float]]]:
    """(model, config, operand, {method: relative squared quantisation error}) of each static INT4 operand."""
    rows = []
    for name, cfg in CONFIGS.items():
        cals = {m: compute_calibration(stats, cfg, m, fingerprint).layers for m in METHODS}
        for i, op in enumerate("qkv"):
            spec = getattr(cfg, op)
            if spec.precision != "int4" or op not in next(iter(cals["mse"].values())):
                continue
            errors = {}
            for m, layers in cals.items():
                err = total = 0.0
                for layer, *ops in seen:
                    x = ops[i]
                    err += (quantize(x, spec, static=layers[layer][op]).dequantize(torch.float32) - x).square().sum()
                    total += x.square().sum()
                errors[m] = (err / total).item()
            rows.append((model, name, op.upper(), errors))
    return rows


def flux_rows() -> tuple[list[tuple[str, str, float, dict[str, float]]], list]:
    """(model, config, dynamic error, {method: static error}) for the tiny Flux pipeline, and its operand rows."""
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stats = collect(pipe, TRAIN, _flux_run, progress=False)
    seen = collect(pipe, TEST, _flux_run, stats=_Recorder(), progress=False).seen
    with torch.no_grad():
        ref = [_flux_run(pipe, p) for p in TEST]

    def error(config, calibration=None) -> float:
        apply(pipe, config, calibration=calibration)
        with torch.no_grad():
            outs = [_flux_run(pipe, p) for p in TEST]
        remove(pipe)
        return (
            sum((o - r).abs().sum() for o, r in zip(outs, ref, strict=True)) / sum(r.abs().sum() for r in ref)
        ).item()

    rows = []
    for name, cfg in CONFIGS.items():
        fp = model_fingerprint(pipe)
        static = {m: error(cfg, compute_calibration(stats, cfg, m, fp)) for m in METHODS}
        rows.append(("tiny Flux (final latents)", name, error(cfg), static))
    return rows, operand_rows("tiny Flux", stats, seen, model_fingerprint(pipe))


def llama_rows() -> tuple[list[tuple[str, str, float, dict[str, float]]], list]:
    """(model, config, dynamic error, {method: static error}) for a tiny random Llama, and its operand rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    train = [torch.randint(3, 300, (2, 64), generator=g) for _ in range(4)]
    test = [torch.randint(3, 300, (2, 64), generator=g) for _ in range(3)]

    def forward(m, ids):
        return m(ids, use_cache=False)

    stats = collect(model, train, forward, progress=False)
    seen = collect(model, test, forward, stats=_Recorder(), progress=False).seen

    def error(cfg, layers=None) -> float:
        err = total = 0.0
        for name, q, k, v in seen:
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
            )
            static = None if layers is None else layers[name]
            out = quantized_attention(q, k, v, config=cfg, is_causal=True, enable_gqa=True, static_scales=static)
            err += (out.double() - ref).abs().sum().item()
            total += ref.abs().sum().item()
        return err / total

    rows = []
    for name, cfg in CONFIGS.items():
        fp = model_fingerprint(model)
        static = {m: error(cfg, compute_calibration(stats, cfg, m, fp).layers) for m in METHODS}
        rows.append(("tiny Llama (attention outputs)", name, error(cfg), static))
    return rows, operand_rows("tiny Llama", stats, seen, model_fingerprint(model))


def main() -> None:
    """Print the header lines and the table."""
    start = time.time()
    torch.set_num_threads(1)
    (flux, flux_ops), (llama, llama_ops) = flux_rows(), llama_rows()
    import diffusers
    import transformers

    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: CPU ({platform.processor() or platform.machine()}), 1 thread")
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    print(f"versions: {versions}")
    print("error: relative L1 on inputs not used for calibration (lower is better); method defaults")
    print()
    print(
        "| model | config | dynamic | static absmax | static percentile (99.9) | static mse | best static / dynamic |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, cfg, dynamic, static in flux + llama:
        best = min(static.values())
        cells = " | ".join(f"{static[m]:.3e}" for m in METHODS)
        print(f"| {model} | {cfg} | {dynamic:.3e} | {cells} | {best / dynamic:.2f}x |")
    print("\nINT4 operands with static scales: relative squared quantisation error on the unseen calls\n")
    print("| model | config | operand | absmax | percentile (99.9) | mse | percentile / absmax | mse / absmax |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, cfg, op, e in flux_ops + llama_ops:
        cells = " | ".join(f"{e[m]:.3e}" for m in METHODS)
        ratios = f"{e['percentile'] / e['absmax']:.2f}x | {e['mse'] / e['absmax']:.2f}x"
        print(f"| {model} | {cfg} | {op} | {cells} | {ratios} |")
    print(f"\n({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
