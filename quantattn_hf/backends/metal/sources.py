"""The .metal sources: where they are, their concatenation, and the layouts the host reads from them.

The parameter structs and the tile tables live once, in the shader text; the host parses them here so
that the Python side and the kernels cannot disagree on a field offset or a threadgroup size.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from pathlib import Path

SHADER_FILES = ("qa_common.metal", "qa_quantize.metal", "qa_attention.metal", "qa_decode.metal")
_REPO_ROOT = Path(__file__).resolve().parents[3]


def shader_dir() -> Path:
    """The folder holding the .metal files: $QUANTATTN_METAL_SHADERS, packaged copies, or the checkout."""
    override = os.environ.get("QUANTATTN_METAL_SHADERS")
    candidates = [Path(override)] if override else []
    candidates += [Path(__file__).resolve().parent / "shaders", _REPO_ROOT / "shaders"]
    for cand in candidates:
        if (cand / SHADER_FILES[0]).is_file():
            return cand
    raise FileNotFoundError(f"quantattn-hf: Metal shader sources not found in {', '.join(map(str, candidates))}")


def native_dir() -> Path:
    """The folder holding the harness sources (shim, fiber runner, kernel table)."""
    for cand in (Path(__file__).resolve().parent / "native", _REPO_ROOT / "native"):
        if (cand / "emu_runtime.cpp").is_file():
            return cand
    raise FileNotFoundError("quantattn-hf: native/ (the Metal harness sources) not found")


def read_sources(directory: Path | None = None) -> dict[str, str]:
    """{file name: text} of the shader files, in concatenation order."""
    base = directory or shader_dir()
    return {name: (base / name).read_text() for name in SHADER_FILES}


def library_source(directory: Path | None = None) -> str:
    """The single source handed to torch.mps.compile_shader: every shader file, in order."""
    return "\n".join(read_sources(directory).values())


@functools.lru_cache(maxsize=8)
def struct_layout(name: str, text: str) -> tuple[tuple[str, str], ...]:
    """The fields of `struct name` in `text` as (field, 'i' | 'f'), in declaration order."""
    match = re.search(r"struct\s+" + name + r"\s*\{(.*?)\};", text, re.S)
    if match is None:
        raise ValueError(f"struct {name} not found in the shader sources")
    fields = []
    for line in match.group(1).splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"(int|float)\s+(\w+);", line)
        if m is None:
            raise ValueError(f"struct {name}: unsupported field line {line!r} (one int or float per line)")
        fields.append((m.group(2), "i" if m.group(1) == "int" else "f"))
    return tuple(fields)


def pack_struct(layout: tuple[tuple[str, str], ...], values: dict[str, int | float]) -> bytes:
    """The bytes of a parameter struct; every field must be given, unknown names are errors."""
    names = [f for f, _ in layout]
    missing = set(names) - set(values)
    unknown = set(values) - set(names)
    if missing or unknown:
        raise ValueError(f"kernel params: missing {sorted(missing)}, unknown {sorted(unknown)}")
    fmt = "<" + "".join(kind for _, kind in layout)
    return struct.pack(fmt, *(float(values[f]) if k == "f" else int(values[f]) for f, k in layout))


@functools.lru_cache(maxsize=8)
def forward_configs(text: str) -> dict[int, tuple[int, int]]:
    """{head dim: (SIMD-groups per threadgroup, keys per tile)} from QA_FWD_CONFIGS."""
    rows = re.findall(r"X\((\d+),\s*(\d+),\s*(\d+)\)", _table(text, "QA_FWD_CONFIGS"))
    return {int(d): (int(n), int(bk)) for d, n, bk in rows}


@functools.lru_cache(maxsize=8)
def decode_head_dims(text: str) -> tuple[int, ...]:
    """Head dims instantiated by QA_DECODE_CONFIGS."""
    return tuple(int(d) for d in re.findall(r"X\((\d+)\)", _table(text, "QA_DECODE_CONFIGS")))


def _table(text: str, macro: str) -> str:
    match = re.search(r"#define\s+" + macro + r"\(X\)((?:[^\n]*\\\n)*[^\n]*)", text)
    if match is None:
        raise ValueError(f"{macro} not found in the shader sources")
    return match.group(1)
