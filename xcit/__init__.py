"""xcit: train, validate and use XCiT (Cross-Covariance Image Transformers) in PyTorch."""

from .backbone import XCiTBackbone
from .loading import from_pretrained, load_model
from .model import XCiT, XCiTConfig
from .pyramid import XCiTPyramid
from .variants import VARIANTS, create_model, get_config, list_models
from .weights import WeightsError, convert, load_weights, read_weights, save_safetensors

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "WeightsError",
    "XCiT",
    "XCiTBackbone",
    "XCiTConfig",
    "XCiTPyramid",
    "convert",
    "create_model",
    "from_pretrained",
    "get_config",
    "list_models",
    "load_model",
    "load_weights",
    "read_weights",
    "save_safetensors",
]
