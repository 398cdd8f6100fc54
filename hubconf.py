"""torch.hub entry points: one per XCiT variant, plus ``from_pretrained`` for hub-style folders.

model = torch.hub.load("OWNER/xcit", "xcit_tiny_12_p16_224", pretrained=True)  # released weights, cached
model = torch.hub.load("OWNER/xcit", "xcit_tiny_12_p16_224", pretrained="xcit_tiny_12_p16_224.fb_dist_in1k")
model = torch.hub.load("OWNER/xcit", "xcit_tiny_12_p16_224", pretrained="weights.pth")
model = torch.hub.load("OWNER/xcit", "from_pretrained", name_or_path="path/or/USER/REPO")
model = torch.hub.load("/local/clone", "xcit_tiny_12_p16_224", source="local")
"""

from __future__ import annotations

from xcit.weights.factory import create_model as _create_model
from xcit.weights.factory import list_models as _list_models
from xcit.weights.loading import from_pretrained as _from_pretrained

dependencies = ["torch", "safetensors"]


def _entry(name: str):
    def entry(pretrained: bool | str | None = None, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__doc__ = (
        f"{name}: ``pretrained`` is True (the released weights: timm's default tag, fetched once from the Hugging "
        "Face Hub or the release URL and cached), a release name (``xcit_tiny_12_p16_224.fb_dist_in1k``), or a path "
        "to weights in any format xcit reads (official, timm, MindCV, this project's checkpoints); other keyword "
        "arguments go to ``xcit.create_model``."
    )
    return entry


def from_pretrained(name_or_path: str, **kwargs):
    """A folder written by ``model.save_pretrained`` or a Hugging Face Hub repo id (see ``xcit.from_pretrained``)."""
    return _from_pretrained(name_or_path, **kwargs)


for _name in _list_models():
    globals()[_name] = _entry(_name)
