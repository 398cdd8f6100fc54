"""Evaluation preprocessing as data, and timm's model conventions (``pretrained_cfg``, ``feature_info``).

:class:`Preprocessing` holds the one set of evaluation defaults: those of the official weights (bicubic resize,
full centre crop, ImageNet mean/std; the official README's results use ``--full_crop``, and timm records the same).
They apply to every weight file that records nothing (official, timm and MindCV files, bare variants). A training
checkpoint records its training config instead, whose keys mean what MindCV's mean (bilinear, crop 0.875 when
left out): :meth:`Preprocessing.from_train_config` reads those, so ``xcit validate`` and ``xcit predict`` evaluate
a trained model as it was trained. A hub folder records timm's ``pretrained_cfg``
(:meth:`Preprocessing.from_pretrained_cfg` / :meth:`Preprocessing.pretrained_cfg`).

:func:`timm_conventions` gives a model timm's attributes, so ``timm.data.resolve_data_config(model=model)`` and
timm's feature wrappers (``FeatureGetterNet``) work on it unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # input channels -> how training images are decoded


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to ``size / crop_pct`` with ``interpolation``, centre-crop ``size``, normalise with
    ``mean`` / ``std`` (0-1 scale, one value per input channel)."""

    size: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} need one value per channel each")

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def for_channels(self, in_chans: int) -> Preprocessing:
        """The same settings for ``in_chans`` input channels (see :func:`channel_stats`)."""
        mean, std = channel_stats(self.mean, self.std, in_chans)
        return replace(self, mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's preprocessing keys (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``,
        ``std``)."""
        return {
            "input_size": (self.in_chans, self.size, self.size),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict[str, Any]) -> Preprocessing:
        """Read timm's keys; what is missing keeps the defaults."""
        base = cls()
        return cls(
            size=int(cfg["input_size"][-1]) if cfg.get("input_size") else base.size,
            crop_pct=float(cfg.get("crop_pct") or base.crop_pct),
            interpolation=str(cfg.get("interpolation") or base.interpolation),
            mean=tuple(cfg.get("mean") or base.mean),
            std=tuple(cfg.get("std") or base.std),
        )

    @classmethod
    def from_train_config(cls, cfg) -> Preprocessing:
        """The evaluation preprocessing of a :class:`xcit.config.train_config.TrainConfig` (MindCV's meaning of its
        keys: mean and std on the 0-255 or 0-1 scale, ``random`` interpolation evaluates bicubic, as timm does)."""
        mean, std = cfg.norm_mean_std
        interpolation = "bicubic" if cfg.interpolation == "random" else cfg.interpolation
        prep = cls(int(cfg.image_resize), float(cfg.crop_pct), interpolation, mean, std)
        return prep.for_channels(int(getattr(cfg, "in_channels", 3) or 3))


def channel_stats(mean, std, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std for ``in_chans`` channels. Values that already fit are kept, one value is repeated; 3 (RGB)
    values become their average for 1 channel (a grey image's statistics), and for more channels the RGB values
    followed by their average for each extra band."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    out = []
    for v in (mean, std):
        if len(v) == in_chans:
            out.append(v)
        elif len(v) == 1:
            out.append(v * in_chans)
        elif len(v) == 3 and in_chans == 1:
            out.append((sum(v) / 3,))
        elif len(v) == 3 and in_chans > 3:
            out.append(v + (sum(v) / 3,) * (in_chans - 3))
        else:
            raise ValueError(f"mean/std {v} do not fit {in_chans} input channels: give {in_chans} values")
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------------
# timm's conventions
# ----------------------------------------------------------------------------------------------------------------------


def pretrained_cfg(model: nn.Module, prep: Preprocessing | None = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for an :class:`xcit.XCiT`: ``prep`` (default: :class:`Preprocessing` at the
    model's resolution) for the model's input channels, plus the model's entries."""
    prep = (prep or Preprocessing(size=model.cfg.img_size)).for_channels(model.cfg.in_chans)
    return {
        "architecture": model.name,
        **prep.pretrained_cfg(),
        "num_classes": model.num_classes,
        "fixed_input_size": False,  # the Fourier encoding is recomputed per grid: any multiple of the patch works
        "first_conv": "patch_embed.proj.0.0",
        "classifier": "head",
    }


def feature_info(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per XCA block, as timm's xcit: every block's tokens are a map at stride ``patch_size``."""
    return [
        dict(num_chs=model.num_features, reduction=model.patch_size, module=f"blocks.{i}")
        for i in range(len(model.blocks))
    ]


def pyramid_feature_info(pyramid: nn.Module, prefix: str = "") -> list[dict[str, Any]]:
    """One entry per level of an :class:`xcit.model.pyramid.XCiTPyramid` (strides 4, 8, 16, 32)."""
    return [
        dict(num_chs=c, reduction=s, module=f"{prefix}fpn.{i}")
        for i, (c, s) in enumerate(zip(pyramid.channels, pyramid.strides))
    ]


def timm_conventions(model: nn.Module, prep: Preprocessing | None = None) -> nn.Module:
    """Set ``pretrained_cfg`` (and its older name ``default_cfg``) and ``feature_info`` on ``model``; returns it."""
    model.pretrained_cfg = pretrained_cfg(model, prep)
    model.default_cfg = model.pretrained_cfg
    model.feature_info = feature_info(model)
    return model


def model_preprocessing(model: nn.Module, size: int | None = None) -> Preprocessing:
    """The preprocessing ``model`` records (its ``pretrained_cfg``), at resolution ``size`` if given."""
    cfg = getattr(model, "pretrained_cfg", None)
    prep = Preprocessing.from_pretrained_cfg(cfg) if cfg else Preprocessing(size=model.cfg.img_size)
    return replace(prep, size=size) if size else prep
