"""cuDNN's fused attention backward through the cuDNN frontend's graph API, its gradients written into given tensors.

torch's `_scaled_dot_product_cudnn_attention_backward` allocates its gradients, so a backward split into head
ranges must copy each range's gradients into the whole ones and hold both meanwhile. The frontend
(`pip install nvidia-cudnn-frontend==1.16.*`, the optional `cuda` extra) takes any strided tensors as outputs: each head
range writes straight into its slice of the whole gradients, and a range then holds only its dense operands
and its share of cuDNN's workspace. Whole tensors are read and written at a head range's offset, without views;
graphs are built once per signature (the range's shapes, the strides, dtype, mask, scale) and replayed with new
pointers. Without the package (or with QUANTATTN_CUDNN_GRAPH=0) `cudnn_backward` uses torch's op.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

ENV = "QUANTATTN_CUDNN_GRAPH"
TESTED = "1.16."
MAX_GRAPHS = 64


def available() -> bool:
    """Whether a tested cuDNN frontend (1.16.x) is installed and not turned off by QUANTATTN_CUDNN_GRAPH=0."""
    return os.environ.get(ENV, "1") != "0" and _installed()


@functools.cache
def _installed() -> bool:
    """The frontend's Python API changes between releases (1.32's pygraph is a Python class over an internal builder,
    whose `_execute` takes other arguments than 1.16's binding): only the tested release is used."""
    if importlib.util.find_spec("cudnn") is None:
        return False
    try:
        return importlib.metadata.version("nvidia-cudnn-frontend").startswith(TESTED)
    except importlib.metadata.PackageNotFoundError:
        return False


@functools.cache
def _handle(device_index: int) -> Any:
    import cudnn

    with torch.cuda.device(device_index):
        return cudnn.create_handle()


@dataclass
class _Graph:
    graph: Any
    uids: tuple[int, ...]  # of q, k, v, o, dO, stats, dQ, dK, dV
    workspace: int


_GRAPHS: dict[tuple, _Graph] = {}
_STREAMS: dict[int, int] = {}  # device index -> the stream its handle was last set to


def _build(q, k, v, o, d_o, stats, dq, dk, dv, is_causal: bool, scale: float) -> _Graph:
    import cudnn

    io = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}[q.dtype]
    graph = cudnn.pygraph(
        io_data_type=io,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=_handle(q.device.index),
    )
    # detached views: tensor_like reads them by DLPack, which refuses tensors that require grad
    inputs = [graph.tensor_like(t.detach()) for t in (q, k, v, o, d_o, stats)]
    outputs = graph.sdpa_backward(
        name="sdpa_backward",
        q=inputs[0], k=inputs[1], v=inputs[2], o=inputs[3], dO=inputs[4], stats=inputs[5],
        attn_scale=scale, use_causal_mask=is_causal,
    )  # fmt: skip
    for node, t in zip(outputs, (dq, dk, dv), strict=True):
        node.set_output(True).set_dim(list(t.shape)).set_stride(list(t.stride()))
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Graph(graph, tuple(t.get_uid() for t in (*inputs, *outputs)), graph.get_workspace_size())


# per tensor of (q, k, v, o, dO, stats, dQ, dK, dV): whether its heads are the query heads (else the K/V heads)
QUERY_SIDE = (True, False, False, True, True, True, True, False, False)


def first_head(t: torch.Tensor, start: int, width: int) -> int:
    """Where in `t` heads [start, start + width) begin: 0 where `t` has exactly `width` heads (a tensor made for
    the range), else `start` (a whole tensor, its range read or written in place)."""
    if t.shape[1] == width:
        return 0
    if start + width > t.shape[1]:
        raise ValueError(f"heads [{start}, {start + width}) of a tensor of {t.shape[1]} heads")
    return start


def backward_into(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    kv_heads: tuple[int, int],
    groups: int,
) -> None:
    """Attention's backward over dense [B, H, S, D] operands (GQA: `groups` query heads a K/V head) given the
    output and the [B, Hq, Sq] natural-log lse, for the K/V heads [h0, h1) of `kv_heads` and their query heads,
    written into dq, dk, dv. Each tensor is either the range's own (h1 - h0 heads, or as many times `groups`)
    or a whole one (any strides) whose range is read or written in place, by pointer: no views per call."""
    import cudnn

    h0, h1 = kv_heads
    tensors = (q, k, v, out, grad_out, lse, dq, dk, dv)
    q_span, kv_span = (h0 * groups, (h1 - h0) * groups), (h0, h1 - h0)  # (first head, heads) of each side
    spans = [q_span if side else kv_span for side in QUERY_SIDE]
    firsts = [first_head(t, *span) for t, span in zip(tensors, spans, strict=True)]
    q_shape, k_shape = (q.shape[0], q_span[1], *q.shape[2:]), (k.shape[0], kv_span[1], *k.shape[2:])
    key = (q.dtype, q.device.index, is_causal, scale, q_shape, k_shape, *(t.stride() for t in tensors))
    entry = _GRAPHS.get(key)
    if entry is None:
        if len(_GRAPHS) >= MAX_GRAPHS:
            _GRAPHS.clear()
        views = [t.narrow(1, h, span[1]) for t, span, h in zip(tensors, spans, firsts, strict=True)]
        views[5] = views[5].unsqueeze(-1)  # cuDNN's stats are [B, H, S, 1]
        entry = _GRAPHS[key] = _build(*views, is_causal, scale)
    index = q.device.index
    handle = _handle(index)
    stream = torch._C._cuda_getCurrentRawStream(index)  # current_stream(index).cuda_stream, without the Stream
    if _STREAMS.get(index) != stream:
        cudnn.set_stream(handle=handle, stream=stream)
        _STREAMS[index] = stream
    workspace = torch.empty(entry.workspace, device=q.device, dtype=torch.uint8)
    pointers = {
        uid: t.data_ptr() + h * t.stride(1) * t.element_size()
        for uid, t, h in zip(entry.uids, tensors, firsts, strict=True)
    }
    entry.graph._execute(pointers, workspace.data_ptr(), handle)  # the binding under pygraph.execute's wrapper
