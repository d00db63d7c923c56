"""Builds the Metal-on-CPU harness: the .metal sources compiled as C++ by clang, plus the fiber runner.

The module is compiled at first use into a cache folder keyed by a hash of every source and flag, so
a fresh clone only needs `apt-get install -y clang-19` (or another clang >= 15 named by $QUANTATTN_CLANG).
`python -m quantattn_hf.backends.metal.build` builds it ahead of time and prints where.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from .sources import SHADER_FILES, native_dir, shader_dir

COMPILERS = ("clang++-19", "clang++-20", "clang++-18", "clang++-17", "clang++-16", "clang++-15")
KERNEL_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-Wno-unknown-attributes")
RUNTIME_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-pthread", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0")
HARNESS_FILES = ("emu_runtime.cpp", "emu_kernels.cpp", "emu_kernels.h", "shim/metal_stdlib")
_LOADED: dict[str, ModuleType] = {}


class HarnessBuildError(RuntimeError):
    """The harness could not be built (no suitable clang, or a compile error in the sources)."""


def find_compiler() -> str:
    """The clang++ to use: $QUANTATTN_CLANG, else the newest clang++-NN (>= 15) on PATH."""
    override = os.environ.get("QUANTATTN_CLANG")
    if override:
        if shutil.which(override) is None:
            raise HarnessBuildError(f"QUANTATTN_CLANG={override!r} is not an executable on PATH")
        return override
    for name in COMPILERS:
        if shutil.which(name):
            return name
    raise HarnessBuildError(
        "the metal-emulated backend needs clang >= 15 (for _Float16 on x86-64): "
        "on Debian/Ubuntu run `apt-get install -y clang-19`, or set QUANTATTN_CLANG to a clang++ binary"
    )


def harness_prerequisites() -> str | None:
    """None when pybind11 and the Python headers needed to build the harness are present, else what is missing."""
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (pip install pybind11)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "the Python development headers (Python.h) are missing (e.g. apt-get install -y python3-dev)"
    return None


def _cache_root() -> Path:
    base = os.environ.get("QUANTATTN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantattn_hf"
    )
    return Path(base) / "metal_emu"


def _fingerprint(compiler: str, shaders: Path, native: Path) -> str:
    h = hashlib.sha256()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(repr((KERNEL_FLAGS, RUNTIME_FLAGS, sys.version, sysconfig.get_config_var("EXT_SUFFIX"))).encode())
    extra = sorted(p for p in shaders.glob("*.metal") if p.name not in SHADER_FILES)
    for path in [*(shaders / f for f in SHADER_FILES), *extra, *(native / f for f in HARNESS_FILES), Path(__file__)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _compile(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessBuildError(f"compile failed: {' '.join(cmd)}\n{proc.stderr[-6000:]}")


def build(shaders: Path | None = None, verbose: bool = False) -> Path:
    """Compile the harness module for the given shader folder (default: the package's); returns its path."""
    compiler = find_compiler()
    missing = harness_prerequisites()
    if missing:
        raise HarnessBuildError(f"cannot build the Metal harness: {missing}")
    shaders = Path(shaders or shader_dir()).resolve()
    native = native_dir()
    key = _fingerprint(compiler, shaders, native)
    name = f"_qa_metal_emu_{key}"
    out_dir = _cache_root() / key
    target = out_dir / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: one builds, the others wait for it
        if not target.exists():
            _compile_module(compiler, shaders, native, name, target, verbose)
    return target


def _compile_module(compiler: str, shaders: Path, native: Path, name: str, target: Path, verbose: bool) -> None:
    import pybind11

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        kernels_o, runtime_o = Path(tmp, "kernels.o"), Path(tmp, "runtime.o")
        kernel_cmd = [compiler, *KERNEL_FLAGS, f"-I{native / 'shim'}", f"-I{shaders}", f"-I{native}", "-c"]
        kernel_cmd += [str(native / "emu_kernels.cpp"), "-o", str(kernels_o)]
        runtime_cmd = [compiler, *RUNTIME_FLAGS, f"-DQA_EMU_MODULE_NAME={name}", f"-I{pybind11.get_include()}"]
        runtime_cmd += [f"-I{sysconfig.get_paths()['include']}", f"-I{native}", "-c"]
        runtime_cmd += [str(native / "emu_runtime.cpp"), "-o", str(runtime_o)]
        if verbose:
            print("\n".join(" ".join(c) for c in (kernel_cmd, runtime_cmd)), file=sys.stderr)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for f in [pool.submit(_compile, c) for c in (kernel_cmd, runtime_cmd)]:
                f.result()
        partial = Path(tmp, target.name)
        _compile([compiler, "-shared", "-o", str(partial), str(kernels_o), str(runtime_o), "-lm", "-pthread"])
        os.replace(partial, target)


def load(shaders: Path | None = None) -> ModuleType:
    """The harness module for a shader folder, built if needed and imported once per process."""
    path = build(shaders)
    key = str(path)
    if key not in _LOADED:
        mod_name = path.name.split(".")[0]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise HarnessBuildError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _LOADED[key] = module
    return _LOADED[key]


def main() -> None:
    """Build the harness now (CI does this once before the tests) and print the module's path."""
    print(build(verbose=True))


if __name__ == "__main__":
    main()
