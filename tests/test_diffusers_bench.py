"""Smoke test of scripts/bench_flux.py on CPU (--tiny): it runs every variant, reports errors, writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_flux.py"


def test_bench_flux_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_flux", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "flux.json"
    bench.main(["--tiny", "--warmup", "0", "--iters", "1", "--json", str(out)])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert list(data["rows"]) == ["sdpa", "fp16", "kv-int8", "kv-int4", "qk-int8-pv-fp8"]
    for variant, row in data["rows"].items():
        assert "error" not in row and row["finite"] and row["ms_median"] > 0, variant
        assert variant in text
    errors = data["layer_errors"]
    assert sorted(errors["kv-int8"]) == sorted(
        ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    )
    worst = {variant: max(layers.values()) for variant, layers in errors.items()}
    # measured (float32 on CPU, reference backend): sdpa 0, fp16 9.7e-8, kv-int8 5.7e-3, kv-int4 1.0e-1, qk 2.75e-2
    assert worst["sdpa"] < 1e-6 and worst["fp16"] < 1e-6
    assert 2e-3 < worst["kv-int8"] < 1e-2 and 5e-2 < worst["kv-int4"] < 0.2 and 1e-2 < worst["qk-int8-pv-fp8"] < 5e-2
    assert "command:" in text and "target (issue 5)" in text
