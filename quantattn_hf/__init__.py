"""quantattn-hf: attention with operands quantised on the fly, for diffusers and transformers."""

from .attention import quantized_attention
from .config import OperandQuant, QuantConfig
from .quant import QuantizedTensor, quantize

__version__ = "0.1.0"

__all__ = ["OperandQuant", "QuantConfig", "QuantizedTensor", "quantize", "quantized_attention"]
