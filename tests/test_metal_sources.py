"""scripts/check_metal_sources.py: the shaders pass it, and each rule catches what it is for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from quantattn_hf.backends.metal.sources import (
    decode_head_dims,
    forward_configs,
    library_source,
    pack_struct,
    shader_dir,
    struct_layout,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_metal_sources.py"


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_metal_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shaders_pass_the_check(checker):
    assert checker.check_dir(shader_dir()) == []
    assert checker.main(["check_metal_sources.py", str(shader_dir())]) == 0


GOOD_KERNEL = (
    "kernel void k(device float* a [[buffer(0)]], constant int& n [[buffer(1)]], QA_THREAD_IDS) { a[tid] = n; }\n"
)
PRELUDE = (
    "#include <metal_stdlib>\nusing namespace metal;\n"
    "#define QA_THREAD_IDS uint tg [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]], "
    "uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]\n"
)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("#include <vector>\n", "only <metal_stdlib>"),
        ("inline float f(float* x) { return x[0]; }\n", "without an address space"),
        ("inline float f(thread float& x) { return x; }\ninline float g(float& y) { return y; }\n", "g: pointer"),
        ("inline int f(int n) { return n > 0 ? f(n - 1) : 0; }\n", "recursion: f -> f"),
        (
            "inline int f(int n);\ninline int g(int n) { return f(n); }\ninline int f(int n) { return g(n); }\n",
            "recursion",
        ),
        ("inline void f(device float* x) { x[0] = 1; throw 1; }\n", "exceptions"),
        ("inline void f(device float* x) { float* y = new float[2]; x[0] = y[0]; }\n", "dynamic allocation"),
        ("inline float f(device float* x) { return std::max(x[0], 1.0f); }\n", "standard library"),
        ("inline void f(device float* x) { static float s = 0; x[0] = s; }\n", "static storage"),
        ("inline void f(device float* x) { double d = x[0]; x[0] = d; }\n", "double"),
        ("inline float f(device float* x) { return x[0] * 0.5; }\n", "without an f/h suffix"),
        (
            "kernel void k2(device float* a [[buffer(0)]], QA_THREAD_IDS) { threadgroup float t[4]; a[0] = t[0]; }\n",
            "QA_TG_ARRAY",
        ),
        ("kernel void k2(device float* a [[buffer(1)]], QA_THREAD_IDS) { a[0] = 1; }\n", "[[buffer(0)]]"),
        (
            "kernel void k2(device float* a [[buffer(0)]], uint t [[thread_position_in_threadgroup]]) { a[t] = 1; }\n",
            "QA_THREAD_IDS",
        ),
    ],
)
def test_each_rule_catches_a_violation(checker, snippet, message):
    assert checker.check_text(PRELUDE + GOOD_KERNEL) == []
    problems = checker.check_text(PRELUDE + GOOD_KERNEL + snippet)
    assert any(message in p for p in problems), problems


def test_host_layouts_parsed_from_the_shaders():
    text = library_source()
    layout = struct_layout("QAAttnParams", text)
    assert layout[0] == ("batch", "i") and ("scale", "f") in layout
    raw = pack_struct(layout, {name: 1 for name, _ in layout})
    assert len(raw) == 4 * len(layout)
    with pytest.raises(ValueError, match="missing"):
        pack_struct(layout, {"batch": 1})
    configs = forward_configs(text)
    assert sorted(configs) == [32, 40, 64, 80, 96, 128, 160, 256] == sorted(decode_head_dims(text))
    for d, (nsg, bk) in configs.items():
        bq = 8 * nsg
        floats = max(bq * d, 2 * bk * d) + bq * bk + nsg * 64 + 2 * bq
        assert floats * 4 <= 32 * 1024 - 5 * 64, f"head dim {d}: threadgroup memory over 32 KiB"
