"""quantattn-hf: attention with operands quantised on the fly, for diffusers and transformers."""

import importlib

from . import autograd  # noqa: F401  (registers the training op and the backward of the attention ops)
from .attention import quantized_attention
from .calibration import CalibrationError, load_calibrated, save_calibrated
from .config import OperandQuant, QuantConfig
from .integrations.transformers import configure
from .integrations.transformers import register as _register_transformers
from .quant import QuantizedTensor, StaticQuant, quantize

_register_transformers()


_LAZY = {
    "QuantizedKVCache": "quantattn_hf.integrations.kv_cache",
    **dict.fromkeys(
        (
            "apply",
            "remove",
            "FluxQuantAttnProcessor",
            "JointQuantAttnProcessor",
            "QuantAttnProcessor",
            "DispatchQuantAttnProcessor",
        ),
        "quantattn_hf.integrations.diffusers",
    ),
}


def __getattr__(name: str):
    """The integrations are imported on first use, so `import quantattn_hf` does not load diffusers."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantattn_hf' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "DispatchQuantAttnProcessor",
    "FluxQuantAttnProcessor",
    "JointQuantAttnProcessor",
    "QuantAttnProcessor",
    "OperandQuant",
    "QuantConfig",
    "QuantizedKVCache",
    "QuantizedTensor",
    "StaticQuant",
    "apply",
    "configure",
    "load_calibrated",
    "quantize",
    "quantized_attention",
    "remove",
    "save_calibrated",
]
