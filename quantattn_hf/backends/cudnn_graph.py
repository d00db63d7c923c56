"""cuDNN's fused attention backward through the cuDNN frontend's graph API, its gradients written into given tensors.

torch's `_scaled_dot_product_cudnn_attention_backward` allocates its gradients, so a backward split into head
ranges must copy each range's gradients into the whole ones and hold both meanwhile. The frontend
(`pip install nvidia-cudnn-frontend==1.16.*`, the optional `cuda` extra) takes any strided tensors as outputs: each head
range writes straight into its slice of the whole gradients, and a range then holds only its dense operands
and its share of cuDNN's workspace. Graphs are built once per signature (shapes, strides, dtype, mask, scale) and
replayed with new pointers. Without the package (or with QUANTATTN_CUDNN_GRAPH=0) `cudnn_backward` uses torch's op.
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
) -> None:
    """Attention's backward over dense [B, H, S, D] operands (GQA: fewer K/V heads) given the output and the
    [B, Hq, Sq] natural-log lse, written into dq, dk, dv (any strides, e.g. head slices of larger tensors)."""
    import cudnn

    stats = lse.unsqueeze(-1)
    tensors = (q, k, v, out, grad_out, stats, dq, dk, dv)
    key = (q.dtype, q.device.index, is_causal, scale, q.shape, k.shape, *(t.stride() for t in tensors))
    entry = _GRAPHS.get(key)
    if entry is None:
        if len(_GRAPHS) >= MAX_GRAPHS:
            _GRAPHS.clear()
        entry = _GRAPHS[key] = _build(*tensors, is_causal, scale)
    index = q.device.index
    handle = _handle(index)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    if _STREAMS.get(index) != stream:
        cudnn.set_stream(handle=handle, stream=stream)
        _STREAMS[index] = stream
    workspace = torch.empty(entry.workspace, device=q.device, dtype=torch.uint8)
    pointers = dict(zip(entry.uids, (t.data_ptr() for t in tensors), strict=True))
    entry.graph._execute(pointers, workspace.data_ptr(), handle)  # the binding under pygraph.execute's wrapper
