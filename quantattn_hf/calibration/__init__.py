"""Calibration: measure Q/K/V once, compute static scales, store them in safetensors metadata (docs/calibration.md)."""

from .checkpoint import load_calibrated, read_calibration, save_calibrated, save_calibration
from .fingerprint import check_fingerprint, config_sha256, model_fingerprint
from .methods import METHODS, Method, compute_calibration, operand_static
from .observe import notify, observe
from .runner import calibrate, collect, span_for
from .schema import (
    CALIBRATION_SCHEMA_VERSION,
    FORMAT_NAME,
    Calibration,
    CalibrationError,
    parse_metadata,
    static_operands,
    takes_static,
)
from .stats import CalibrationStats, OperandStats
from .use import (
    LayerCalibration,
    attach_static_scales,
    attached_calibration,
    enable,
    load_calibration,
    load_layer_calibration,
)

__all__ = [
    "CALIBRATION_SCHEMA_VERSION",
    "FORMAT_NAME",
    "METHODS",
    "Calibration",
    "CalibrationError",
    "CalibrationStats",
    "LayerCalibration",
    "Method",
    "OperandStats",
    "attach_static_scales",
    "attached_calibration",
    "calibrate",
    "check_fingerprint",
    "collect",
    "compute_calibration",
    "config_sha256",
    "enable",
    "load_calibrated",
    "load_calibration",
    "load_layer_calibration",
    "model_fingerprint",
    "notify",
    "observe",
    "operand_static",
    "parse_metadata",
    "read_calibration",
    "save_calibrated",
    "save_calibration",
    "span_for",
    "static_operands",
    "takes_static",
]
