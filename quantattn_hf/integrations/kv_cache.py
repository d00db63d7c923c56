"""`QuantizedKVCache`: a transformers Cache whose layers hold K and V quantised, read in place by the kernels.

Each layer keeps the keys and values of complete token blocks as quantised codes plus their
statistics (the `QuantizedTensor` layout of docs/quantization.md), and the newest tokens (the
partial last block, plus an optional `residual_length` window as KIVI does) in 16-bit. `update`
returns a pair of `CacheHandle` placeholders (zero-stride views, no memory); the `quantattn`
attention function recognises them, runs `quantized_attention` over the quantised blocks as held
`QuantizedTensor`s (the fused kernels read the codes in place) and merges the 16-bit window into
that result through its log-sum-exp (`attend_window`). The cache is never dequantised into a
16-bit copy on that path; any other attention implementation that touches a handle gets the
dequantised states (correct, slow, with a warning).

Blocks: K is quantised per channel within blocks of `block_size` tokens, which need all their
tokens, so a block is quantised once it is complete; V (per token) follows in the same steps.
Sliding-window layers drop whole blocks that no present or future query can see. `crop` through
a quantised block moves that block's surviving tokens back into the 16-bit window (as dequantised
values, i.e. what attention saw), to be quantised again when the block fills.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..attention import quantized_attention, select_backend_for_quantiser
from ..backends.reference import CHUNK_ELEMENTS, causal_keep, fully_masked_value, round_p
from ..config import OperandQuant, QuantConfig, resolve_config
from ..quant import QuantizedTensor, StaticQuant, quantize

PARTS = ("data", "scale", "zero_point", "mean")
DEFAULT_BLOCK = 128
_FULLY_MASKED = float(fully_masked_value(torch.float32, torch.device("cpu")))
_FILL_IS_FINITE = math.isfinite(_FULLY_MASKED)


def append_group(spec: OperandQuant) -> int:
    """Tokens appended at a time so that no statistic group of `spec` straddles two appends."""
    if not spec.quantized or spec.mode == "row":
        return 1
    if spec.mode == "tensor" or spec.block_size == 0:
        raise ValueError(
            f"QuantizedKVCache: mode {spec.mode!r} with block_size {spec.block_size} covers the whole sequence, "
            "so a growing cache cannot hold it; use mode 'row', or 'channel'/'block' with block_size > 0"
        )
    return spec.block_size


def cache_config(
    config: QuantConfig | str | None, block_size: int | None, keep: frozenset[str] = frozenset()
) -> QuantConfig:
    """The config a cache holds K/V by: `config` with K (and V, if grouped) blocks of `block_size` tokens, except
    the operands in `keep`."""
    cfg = resolve_config(config)
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: must be a positive int, got {block_size!r}")
        changes = {
            op: OperandQuant(**{**spec.to_dict(), "block_size": block_size})
            for op, spec in (("k", cfg.k), ("v", cfg.v))
            if spec.quantized and spec.mode in ("channel", "block") and spec.block_size != block_size and op not in keep
        }
        if changes:
            cfg = cfg.replace(**changes)
    append_group(cfg.k)
    append_group(cfg.v)
    return cfg


def attend_window(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    config: QuantConfig,
    q_static: StaticQuant | None = None,
    held: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention over 16-bit window keys, merged with the attention over the held blocks in one softmax.

    `held` is the (out, lse) of the quantised segment: it enters the softmax as one more key whose logit
    is its lse and whose value is its output, which is the exact merge of the two segments. P of the
    window keys is rounded to the config's P format as the contract says. Plain torch ops: the window
    has fewer than block + residual_length keys, so a kernel launch would cost more than the work.
    Query rows go in chunks so the score tensor stays small for long prefills.
    """
    b, hq, sq, d = query.shape
    hkv, w, dv = keys.shape[1], keys.shape[2], values.shape[3]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query
    if config.q.quantized:
        q = quantize(query, config.q, config.strategy_version, q_static).dequantize(compute)
    kt = keys.to(compute).transpose(-1, -2)
    vf = values.to(compute)
    rows = max(1, CHUNK_ELEMENTS // max(1, b * hq * (w + 1)))
    outs = []
    for start in range(0, sq, rows):
        stop = min(sq, start + rows)
        n = stop - start
        qc = q[:, :, start:stop].to(compute).reshape(b, hkv, g * n, d)
        s = torch.matmul(qc, kt).mul_(scale)
        if mask is not None:
            mc = mask[..., start:stop, :].expand(b, hq, n, w).reshape(b, hkv, g * n, w)
            s = s.masked_fill(~mc, float("-inf")) if mc.dtype == torch.bool else s + mc.to(compute)
        if held is not None:
            lse = held[1][:, :, start:stop].to(compute).reshape(b, hkv, g * n, 1)
            s = torch.cat([lse, s], dim=-1)
        m = s.amax(dim=-1, keepdim=True)
        p = torch.exp(s - torch.nan_to_num(m, nan=math.nan, neginf=0.0))  # rows with no key: m = -inf
        denom = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(round_p(p[..., -w:], config.p).to(compute), vf)
        if held is not None:
            o1 = held[0][:, :, start:stop].to(compute).reshape(b, hkv, g * n, dv)
            out = out + p[..., :1] * (o1 if _FILL_IS_FINITE else torch.nan_to_num(o1))
        if _FULLY_MASKED == 0.0:  # a row with no key has out = 0 and denom = 0; any other has denom >= 1
            out = out / denom.clamp_min(1e-30)
        else:
            out = torch.where(denom > 0, out / denom, _FULLY_MASKED)
        outs.append(out.reshape(b, hq, n, dv))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(query.dtype)


class CacheHandle(torch.Tensor):
    """A zero-stride placeholder for a layer's keys or values: what `update` returns instead of a 16-bit copy."""

    layer: QuantizedKVLayer
    which: str
    version: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if getattr(func, "__name__", "") in ("__get__", "size", "dim", "numel", "stride", "is_contiguous"):
                return func(*args, **kwargs)
        args, kwargs = torch.utils._pytree.tree_map_only(CacheHandle, _materialize, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _materialize(handle: CacheHandle) -> torch.Tensor:
    """The dequantised states behind a handle, for attention implementations other than quantattn."""
    warnings.warn(
        "QuantizedKVCache is read by an attention implementation other than 'quantattn', so each layer's "
        "cache is dequantised into a 16-bit copy on every step; use attn_implementation='quantattn' "
        "(quantattn_hf.configure(model)) to read it in place",
        RuntimeWarning,
        stacklevel=4,
    )
    handle.layer.check_handle(handle)
    return handle.layer.dequantized(handle.which)


class QuantizedKVLayer(CacheLayerMixin):
    """One layer's cache: quantised complete blocks of K and V, plus the newest tokens in 16-bit."""

    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        config: QuantConfig,
        layer_idx: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        residual_length: int = 0,
        sliding_window: int | None = None,
        static: Mapping[str, StaticQuant] | None = None,
    ):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.residual_length = residual_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.static = dict(static or {})
        g_k, g_v = append_group(config.k), append_group(config.v)
        self.group = g_k * g_v // math.gcd(g_k, g_v)
        self._reset_state()

    def _reset_state(self) -> None:
        self.keys = self.values = None
        self.k_parts: dict[str, torch.Tensor | None] = {}
        self.v_parts: dict[str, torch.Tensor | None] = {}
        self.n_quant = 0
        self.offset = 0
        self.version = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch = key_states.shape[0]
        empty = key_states[:, :, :0]
        self.keys, self.values = empty.clone(), value_states[:, :, :0].clone()
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t in (("key", key_states), ("value", value_states)):
            if t.dim() != 4 or t.shape[1] != self.kv_heads or t.shape[3] != self.head_dim:
                raise ValueError(
                    f"QuantizedKVCache layer {self.layer_idx}: made for a model with {self.kv_heads} key/value "
                    f"heads of dim {self.head_dim}, but got {name} states of shape {tuple(t.shape)} "
                    "([B, heads, tokens, dim]); make the cache for this model"
                )
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(f"key and value states differ: {tuple(key_states.shape)} vs {tuple(value_states.shape)}")
        if self.is_initialized and self.get_seq_length() > 0 and key_states.shape[0] != self.batch:
            raise ValueError(f"QuantizedKVCache: batch size {key_states.shape[0]}, but the cache holds {self.batch}")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens (quantising blocks that fill up); return handles the attention function reads."""
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.batch = key_states.shape[0]
        self._drop_front(self._droppable())
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self._flush()
        self.version += 1
        return self._handle("k"), self._handle("v")

    def _handle(self, which: str) -> CacheHandle:
        dim = self.head_dim
        base = self._zero.expand(self.batch, self.kv_heads, self.kept, dim)
        handle = base.as_subclass(CacheHandle)
        handle.layer, handle.which, handle.version = self, which, self.version
        return handle

    def check_handle(self, handle: CacheHandle) -> None:
        """Raise if a handle is read after the layer moved on (a later update, crop or reorder)."""
        if handle.version != self.version:
            raise RuntimeError(
                f"QuantizedKVCache layer {self.layer_idx}: a key/value handle from an earlier step was read after the "
                "cache changed; read the handles `update` returns before the next update"
            )

    @property
    def kept(self) -> int:
        """Tokens held now (quantised + 16-bit)."""
        return self.n_quant + (self.keys.shape[2] if self.keys is not None else 0)

    def _quantize(self, x: torch.Tensor, which: str) -> QuantizedTensor:
        """Quantise a whole-block slice: calibrated statistics if given, else the device backend's quantiser."""
        spec = self.config.k if which == "k" else self.config.v
        static = self.static.get(which)
        if static is not None:
            return quantize(x, spec, self.config.strategy_version, static)
        return select_backend_for_quantiser(x, "").quantize(x.contiguous(), spec, self.config.strategy_version)

    def _flush(self) -> None:
        """Quantise the oldest whole blocks of the 16-bit window beyond `residual_length` tokens."""
        extra = self.keys.shape[2] - self.residual_length
        n = (extra // self.group) * self.group if extra > 0 else 0
        if n == 0:
            return
        for which, src in (("k", self.keys), ("v", self.values)):
            qt = self._quantize(src[:, :, :n], which)
            parts = self.k_parts if which == "k" else self.v_parts
            for name in PARTS:
                new = getattr(qt, name)
                old = parts.get(name)
                parts[name] = new if old is None or new is None else torch.cat([old, new], dim=2)
        self.n_quant += n
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def _stat_tokens(self, spec: OperandQuant) -> int:
        """Tokens per row of a statistic along dim 2 (1 for per-token, block_size for grouped)."""
        return spec.block_size if spec.quantized and spec.mode in ("channel", "block") else 1

    def _range(self, parts: dict[str, torch.Tensor | None], spec: OperandQuant, start: int, stop: int) -> dict:
        """Views of the quantised tokens [start, stop) (start block aligned): codes by token, statistics by block."""
        t = self._stat_tokens(spec)
        out = {}
        for name, tensor in parts.items():
            if tensor is None or name == "data":
                out[name] = None if tensor is None else tensor[:, :, start:stop]
            else:
                out[name] = tensor[:, :, start // t : math.ceil(stop / t)]
        return out

    def _slice_parts(self, start: int, stop: int) -> None:
        """Keep quantised tokens [start, stop) (block aligned) of both K and V."""
        self.k_parts = self._range(self.k_parts, self.config.k, start, stop)
        self.v_parts = self._range(self.v_parts, self.config.v, start, stop)
        self.n_quant = stop - start

    def held(self, start: int = 0, stop: int | None = None) -> tuple[QuantizedTensor, QuantizedTensor]:
        """Quantised tokens [start, stop) of K and V (start block aligned) as QuantizedTensors: views, no copy."""
        stop = self.n_quant if stop is None else stop
        shape = (self.batch, self.kv_heads, stop - start, self.head_dim)
        sv = self.config.strategy_version
        out = []
        for spec, parts in ((self.config.k, self.k_parts), (self.config.v, self.v_parts)):
            if start or stop != self.n_quant:
                parts = self._range(parts, spec, start, stop)
            out.append(QuantizedTensor(*(parts.get(n) for n in PARTS), spec, shape, self.dtype, sv))
        return out[0], out[1]

    def dequantized(self, which: str) -> torch.Tensor:
        """K or V of every held token in the model dtype (only for attention implementations other than quantattn)."""
        residual = self.keys if which == "k" else self.values
        if self.n_quant == 0:
            return residual
        held = self.held()[0 if which == "k" else 1]
        return torch.cat([held.dequantize(self.dtype), residual], dim=2)

    def attend(
        self,
        query: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        scale: float | None,
        config: QuantConfig,
        handle: CacheHandle,
        backend: str | None = None,
        q_static: StaticQuant | None = None,
    ) -> torch.Tensor:
        """Attention of `query` [B,Hq,Sq,D] over this layer's cache, read in place; BHSD output.

        Q's static scale is the cache's for this layer if it has one, else `q_static` (the module's).
        """
        self.check_handle(handle)
        sq, sk = query.shape[2], self.kept
        n = self.n_quant
        q_static = self.static.get("q", q_static)
        causal = attn_mask is None and is_causal and sq > 1
        op_args = {
            "config": config,
            "scale": scale,
            "enable_gqa": query.shape[1] != self.kv_heads,
            "return_lse": True,
            "backend": backend,
            "static_scales": None if q_static is None else {"q": q_static},
        }
        held = None
        if n and causal:
            held = self._attend_held_causal(query, sk - sq, op_args)
        elif n:
            kq, vq = self.held()
            mask = None if attn_mask is None else attn_mask[..., :n]
            held = quantized_attention(query, kq, vq, attn_mask=mask, **op_args)
        if sk == n:
            return held[0]
        if causal:
            mask = causal_keep(sq, sk, query.device)[:, n:]
        else:
            mask = None if attn_mask is None else attn_mask[..., n:]
        return attend_window(query, self.keys, self.values, mask, scale, config, q_static, held)

    def _attend_held_causal(
        self, query: torch.Tensor, first: int, op_args: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention over the held blocks for queries at positions first.. without a mask tensor.

        Query rows that come before the last held key are the op's bottom-right causal case over the held
        keys up to their own position; the rest see every held key.
        """
        sq, n = query.shape[2], self.n_quant
        r = min(sq, max(0, n - 1 - first))
        outs, lses = [], []
        if r:
            kq, vq = self.held(0, first + r)
            out, lse = quantized_attention(query[:, :, :r], kq, vq, is_causal=True, **op_args)
            outs.append(out)
            lses.append(lse)
        if r < sq:
            kq, vq = self.held()
            out, lse = quantized_attention(query[:, :, r:], kq, vq, **op_args)
            outs.append(out)
            lses.append(lse)
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)

    def _droppable(self) -> int:
        """Quantised tokens at the front no present or future query can see (sliding window layers only)."""
        if self.sliding_window is None or not self.is_initialized:
            return 0
        first_needed = self.get_seq_length() - self.sliding_window + 1
        n = min(first_needed - self.offset, self.n_quant)
        return (n // self.group) * self.group if n > 0 else 0

    def _drop_front(self, n: int) -> None:
        if n:
            self._slice_parts(n, self.n_quant)
            self.offset += n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) the mask is built for: the tokens `update` will hold, and the first one's position."""
        if not self.is_initialized:
            return query_length, 0
        drop = self._droppable()
        return self.kept - drop + query_length, self.offset + drop

    def get_seq_length(self) -> int:
        """Tokens seen so far (including tokens a sliding window layer has dropped)."""
        return self.offset + self.kept if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self._reset_state()

    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points, means and the 16-bit window."""
        tensors = [*self.k_parts.values(), *self.v_parts.values(), self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest `-tokens_to_remove` tokens; a cut through a quantised block moves it back to 16-bit."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop: a positive value ({tokens_to_remove}) is not supported; "
                "pass a negative number of tokens to remove"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        target = self.get_seq_length() + tokens_to_remove
        if target < self.offset:
            raise ValueError(
                f"crop: cannot go back to {target} tokens, the sliding window layer {self.layer_idx} already dropped "
                f"the first {self.offset}"
            )
        keep = target - self.offset
        if keep >= self.n_quant:
            self.keys, self.values = self.keys[:, :, : keep - self.n_quant], self.values[:, :, : keep - self.n_quant]
        else:
            aligned = (keep // self.group) * self.group
            kq, vq = self.held(aligned, keep)
            self.keys, self.values = kq.dequantize(self.dtype), vq.dequantize(self.dtype)
            self._slice_parts(0, aligned)
        self.version += 1

    def _select(self, fn) -> None:
        for parts in (self.k_parts, self.v_parts):
            for name, tensor in parts.items():
                if tensor is not None:
                    parts[name] = fn(tensor)
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.batch = self.keys.shape[0]
        self.version += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (codes and statistics alike, no requantisation)."""
        if self.is_initialized:
            self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(lambda t: t[indices])

    def offload(self) -> None:
        raise NotImplementedError("QuantizedKVCache does not offload layers to the CPU")

    prefetch = offload


def _model_config(model: PreTrainedModel | PreTrainedConfig) -> PreTrainedConfig:
    if isinstance(model, PreTrainedModel):
        return model.config.get_text_config(decoder=True)
    if isinstance(model, PreTrainedConfig):
        return model.get_text_config(decoder=True)
    raise TypeError(f"QuantizedKVCache: expected a transformers model or its config, got {type(model).__name__}")


def _check_static(static_scales: Mapping[int, Mapping[str, StaticQuant]] | None, num_layers: int) -> None:
    for idx, entry in (static_scales or {}).items():
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < num_layers:
            raise ValueError(f"static_scales: layer index {idx!r} is not one of the model's {num_layers} layers")
        if not isinstance(entry, Mapping) or set(entry) - {"q", "k", "v"}:
            raise ValueError(f"static_scales[{idx}]: expected a mapping of 'q'/'k'/'v' to StaticQuant")
        for op, st in entry.items():
            if not isinstance(st, StaticQuant):
                raise TypeError(f"static_scales[{idx}][{op!r}]: expected a StaticQuant, got {type(st).__name__}")


class QuantizedKVCache(Cache):
    """A transformers Cache that keeps K (per channel within token blocks) and V (per token) quantised.

    `model` is the model (or its config) the cache is made for; `config` is a QuantConfig or preset
    (default: what `quantattn_hf.configure` set on the model, else kv-int8), of which the K and V
    operands say how the cache holds them. `block_size` (default 128 tokens) replaces the K block
    size of the preset: the per-block scale and mean cost 8 bytes a channel, 6% of INT8 codes at 128.
    `residual_length` newest tokens stay in 16-bit (KIVI's window; the partial last block always
    does). `static_scales` maps a layer index to calibrated {'q'|'k'|'v': StaticQuant}, used instead
    of measured statistics for that layer (default: what `quantattn_hf.calibration` attached to the
    model, if anything). A mean-subtracting operand with static scales and no static mean keeps
    `config`'s block size: its scale covers x less its own block's mean, for blocks of that size.
    """

    def __init__(
        self,
        model: PreTrainedModel | PreTrainedConfig,
        config: QuantConfig | str | None = None,
        *,
        residual_length: int = 0,
        block_size: int | None = DEFAULT_BLOCK,
        static_scales: Mapping[int, Mapping[str, StaticQuant]] | None = None,
    ):
        text = _model_config(model)
        if isinstance(model, PreTrainedModel):
            if config is None:
                config = getattr(model, "quantattn_config", None)
            if static_scales is None:
                static_scales = getattr(model, "quantattn_static_scales", None)
        heads = text.num_attention_heads
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        num_layers = len(layer_types)
        _check_static(static_scales, num_layers)
        base = resolve_config(config)
        calibrated = frozenset(
            op
            for entry in (static_scales or {}).values()
            for op, st in entry.items()
            if st.mean is None and getattr(base, op).subtract_mean
        )
        cfg = cache_config(base, block_size, calibrated)
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length: must be an int >= 0, got {residual_length!r}")
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        for name, spec in (("key", cfg.k), ("value", cfg.v)):
            if spec.precision == "int4" and head_dim % 2:
                raise ValueError(f"QuantizedKVCache: int4 {name}s need an even head dim, the model's is {head_dim}")
        if isinstance(layer_kwargs, dict):  # transformers before 5.2x: one dict shared by every layer
            layer_kwargs = [layer_kwargs] * len(layer_types)
        layers = []
        for idx, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind not in ("full_attention", "sliding_attention"):
                raise ValueError(f"QuantizedKVCache: layer {idx} is of type {kind!r}; only full and sliding attention")
            window = kwargs.get("sliding_window") if kind == "sliding_attention" else None
            static = (static_scales or {}).get(idx)
            layers.append(QuantizedKVLayer(cfg, idx, num_layers, kv_heads, head_dim, residual_length, window, static))
        self.quant_config = cfg
        super().__init__(layers=layers)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"QuantizedKVCache: made for a model with {len(self.layers)} layers, got layer index {layer_idx}; "
                "make the cache for this model"
            )
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes the cache holds now, all layers: codes, scales, zero points, means, 16-bit window."""
        return sum(layer.nbytes() for layer in self.layers)
