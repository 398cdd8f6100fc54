"""Multi-scale features for dense tasks: XCiT's isotropic tokens resampled to strides 4/8/16/32, as the official
detection and segmentation backbone does (github.com/facebookresearch/xcit, ``detection/backbone/xcit.py``)."""

from __future__ import annotations

import torch
from torch import nn

from .indices import block_indices
from .xcit import XCiT


def default_out_indices(depth: int) -> list[int]:
    """Blocks tapped by the official dense-task backbone: [3, 5, 7, 11] for depth 12, [7, 11, 15, 23] for 24."""
    if depth == 12:
        return [3, 5, 7, 11]
    if depth == 24:
        return [7, 11, 15, 23]
    return [round(depth * f) - 1 for f in (1 / 3, 1 / 2, 2 / 3, 1)]


class XCiTPyramid(nn.Module):
    """Features at strides 4/8/16/32 from four XCA blocks, resampled as in the official detection backbone.

    p16: 2 deconvs (x4), 1 deconv (x2), identity, 2x2 max-pool. p8: deconv (x2), identity, max-pool 2, max-pool 4.
    ``forward`` returns a dict ``{"0": s4, "1": s8, "2": s16, "3": s32}`` (torchvision's convention).
    """

    strides = (4, 8, 16, 32)

    def __init__(self, model: XCiT, out_indices: list[int] | None = None) -> None:
        super().__init__()
        self.model = model
        if out_indices is not None and len(out_indices) != 4:
            raise ValueError(f"need 4 out_indices, got {list(out_indices)}")
        # as non-negative block positions (negative ones count from the end); past either end: a ValueError
        self.out_indices = block_indices(out_indices or default_out_indices(len(model.blocks)), len(model.blocks))
        D = model.num_features
        self.out_channels = D
        self.channels = [D] * 4

        def up(n: int) -> nn.Module:
            layers: list[nn.Module] = [nn.ConvTranspose2d(D, D, 2, 2)]
            for _ in range(n - 1):
                layers += [nn.BatchNorm2d(D), nn.GELU(), nn.ConvTranspose2d(D, D, 2, 2)]
            return nn.Sequential(*layers)

        if model.patch_size == 16:
            self.fpn = nn.ModuleList([up(2), up(1), nn.Identity(), nn.MaxPool2d(2, 2)])
        else:
            self.fpn = nn.ModuleList([up(1), nn.Identity(), nn.MaxPool2d(2, 2), nn.MaxPool2d(4, 4)])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        return {str(i): f(y) for i, (f, y) in enumerate(zip(self.fpn, feats))}
