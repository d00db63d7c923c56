"""The public op: `quantized_attention`, a `torch.library` custom op with a fake implementation.

It checks its inputs (clear errors, never a wrong number), puts them in canonical [B, H, S, D]
form, picks a backend and runs the backend's quantiser and attention.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from .backends import DEVICE_DEFAULTS, AttentionCall, Backend, get_backend, select_backend
from .config import OperandQuant, QuantConfig, resolve_config
from .quant import QuantizedTensor, StaticQuant

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("BHSD", "BSHD")


@functools.lru_cache(maxsize=64)
def _config_from_json(text: str) -> QuantConfig:
    return QuantConfig.from_json(text)


@functools.lru_cache(maxsize=256)
def _describe(
    config: QuantConfig | str | None, held: tuple[OperandQuant, OperandQuant, int] | None
) -> tuple[str, tuple[str, str, str]]:
    """The op's config JSON and the Q/K/V precisions, cached: decode calls the op once per layer per token."""
    cfg = resolve_config(config)
    if held is not None:
        cfg = cfg.replace(k=held[0], v=held[1], strategy_version=held[2])
    return cfg.to_json(), (cfg.q.precision, cfg.k.precision, cfg.v.precision)


@torch.compiler.assume_constant_result
def _config_json(config: QuantConfig | str | None) -> tuple[str, tuple[str, str, str]]:
    """The op's config argument and the Q/K/V precisions; constants for torch.compile (no json traced)."""
    return _describe(config, None)


@torch.compiler.assume_constant_result
def _held_config_json(
    config: QuantConfig | str | None, k: OperandQuant, v: OperandQuant, version: int
) -> tuple[str, tuple[str, str, str]]:
    """As `_config_json` over held K/V: their own specs and strategy version replace the config's."""
    return _describe(config, (k, v, version))


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}"
        )
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
    for got, want in zip(reversed(mask.shape), reversed(target), strict=False):
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
    precisions: tuple[str, str, str],
    check_devices: bool = True,
) -> None:
    """Raise TypeError/ValueError for anything the op cannot compute correctly (BHSD inputs)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key, value: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if check_devices and not (q.device == k.device == v.device):
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
    for name, precision, dim in zip(("query", "key", "value"), precisions, (d, d, dv), strict=True):
        if precision == "int4" and dim % 2:
            raise ValueError(f"{name}: int4 needs an even head dim to pack two values per byte, got {dim}")
    if attn_mask is not None:
        _check_mask(attn_mask, q, (b, hq, sq, sk))


def make_call(
    query: torch.Tensor,
    q_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: QuantConfig,
) -> AttentionCall:
    """The canonical AttentionCall of one op call (the mask broadcast to [B, Hq, Sq, Sk]).

    `query` gives the dtype and device (the upstream gradient serves in backward), the shapes the sizes.
    """
    b, hq, sq, d = q_shape
    _, hkv, sk, dv = v_shape
    mask = None if attn_mask is None else attn_mask.expand(b, hq, sq, sk)
    return AttentionCall(
        config=config,
        batch=b,
        q_heads=hq,
        kv_heads=hkv,
        q_len=sq,
        kv_len=sk,
        head_dim=d,
        head_dim_v=dv,
        dtype=query.dtype,
        device=query.device,
        scale=scale,
        is_causal=is_causal,
        attn_mask=mask,
    )


def quantize_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: QuantConfig,
    backend: str,
    k_static: StaticQuant | None,
    v_static: StaticQuant | None,
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """K and V held by the quantiser of the backend the query's device uses."""
    quantiser = select_backend_for_quantiser(query, backend)
    sv = config.strategy_version
    return (
        _quantize_operand(quantiser, key, config.k, sv, k_static),
        _quantize_operand(quantiser, value, config.v, sv, v_static),
    )


def run_attention(
    query: torch.Tensor,
    kq: QuantizedTensor,
    vq: QuantizedTensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: QuantConfig,
    backend: str,
    q_static: StaticQuant | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantizedTensor]:
    """Pick the backend for this call and run its attention over held K/V: (out, lse, held Q)."""
    call = make_call(query, query.shape, vq.shape, attn_mask, is_causal, scale, config)
    impl = select_backend(call, backend or None)
    qq = _quantize_operand(impl, query, config.q, config.strategy_version, q_static)
    out, lse = impl.attention(qq, kq, vq, call)
    return out.to(query.dtype).contiguous(), lse.to(torch.float32).contiguous(), qq


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
    static: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config_from_json(config_json)
    q_static, k_static, v_static = _unpack_static(static)
    kq, vq = quantize_kv(query, key, value, config, backend, k_static, v_static)
    return run_attention(query, kq, vq, attn_mask, is_causal, scale, config, backend, q_static)[:2]


@_attention_op.register_fake
def _attention_fake(query, key, value, attn_mask, is_causal, scale, config_json, backend, static):
    b, hq, sq, _ = query.shape
    out = query.new_empty((b, hq, sq, value.shape[3]))
    lse = query.new_empty((b, hq, sq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("quantattn::attention_held_kv", mutates_args=())
def _attention_held_kv_op(
    query: torch.Tensor,
    k_data: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    k_mean: torch.Tensor | None,
    v_data: torch.Tensor,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    v_mean: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config_json: str,
    backend: str,
    q_static: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config_from_json(config_json)
    sv = config.strategy_version
    kq = QuantizedTensor(k_data, k_scale, k_zero, k_mean, config.k, _held_shape(k_data, config.k), query.dtype, sv)
    vq = QuantizedTensor(v_data, v_scale, v_zero, v_mean, config.v, _held_shape(v_data, config.v), query.dtype, sv)
    static = _unpack_static([*q_static, None, None, None, None, None, None])[0]
    return run_attention(query, kq, vq, attn_mask, is_causal, scale, config, backend, static)[:2]


@_attention_held_kv_op.register_fake
def _attention_held_kv_fake(query, k_data, k_scale, k_zero, k_mean, v_data, v_scale, v_zero, v_mean, *rest):
    b, hq, sq, _ = query.shape
    dv = v_data.shape[3] * (2 if v_data.dtype == torch.uint8 else 1)
    out = query.new_empty((b, hq, sq, dv))
    lse = query.new_empty((b, hq, sq), dtype=torch.float32)
    return out, lse


def _held_shape(data: torch.Tensor, spec: OperandQuant) -> tuple[int, int, int, int]:
    b, h, s, d = data.shape
    return (b, h, s, d * 2 if spec.precision == "int4" else d)


def _quantize_operand(
    impl: Backend, x: torch.Tensor, spec: OperandQuant, version: int, static: StaticQuant | None
) -> QuantizedTensor:
    """The backend's quantiser, with the calibrated statistics where there are some."""
    if static is not None and spec.quantized:
        return impl.quantize_static(x, spec, version, static)
    return impl.quantize(x, spec, version)


def _unpack_static(static: list[torch.Tensor | None]) -> tuple[StaticQuant | None, ...]:
    """The op's flat [q scale, mean, zero, k ..., v ...] list back into StaticQuant per operand."""
    out = []
    for i in range(3):
        scale, mean, zero = static[3 * i : 3 * i + 3]
        out.append(None if scale is None else StaticQuant(scale, mean, zero))
    return tuple(out)


def _flatten_static(static_scales: Mapping[str, StaticQuant] | None) -> list[torch.Tensor | None]:
    """`static_scales` {'q'|'k'|'v': StaticQuant} as the op's flat list of nine optional tensors."""
    static_scales = static_scales or {}
    unknown = set(static_scales) - {"q", "k", "v"}
    if unknown:
        raise ValueError(f"static_scales: unknown operand(s) {sorted(unknown)}; expected 'q', 'k', 'v'")
    flat: list[torch.Tensor | None] = []
    for op in ("q", "k", "v"):
        st = static_scales.get(op)
        if st is not None and not isinstance(st, StaticQuant):
            raise TypeError(f"static_scales[{op!r}]: expected a StaticQuant, got {type(st).__name__}")
        flat.extend((None, None, None) if st is None else (st.scale, st.mean, st.zero_point))
    return flat


def select_backend_for_quantiser(query: torch.Tensor, backend: str) -> Backend:
    """The backend whose quantiser prepares K/V: the one the device would use for attention."""
    name = backend or DEVICE_DEFAULTS.get(query.device.type, "reference")
    impl = get_backend(name)
    return impl if impl.available() else get_backend("reference")


def _check_held(name: str, t: QuantizedTensor, query: torch.Tensor, layout: str) -> None:
    if layout != "BHSD":
        raise ValueError(f"{name}: a QuantizedTensor is always [B, H, S, D]; pass layout='BHSD'")
    if t.device != query.device:
        raise ValueError(f"{name}: held on {t.device}, but query is on {query.device}")
    expected = _held_shape(t.data, t.spec)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: QuantizedTensor shape {tuple(t.shape)} does not match its data {expected}")


def quantized_attention(
    query: torch.Tensor,
    key: torch.Tensor | QuantizedTensor,
    value: torch.Tensor | QuantizedTensor,
    *,
    config: QuantConfig | str | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    layout: str = "BHSD",
    return_lse: bool = False,
    backend: str | None = None,
    static_scales: Mapping[str, StaticQuant] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with quantised operands, with the semantics of torch's scaled_dot_product_attention.

    `config` is a QuantConfig or a preset name (default kv-int8). `key`/`value` may be tensors or
    already-held `QuantizedTensor`s (a quantised KV cache; their own specs then apply). `layout` is
    "BHSD" or "BSHD" (the output has the same layout). `is_causal` is aligned bottom-right when
    Sq < Sk and may be combined with `attn_mask`. `return_lse` also returns the float32
    log-sum-exp [B, H, Sq]. `static_scales` maps 'q'/'k'/'v' to calibrated `StaticQuant`s used
    instead of measuring scales on the fly (held K/V already carry theirs).
    """
    config_json, precisions = _config_json(config)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'BHSD' or 'BSHD', got {layout!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name, got {type(backend).__name__}")
    _check_tensor("query", query)
    held = isinstance(key, QuantizedTensor), isinstance(value, QuantizedTensor)
    if held[0] != held[1]:
        raise TypeError("key and value: pass both as tensors or both as QuantizedTensor")
    if held[0]:
        _check_held("key", key, query, layout)
        _check_held("value", value, query, layout)
        if key.strategy_version != value.strategy_version:
            raise ValueError("key and value: made with different strategy versions")
        config_json, precisions = _held_config_json(config, key.spec, value.spec, key.strategy_version)
        shapes = (
            torch.empty(key.shape, device="meta", dtype=query.dtype),
            torch.empty(value.shape, device="meta", dtype=query.dtype),
        )
    else:
        for name, t in (("key", key), ("value", value)):
            _check_tensor(name, t)
        if layout == "BSHD":
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        shapes = (key, value)
    if layout == "BSHD" and held[0]:
        query = query.transpose(1, 2)
    check_inputs(query, *shapes, attn_mask, enable_gqa, precisions, check_devices=not held[0])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale: must be finite, got {scale}")
    args = (attn_mask, bool(is_causal), float(scale), config_json, backend or "")
    static = _flatten_static(static_scales)
    if held[0]:
        if any(t is not None for t in static[3:]):
            raise ValueError("static_scales: held K/V carry their own scales; pass only 'q'")
        out, lse = _attention_held_kv_op(
            query,
            key.data,
            key.scale,
            key.zero_point,
            key.mean,
            value.data,
            value.scale,
            value.zero_point,
            value.mean,
            *args,
            static[:3],
        )
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        from .autograd import attention_train  # autograd imports this module

        out, lse = attention_train(query, key, value, *args, static)[:2]
    else:
        out, lse = _attention_op(query, key, value, *args, static)
    if layout == "BSHD":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
