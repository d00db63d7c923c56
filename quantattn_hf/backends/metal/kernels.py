"""What the Metal kernels serve and how they are called: shared by the MPS and the emulated backends.

The two backends differ only in how a kernel is launched (torch.mps.compile_shader on MPS tensors, or
the fiber harness on CPU tensors); the choice of kernel, the parameter structs, the buffers and the
checks of what a call may ask are here, once.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from pathlib import Path

import torch

from ...config import OperandQuant
from ...quant import QuantizedTensor, effective_block, num_blocks, quantize
from ..base import AttentionCall, Backend
from ..reference import fully_masked_value
from .sources import decode_head_dims, forward_configs, library_source, pack_struct, struct_layout

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
P_ROUND_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
DECODE_MAX_ROWS = 8
MAX_ELEMENTS = 2**31 - 1


def _operand_fields(prefix: str, t: QuantizedTensor) -> dict[str, int]:
    """Scale / zero point / mean indexing of a held K or V for qa_dequant (scale index per token and channel)."""
    spec = t.spec
    _, _, s, d = t.shape
    nb = num_blocks(s, spec.block_size)
    block = effective_block(s, spec.block_size)
    layouts = {
        "channel": (nb * d, block, d, 1),
        "block": (nb, block, 1, 0),
        "row": (s, 1, 1, 0),
        "tensor": (0, 1, 0, 0),
    }
    sbh, tdiv, st, sc = layouts[spec.mode]
    return {
        f"{prefix}_bits": 8 if spec.precision == "int8" else 4,
        f"{prefix}_unsigned": int(spec.strategy == "asymmetric"),
        f"{prefix}_has_zero": int(t.zero_point is not None),
        f"{prefix}_has_mean": int(t.mean is not None),
        f"{prefix}_scale_sbh": sbh,
        f"{prefix}_scale_tdiv": tdiv,
        f"{prefix}_scale_st": st,
        f"{prefix}_scale_sc": sc,
        f"{prefix}_mean_sbh": nb * d,
        f"{prefix}_mean_tdiv": block,
    }


class MetalKernels(Backend):
    """The quantiser, forward and decode kernels of shaders/*.metal behind the Backend interface."""

    name = "metal-kernels"
    #: keys per decode split; the split count is ceil(kv_len / this), at most 64
    decode_split_tokens = 256

    def __init__(self, shaders: Path | None = None) -> None:
        self.shaders = shaders
        self._warned: set[str] = set()
        self._source: str | None = None
        self._empty_value: float | None = None

    # ---- what each backend provides ----
    @abstractmethod
    def _launch(self, name: str, buffers: list[torch.Tensor], n_groups: int, group_size: int) -> None:
        """Run kernel `name` over n_groups threadgroups of group_size threads on these buffers."""

    @abstractmethod
    def _device_reason(self, device: torch.device) -> str | None:
        """None when tensors on `device` can be served, else why not."""

    def _new_output(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    # ---- shared ----
    @property
    def source(self) -> str:
        """The concatenated shader source."""
        if self._source is None:
            self._source = library_source(self.shaders)
        return self._source

    def head_dims(self) -> tuple[int, ...]:
        """Head dims the attention kernels are instantiated for."""
        return tuple(sorted(set(forward_configs(self.source)) & set(decode_head_dims(self.source))))

    def _params(self, struct_name: str, values: dict[str, int | float], device: torch.device) -> torch.Tensor:
        raw = pack_struct(struct_layout(struct_name, self.source), values)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)

    def _dummy(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(16, dtype=torch.uint8, device=device)

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"quantattn-hf: backend {self.name!r} {reason}", RuntimeWarning, stacklevel=3)

    def quantize_unsupported_reason(self, x: torch.Tensor, spec: OperandQuant) -> str | None:
        """None when the quantiser kernels serve (x, spec), else why quant.quantize is used instead."""
        if spec.precision not in ("int8", "int4"):
            return f"quantiser kernels hold int8/int4 only, not {spec.precision}"
        if spec.strategy != "symmetric":
            return f"quantiser kernels are symmetric only, not {spec.strategy}"
        if spec.mode not in ("channel", "row"):
            return f"quantiser kernels serve the channel (K) and row (V) modes, not {spec.mode}"
        if x.dtype not in DTYPE_CODES:
            return f"quantiser kernels read float16/bfloat16/float32, not {x.dtype}"
        if x.numel() > MAX_ELEMENTS or x.numel() == 0:
            return "tensor size outside the kernels' 32-bit indexing"
        return self._device_reason(x.device)

    def quantize(self, x: torch.Tensor, spec: OperandQuant, strategy_version: int = 1) -> QuantizedTensor:
        if not spec.quantized:
            return quantize(x, spec, strategy_version)
        reason = self.quantize_unsupported_reason(x, spec)
        if reason is not None:
            self._warn_once(f"uses quant.quantize for this operand ({reason})")
            return quantize(x, spec, strategy_version)
        if x.stride(-1) != 1:
            x = x.contiguous()
        b, h, s, d = x.shape
        bits = 8 if spec.precision == "int8" else 4
        row_mode = spec.mode == "row"
        nb = s if row_mode else num_blocks(s, spec.block_size)
        code_shape, code_dtype = ((b, h, s, d), torch.int8) if bits == 8 else ((b, h, s, d // 2), torch.uint8)
        codes = self._new_output(code_shape, code_dtype, x.device)
        scale = self._new_output((b, h, nb, 1 if row_mode else d), torch.float32, x.device)
        mean = self._new_output((b, h, nb, d), torch.float32, x.device) if spec.subtract_mean else None
        params = {
            "batch": b,
            "heads": h,
            "seq_len": s,
            "head_dim": d,
            "x_dtype": DTYPE_CODES[x.dtype],
            "x_sb": x.stride(0),
            "x_sh": x.stride(1),
            "x_ss": x.stride(2),
            "bits": bits,
            "block": 1 if row_mode else effective_block(s, spec.block_size),
            "n_blocks": nb,
            "subtract_mean": int(spec.subtract_mean),
        }
        buffers = [x, codes, scale, mean if mean is not None else self._dummy(x.device)]
        buffers.append(self._params("QAQuantParams", params, x.device))
        if row_mode:
            self._launch("qa_quant_row", buffers, math.ceil(b * h * s / 4), 128)
        else:
            self._launch("qa_quant_channel", buffers, b * h * nb, 64)
        return QuantizedTensor(codes, scale, None, mean, spec, (b, h, s, d), x.dtype, strategy_version)

    def unsupported_reason(self, call: AttentionCall) -> str | None:
        cfg = call.config
        if cfg.q.quantized:
            return f"the kernels take Q as a float format, not {cfg.q.precision}"
        for op, spec in (("K", cfg.k), ("V", cfg.v)):
            if spec.precision not in ("int8", "int4"):
                return f"{op} held as {spec.precision}: the kernels read int8/int4 K and V"
        if cfg.p.precision not in P_ROUND_CODES:
            return f"P rounded to {cfg.p.precision}: the kernels round P to fp32/fp16/bf16"
        if call.dtype not in DTYPE_CODES:
            return f"query dtype {call.dtype}"
        if call.head_dim not in self.head_dims():
            return f"head dim {call.head_dim} (kernels: {', '.join(map(str, self.head_dims()))})"
        if call.head_dim_v != call.head_dim:
            return f"value head dim {call.head_dim_v} differs from the query/key head dim {call.head_dim}"
        if call.q_len == 0 or call.kv_len == 0:
            return "empty sequence"
        rows = call.batch * call.q_heads * max(call.q_len, call.kv_len)
        if rows * max(call.head_dim, call.kv_len if call.attn_mask is not None else 0) > MAX_ELEMENTS:
            return "tensor size outside the kernels' 32-bit indexing"
        return self._device_reason(torch.device(call.device))

    def uses_decode(self, call: AttentionCall) -> bool:
        """Whether a call goes to the split-K decode kernel (few query rows per K/V head)."""
        return call.groups * call.q_len <= DECODE_MAX_ROWS

    def attention(
        self, q: QuantizedTensor, k: QuantizedTensor, v: QuantizedTensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = q.data.device
        qx = q.data if q.data.stride(-1) == 1 else q.data.contiguous()
        if qx.dtype != call.dtype:
            qx = qx.to(call.dtype)
        b, hq, sq, d = call.batch, call.q_heads, call.q_len, call.head_dim
        values: dict[str, int | float] = {
            "batch": b,
            "q_heads": hq,
            "kv_heads": call.kv_heads,
            "q_len": sq,
            "kv_len": call.kv_len,
            "head_dim": d,
            "q_dtype": DTYPE_CODES[qx.dtype],
            "out_dtype": DTYPE_CODES[qx.dtype],
            "q_sb": qx.stride(0),
            "q_sh": qx.stride(1),
            "q_ss": qx.stride(2),
            **_operand_fields("k", k),
            **_operand_fields("v", v),
            "causal": int(call.is_causal),
            "p_round": P_ROUND_CODES[call.config.p.precision],
            "scale": call.scale,
            "empty_value": self._fully_masked(),
        }
        mask = call.attn_mask
        if mask is None:
            values.update(mask_kind=0, mask_sb=0, mask_sh=0, mask_sq=0, mask_sk=0)
            mask_buf = self._dummy(device)
        else:
            if mask.dtype != torch.bool and mask.dtype != torch.float32:
                mask = mask.to(torch.float32)
            sb, sh, sqs, sks = mask.stride()
            kind = 1 if mask.dtype == torch.bool else 2
            values.update(mask_kind=kind, mask_sb=sb, mask_sh=sh, mask_sq=sqs, mask_sk=sks)
            mask_buf = mask
        operands = [qx]
        for t in (k, v):
            operands.append(t.data.contiguous())
            for stat in (t.scale, t.zero_point, t.mean):
                operands.append(self._dummy(device) if stat is None else stat.to(torch.float32).contiguous())
        operands.append(mask_buf)
        out = self._new_output((b, hq, sq, d), qx.dtype, device)
        lse = self._new_output((b, hq, sq), torch.float32, device)
        if self.uses_decode(call):
            n_split = max(1, min(64, math.ceil(call.kv_len / self.decode_split_tokens)))
            values["n_split"] = n_split
            params = self._params("QAAttnParams", values, device)
            part_o = self._new_output((b, hq, sq, n_split * 4, d), torch.float32, device)
            part_ml = self._new_output((b, hq, sq, n_split * 4, 2), torch.float32, device)
            self._launch(f"qa_attn_decode_d{d}", [*operands, part_o, part_ml, params], b * call.kv_heads * n_split, 128)
            self._launch("qa_attn_combine", [part_o, part_ml, out, lse, params], b * hq * sq, 32)
        else:
            values["n_split"] = 1
            params = self._params("QAAttnParams", values, device)
            nsg, _ = forward_configs(self.source)[d]
            n_groups = b * hq * math.ceil(sq / (8 * nsg))
            self._launch(f"qa_attn_fwd_d{d}", [*operands, out, lse, params], n_groups, 32 * nsg)
        return out, lse

    def _fully_masked(self) -> float:
        if self._empty_value is None:
            self._empty_value = float(fully_masked_value(torch.float32, torch.device("cpu")))
        return self._empty_value
