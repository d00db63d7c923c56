"""The `metal` backend: the shaders compiled at first use by torch.mps.compile_shader, run on MPS tensors.

Written against PyTorch's documented shader API (PyTorch 2.6+): `lib.<kernel>(*tensors, threads=...,
group_size=...)` binds each tensor's buffer (with its storage offset) in argument order and dispatches
`threads` threads in threadgroups of `group_size`. Where that API is missing, the optional
Objective-C++ bridge (native/mps_bridge.mm, QUANTATTN_MPS_BRIDGE=1) does the same on PyTorch's MPS
stream. No Apple GPU was available to the authors: neither path has run (docs/metal.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from .kernels import MetalKernels
from .sources import native_dir


def _on_mps_machine() -> bool:
    return sys.platform == "darwin" and torch.backends.mps.is_available()


def _has_compile_shader() -> bool:
    return hasattr(torch, "mps") and hasattr(torch.mps, "compile_shader")


def _bridge_wanted() -> bool:
    return os.environ.get("QUANTATTN_MPS_BRIDGE") == "1"


def load_bridge(verbose: bool = False) -> Any:
    """Build (once) and import the Objective-C++ bridge through torch.utils.cpp_extension (macOS only)."""
    from torch.utils.cpp_extension import load

    build_dir = Path(os.environ.get("QUANTATTN_CACHE") or Path.home() / ".cache" / "quantattn_hf") / "mps_bridge"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="quantattn_hf_mps_bridge",
        sources=[str(native_dir() / "mps_bridge.mm")],
        extra_cflags=["-std=c++17"],
        extra_ldflags=["-framework", "Metal", "-framework", "Foundation"],
        build_directory=str(build_dir),
        verbose=verbose,
    )


class _BridgeLibrary:
    """torch.mps.compile_shader's calling convention on top of the bridge's Library.launch."""

    def __init__(self, source: str) -> None:
        self._lib = load_bridge().Library(source)

    def __getattr__(self, name: str) -> Any:
        def dispatch(*tensors: torch.Tensor, threads: int, group_size: int) -> None:
            self._lib.launch(name, list(tensors), threads // group_size, group_size)

        return dispatch


class MetalBackend(MetalKernels):
    """Metal kernels on MPS tensors; `available()` is False anywhere but macOS with MPS."""

    name = "metal"

    def __init__(self, shaders: Path | None = None) -> None:
        super().__init__(shaders)
        self._lib: Any = None

    def available(self) -> bool:
        return _on_mps_machine() and (_has_compile_shader() or _bridge_wanted())

    def _device_reason(self, device: torch.device) -> str | None:
        return None if device.type == "mps" else f"runs on MPS tensors only, not {device.type}"

    @property
    def library(self) -> Any:
        """The compiled shader library (compiled once, at first use)."""
        if self._lib is None:
            if _has_compile_shader() and not _bridge_wanted():
                self._lib = torch.mps.compile_shader(self.source)
            else:
                self._lib = _BridgeLibrary(self.source)
        return self._lib

    def _launch(self, name: str, buffers: list[torch.Tensor], n_groups: int, group_size: int) -> None:
        kernel = getattr(self.library, name)
        kernel(*buffers, threads=n_groups * group_size, group_size=group_size)
