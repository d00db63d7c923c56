"""The main job: `quantattn-demo` on the tiny random Flux pipeline and on a saved local pipeline directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

from PIL import Image

from quantattn_hf import demo
from quantattn_hf.tiny import tiny_flux_pipeline


def test_demo_tiny_flux(tmp_path, capsys):
    out = tmp_path / "grid.png"
    results = demo.run_demo(["--steps", "2", "--size", "32", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert [r.label for r in results] == ["original", "fp16", "kv-int8", "kv-int4", "qk-int8-pv-fp8"]
    base = results[0].image
    assert base.shape == (32, 32, 3) and base.std() > 0.1  # not a constant image (measured std 0.16)
    scores = {r.label: demo.psnr(r.image, base) for r in results}
    # measured at 32x32, 2 steps: fp16 137.2 dB, kv-int8 90.1 dB, kv-int4 65.3 dB, qk-int8-pv-fp8 74.3 dB
    assert scores["fp16"] > 120 and 86 < scores["kv-int8"] < 95
    assert 61 < scores["kv-int4"] < 70 and 70 < scores["qk-int8-pv-fp8"] < 79
    assert all(r.seconds > 0 and np.isfinite(r.peak_mib) for r in results)
    for label in scores:
        assert label in text
    assert "peak memory: process RSS" in text and "PSNR (dB)" in text
    with Image.open(out) as grid:
        assert grid.size == (5 * 192, 2 * (192 + 14))


def test_demo_local_pipeline_dir(tmp_path, capsys):
    model = tmp_path / "tiny-flux"
    tiny_flux_pipeline(seed=3).save_pretrained(model)
    args = ["--model", str(model), "--presets", "kv-int8", "--steps", "1", "--size", "32", "--device", "cpu"]
    results = demo.run_demo([*args, "--out", str(tmp_path / "x.png")])
    assert [r.label for r in results] == ["original", "kv-int8"]
    assert 87 < demo.psnr(results[1].image, results[0].image) < 96  # measured 91.1 dB
    assert str(model) in capsys.readouterr().out


def test_metrics_against_float64():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(8, 8, 3, generator=gen, dtype=torch.float64).numpy()
    b = (a + 0.01 * torch.randn(8, 8, 3, generator=gen, dtype=torch.float64).numpy()).astype(np.float32)
    mse = ((b.astype(np.float64) - a) ** 2).mean()
    assert demo.psnr(b, a) == pytest.approx(-10 * np.log10(mse), rel=1e-12)
    assert demo.relative_error(b, a) == pytest.approx(np.sqrt(((b - a) ** 2).sum() / (a**2).sum()), rel=1e-12)
    assert demo.psnr(a, a) == float("inf")


def test_console_entry_point_returns_zero(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda argv: calls.append(argv) or [])
    assert demo.main(["--steps", "1"]) == 0 and calls == [["--steps", "1"]]


def test_bad_arguments():
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match="unknown preset"):
        demo.run_demo(["--presets", "int3", "--out", "unused.png"])
