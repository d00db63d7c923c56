"""`quantattn-demo`: generate one image with and without quantised attention and compare them.

With no download it builds a tiny random Flux pipeline (or loads a local pipeline directory with
`--model`), generates the image with the original attention and then with each preset applied,
prints a table (time, peak memory, PSNR and relative error against the original image) and
saves the images side by side, with their amplified differences below, as one PNG.
"""

from __future__ import annotations

import argparse
import inspect
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_PRESETS = ("fp16", "kv-int8", "kv-int4", "qk-int8-pv-fp8")
BASELINE = "original"


@dataclass
class Result:
    """One generation: its label, image (H, W, 3 in [0, 1]), seconds and peak memory in MiB."""

    label: str
    image: np.ndarray
    seconds: float
    peak_mib: float


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1], computed in float64 (inf when identical)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def relative_error(image: np.ndarray, reference: np.ndarray) -> float:
    """Relative L2 error ||image - reference|| / ||reference|| in float64."""
    ref = reference.astype(np.float64)
    return float(np.linalg.norm(image.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def _rss_bytes() -> int:
    """This process's resident set size (Linux /proc, else psutil)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, else the peak of a sampled counter above its start."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._read: Callable[[], int] | None = None
        if device.type == "mps":
            self._read = torch.mps.current_allocated_memory
        elif device.type != "cuda":
            self._read = _rss_bytes

    @staticmethod
    def describe(device: torch.device) -> str:
        """What the memory column measures on this device."""
        if device.type == "cuda":
            return "peak memory: torch.cuda.max_memory_allocated during the generation"
        if device.type == "mps":
            return "peak memory: torch.mps.current_allocated_memory sampled every 2 ms, above its value at the start"
        return "peak memory: process RSS sampled every 2 ms, above its value at the start (CPU)"

    def __enter__(self) -> PeakMemory:
        if self._read is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self.peak = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc: object) -> None:
        if self._read is None:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def mib(self) -> float:
        """Peak in MiB: absolute on CUDA, above the start elsewhere."""
        base = 0 if self._read is None else self._start
        return (self.peak - base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def build_pipeline(model: str | None, device: torch.device, dtype: torch.dtype):
    """The local pipeline directory `model`, or the tiny random Flux pipeline of the demo."""
    if model is None:
        from .tiny import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(num_layers=2, num_single_layers=4, heads=4, head_dim=32, dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        with warnings.catch_warnings():  # `torch_dtype` works on every diffusers >= 0.35; 0.42 prefers `dtype`
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    return pipe.to(device)


def generate(pipe, args: argparse.Namespace, device: torch.device, bar, steps: int | None = None) -> np.ndarray:
    """One image as float32 (H, W, 3) in [0, 1]; advances `bar` once per denoising step."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"height": args.size, "width": args.size, "num_inference_steps": steps or args.steps}
    if "max_sequence_length" in params and args.model is None:
        kwargs["max_sequence_length"] = 64
    if "callback_on_step_end" in params and bar is not None:

        def on_step(_pipe, _step, _timestep, callback_kwargs):
            bar.update(1)
            return callback_kwargs

        kwargs["callback_on_step_end"] = on_step
    generator = torch.Generator("cpu").manual_seed(args.seed)
    with torch.inference_mode():
        image = pipe(args.prompt, generator=generator, output_type="np", **kwargs).images[0]
    _sync(device)
    return np.asarray(image, dtype=np.float32)


def run(pipe, label: str, args: argparse.Namespace, device: torch.device, bar) -> Result:
    """Generate once, timed, with its peak memory."""
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        image = generate(pipe, args, device, bar)
        seconds = time.perf_counter() - start
    return Result(label, image, seconds, mem.mib)


def table(results: list[Result], steps: int) -> str:
    """The comparison table, one row per run, against the first (original attention) run."""
    base = results[0].image
    header = (
        f"{'attention':<18} {'time (s)':>9} {'ms/step':>9} {'peak mem (MiB)':>15} {'PSNR (dB)':>10} {'rel err':>10}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        value = psnr(r.image, base)
        shown = "inf" if value == float("inf") else f"{value:.2f}"
        rows.append(
            f"{r.label:<18} {r.seconds:>9.3f} {1000 * r.seconds / steps:>9.1f} {r.peak_mib:>15.1f} {shown:>10} "
            f"{relative_error(r.image, base):>10.2e}"
        )
    return "\n".join(rows)


def save_grid(results: list[Result], path: Path, min_panel: int = 192) -> None:
    """The images side by side with their labels; below, |image - original| scaled to the largest difference.

    Panels smaller than `min_panel` pixels are enlarged by an integer factor (nearest neighbour).
    """
    from PIL import Image, ImageDraw

    base = results[0].image
    zoom = max(1, min_panel // max(base.shape[:2]))
    h, w = base.shape[0] * zoom, base.shape[1] * zoom
    label_h = 14
    diffs = [np.abs(r.image - base).mean(axis=-1) for r in results]
    top = max(float(d.max()) for d in diffs) or 1.0

    def panel(pixels: np.ndarray) -> Image.Image:
        return Image.fromarray(pixels).resize((w, h), Image.Resampling.NEAREST)

    canvas = Image.new("RGB", (w * len(results), 2 * (h + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (r, d) in enumerate(zip(results, diffs, strict=True)):
        canvas.paste(panel((np.clip(r.image, 0, 1) * 255).round().astype(np.uint8)), (i * w, label_h))
        heat = (np.clip(d / top, 0, 1) * 255).round().astype(np.uint8)
        canvas.paste(panel(heat).convert("RGB"), (i * w, 2 * label_h + h))
        draw.text((i * w + 2, 1), r.label, fill="black")
        gain = f"{1 / top:,.0f}" if top < 0.1 else f"{1 / top:.3g}"
        draw.text((i * w + 2, h + label_h + 1), f"|diff| x{gain}", fill="black")
    canvas.save(path)


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quantattn-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local diffusers pipeline directory (default: a tiny random Flux pipeline)")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated preset names")
    parser.add_argument("--prompt", default="a photo of a cat sitting on a red sofa")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the accelerator if any)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: bfloat16 on CUDA")
    parser.add_argument("--backend", default=None, help="quantattn backend (default: chosen by device)")
    parser.add_argument("--out", default="quantattn_demo.png", help="where to save the side-by-side PNG")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.size < 16:
        parser.error("--steps must be >= 1 and --size >= 16")
    return args


def run_demo(argv: list[str] | None = None) -> list[Result]:
    """Run the demo; returns the results (original first, then one per preset)."""
    from tqdm.auto import tqdm

    from .config import QuantConfig
    from .integrations.diffusers import apply, remove

    args = parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for name in presets:
        QuantConfig.preset(name)
    device = torch.device(args.device or _default_device())
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    prog = "python -m quantattn_hf.demo" if sys.argv[0].endswith("demo.py") else Path(sys.argv[0]).name
    print("command:", " ".join([prog, *(sys.argv[1:] if argv is None else argv)]))
    print(
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}), "
        f"dtype {dtype_name}; torch {torch.__version__}, diffusers {diffusers.__version__}, python "
        f"{platform.python_version()}"
    )
    pipe = build_pipeline(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    source = args.model or "tiny random Flux (no download)"
    print(f"pipeline: {source} ({type(pipe).__name__}), {args.size}x{args.size}, {args.steps} steps, seed {args.seed}")
    generate(pipe, args, device, None, steps=1)
    results = []
    with tqdm(total=args.steps * (1 + len(presets)), desc="denoising steps", unit="step") as bar:
        bar.set_postfix_str(BASELINE)
        results.append(run(pipe, BASELINE, args, device, bar))
        for name in presets:
            bar.set_postfix_str(name)
            apply(pipe, name, backend=args.backend)
            results.append(run(pipe, name, args, device, bar))
    remove(pipe)
    print(PeakMemory.describe(device) + "; PSNR and relative L2 error against the original attention's image")
    print(table(results, args.steps))
    out = Path(args.out)
    save_grid(results, out)
    print(f"saved {out} ({', '.join(r.label for r in results)}; below: amplified differences)")
    return results


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`quantattn-demo`): run the demo, exit status 0."""
    run_demo(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
