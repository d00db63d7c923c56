"""Training through quantised attention: a forward op that keeps the held operands, and its backward.

`quantattn::attention` returns only (out, lse), so its autograd could not save the quantised
K/V. `quantattn::attention_train` runs the same forward and also returns the held Q, K and V
(codes, scales, zero points, means); its autograd saves those, the output and the lse, never
the full-precision K/V. `quantattn::attention_bwd` is the backward (straight-through estimator
for every quantisation, P's included): on CUDA cuDNN's backward over operands dequantised by a Triton kernel
where cuDNN serves the call (`backends/cudnn_backward.py`), else the Triton backward kernels; the reference
elsewhere. Both are custom
ops with fake implementations, so torch.compile traces forward and backward.
`quantattn::attention_held_kv` (pre-quantised K/V) gets a backward for the query here too.
`quantized_attention` calls `attention_train` when autograd records and Q, K or V requires a gradient: the
op under torch.compile, else the same forward and backward functions through an autograd.Function. The mask, the
scale and calibrated statistics get no gradient. An eager backward that does not keep its graph (no
retain_graph) frees the held parts once dequantised (cuDNN's path): they are the forward's own (the eager route
does not return them), and the peak of that backward is then SDPA's.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch

from .attention import (
    _config_from_json,
    _held_shape,
    _quantize_operand,
    _unpack_static,
    make_call,
    quantize_kv,
    run_attention,
    select_backend_for_quantiser,
)
from .backends import DEVICE_DEFAULTS, AttentionCall
from .backends import reference_backward as _reference_backward
from .config import OperandQuant
from .quant import STORAGE_DTYPES, QuantizedTensor, group_shape, num_blocks

PARTS = 4
_WARNED: set[str] = set()


def _held_like(x: torch.Tensor, spec: OperandQuant) -> list[torch.Tensor]:
    """Empty tensors shaped as the held (data, scale, zero point, mean) of `x`; (0,) where absent."""
    if not spec.quantized:
        return [x.new_empty((0,), dtype=torch.float32) for _ in range(PARTS)]
    b, h, s, d = x.shape
    nb = num_blocks(s, spec.block_size)
    data = x.new_empty((b, h, s, d // 2 if spec.precision == "int4" else d), dtype=STORAGE_DTYPES[spec.precision])
    group = group_shape(tuple(x.shape), spec)
    scale = x.new_empty(group, dtype=torch.float32)
    zero = x.new_empty(group if spec.strategy == "asymmetric" else (0,), dtype=torch.float32)
    mean = x.new_empty((b, h, nb, d) if spec.subtract_mean else (0,), dtype=torch.float32)
    return [data, scale, zero, mean]


def _held_outputs(t: QuantizedTensor, like: torch.Tensor) -> list[torch.Tensor]:
    """The held parts of a quantised operand as contiguous op outputs; (0,) placeholders where absent."""
    if not t.spec.quantized:
        return [like.new_empty((0,), dtype=torch.float32) for _ in range(PARTS)]
    parts = (t.data, t.scale, t.zero_point, t.mean)
    return [like.new_empty((0,), dtype=torch.float32) if p is None else p.contiguous() for p in parts]


def _saved_parts(
    held: tuple[torch.Tensor, ...], raw: torch.Tensor, spec: OperandQuant
) -> tuple[torch.Tensor | None, ...]:
    """What backward keeps of one operand: its held parts, or the tensor itself when it is not quantised."""
    if not spec.quantized:
        return (raw, None, None, None)
    data, scale, zero, mean = held
    return (
        data,
        scale,
        zero if spec.strategy == "asymmetric" else None,
        mean if spec.subtract_mean else None,
    )


def _attention_train(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config_json: str,
    backend: str,
    static: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    config = _config_from_json(config_json)
    q_static, k_static, v_static = _unpack_static(static)
    kq, vq = quantize_kv(query, key, value, config, backend, k_static, v_static)
    out, lse, qq = run_attention(query, kq, vq, attn_mask, is_causal, scale, config, backend, q_static)
    held = [*_held_outputs(qq, query), *_held_outputs(kq, query), *_held_outputs(vq, query)]
    # calibrated statistics can come back from quantize as given; an op's outputs may not alias its inputs
    inputs = {t.untyped_storage().data_ptr() for t in (query, key, value, attn_mask, *static) if t is not None}
    held = [t.clone() if t.numel() and t.untyped_storage().data_ptr() in inputs else t for t in held]
    return [out, lse, *held]


_attention_train_op = torch.library.custom_op("quantattn::attention_train", mutates_args=())(_attention_train)


@_attention_train_op.register_fake
def _attention_train_fake(query, key, value, attn_mask, is_causal, scale, config_json, backend, static):
    config = _config_from_json(config_json)
    b, hq, sq, _ = query.shape
    out = query.new_empty((b, hq, sq, value.shape[3]))
    lse = query.new_empty((b, hq, sq), dtype=torch.float32)
    return [out, lse, *_held_like(query, config.q), *_held_like(key, config.k), *_held_like(value, config.v)]


def _attention_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_data: torch.Tensor,
    q_scale: torch.Tensor | None,
    q_zero: torch.Tensor | None,
    q_mean: torch.Tensor | None,
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
    need_dkv: bool,
    release_held: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = _config_from_json(config_json)
    sv, dtype = config.strategy_version, grad_out.dtype
    kq = QuantizedTensor(k_data, k_scale, k_zero, k_mean, config.k, _held_shape(k_data, config.k), dtype, sv)
    vq = QuantizedTensor(v_data, v_scale, v_zero, v_mean, config.v, _held_shape(v_data, config.v), dtype, sv)
    if config.q.quantized and q_scale is None:
        static = _unpack_static([*q_static, None, None, None, None, None, None])[0]
        qq = _quantize_operand(select_backend_for_quantiser(q_data, backend), q_data, config.q, sv, static)
    else:
        qq = QuantizedTensor(q_data, q_scale, q_zero, q_mean, config.q, _held_shape(q_data, config.q), dtype, sv)
    call = make_call(grad_out, qq.shape, vq.shape, attn_mask, is_causal, scale, config)
    dq, dk, dv = attention_backward(qq, kq, vq, out, lse, grad_out, grad_lse, call, backend, need_dkv, release_held)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


_attention_bwd_op = torch.library.custom_op("quantattn::attention_bwd", mutates_args=())(_attention_bwd)


def _backward_kernels(*args, release_held: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op where a graph is traced or recorded (torch.compile, create_graph), else its function
    called directly on plain tensors: the dispatcher's argument checks cost host time that a layer's backward
    cannot spare. `release_held` (the held operands are the forward's own and this backward runs once) applies
    to the direct call only: a traced graph keeps its inputs."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or type(args[0]) is not torch.Tensor:
        return _attention_bwd_op(*args)
    return _attention_bwd(*args, release_held and not _graph_kept())


def _graph_kept() -> bool:
    """Whether the running backward keeps its graph (retain_graph), so that saved tensors are read again; True
    where torch cannot say."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else kept()


@_attention_bwd_op.register_fake
def _attention_bwd_fake(
    grad_out, grad_lse, out, lse, q_data, q_scale, q_zero, q_mean, k_data, k_scale, k_zero, k_mean,
    v_data, v_scale, v_zero, v_mean, attn_mask, is_causal, scale, config_json, backend, q_static, need_dkv,
    release_held=False,
):  # fmt: skip
    config = _config_from_json(config_json)
    dq = grad_out.new_empty((*grad_out.shape[:3], _held_shape(q_data, config.q)[3]))
    if not need_dkv:
        return dq, grad_out.new_empty((0,)), grad_out.new_empty((0,))
    return dq, grad_out.new_empty(_held_shape(k_data, config.k)), grad_out.new_empty(_held_shape(v_data, config.v))


@functools.cache
def _cuda_backward_modules() -> tuple[ModuleType | None, ModuleType | None]:
    """(cudnn_backward, triton_backward), imported once (both need triton), or (None, None) without triton."""
    try:
        from .backends import cudnn_backward, triton_backward
    except ImportError:
        return None, None
    return cudnn_backward, triton_backward


def _backward_backend(name: str, device: torch.device, call: AttentionCall, grad_lse: torch.Tensor | None):
    """The backward kernels that serve this call: cuDNN's over dequantised operands where it can (CUDA), else
    the Triton ones, else None (the reference)."""
    name = name or DEVICE_DEFAULTS.get(device.type, "reference")
    if name == "reference":
        return None
    if name == "triton":
        reason = "triton cannot be imported"
        cudnn_backward, triton_backward = _cuda_backward_modules()
        if cudnn_backward is not None and cudnn_backward.unsupported_reason(call, grad_lse) is None:
            return cudnn_backward
        if triton_backward is not None:
            reason = triton_backward.unsupported_reason(call)
            if reason is None:
                return triton_backward
    else:
        reason = "it has no backward kernels"
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"quantattn-hf: backend {name!r} backward falls back to the reference ({reason})",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def attention_backward(
    q: QuantizedTensor,
    k: QuantizedTensor,
    v: QuantizedTensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    call: AttentionCall,
    backend: str = "",
    need_dkv: bool = True,
    release_held: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) over held operands by cuDNN's or the Triton kernels where they serve, else the reference.

    Without `need_dkv`, dK and dV are empty (0,) tensors (and only dQ is computed where the kernels allow).
    `release_held`: the quantised operands are read by no one after this call; the kernels may free them early.
    """
    kernels = _backward_backend(backend, grad_out.device, call, grad_lse)
    if kernels is not None:
        return kernels.attention_backward(q, k, v, out, lse, grad_out, grad_lse, call, need_dkv, release_held)
    compute = torch.float64 if call.dtype == torch.float64 else torch.float32
    dq, dk, dv = _reference_backward.attention_backward(
        q.dequantize(compute), k.dequantize(compute), v.dequantize(compute), out, lse, grad_out, grad_lse, call
    )
    if not need_dkv:
        dk, dv = grad_out.new_empty((0,)), grad_out.new_empty((0,))
    return dq, dk, dv


def _setup_train(ctx, inputs, output) -> None:
    query, key, value, attn_mask, is_causal, scale, config_json, backend, _ = inputs
    out, lse, *held = output
    config = _config_from_json(config_json)
    parts = (
        *_saved_parts(held[0:4], query, config.q),
        *_saved_parts(held[4:8], key, config.k),
        *_saved_parts(held[8:12], value, config.v),
    )
    ctx.save_for_backward(out, lse, *parts, attn_mask)
    ctx.args = (is_causal, scale, config_json, backend)
    # outputs nobody used (the lse, the held parts) get None, not zeros: no zero tensors allocated, and a
    # backward that takes no lse gradient (cuDNN's) can serve
    ctx.set_materialize_grads(False)


def _backward_train(ctx, grads, release_held: bool = False):
    grad_out, grad_lse = grads[0], grads[1]
    out, lse, *parts, attn_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    args = (grad_out, grad_lse, out, lse, *parts, attn_mask, *ctx.args, [None, None, None], need_dkv)
    dq, dk, dv = _backward_kernels(*args, release_held=release_held)
    return (dq, dk if need_dkv else None, dv if need_dkv else None, None, None, None, None, None, None)


def _setup_held(ctx, inputs, output) -> None:
    query, *kv, attn_mask, is_causal, scale, config_json, backend, q_static = inputs
    out, lse = output
    ctx.save_for_backward(out, lse, query, *kv, attn_mask, *q_static)
    ctx.args = (is_causal, scale, config_json, backend)
    ctx.n_static = len(q_static)
    ctx.set_materialize_grads(False)


def _backward_held(ctx, grad_out, grad_lse):
    out, lse, query, *rest = ctx.saved_tensors
    kv, attn_mask, q_static = rest[:8], rest[8], list(rest[9 : 9 + ctx.n_static])
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    args = (grad_out, grad_lse, out, lse, query, None, None, None, *kv, attn_mask, *ctx.args, q_static, False)
    dq = _backward_kernels(*args, release_held=False)[0]  # the held K/V are the caller's (a cache)
    return (dq, *([None] * 14))


torch.library.register_autograd("quantattn::attention_train", _backward_train, setup_context=_setup_train)


class _TrainAttention(torch.autograd.Function):
    """`quantattn::attention_train` and its autograd without the dispatcher, for eager training: the
    dispatcher's checks of 9 inputs and 14 outputs, each way, cost host time that a layer cannot spare. Its outputs
    are (out, lse) alone: the held parts are saved for backward, not returned (12 fewer outputs to record and to
    take gradients for)."""

    @staticmethod
    def forward(ctx, *inputs):
        result = _attention_train(*inputs)
        _setup_train(ctx, inputs, result)
        return result[0], result[1]

    @staticmethod
    def backward(ctx, *grads):
        return _backward_train(ctx, grads, release_held=True)  # the held parts are nobody else's


def attention_train(*inputs: object) -> tuple[torch.Tensor, ...]:
    """(out, lse) of `quantattn::attention_train(*inputs)` with autograd, and the held parts where the op runs: the
    op where torch.compile traces (or tensor subclasses dispatch), else the same functions through
    `_TrainAttention`, which keeps the held parts to itself and frees them in a backward that does not retain the
    graph."""
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in inputs[:3]):
        return tuple(torch.ops.quantattn.attention_train(*inputs))
    return _TrainAttention.apply(*inputs)


torch.library.register_autograd("quantattn::attention_held_kv", _backward_held, setup_context=_setup_held)
