"""Apple backend: Metal shaders (shaders/*.metal) on MPS, and the same shaders on CPU through a harness."""

from .emulated import EmulatedMetalBackend
from .mps import MetalBackend

__all__ = ["EmulatedMetalBackend", "MetalBackend"]
