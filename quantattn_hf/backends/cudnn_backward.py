"""Backward on CUDA by cuDNN's fused attention backward over the dequantised operands.

The backward's gradient is attention's over the dequantised operands (straight-through estimator, as
`reference_backward` defines it), given the forward's output and log-sum-exp. cuDNN's backward computes
exactly that when handed x' as dense tensors, at cuDNN's speed. The held K/V (and Q where it is quantised)
are dequantised by `triton.dequantize.HeadDequantizer`; a backward that runs once (no retain_graph, not traced)
may release the held codes as soon as they are dequantised. The operands are dequantised head range by head
range ("chunks"), so their dense copies exist for one chunk at a time: `chunk_bounds` plans chunks no wider
than the peak allows, uneven where that fills the GPU's waves (Flux on an H100: 10+7+7 heads take 7% more GPU
time than one chunk, 8+8+8 30% more; scripts/bench_backward_chunks.py). Through the cuDNN frontend
(`cudnn_graph`, where installed) each chunk writes its gradients straight into slices of the whole ones, so
chunks cost no copies: the plan keeps the peak below SDPA's, with K/V dequantised once for all chunks where that
plans as few of them (`backward_plan`). Through torch's op, a chunk's gradients are copied
and a backward that releases the codes runs one chunk, at SDPA's own peak (the dense copies take the place of the
dense operands SDPA's autograd keeps). `QUANTATTN_CUDNN_BACKWARD=0` leaves the backward to the Triton kernels
(`triton_backward`); `QUANTATTN_CUDNN_BACKWARD=n` fixes n even chunks.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ..quant import QuantizedTensor
from . import cudnn_graph
from .base import AttentionCall
from .triton.dequantize import HeadDequantizer

ENV = "QUANTATTN_CUDNN_BACKWARD"
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
# cuDNN's backward runs one program per key tile of this many tokens and head (inferred from its GPU time by
# chunk plan on the H100, scripts/bench_backward_chunks.py); used only to rank chunk plans by whole waves.
KEY_TILE = 128
# share of SDPA's modelled peak bytes an in-place plan leaves unused: the byte model omits cuDNN's per-row statistics
# and the caching allocator's rounding (~5 MiB at the Flux shape on an H100, where a plan at the model's very edge
# peaked 1% above SDPA's; docs/benchmarks.md)
IN_PLACE_HEADROOM = 0.05


def _fixed_chunks() -> int | None:
    """QUANTATTN_CUDNN_BACKWARD as a chunk count: None for 'auto' (unset), 0 for off, else n."""
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting == "auto":
        return None
    if not setting.isdigit():
        raise ValueError(f"{ENV} must be 'auto', 0 or a positive chunk count, got {setting!r}")
    return int(setting)


def _device_facts(device: torch.device) -> tuple[str | None, int]:
    """(why cuDNN's backward cannot run on this GPU or None, its multiprocessor count)."""
    return _facts_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _facts_of(index: int) -> tuple[str | None, int]:
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available", 0
    props = torch.cuda.get_device_properties(index)
    return ("a GPU older than sm80" if props.major < 8 else None), props.multi_processor_count


def unsupported_reason(call: AttentionCall, grad_lse: torch.Tensor | None) -> str | None:
    """None when cuDNN's backward serves `call`, else why not (the Triton kernels then run)."""
    if _fixed_chunks() == 0:
        return f"{ENV}=0"
    device = call.device
    if device.type != "cuda":
        return f"tensors on {device.type}"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN attention is disabled (torch.backends.cuda.enable_cudnn_sdp)"
    reason = _device_facts(device)[0]
    if reason is not None:
        return reason
    if call.dtype not in DTYPES:
        return f"dtype {call.dtype} (fp16 and bf16 are served)"
    if call.head_dim != call.head_dim_v or call.head_dim % 8 or call.head_dim > MAX_HEAD_DIM:
        return f"head dims {call.head_dim}/{call.head_dim_v} (equal, a multiple of 8, at most {MAX_HEAD_DIM})"
    if call.attn_mask is not None:
        return "an attention mask"
    if call.is_causal and call.q_len != call.kv_len:
        return "causal with q_len != kv_len (cuDNN's causal mask is top-left, quantattn's bottom-right)"
    if grad_lse is not None:
        return "a gradient of the log-sum-exp"
    return None


def chunk_bounds(
    call: AttentionCall, held_bytes: int, dequant_bytes: int, sms: int, in_place: bool = False
) -> list[int]:
    """K/V head bounds [0, ..., Hkv] of the backward's chunks, no wider than the peak allows, sized so their waves over
    the GPU are fewest, then fewest chunks, then the widest smallest.

    Against SDPA's backward, which keeps dense Q, K, V (`dense` bytes) and runs cuDNN once over all heads, this one
    keeps the held operands that are still alive while cuDNN runs (`held_bytes`) and, per chunk, the dense copies of
    the quantised ones (`dequant_bytes` over all heads) and its share of cuDNN's fp32 dQ accumulator; through
    torch's op also the chunk's gradients before they are copied into the whole ones (one chunk needs no copy: it is
    taken where its peak stays at SDPA's or below). `in_place` (the cuDNN frontend: gradients written into slices)
    plans the peak below SDPA's by IN_PLACE_HEADROOM. (With GQA cuDNN's workspace also holds per-query-head dK/dV,
    in SDPA's peak whole and in a chunk's its share: leaving them out only understates what chunks save.) (Before
    cuDNN runs, the dequantising moment holds the held operands and the dense copies, without gradients or
    accumulator: never above SDPA's peak.) A chunk of h K/V heads runs h * groups * batch * ceil(kv_len / KEY_TILE)
    programs, ceil(that / sms) waves: chunk widths that fill their last wave (uneven ones included) cost no more GPU
    time than one chunk does, and each chunk costs host time.
    """
    return list(_bounds(_sizes(call), held_bytes, dequant_bytes, sms, in_place, _fixed_chunks()))


def _sizes(call: AttentionCall) -> tuple[int, ...]:
    """The call's sizes the plans depend on: element bytes, B, Hq, Hkv, Sq, Sk, D, Dv."""
    b, hq, hkv, sq, sk = call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len
    return (call.dtype.itemsize, b, hq, hkv, sq, sk, call.head_dim, call.head_dim_v)


def _bounds(
    sizes: tuple[int, ...], held: int, dequant: int, sms: int, in_place: bool, fixed: int | None
) -> tuple[int, ...]:
    """`chunk_bounds`: `fixed` even chunks where QUANTATTN_CUDNN_BACKWARD fixes them, else the policy's."""
    hkv = sizes[3]
    if fixed:
        n = min(fixed, hkv)
        return tuple(hkv * i // n for i in range(n + 1))
    return _planned_bounds(*sizes, held, dequant, sms, in_place)


@functools.lru_cache(maxsize=256)
def _planned_bounds(
    size: int, b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dv: int, held: int, dequant: int, sms: int,
    in_place: bool,
) -> tuple[int, ...]:  # fmt: skip
    """`chunk_bounds` for a policy-chosen split, cached: a layer repeats its shapes every step."""
    dense = size * (b * hq * sq * d + b * hkv * sk * (d + dv))
    accumulator = 4 * b * hq * sq * d
    if in_place:
        per_head = (dequant + accumulator) / hkv
        bound = (1 - IN_PLACE_HEADROOM) * (dense + accumulator)
        widest = min(max(math.ceil((bound - held) / per_head) - 1, 1), hkv)
    elif held + dequant <= dense:
        return (0, hkv)
    else:
        per_head = (dequant + dense + accumulator) / hkv
        widest = min(max(int((dense - held + accumulator) // per_head), 1), hkv)
    programs = math.ceil(sk / KEY_TILE) * b * (hq // hkv)
    # best[j]: (waves, chunks, widest chunk, width of the last chunk) of the best split of the first j heads
    best = [(0, 0, 0, 0)]
    for j in range(1, hkv + 1):
        best.append(
            min(
                (best[j - w][0] + math.ceil(w * programs / sms), best[j - w][1] + 1, max(best[j - w][2], w), w)
                for w in range(1, min(widest, j) + 1)
            )
        )
    bounds = [hkv]
    while bounds[-1]:
        bounds.append(bounds[-1] - best[bounds[-1]][3])
    return tuple(bounds[::-1])


def dense_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cuDNN's backward of attention over dense [B, H, S, D] operands (GQA: fewer K/V heads), given the output
    and the [B, Hq, Sq] natural-log lse: (dQ, dK, dV)."""
    sq, sk = q.shape[2], k.shape[2]
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.unsqueeze(-1), None, None, None, None, None, sq, sk, 0.0, is_causal, scale=scale
    )


def attention_backward(
    q: QuantizedTensor,
    k: QuantizedTensor,
    v: QuantizedTensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    call: AttentionCall,
    need_dkv: bool = True,
    release_held: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the call's dtype, in the chunks of `backward_plan`; dK and dV are empty (0,) tensors without
    `need_dkv`. `release_held`: the quantised operands are read by no one after this call, so their storage
    may be freed once dequantised."""
    if grad_lse is not None:
        raise ValueError("cuDNN's attention backward takes no gradient of the log-sum-exp")
    bounds, kv_once = backward_plan(q, k, v, call, release_held, in_place=cudnn_graph.available())
    return backward_in_chunks(q, k, v, out, lse, grad_out, call, bounds, need_dkv, release_held, kv_once)


def backward_plan(
    q: QuantizedTensor,
    k: QuantizedTensor,
    v: QuantizedTensor,
    call: AttentionCall,
    release_held: bool = False,
    in_place: bool = False,
    sms: int | None = None,
) -> tuple[list[int], bool]:
    """(`chunk_bounds` for these held operands on their device, whether K/V are dequantised once for all chunks).

    Each chunk holds the bytes of the held operands that stay alive while cuDNN runs (through torch's op, where
    the quantised ones are released, the unquantised ones only: it then runs one chunk; in place, all of them,
    as they are released only after the last chunk's dequantising) and the dense copies of its heads. In place,
    K/V may instead be dequantised once, before the first chunk (with `release_held` their codes then go at
    once): their whole dense copies count as held, and only Q's (where quantised) are made per chunk. That costs
    one dequantiser launch instead of one a chunk, and is taken where it plans as few waves and chunks (GQA's
    K/V are a fraction of Q's bytes)."""
    dense = tuple(
        t.shape[0] * t.shape[1] * t.shape[2] * t.shape[3] * call.dtype.itemsize if t.spec.quantized else 0
        for t in (q, k, v)
    )
    held = tuple(t.nbytes() for t in (q, k, v))
    if sms is None:
        sms = _device_facts(k.data.device)[1] if k.data.device.type == "cuda" else 1
    plan = _plan(_sizes(call), held, dense, release_held, in_place, sms, _fixed_chunks())
    return list(plan[0]), plan[1]


@functools.lru_cache(maxsize=256)
def _plan(
    sizes: tuple[int, ...],
    held: tuple[int, int, int],
    dense: tuple[int, int, int],
    release_held: bool,
    in_place: bool,
    sms: int,
    fixed: int | None,
) -> tuple[tuple[int, ...], bool]:
    """`backward_plan` over bytes (held, and dense where quantised, of Q, K, V), cached: a layer repeats them."""
    if not in_place:
        kept = sum(h for h, d in zip(held, dense, strict=True) if not (release_held and d))
        return _bounds(sizes, kept, sum(dense), sms, False, fixed), False
    ranged = _bounds(sizes, sum(held), sum(dense), sms, True, fixed)
    if not (dense[1] or dense[2]) or fixed:
        return ranged, False
    kv_held = 0 if release_held else held[1] + held[2]
    once = _bounds(sizes, held[0] + kv_held + dense[1] + dense[2], dense[0], sms, True, fixed)
    b, hq, hkv, sk = sizes[1], sizes[2], sizes[3], sizes[5]
    programs = math.ceil(sk / KEY_TILE) * b * (hq // hkv)
    if _waves(once, programs, sms) <= _waves(ranged, programs, sms):
        return once, True
    return ranged, False


def _waves(bounds: tuple[int, ...], programs: int, sms: int) -> tuple[int, int]:
    """(GPU waves, chunks) of a plan whose chunks run `programs` programs a K/V head."""
    widths = [h1 - h0 for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True)]
    return sum(math.ceil(w * programs / sms) for w in widths), len(widths)


def backward_in_chunks(
    q: QuantizedTensor,
    k: QuantizedTensor,
    v: QuantizedTensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    call: AttentionCall,
    bounds: list[int],
    need_dkv: bool = True,
    release_held: bool = False,
    kv_once: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) by cuDNN's backward over the K/V head ranges between consecutive `bounds` (with their query
    heads), each range's operands dequantised just before it runs (K/V once before the first with `kv_once`,
    through the cuDNN frontend), its gradients written into slices of the whole ones (cuDNN frontend) or copied
    there (torch's op); with `release_held`, the quantised operands' storage is freed after their last
    dequantising."""
    b, hq, hkv, groups = call.batch, call.q_heads, call.kv_heads, call.groups
    if bounds[0] != 0 or bounds[-1] != hkv or bounds != sorted(set(bounds)):
        raise ValueError(f"chunk bounds must rise from 0 to {hkv} K/V heads, got {bounds}")
    sq, sk, dtype = call.q_len, call.kv_len, call.dtype
    grad_out = grad_out.contiguous()
    if cudnn_graph.available():
        return _chunks_in_place(q, k, v, out, lse, grad_out, call, bounds, need_dkv, release_held, kv_once)
    if kv_once:
        raise ValueError("K/V dequantised once need the cuDNN frontend (gradients written in place)")
    dense_q, dense_kv = HeadDequantizer([q], dtype), HeadDequantizer([k, v], dtype)
    grads: list[torch.Tensor] = []
    whole = len(bounds) == 2  # one chunk: whole tensors, no slices, no gradient copies
    for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks = slice(h0 * groups, h1 * groups), slice(h0, h1)
        (qd,), (kd, vd) = dense_q(qs), dense_kv(ks)
        if release_held and h1 == hkv:
            _release((q, k, v))
        rows = (grad_out, out, lse) if whole else (grad_out[:, qs], out[:, qs], lse[:, qs])
        part = dense_backward(rows[0], qd, kd, vd, rows[1], rows[2], call.is_causal, call.scale)
        del qd, kd, vd
        if whole:  # contiguous as the op's fake implementation declares (cuDNN follows BSHD-strided inputs)
            grads = [g.contiguous() for g in part]
            break
        if not grads:
            grads = [
                grad_out.new_empty((b, hq, sq, call.head_dim)),
                *(grad_out.new_empty((b, hkv, sk, d) if need_dkv else (0,)) for d in (call.head_dim, call.head_dim_v)),
            ]
        grads[0][:, qs].copy_(part[0])
        if need_dkv:
            grads[1][:, ks].copy_(part[1])
            grads[2][:, ks].copy_(part[2])
        del part
    if not need_dkv:
        grads[1:] = [grad_out.new_empty((0,)), grad_out.new_empty((0,))]
    return grads[0], grads[1], grads[2]


def _chunks_in_place(q, k, v, out, lse, grad_out, call, bounds, need_dkv, release_held, kv_once):
    """backward_in_chunks through the cuDNN frontend: each chunk's gradients written into the whole ones' head
    ranges (dK/dV into a chunk's scratch where they are not needed); Q, where it is not quantised, and K/V with
    `kv_once` are read in place from whole tensors."""
    b, groups, sk, dtype = call.batch, call.groups, call.kv_len, call.dtype
    dims = (call.head_dim, call.head_dim_v)
    dense_kv = HeadDequantizer([k, v], dtype)
    whole_kv = dense_kv(slice(None)) if kv_once else None
    if kv_once and release_held:
        _release((k, v))
    # Q read in place where it is held as given in the call's dtype (the kv presets), else dequantised by chunk
    dense_q = HeadDequantizer([q], dtype) if q.spec.quantized or q.data.dtype != dtype else None
    dq = grad_out.new_empty((b, call.q_heads, call.q_len, call.head_dim))
    dkv = [grad_out.new_empty((b, call.kv_heads, sk, d) if need_dkv else (0,)) for d in dims]
    for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True):
        qd = q.data if dense_q is None else dense_q(slice(h0 * groups, h1 * groups))[0]
        kd, vd = whole_kv if kv_once else dense_kv(slice(h0, h1))
        if release_held and h1 == call.kv_heads:
            _release((q,) if kv_once else (q, k, v))
        dk, dv = dkv if need_dkv else [torch.empty((b, h1 - h0, sk, d), dtype=dtype, device=dq.device) for d in dims]
        cudnn_graph.backward_into(
            dq, dk, dv, grad_out, qd, kd, vd, out, lse, call.is_causal, call.scale, (h0, h1), groups
        )  # fmt: skip
        del qd, kd, vd, dk, dv
    return dq, dkv[0], dkv[1]


def _release(held: tuple[QuantizedTensor, ...]) -> None:
    """Free the storage of the quantised operands' parts (codes, scales, zero points, means); the kernels queued
    on them still read them, as the caching allocator hands the memory out again only in stream order."""
    for t in held:
        if t.spec.quantized:
            for part in (t.data, t.scale, t.zero_point, t.mean):
                if part is not None and part.untyped_storage().resizable():
                    part.untyped_storage().resize_(0)
