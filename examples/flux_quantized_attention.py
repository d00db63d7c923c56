"""Flux with quantised attention: apply a preset to a pipeline, generate, then put the original attention back.

python examples/flux_quantized_attention.py                          # tiny random Flux, no download
python examples/flux_quantized_attention.py --model /path/to/FLUX.1-dev --device cuda --size 1024
"""

from __future__ import annotations

import argparse

import torch

from quantattn_hf.integrations.diffusers import FluxQuantAttnProcessor, apply, remove


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Flux pipeline directory (default: tiny random Flux)")
    parser.add_argument("--preset", default="qk-int8-pv-fp8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="flux_quantized.png")
    args = parser.parse_args()

    if args.model:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, local_files_only=True)
    else:
        from quantattn_hf.tiny import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(num_layers=2, num_single_layers=4, heads=4, head_dim=32)
    pipe.to(args.device)

    # every attention layer of every component (transformer and VAE), except the VAE's
    layers = apply(pipe, args.preset, exclude="vae.*")
    print(f"{len(layers)} layers quantised with {args.preset}, e.g. {next(iter(layers.values()))}")

    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe(
        "a photo of a cat", height=args.size, width=args.size, num_inference_steps=args.steps, generator=generator
    ).images[0]
    image.save(args.out)
    print(f"saved {args.out}")

    remove(pipe)  # the original processors, exactly
    # the same by hand, for one model: one processor instance for every layer of the transformer
    pipe.transformer.set_attn_processor(FluxQuantAttnProcessor("kv-int8"))
    remove(pipe.transformer)


if __name__ == "__main__":
    main()
