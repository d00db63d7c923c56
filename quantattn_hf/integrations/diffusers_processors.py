"""Attention processors for diffusers models that compute attention with `quantized_attention`.

Each processor mirrors one diffusers processor line for line (projections, norms, RoPE, masks,
output projections, residuals) and replaces only the attention call, so with the `fp16` preset it
reproduces the original within float rounding. Every processor keeps its `config`, its
`layer_name` (the key per-layer calibration data is looked up by) and the `original` processor it
replaced (what `remove` puts back). They hold no tensors of their own: pickle, deepcopy and device moves work.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models import attention_dispatch as diffusers_attention_dispatch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from ..attention import quantized_attention
from ..config import QuantConfig, resolve_config


def dispatch_mask(attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """A [B, Sk] key mask as diffusers' native backend reads it ([B, 1, 1, Sk]); other masks unchanged (BSHD inputs)."""
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask


class QuantAttnProcessorBase:
    """What every quantised processor holds: config, layer name, backend, original processor, hooks.

    `observer` (if set) is called as `observer(processor, query, key, value, layout)` before each
    attention, for collecting statistics. `calibration` (if set, by `apply(calibration=...)`) is a
    per-layer object whose `attention(processor, query, key, value, attn_mask=..., layout=...)`
    computes the attention with static scales instead of the dynamic ones.
    """

    _attention_backend = None
    _parallel_config = None
    mirrors: type | None = None

    def __init__(
        self,
        config: QuantConfig | str | None = None,
        *,
        layer_name: str | None = None,
        backend: str | None = None,
        original: Any = None,
    ) -> None:
        self.config = resolve_config(config)
        self.layer_name = layer_name
        self.backend = backend
        self.original = original
        self.observer: Callable[..., None] | None = None
        self.calibration: Any = None

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        layout: str = "BHSD",
        **kwargs: Any,
    ) -> torch.Tensor:
        """The one attention call of this layer (extra kwargs: is_causal, scale, enable_gqa)."""
        if self.observer is not None:
            self.observer(self, query, key, value, layout)
        if self.calibration is not None:
            return self.calibration.attention(self, query, key, value, attn_mask=attn_mask, layout=layout, **kwargs)
        return quantized_attention(
            query, key, value, config=self.config, attn_mask=attn_mask, layout=layout, backend=self.backend, **kwargs
        )

    def restored(self) -> Any:
        """The processor `remove` puts back: the original one, else a fresh one of the mirrored class."""
        if self.original is not None:
            return self.original
        return self.mirrors()

    def __repr__(self) -> str:
        name = self.config.name or "custom"
        return f"{type(self).__name__}(config={name!r}, layer_name={self.layer_name!r})"


class FluxQuantAttnProcessor(QuantAttnProcessorBase):
    """Flux joint attention (double and single blocks, RoPE, Q/K RMS norms), as `FluxAttnProcessor`.

    On CUDA the Q/K norms and the rotary embedding run as one fused Triton kernel per operand, written
    straight into the joint text+image buffer (`fuse_prologue`: None = on CUDA outside torch.compile,
    True/False to force); elsewhere, and for norms or embeddings it does not cover, diffusers' own modules.
    """

    mirrors = FluxAttnProcessor

    def __init__(self, config: QuantConfig | str | None = None, *, fuse_prologue: bool | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.fuse_prologue = fuse_prologue

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        joint = attn.added_kv_proj_dim is not None
        if joint:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            value = torch.cat([encoder_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        if self._fuses(attn, query, joint, image_rotary_emb):
            parts = [(encoder_query, encoder_key, attn.norm_added_q, attn.norm_added_k)] if joint else []
            parts.append((query, key, attn.norm_q, attn.norm_k))
            query, key = fused_norm_rope(parts, image_rotary_emb)
        else:
            query = attn.norm_q(query)
            key = attn.norm_k(key)
            if joint:
                query = torch.cat([attn.norm_added_q(encoder_query), query], dim=1)
                key = torch.cat([attn.norm_added_k(encoder_key), key], dim=1)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = self.attend(query, key, value, dispatch_mask(attention_mask, query, key), layout="BSHD")
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states

    def _fuses(self, attn: torch.nn.Module, query: torch.Tensor, joint: bool, rotary: Any) -> bool:
        """Whether this call's norms and RoPE go through the fused kernel (see the class docstring)."""
        wanted = self.fuse_prologue
        if wanted is None:
            wanted = query.is_cuda and not torch.compiler.is_compiling()
        if not wanted:
            return False
        norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if joint else [])
        return (
            all(fusable_norm(norm, query) for norm in norms)
            and isinstance(rotary, tuple)
            and len(rotary) == 2
            and query.shape[-1] % 2 == 0
        )


def fusable_norm(norm: Any, x: torch.Tensor) -> bool:
    """diffusers' `RMSNorm` or `torch.nn.RMSNorm` over the head dim, weight (if any) in x's dtype, no bias."""
    weight = getattr(norm, "weight", None)
    if isinstance(norm, torch.nn.RMSNorm):
        shape_ok = tuple(norm.normalized_shape) == (x.shape[-1],)
    else:
        shape_ok = isinstance(norm, RMSNorm) and getattr(norm, "bias", None) is None
    return shape_ok and (weight is None or (weight.dtype == x.dtype and weight.shape == (x.shape[-1],)))


def norm_eps(norm: Any, dtype: torch.dtype) -> float:
    """The epsilon the norm adds (torch.nn.RMSNorm's None means the dtype's machine epsilon)."""
    return torch.finfo(dtype).eps if norm.eps is None else float(norm.eps)


def fused_norm_rope(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.nn.Module, torch.nn.Module]], rotary: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint (query, key) [B, S, H, D]: each part's Q/K through its own RMSNorms, rotated, in sequence order."""
    from ..backends.triton.norm_rope import rms_norm_rope

    first = parts[0][0]
    total = sum(part[0].shape[1] for part in parts)
    shape = (first.shape[0], total, *first.shape[2:])
    query = torch.empty(shape, dtype=first.dtype, device=first.device)
    key = torch.empty(shape, dtype=first.dtype, device=first.device)
    cos, sin = (t.to(first.device) for t in rotary)
    start = 0
    for q, k, norm_q, norm_k in parts:
        end = start + q.shape[1]
        for x, norm, out in ((q, norm_q, query), (k, norm_k, key)):
            eps, diffusers_norm = norm_eps(norm, x.dtype), not isinstance(norm, torch.nn.RMSNorm)
            rope = cos[start:end], sin[start:end]
            rms_norm_rope(x, norm.weight, eps, *rope, out=out[:, start:end], round_normed=diffusers_norm)
        start = end
    return query, key


class JointQuantAttnProcessor(QuantAttnProcessorBase):
    """SD3-style joint attention (image tokens then context tokens), as `JointAttnProcessor2_0`."""

    mirrors = JointAttnProcessor2_0

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.FloatTensor:
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ctx_q, ctx_k, ctx_v = (
                proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                for proj in projections
            )
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)
        hidden_states = self.attend(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class QuantAttnProcessor(QuantAttnProcessorBase):
    """Self and cross attention of UNets and VAEs (SD 1.5, SDXL), as `AttnProcessor2_0`."""

    mirrors = AttnProcessor2_0

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self.attend(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def calls_dispatch(processor: Any) -> bool:
    """Whether a processor's `__call__` hands `self._attention_backend` to diffusers' `dispatch_attention_fn`."""
    call = inspect.getattr_static(type(processor), "__call__", None)
    code = getattr(call, "__code__", None)
    if code is None or not {"dispatch_attention_fn", "_attention_backend"} <= set(code.co_names):
        return False
    return call.__globals__.get("dispatch_attention_fn") in (_diffusers_dispatch, routing_dispatch)


class _Route:
    """The `backend` a wrapped processor passes to `dispatch_attention_fn`: names the quantised processor."""

    def __init__(self, processor: DispatchQuantAttnProcessor) -> None:
        self.processor = processor


_diffusers_dispatch = diffusers_attention_dispatch.dispatch_attention_fn


def routing_dispatch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    attention_kwargs: dict[str, Any] | None = None,
    *,
    backend: Any = None,
    parallel_config: Any = None,
) -> torch.Tensor:
    """`dispatch_attention_fn` that sends calls whose backend is a `_Route` to the quantised processor."""
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs)
    if isinstance(backend, _Route):
        return backend.processor.dispatch(*args, parallel_config=parallel_config)
    return _diffusers_dispatch(*args, backend=backend, parallel_config=parallel_config)


def _install_routing(call: Callable[..., Any]) -> None:
    """Make the module that defines `call` look up `routing_dispatch` as its `dispatch_attention_fn`."""
    scope = call.__globals__
    if scope.get("dispatch_attention_fn") is _diffusers_dispatch:
        scope["dispatch_attention_fn"] = routing_dispatch


class DispatchQuantAttnProcessor(QuantAttnProcessorBase):
    """Any processor that calls `dispatch_attention_fn` (Wan, QwenImage, ...), run with that call quantised.

    The wrapped processor's own `__call__` runs unchanged on a shallow copy of it whose
    `_attention_backend` is a route to this processor. The defining module's
    `dispatch_attention_fn` is swapped (once, for good) for `routing_dispatch`, which passes every
    other call to diffusers' function untouched (so a call inside the processor that names a
    backend of its own, e.g. `backend="flex"`, stays unquantised). Instances are of a subclass
    made once per wrapped class, whose `__call__` carries the wrapped signature, so diffusers'
    signature-based filtering of extra kwargs sees the wrapped processor's parameters.
    """

    def __new__(cls, original: Any, *args: Any, **kwargs: Any) -> DispatchQuantAttnProcessor:
        if not calls_dispatch(original):
            raise TypeError(f"{type(original).__name__} does not call dispatch_attention_fn with its backend")
        return super().__new__(_dispatch_class(type(original)) if cls is DispatchQuantAttnProcessor else cls)

    def __init__(
        self,
        original: Any,
        config: QuantConfig | str | None = None,
        *,
        layer_name: str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(config, layer_name=layer_name, backend=backend, original=original)
        self._bind()

    def _bind(self) -> None:
        _install_routing(type(self.original).__call__)
        self._routed = copy.copy(self.original)
        self._routed._attention_backend = _Route(self)

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._routed(attn, *args, **kwargs)

    def dispatch(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        """`dispatch_attention_fn` with its semantics (BSHD inputs and output), computed by `attend`."""
        if dropout_p:
            raise ValueError(f"{self.layer_name}: quantised attention has no dropout (got dropout_p={dropout_p})")
        if parallel_config is not None:
            raise NotImplementedError(f"{self.layer_name}: context parallelism is not supported by quantised attention")
        if attention_kwargs:
            raise NotImplementedError(f"{self.layer_name}: attention_kwargs {sorted(attention_kwargs)} not supported")
        mask = dispatch_mask(attn_mask, query, key)
        return self.attend(query, key, value, mask, "BSHD", is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k != "_routed"}
        return (DispatchQuantAttnProcessor, (self.original, self.config), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind()

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, wraps={type(self.original).__name__})"


@functools.cache
def _dispatch_class(wrapped: type) -> type[DispatchQuantAttnProcessor]:
    """The DispatchQuantAttnProcessor subclass for one wrapped class: its `__call__` shows the wrapped signature."""

    def __call__(self: DispatchQuantAttnProcessor, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._routed(attn, *args, **kwargs)

    __call__.__signature__ = inspect.signature(wrapped.__call__)
    name = f"DispatchQuantAttnProcessor[{wrapped.__name__}]"
    namespace = {"__call__": __call__, "__module__": __name__, "__qualname__": name}
    return type(name, (DispatchQuantAttnProcessor,), namespace)


def quant_processor_for(
    processor: Any, config: QuantConfig, *, layer_name: str | None = None, backend: str | None = None
) -> QuantAttnProcessorBase | None:
    """The quantised processor that replaces `processor`, or None when its kind is not supported."""
    kinds: dict[type, type[QuantAttnProcessorBase]] = {
        FluxAttnProcessor: FluxQuantAttnProcessor,
        JointAttnProcessor2_0: JointQuantAttnProcessor,
        AttnProcessor2_0: QuantAttnProcessor,
    }
    kind = kinds.get(type(processor))
    if kind is not None:
        return kind(config, layer_name=layer_name, backend=backend, original=processor)
    if calls_dispatch(processor):
        return DispatchQuantAttnProcessor(processor, config, layer_name=layer_name, backend=backend)
    return None


__all__ = [
    "DispatchQuantAttnProcessor",
    "FluxQuantAttnProcessor",
    "JointQuantAttnProcessor",
    "QuantAttnProcessor",
    "QuantAttnProcessorBase",
    "quant_processor_for",
]
