"""The training crop of the default (``fast``) data backend: timm's random resized crop, cut and resized in one pass.

timm's ``RandomResizedCropAndInterpolation`` crops a Pillow image (a copy of the region) and resizes it with Pillow's
antialiased filter: about 1.1 ms of the recipe's 3-4 ms per image on a Zen 4 core. Here the image arrives as the
uint8 tensor torchvision's ``decode_jpeg`` gives (:data:`xcit.data.imageio.TENSOR_RGB`), the crop is a view of it,
and torchvision's antialiased resize (``antialias=True``, the same filter family and support as Pillow's) reads the
view and writes the output size directly: about 0.3 ms. The crop parameters are timm's own draws
(:meth:`get_params`, the same calls on Python's ``random``), so a seed gives the same boxes as timm's transform.

The pixels are not Pillow's bit for bit. Pillow resizes in two passes and stores the first pass in uint8, so
it clips the bicubic filter's overshoot (the Keys kernel, a = -0.5, has 8.3% negative weight: up to 21 levels
beyond 0 or 255 at a saturated edge) before the second pass; torchvision keeps the first pass in float. The
difference is therefore at most about 23 levels (1.083 x 21) and only next to saturated edges. Measured against
timm's transform with the same seeds (crop and flip, 224 px, bicubic; tests/test_data.py): on a sharp 500x375 crop
of scikit-learn's photo, 24 crops: at most 10 levels, 0.016 on average; on 1,024 crops of the benchmark's JPEGs
(:func:`xcit.bench.data.write_jpegs`): 99.71% equal, 0.29% off by 1, at most 2. The ``pil`` backend keeps
Pillow's path throughout.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F2

# the filters torchvision resizes with antialiasing as Pillow does; others (nearest, box, ...) go through Pillow
_ONE_PASS = (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR)


def to_pil(img: torch.Tensor) -> Image.Image:
    """A uint8 ``(C, H, W)`` tensor as a Pillow image (the downstream augmentations are Pillow's)."""
    arr = img.permute(1, 2, 0).numpy()  # HWC memory when the tensor is channels-last, as decode_jpeg's output is
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else np.ascontiguousarray(arr))


class OnePassRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's random resized crop with the same parameters and draws; on a tensor image the crop and the resize
    are one antialiased pass (see the module docstring for the pixel bound). Pillow images take timm's path."""

    @classmethod
    def like(cls, timm_crop: RandomResizedCropAndInterpolation) -> OnePassRandomResizedCrop:
        """This crop with ``timm_crop``'s size, scale, ratio and interpolation."""
        new = cls.__new__(cls)
        new.__dict__.update(timm_crop.__dict__)
        return new

    def __call__(self, img):
        if not isinstance(img, torch.Tensor):
            return super().__call__(img)
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        mode = (
            random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list)) else self.interpolation
        )
        if mode not in _ONE_PASS:
            return F1.resized_crop(to_pil(img), i, j, h, w, self.size, mode)
        # channels-last in and out: the resize's fast layout, and the output is the HWC memory Pillow wraps
        crop = img[:, i : i + h, j : j + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
        return to_pil(F2.resize(crop, list(self.size), interpolation=mode, antialias=True)[0])


class PilFallback:
    """A Pillow-only transform that may be handed a decoded tensor (a transform list without a random crop)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        return self.transform(to_pil(img) if isinstance(img, torch.Tensor) else img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"
