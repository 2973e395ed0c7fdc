"""Model loading: format sniffing, JSON architecture specs, strict state_dict matching."""

from .arch import Residual, build_model, load_spec
from .formats import ModelFormat, sniff_model_format
from .loader import ARCH_METADATA_KEY, LoadedModel, load_model, save_model

__all__ = [
    "ARCH_METADATA_KEY", "LoadedModel", "ModelFormat", "Residual", "build_model", "load_model",
    "load_spec", "save_model", "sniff_model_format",
]
