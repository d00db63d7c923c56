"""Statistics of Q, K and V per attention layer, gathered over calibration runs.

Per layer and operand: exact running max, min and sum per head and channel; the exact max of
|x - its own block's mean| for block sizes 0 (the whole sequence) and every divisor of `span`; and
a uniform random sample of spans of `span` consecutive tokens of one sequence, aligned to multiples
of `span` (priority sampling: each span gets a random key, the smallest keys are kept), from which
percentiles and the MSE search are computed at the end. A span holds whole token blocks of every
block size that divides it, so each sampled token's block mean is known.
"""

from __future__ import annotations

import torch

from ..quant import block_mean, block_residual

OPERAND_NAMES = ("q", "k", "v")
DEFAULT_MAX_SAMPLES = 2048
DEFAULT_SPAN = 64


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

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0, span: int = DEFAULT_SPAN) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples: must be >= 1, got {max_samples}")
        if span < 1:
            raise ValueError(f"span: must be >= 1, got {span}")
        self.max_samples = max_samples
        self.span = span
        self.max_spans = max(1, max_samples // span)
        self.generator = torch.Generator().manual_seed(seed)
        self.heads = 0
        self.dim = 0
        self.count = 0
        self.amax = torch.empty(0)
        self.amin = torch.empty(0)
        self.total = torch.empty(0, dtype=torch.float64)
        self.residual_absmax: dict[int, torch.Tensor] = {}
        self.spans = torch.empty(0)
        self.lengths = torch.empty(0, dtype=torch.long)
        self.seq_means = torch.empty(0)
        self.keys = torch.empty(0)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Block sizes with residual statistics: 0 (the whole sequence) and every divisor of `span`."""
        return (0, *(b for b in range(1, self.span + 1) if self.span % b == 0))

    def record(self, x: torch.Tensor) -> None:
        """Add a [B, H, S, D] tensor (any device; reductions run there, only sampled spans move to the CPU).

        Tokens holding NaN or Inf are left out of the running max, min and sum; a block's channel holding one out
        of the residual maxima; a sequence holding one out of the sample.
        """
        if x.dim() != 4:
            raise ValueError(f"expected a [B, H, S, D] tensor, got shape {tuple(x.shape)}")
        b, h, s, d = x.shape
        if self.count == 0 and self.heads == 0:
            self.heads, self.dim = h, d
            self.amax = torch.full((h, d), float("-inf"))
            self.amin = torch.full((h, d), float("inf"))
            self.total = torch.zeros((h, d), dtype=torch.float64)
            self.residual_absmax = {bs: torch.zeros(h, d) for bs in self.block_sizes}
            self.spans = torch.empty((h, 0, self.span, d))
            self.seq_means = torch.empty((h, 0, d))
        elif (h, d) != (self.heads, self.dim):
            raise ValueError(f"shape changed: had {self.heads} heads x {self.dim} channels, got {h} x {d}")
        xf = x.detach().to(torch.float32)
        tokens = xf.permute(1, 0, 2, 3).reshape(h, b * s, d)
        finite = torch.isfinite(tokens).all(dim=2).all(dim=0)
        if not bool(finite.all()):
            tokens = tokens[:, finite]
        n = tokens.shape[1]
        if n == 0:
            return
        self.count += n
        self.amax = torch.maximum(self.amax, tokens.amax(dim=1).cpu())
        self.amin = torch.minimum(self.amin, tokens.amin(dim=1).cpu())
        self.total += tokens.sum(dim=1).cpu().to(torch.float64)
        for bs in self.block_sizes:
            r = block_residual(xf, bs)
            mag = torch.where(torch.isfinite(r), r.abs(), 0.0).amax(dim=(0, 2)).cpu()
            self.residual_absmax[bs] = torch.maximum(self.residual_absmax[bs], mag)
        self._sample_spans(xf)

    def _sample_spans(self, xf: torch.Tensor) -> None:
        """Priority-sample whole spans of the sequences without NaN or Inf, with their sequence's mean."""
        b, h, s, d = xf.shape
        ns = -(-s // self.span)
        ok = torch.isfinite(xf).flatten(1).all(dim=1).cpu().nonzero().flatten()
        if ok.numel() == 0:
            return
        seq = ok.repeat_interleave(ns)
        pos = torch.arange(ns).repeat(ok.numel())
        kept = self.keys.numel()
        keys = torch.cat((self.keys, torch.rand(seq.numel(), generator=self.generator)))
        keep = torch.arange(keys.numel())
        if keys.numel() > self.max_spans:
            keep = torch.topk(keys, self.max_spans, largest=False).indices.sort().values
        old, new = keep[keep < kept], keep[keep >= kept] - kept
        padded = torch.nn.functional.pad(xf, (0, 0, 0, ns * self.span - s)).view(b, h, ns, self.span, d)
        sb, sp = seq[new].to(xf.device), pos[new].to(xf.device)
        fresh = padded[sb, :, sp].transpose(0, 1).cpu()
        means = block_mean(xf, 0)[sb, :, 0].transpose(0, 1).cpu()
        self.keys = keys[keep]
        self.spans = torch.cat((self.spans[:, old], fresh), dim=1).contiguous()
        self.seq_means = torch.cat((self.seq_means[:, old], means), dim=1).contiguous()
        self.lengths = torch.cat((self.lengths[old], (s - pos[new] * self.span).clamp(max=self.span)))

    @property
    def mean(self) -> torch.Tensor:
        """Per head and channel mean over every recorded token, [H, D] float32."""
        return (self.total / max(self.count, 1)).to(torch.float32)

    @property
    def sample(self) -> torch.Tensor:
        """The sampled tokens, [H, N, D]: the tokens of the kept spans, in order."""
        valid = torch.arange(self.span) < self.lengths[:, None]
        return self.spans[:, valid]

    def residuals(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens less their own block's mean: the exact max of |residual| per head and channel [H, D], and the
        residuals of the sampled tokens [H, N, D]. `block_size` 0 (the whole sequence) or a divisor of `span`."""
        if block_size not in self.block_sizes:
            raise ValueError(
                f"block size {block_size}: the statistics hold spans of {self.span} tokens, which it does not "
                "divide; collect them with a span that is a multiple of it"
            )
        if block_size == 0:
            valid = torch.arange(self.span) < self.lengths[:, None]
            sample = (self.spans - self.seq_means[:, :, None, :])[:, valid]
        else:
            parts = []
            for n in self.lengths.unique().tolist():
                spans = self.spans[:, self.lengths == n, :n].transpose(0, 1)
                parts.append(block_residual(spans, block_size).transpose(0, 1).reshape(self.heads, -1, self.dim))
            sample = torch.cat(parts, dim=1) if parts else torch.empty(self.heads, 0, self.dim)
        return self.residual_absmax[block_size], sample


class CalibrationStats:
    """Statistics of Q, K and V for every observed layer: what `record` has been given."""

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0, span: int = DEFAULT_SPAN) -> None:
        self.max_samples = max_samples
        self.seed = seed
        self.span = span
        self.layers: dict[str, dict[str, OperandStats]] = {}
        self.calls = 0

    def record(self, layer_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one attention call's [B, H, S, D] operands under `layer_name`."""
        layer = self.layers.get(layer_name)
        if layer is None:
            seed = self.seed + len(self.layers) * len(OPERAND_NAMES)
            layer = {op: OperandStats(self.max_samples, seed + i, self.span) for i, op in enumerate(OPERAND_NAMES)}
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
