"""The public op: `quantized_attention`, a `torch.library` custom op with a fake implementation.

It checks its inputs (clear errors, never a wrong number), puts them in canonical [B, H, S, D]
form, picks a backend and runs the backend's quantiser and attention.
"""

from __future__ import annotations

import functools
import math

import torch

from .backends import AttentionCall, select_backend
from .config import QuantConfig, resolve_config

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("BHSD", "BSHD")


@functools.lru_cache(maxsize=64)
def _config_from_json(text: str) -> QuantConfig:
    return QuantConfig.from_json(text)


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _check_mask(mask: torch.Tensor, q: torch.Tensor, target: tuple[int, int, int, int]) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask: on {mask.device}, but query is on {q.device}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask: expected a bool or floating-point mask, got {mask.dtype}")
    if mask.dim() > 4:
        raise ValueError(f"attn_mask: at most 4 dims, got shape {tuple(mask.shape)}")
    for got, want in zip(reversed(mask.shape), reversed(target)):
        if got not in (1, want):
            raise ValueError(
                f"attn_mask: shape {tuple(mask.shape)} does not broadcast to [B, H, Sq, Sk] = {list(target)}"
            )


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    enable_gqa: bool,
    config: QuantConfig,
) -> None:
    """Raise TypeError/ValueError for anything the op cannot compute correctly (BHSD inputs)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key, value: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key, value: on different devices ({q.device}, {k.device}, {v.device})")
    b, hq, sq, d = q.shape
    bk, hk, sk, dk = k.shape
    bv, hv, sv, dv = v.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: query {b}, key {bk}, value {bv}")
    if hk != hv:
        raise ValueError(f"key and value head counts differ: {hk} vs {hv}")
    if sk != sv:
        raise ValueError(f"key and value lengths differ: {sk} vs {sv}")
    if d != dk:
        raise ValueError(f"query and key head dims differ: {d} vs {dk}")
    if min(d, dv) < 1 or hk < 1:
        raise ValueError(f"empty head dim or head count: query {tuple(q.shape)}, value {tuple(v.shape)}")
    if hq != hk:
        if not enable_gqa:
            raise ValueError(f"query has {hq} heads, key/value {hk}: pass enable_gqa=True for grouped-query attention")
        if hq % hk:
            raise ValueError(f"GQA: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    for name, op, dim in (("query", config.q, d), ("key", config.k, d), ("value", config.v, dv)):
        if op.precision == "int4" and dim % 2:
            raise ValueError(f"{name}: int4 needs an even head dim to pack two values per byte, got {dim}")
    if attn_mask is not None:
        _check_mask(attn_mask, q, (b, hq, sq, sk))


@torch.library.custom_op("quantattn::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config_json: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config_from_json(config_json)
    b, hq, sq, d = query.shape
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(b, hq, sq, key.shape[2])
    call = AttentionCall(
        config=config,
        batch=b,
        q_heads=hq,
        kv_heads=key.shape[1],
        q_len=sq,
        kv_len=key.shape[2],
        head_dim=d,
        head_dim_v=value.shape[3],
        dtype=query.dtype,
        device=query.device,
        scale=scale,
        is_causal=is_causal,
        attn_mask=mask,
    )
    impl = select_backend(call, backend or None)
    sv = config.strategy_version
    qq = impl.quantize(query, config.q, sv)
    kq = impl.quantize(key, config.k, sv)
    vq = impl.quantize(value, config.v, sv)
    out, lse = impl.attention(qq, kq, vq, call)
    return out.to(query.dtype).contiguous(), lse.to(torch.float32).contiguous()


@_attention_op.register_fake
def _attention_fake(query, key, value, attn_mask, is_causal, scale, config_json, backend):
    b, hq, sq, _ = query.shape
    out = query.new_empty((b, hq, sq, value.shape[3]))
    lse = query.new_empty((b, hq, sq), dtype=torch.float32)
    return out, lse


def quantized_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    config: QuantConfig | str | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    layout: str = "BHSD",
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with quantised operands, with the semantics of torch's scaled_dot_product_attention.

    `config` is a QuantConfig or a preset name (default kv-int8). `layout` is "BHSD" or "BSHD"
    (the output has the same layout). `is_causal` is aligned bottom-right when Sq < Sk and may be
    combined with `attn_mask`. `return_lse` also returns the float32 log-sum-exp [B, H, Sq].
    """
    cfg = resolve_config(config)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'BHSD' or 'BSHD', got {layout!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name, got {type(backend).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if layout == "BSHD":
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    check_inputs(query, key, value, attn_mask, enable_gqa, cfg)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale: must be finite, got {scale}")
    out, lse = _attention_op(
        query, key, value, attn_mask, bool(is_causal), float(scale), cfg.to_json(), backend or ""
    )
    if layout == "BSHD":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
