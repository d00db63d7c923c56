"""`quantattn-calibrate`: calibrate a diffusers pipeline over prompts or a transformers LM over text; write scales."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import PRESETS, QuantConfig
from .checkpoint import save_calibrated, save_calibration
from .methods import METHODS, Method
from .runner import calibrate
from .schema import CalibrationError, static_operands

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see docs/calibration.md)."""
    p = argparse.ArgumentParser(prog="quantattn-calibrate", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="a diffusers pipeline directory, or 'tiny-flux' for the built-in tiny Flux")
    src.add_argument("--model", help="a transformers causal LM directory (with its tokenizer)")
    p.add_argument("--prompts", type=Path, help="pipeline: a text file, one prompt a line")
    p.add_argument("--text", type=Path, help="model: a text file, cut into --seq-len token windows")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors calibration file to write")
    p.add_argument("--save-calibrated", type=Path, help="also write a calibrated checkpoint (directory) here")
    p.add_argument("--config", default="kv-int8", help=f"a preset ({', '.join(PRESETS)}) or a QuantConfig JSON file")
    p.add_argument("--method", choices=METHODS, default="mse")
    p.add_argument("--percentile", type=float, default=99.9, help="percentile method: the clip percentile")
    p.add_argument("--grid", type=int, default=40, help="mse method: clipping ratios searched")
    p.add_argument("--max-samples", type=int, default=2048, help="tokens kept per layer and operand for the search")
    p.add_argument("--steps", type=int, default=4, help="pipeline: denoising steps per prompt")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=512, help="model: tokens per window")
    p.add_argument("--max-windows", type=int, default=64, help="model: at most this many windows")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _config(text: str) -> QuantConfig:
    if text in PRESETS:
        return QuantConfig.preset(text)
    path = Path(text)
    if not path.is_file():
        raise SystemExit(f"--config: {text!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        return QuantConfig.from_json(path.read_text())
    except ValueError as exc:
        raise SystemExit(f"--config {path}: {exc}") from None


def _lines(path: Path | None, flag: str) -> list[str]:
    if path is None:
        raise SystemExit(f"{flag} is required")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{flag}: {path} holds no text")
    return lines


def _pipeline_job(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    dtype = DTYPES[args.dtype]
    if args.pipeline == "tiny-flux":
        from ..tiny import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(dtype=dtype)
        size = {"height": args.height or 32, "width": args.width or 32}
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype)
        size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def run(target: Any, item: tuple[int, str]) -> Any:
        index, prompt = item
        generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
        return target(prompt, num_inference_steps=args.steps, generator=generator, output_type="latent", **size)

    return pipe, list(enumerate(_lines(args.prompts, "--prompts"))), run


def _model_job(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = "\n".join(_lines(args.text, "--text"))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = [ids[i : i + args.seq_len] for i in range(0, len(ids), args.seq_len)][: args.max_windows]

    def run(target: Any, window: torch.Tensor) -> Any:
        return target(window[None].to(args.device), use_cache=False)

    return model, windows, run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `quantattn-calibrate`."""
    args = build_parser().parse_args(argv)
    config = _config(args.config)
    try:
        method = Method(args.method, percentile=args.percentile, grid=args.grid)
    except ValueError as exc:
        raise SystemExit(f"quantattn-calibrate: {exc}") from None
    target, inputs, run = _pipeline_job(args) if args.pipeline else _model_job(args)
    try:
        progress = not args.no_progress
        calibration = calibrate(target, inputs, config, method, run, max_samples=args.max_samples, progress=progress)
        save_calibration(calibration, args.out)
        if args.save_calibrated:
            save_calibrated(target, args.save_calibrated, calibration)
    except (CalibrationError, ValueError) as exc:
        print(f"quantattn-calibrate: {exc}", file=sys.stderr)
        return 1
    layers = len(calibration.layers)
    static = static_operands(config)
    dynamic = [op.upper() for op in "qkv" if getattr(config, op).quantized and op not in static]
    note = f"; {', '.join(dynamic)} per token, dynamic at use" if dynamic else ""
    print(f"wrote {args.out}: {layers} attention layer(s), config {config.name or 'custom'}, method {method.name}")
    print(f"static scales for {', '.join(op.upper() for op in static)}{note}")
    return 0
