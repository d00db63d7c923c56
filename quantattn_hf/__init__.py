"""quantattn-hf: attention with operands quantised on the fly, for diffusers and transformers."""

from .attention import quantized_attention
from .calibration import CalibrationError, load_calibrated, save_calibrated
from .config import OperandQuant, QuantConfig
from .quant import QuantizedTensor, quantize

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "OperandQuant",
    "QuantConfig",
    "QuantizedTensor",
    "load_calibrated",
    "quantize",
    "quantized_attention",
    "save_calibrated",
]
