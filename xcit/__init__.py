"""xcit: train, validate and use XCiT (Cross-Covariance Image Transformers) in PyTorch."""

from .backbone import XCiTBackbone
from .loading import from_pretrained, load_model
from .model import XCiT, XCiTConfig
from .pyramid import XCiTPyramid
from .variants import VARIANTS, create_model, get_config, list_models
from .weights import WeightsError, convert, load_weights, read_weights, save_safetensors

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "train":  # xcit.train(config, **keys): the submodule, callable (xcit.train.run_config), loaded lazily
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module 'xcit' has no attribute {name!r}")


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
    "train",
]
