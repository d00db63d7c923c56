"""Triton backend for NVIDIA GPUs: fused quantiser, prefill attention and split-KV decode kernels."""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
