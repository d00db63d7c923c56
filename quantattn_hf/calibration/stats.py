"""Statistics of Q, K and V per attention layer, gathered over calibration runs.

Per layer and operand: exact running max, min and sum per head and channel, and a uniform random
sample of token vectors (priority sampling: each token gets a random key, the smallest keys are
kept) from which percentiles and the MSE search are computed at the end.
"""

from __future__ import annotations

import torch

OPERAND_NAMES = ("q", "k", "v")
DEFAULT_MAX_SAMPLES = 2048


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0..1, linear interpolation as torch.quantile) over the last dim; no size limit."""
    n = values.shape[-1]
    if n == 0:
        return torch.zeros(values.shape[:-1])
    pos = min(max(q, 0.0), 1.0) * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    ordered = values.sort(dim=-1).values
    frac = pos - lo
    return ordered[..., lo] * (1.0 - frac) + ordered[..., hi] * frac


class OperandStats:
    """Running statistics of one operand of one layer, per head and channel."""

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples: must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.heads = 0
        self.dim = 0
        self.count = 0
        self.amax = torch.empty(0)
        self.amin = torch.empty(0)
        self.total = torch.empty(0, dtype=torch.float64)
        self.sample = torch.empty(0)
        self.keys = torch.empty(0)

    def record(self, x: torch.Tensor) -> None:
        """Add a [B, H, S, D] tensor (any device; reductions run there, only sampled tokens move to the CPU).

        Tokens holding NaN or Inf are skipped.
        """
        if x.dim() != 4:
            raise ValueError(f"expected a [B, H, S, D] tensor, got shape {tuple(x.shape)}")
        b, h, s, d = x.shape
        if self.count == 0 and self.heads == 0:
            self.heads, self.dim = h, d
            self.amax = torch.full((h, d), float("-inf"))
            self.amin = torch.full((h, d), float("inf"))
            self.total = torch.zeros((h, d), dtype=torch.float64)
            self.sample = torch.empty((h, 0, d))
            self.keys = torch.empty(0)
        elif (h, d) != (self.heads, self.dim):
            raise ValueError(f"shape changed: had {self.heads} heads x {self.dim} channels, got {h} x {d}")
        tokens = x.detach().permute(1, 0, 2, 3).reshape(h, b * s, d)
        finite = torch.isfinite(tokens).all(dim=2).all(dim=0)
        if not bool(finite.all()):
            tokens = tokens[:, finite]
        n = tokens.shape[1]
        if n == 0:
            return
        values = tokens.to(torch.float32)
        self.count += n
        self.amax = torch.maximum(self.amax, values.amax(dim=1).cpu())
        self.amin = torch.minimum(self.amin, values.amin(dim=1).cpu())
        self.total += values.sum(dim=1).cpu().to(torch.float64)
        kept = self.keys.numel()
        keys = torch.cat((self.keys, torch.rand(n, generator=self.generator)))
        keep = torch.arange(keys.numel())
        if keys.numel() > self.max_samples:
            keep = torch.topk(keys, self.max_samples, largest=False).indices.sort().values
        old, new = keep[keep < kept], keep[keep >= kept] - kept
        fresh = values[:, new.to(values.device)].cpu()
        self.keys = keys[keep]
        self.sample = torch.cat((self.sample[:, old], fresh), dim=1).contiguous()

    @property
    def mean(self) -> torch.Tensor:
        """Per head and channel mean over every recorded token, [H, D] float32."""
        return (self.total / max(self.count, 1)).to(torch.float32)

    def percentile(self, p: float, centered: bool = True) -> torch.Tensor:
        """The p-th percentile (0..100) of |x| (of |x - mean| when centered) per head and channel, from the sample."""
        vals = self.sample - self.mean[:, None, :] if centered else self.sample
        return quantile(vals.abs().transpose(1, 2), p / 100.0)


class CalibrationStats:
    """Statistics of Q, K and V for every observed layer: what `record` has been given."""

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.seed = seed
        self.layers: dict[str, dict[str, OperandStats]] = {}
        self.calls = 0

    def record(self, layer_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one attention call's [B, H, S, D] operands under `layer_name`."""
        layer = self.layers.get(layer_name)
        if layer is None:
            seed = self.seed + len(self.layers) * len(OPERAND_NAMES)
            layer = {op: OperandStats(self.max_samples, seed + i) for i, op in enumerate(OPERAND_NAMES)}
            self.layers[layer_name] = layer
        for op, x in zip(OPERAND_NAMES, (q, k, v), strict=True):
            try:
                layer[op].record(x)
            except ValueError as exc:
                raise ValueError(f"calibration: layer {layer_name!r} operand {op!r}: {exc}") from None
        self.calls += 1

    def shapes(self) -> dict[str, dict[str, list[int]]]:
        """Heads and channels of each layer's operands, {layer: {op: [H, D]}}."""
        return {
            name: {op: [st.heads, st.dim] for op, st in layer.items()} for name, layer in sorted(self.layers.items())
        }
