"""Shared test helpers: float64 attention, error measures, random inputs with outlier channels."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import settings

# CI draws the same examples on every run (a failure there is reproducible); locally they vary.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per test worker: oversubscribed threads slow small CPU ops by 30x or more
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be chosen before any
    # @triton.jit decorates (transformers imports triton, so this comes first).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantattn_hf.calibration import CalibrationStats  # noqa: E402  (after TRITON_INTERPRET is chosen)


def sdpa64(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """float64 attention (torch's math) with bottom-right aligned causal masking; BHSD."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    if enable_gqa and q.shape[1] != k.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    if is_causal:
        sq, sk = q.shape[2], k.shape[2]
        keep = torch.arange(sk).unsqueeze(0) <= torch.arange(sq).unsqueeze(1) + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return p @ v


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L1 error sum|out - ref| / sum|ref| (float64)."""
    out, ref = out.to(torch.float64), ref.to(torch.float64)
    return float((out - ref).abs().sum() / ref.abs().sum())


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (float64)."""
    return float(torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0))


def outlier_keys(k: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Keys with a few channels 10-30x larger, as real transformer keys have."""
    k = k.clone()
    d = k.shape[-1]
    chans = torch.randperm(d, generator=gen)[:3]
    factors = 10 + 20 * torch.rand(3, generator=gen, dtype=torch.float64)
    k[..., chans] *= factors.to(k.dtype)
    return k


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


class Recorder(CalibrationStats):
    """Calibration statistics that keep every call's operands, for measuring error on unseen calls."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def record(self, layer_name, q, k, v):
        self.seen.append((layer_name, q.clone(), k.clone(), v.clone()))
