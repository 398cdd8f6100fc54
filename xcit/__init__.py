"""xcit: train, validate and use XCiT (Cross-Covariance Image Transformers) in PyTorch."""

from .model.pyramid import XCiTPyramid
from .model.xcit import XCiT, XCiTConfig
from .weights.backbone import XCiTBackbone
from .weights.factory import VARIANTS, create_model, get_config, list_models
from .weights.files import WeightsError, convert, load_weights, read_weights, save_safetensors
from .weights.hub import save_pretrained
from .weights.loading import from_pretrained, load_model

__version__ = "0.1.0"


def __getattr__(name: str):
    if (
        name == "train"
    ):  # xcit.train(config, **keys): the subpackage, callable (xcit.train.fit.run_config), loaded lazily
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
    "save_pretrained",
    "save_safetensors",
    "train",
]
