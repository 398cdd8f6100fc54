"""Attention pictures: class-attention overlays on the input image and XCA channel-covariance heatmaps.

The class-attention map of XCiT's last class-attention block (the class token attending over the patches) is
(heads, H/p, W/p); it is upsampled to the image, normalised per map to [0, 1], coloured with a matplotlib colormap
and alpha-blended onto the picture. XCA maps are (heads, d_h, d_h) softmax matrices over channels: they are drawn
as plain heatmaps, one panel per head.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def upsample_maps(attn: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(heads, Hp, Wp) patch maps -> (heads, H, W), bilinear, each min-max normalised to [0, 1]."""
    maps = F.interpolate(attn[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    lo = maps.flatten(1).min(dim=1).values[:, None, None]
    hi = maps.flatten(1).max(dim=1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def overlay(image: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heat map (H, W), coloured by ``cmap``, onto an (H, W, 3) uint8 image."""
    import matplotlib

    colour = matplotlib.colormaps[cmap](heat)[..., :3]
    out = (1.0 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def display_scale(size: tuple[int, int], min_side: int) -> int:
    """Integer factor that brings a small image's longer side to at least ``min_side`` pixels (1 if it is)."""
    return max(1, math.ceil(min_side / max(size)))


def save_overlays(
    image: Image.Image,
    attn: torch.Tensor,
    out_dir: str | os.PathLike,
    scale: int = 1,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
) -> list[Path]:
    """Write ``attn_head{i}.png`` for every head, ``attn_mean.png`` and an ``attn_grid.png`` panel.

    Maps are drawn at the image's own resolution, times ``scale`` (nearest-neighbour for the image) so that
    tiny inputs stay visible. Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    W, H = image.size
    size = (H * scale, W * scale)
    picture = np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.NEAREST))
    maps = upsample_maps(torch.cat([attn, attn.mean(0, keepdim=True)]), size).numpy()
    names = [f"attn_head{i}.png" for i in range(attn.shape[0])] + ["attn_mean.png"]
    blends = [overlay(picture, m, cmap, alpha) for m in maps]
    paths = []
    for name, blend in zip(names, blends):
        Image.fromarray(blend).save(out / name)
        paths.append(out / name)
    titles = [f"head {i}" for i in range(attn.shape[0])] + ["mean"]
    paths.append(_grid([picture, *blends], ["input", *titles], out / "attn_grid.png", title))
    return paths


def _grid(images: list[np.ndarray], titles: list[str], path: Path, title: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(images) / 6)
    cols = math.ceil(len(images) / rows)
    h, w = images[0].shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows * h / w + (0.3 if title else 0)))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, t in zip(np.atleast_1d(axes).ravel(), images, titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_channel_maps(maps: dict[int, torch.Tensor], out_dir: str | os.PathLike, cmap: str = "viridis") -> list[Path]:
    """Write ``xca_block{i}.png`` per block: one (d_h x d_h) heatmap per head of the XCA softmax map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for block, m in sorted(maps.items()):
        heads = m.shape[0]
        fig, axes = plt.subplots(1, heads, figsize=(2.4 * heads + 0.6, 2.6), squeeze=False)
        for h, ax in enumerate(axes[0]):
            im = ax.imshow(m[h].float().numpy(), cmap=cmap, vmin=0.0)
            ax.set_title(f"head {h}", fontsize=9)
            ax.set_xlabel("key channel", fontsize=7)
            ax.set_ylabel("query channel", fontsize=7)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.suptitle(f"XCA channel attention, block {block}", fontsize=10)
        fig.tight_layout()
        path = out / f"xca_block{block}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
