"""The `metal-emulated` backend: the very .metal sources, compiled as C++ and run on CPU fibers.

It exists so that CI (no Apple GPU anywhere) runs every shader kernel on real inputs: any call of
`quantized_attention(..., backend="metal-emulated")` on CPU tensors goes through the shaders. Slow by
design (each Metal thread is a fiber); meant for tests at small sizes, never for speed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import ModuleType

import torch

from ...config import OperandQuant
from ...quant import QuantizedTensor
from ..base import AttentionCall
from .build import HarnessBuildError, find_compiler, harness_prerequisites, load
from .kernels import MetalKernels

GUARD_ELEMENTS = 64


def _poison(dtype: torch.dtype) -> float | int:
    """NaN for floats; for codes a value no symmetric int8 (-127..127) or int4 byte (nibbles -7..7) holds."""
    return float("nan") if dtype.is_floating_point else (-128 if dtype == torch.int8 else 0x88)


class EmulatedMetalBackend(MetalKernels):
    """Metal kernels on CPU tensors through the fiber harness (needs clang >= 15 to build it once).

    `shaders` names another folder of the same .metal files (the tests build a deliberately broken copy).
    """

    name = "metal-emulated"
    #: scheduling seed of the fibers (each threadgroup shuffles its threads' order from it)
    seed = 0

    def __init__(self, shaders: Path | None = None) -> None:
        super().__init__(shaders)
        self._module: ModuleType | None = None
        self._available: bool | None = None
        self._guarded: list[torch.Tensor] = []
        self.threads = max(1, min(4, os.cpu_count() or 1))
        self.last_threadgroup_bytes = 0

    def available(self) -> bool:
        if self._available is None:
            try:
                find_compiler()
                self._available = harness_prerequisites() is None
            except HarnessBuildError:
                self._available = False
        return self._available

    @property
    def module(self) -> ModuleType:
        """The compiled harness (built on first use)."""
        if self._module is None:
            self._module = load(self.shaders)
        return self._module

    def _device_reason(self, device: torch.device) -> str | None:
        return None if device.type == "cpu" else f"runs on CPU tensors only, not {device.type}"

    def _new_output(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A poisoned output (NaN, or codes outside the symmetric range) inside a larger poisoned buffer.

        An element a kernel skips stays poison; a write before or after the output lands in the guard
        elements, which every later launch of this call checks.
        """
        numel = math.prod(shape)
        buf = torch.full((numel + 2 * GUARD_ELEMENTS,), _poison(dtype), dtype=dtype, device=device)
        self._guarded.append(buf)
        return buf[GUARD_ELEMENTS : GUARD_ELEMENTS + numel].view(shape)

    def quantize(self, x: torch.Tensor, spec: OperandQuant, strategy_version: int = 1) -> QuantizedTensor:
        self._guarded = []
        return super().quantize(x, spec, strategy_version)

    def attention(
        self, q: QuantizedTensor, k: QuantizedTensor, v: QuantizedTensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._guarded = []
        return super().attention(q, k, v, call)

    def _launch(self, name: str, buffers: list[torch.Tensor], n_groups: int, group_size: int) -> None:
        ptrs = [t.data_ptr() for t in buffers]
        self.last_threadgroup_bytes = self.module.launch(name, ptrs, n_groups, group_size, self.threads, self.seed)
        for buf in self._guarded:
            guards = torch.cat((buf[:GUARD_ELEMENTS], buf[-GUARD_ELEMENTS:]))
            intact = guards.isnan() if buf.dtype.is_floating_point else guards == _poison(buf.dtype)
            if not bool(intact.all()):
                raise RuntimeError(f"metal-emulated: {name} wrote outside an output buffer")
