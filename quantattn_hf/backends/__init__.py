"""Backends by name, and the choice of one for a device."""

from __future__ import annotations

import importlib
import warnings

import torch

from .base import AttentionCall, Backend
from .reference import ReferenceBackend

_FACTORIES: dict[str, str] = {
    "reference": "quantattn_hf.backends.reference:ReferenceBackend",
    "triton": "quantattn_hf.backends.triton:TritonBackend",
    "metal": "quantattn_hf.backends.metal:MetalBackend",
    "metal-emulated": "quantattn_hf.backends.metal:EmulatedMetalBackend",
}
_INSTANCES: dict[str, Backend] = {"reference": ReferenceBackend()}
_WARNED: set[tuple[str, str]] = set()
DEVICE_DEFAULTS = {"cuda": "triton", "mps": "metal"}


def backend_names() -> tuple[str, ...]:
    """Every backend name `backend=` accepts."""
    return tuple(_FACTORIES)


def get_backend(name: str) -> Backend:
    """The backend instance of that name (imported on first use)."""
    if name not in _FACTORIES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {', '.join(_FACTORIES)}")
    if name not in _INSTANCES:
        module_name, cls_name = _FACTORIES[name].split(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ImportError as exc:
            _warn_once(name, f"cannot be imported ({exc})")
            return _INSTANCES["reference"]
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def _warn_once(name: str, reason: str) -> None:
    if (name, reason) not in _WARNED:
        _WARNED.add((name, reason))
        warnings.warn(
            f"quantattn-hf: backend {name!r} {reason}; using the reference backend", RuntimeWarning, stacklevel=4
        )


def select_backend(call: AttentionCall, requested: str | None) -> Backend:
    """The backend that serves `call`: the requested one or the device's default, else the reference."""
    name = requested or DEVICE_DEFAULTS.get(torch.device(call.device).type, "reference")
    backend = get_backend(name)
    if backend.name == "reference":
        return backend
    if not backend.available():
        _warn_once(name, "is not available on this machine")
        return _INSTANCES["reference"]
    reason = backend.unsupported_reason(call)
    if reason is not None:
        _warn_once(name, f"cannot serve this call ({reason})")
        return _INSTANCES["reference"]
    return backend


__all__ = ["AttentionCall", "Backend", "backend_names", "get_backend", "select_backend"]
