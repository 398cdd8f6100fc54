"""XCiT as a multi-scale backbone for detection and segmentation (torchvision conventions).

:class:`XCiTBackbone` follows the official dense-task backbone (facebookresearch/xcit, ``detection/backbone/xcit.py``
and ``semantic_segmentation/backbone/xcit.py``): four XCA blocks are tapped ([3, 5, 7, 11] for depth 12,
[7, 11, 15, 23] for depth 24), their tokens reshaped to (B, D, H/p, W/p) without a norm, and resampled to strides
4 / 8 / 16 / 32. For p16 that is deconv-BN-GELU-deconv (x4), deconv (x2), identity, 2x2 max-pool; for p8 deconv
(x2), identity, max-pool 2, max-pool 4. The class-attention stage and the head are not part of the backbone.

Differences from the official code: the official fpn1 uses ``SyncBatchNorm``; here it is ``BatchNorm2d`` (call
``torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone)`` for multi-GPU training), and images only need to be a
multiple of the patch size (torchvision's detectors pad to 32 already).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..model.preprocessing import pyramid_feature_info
from ..model.pyramid import XCiTPyramid
from .factory import create_model
from .files import load_state_dict_checked, read_weights
from .loading import adapt_input_channels
from .pretrained import read_release, release_for

log = logging.getLogger("xcit")


class XCiTBackbone(nn.Module):
    """Stride 4 / 8 / 16 / 32 feature maps of an XCiT, as an ``OrderedDict`` {"0": s4, "1": s8, "2": s16, "3": s32}.

    Args:
        name: a variant name (see ``xcit models``).
        pretrained: weights in any supported format: classification or DINO weights (their head and
            class-attention weights are not used; the fpn layers start fresh), mmdet / mmseg checkpoints of the
            official dense-task code (the ``backbone.`` part, ``fpn1``-``fpn4`` included; neck, heads and meta are
            left out with a notice), or this class's own ``state_dict()``. Every XCA-stage key must be there.
            ``True`` or ``"variant.tag"`` takes released weights by name, as :func:`xcit.create_model` does.
        out_indices: the four XCA blocks to tap (default: the official backbone's); negative ones count from the
            end, and one past either end is a ValueError.
        drop_path_rate: stochastic depth of the XCA blocks (the official detection recipes use 0.05-0.1).
        checkpoint_key: the entry of a whole checkpoint to take (DINO: ``"teacher"`` by default, or ``"student"``).
        **overrides: :class:`xcit.XCiTConfig` fields (``embed_dim``, ``depth``, ``in_chans``, ...), e.g. for tiny
            test models.

    Attributes:
        out_channels: channels of every level (the embedding dim), as torchvision's detectors expect.
        channels: per-level channels (for ``FeaturePyramidNetwork(in_channels_list=...)``).
        strides: (4, 8, 16, 32).
        feature_info: timm's per-level ``num_chs`` / ``reduction`` / ``module``.
        pretrained_cfg: timm's preprocessing record (:class:`xcit.model.preprocessing.Preprocessing`'s defaults).
    """

    strides = XCiTPyramid.strides

    def __init__(
        self,
        name: str,
        pretrained: str | Path | bool | None = None,
        out_indices: list[int] | None = None,
        drop_path_rate: float = 0.0,
        checkpoint_key: str | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        name, release = release_for(name, pretrained)  # True or "variant.tag": released weights, fetched once
        if release is not None:
            w = read_release(release)
        else:
            w = None if pretrained is None else read_weights(pretrained, checkpoint_key=checkpoint_key)
        if w is not None and "flavour" not in overrides:
            overrides["flavour"] = w.flavour
        model = create_model(name, num_classes=0, drop_path_rate=drop_path_rate, **overrides)
        # Dense tasks never run the class-attention stage (as in the official backbone); dropping it keeps
        # DistributedDataParallel from seeing parameters without gradients.
        model.cls_attn_blocks = nn.ModuleList()
        model.norm = nn.Identity()
        del model.cls_token
        self.body = XCiTPyramid(model, out_indices)  # indices past the last block: a ValueError naming them
        if len(set(self.body.out_indices)) != 4:
            raise ValueError(
                f"the pyramid taps 4 different XCA blocks, got {self.body.out_indices} for depth {len(model.blocks)}: "
                "use depth >= 4 or pass 4 distinct out_indices"
            )
        self.out_indices = self.body.out_indices
        self.out_channels: int = self.body.out_channels
        self.channels: list[int] = list(self.body.channels)
        self.patch_size = model.patch_size
        self.feature_info = pyramid_feature_info(self.body, "body.")
        self.pretrained_cfg = model.pretrained_cfg
        if w is not None:
            self._load(adapt_input_channels(w.state_dict, model.cfg.in_chans, pretrained), pretrained)

    def _load(self, sd: dict[str, torch.Tensor], source: object) -> None:
        sd, unused = backbone_keys(sd)
        if unused:
            log.info("%s: %d class-attention / head tensors are not used by the dense backbone", source, len(unused))
        if not any(k.startswith("body.fpn.") for k in sd):
            fresh = {k: v for k, v in self.state_dict().items() if k.startswith("body.fpn.")}
            if fresh:
                log.info("%s: no fpn1-fpn4 weights in the file; the resampling layers start fresh", source)
            sd = {**sd, **fresh}
        load_state_dict_checked(self, sd, source=source)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(self.body(x))


_FPN = re.compile(r"fpn([1-4])\.(.*)")


def backbone_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict in this project's layout -> :class:`XCiTBackbone`'s keys, and the keys a dense backbone does not
    use (class token, class attention, final norm, head).

    The official dense backbone's ``fpn1``-``fpn4`` become ``body.fpn.0``-``body.fpn.3`` (same Sequential indices:
    detection/backbone/xcit.py); the rest moves under ``body.model.``. An :class:`XCiTBackbone` state dict
    (``body.*``) is returned as is.
    """
    if sd and all(k.startswith("body.") for k in sd):
        return dict(sd), []
    out, unused = {}, []
    for k, v in sd.items():
        if k == "cls_token" or k.startswith(("cls_attn_blocks.", "norm.", "head.")):
            unused.append(k)
            continue
        m = _FPN.fullmatch(k)
        out[f"body.fpn.{int(m[1]) - 1}.{m[2]}" if m else f"body.model.{k}"] = v
    return out, unused


class XCiTFPN(nn.Module):
    """:class:`XCiTBackbone` followed by torchvision's ``FeaturePyramidNetwork`` (plus a stride-64 max-pool level),
    the drop-in ``backbone`` for ``torchvision.models.detection.FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet``.

    Mirrors ``torchvision.models.detection.backbone_utils.BackboneWithFPN``, whose layer getter cannot tap
    transformer blocks. Output keys: "0", "1", "2", "3", "pool"; ``out_channels`` FPN channels each.
    """

    def __init__(self, backbone: XCiTBackbone, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))
