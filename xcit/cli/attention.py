"""``xcit attention IMAGE --out DIR``: class-attention overlays per head and their mean, plus XCA channel maps."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..config.options import Parser
from ..data.imageio import load_rgb, to_mode
from ..infer.predict import class_names, eval_preprocessing, load_model
from ..infer.visualize import display_scale, save_channel_maps, save_overlays
from ..model.indices import block_indices
from ..model.preprocessing import PIL_MODES
from ._args import add_weights_arguments

log = logging.getLogger("xcit")


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="xcit attention",
        description="Write the class-attention map of every head (and their mean) as PNG overlays on the image, at "
        "the image's own resolution. XCA's cost is linear in the number of patches, so the model can run on the "
        "image at (nearly) native size for sharper maps.",
    )
    p.add_argument("image", help="an image file")
    add_weights_arguments(p, "weights file or save_pretrained folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="N",
        help="H [W] the model sees (multiples of the patch size); default: the image's own size rounded to the "
        "patch, enlarged so the short side is at least the model's training resolution",
    )
    p.add_argument(
        "--channel-blocks",
        type=int,
        nargs="*",
        default=[],
        help="XCA blocks whose channel maps to draw (negative ones count from the end: -1 is the last)",
    )
    p.add_argument("--cmap", default="jet", help="matplotlib colormap (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default: %(default)s)")
    p.add_argument("--display-min", type=int, default=256, help="enlarge smaller images to this side for display")
    return p


def model_input_size(width: int, height: int, patch: int, min_short: int) -> tuple[int, int]:
    """(H, W) for the model: the image's size scaled up so the short side reaches ``min_short``, rounded to the
    patch size."""
    s = max(1.0, min_short / min(width, height))
    return max(patch, round(height * s / patch) * patch), max(patch, round(width * s / patch) * patch)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if Path(args.image).is_dir():  # before the model loads; load_rgb would call it "not found"
        raise ValueError(f"{args.image} is a folder: xcit attention draws one image file (xcit predict takes folders)")
    model = load_model(args.model, args.pretrained, use_ema=args.ema)
    channel_blocks = block_indices(args.channel_blocks, len(model.blocks))  # past either end: one line, exit 2
    prep = eval_preprocessing(model)
    image = load_rgb(args.image)
    p = model.patch_size
    if args.img_size:
        H, W = (args.img_size * 2)[:2]
    else:
        H, W = model_input_size(*image.size, p, int(prep["input_size"][-1]))
    from torchvision import transforms as T

    # the eval transform without its centre crop: the map must cover the whole picture
    to_tensor = T.Compose(
        [
            T.Resize((H, W), interpolation=T.InterpolationMode(prep["interpolation"])),
            T.ToTensor(),
            T.Normalize(prep["mean"], prep["std"]),
        ]
    )
    x = to_tensor(to_mode(image, PIL_MODES[model.cfg.in_chans]))[None]  # grey or 4-band models: their bands
    model.check_input(x)
    with torch.no_grad():
        logits, attn = model(x, return_attention=True)
    names = class_names(model)
    prob, idx = logits.softmax(-1)[0].max(-1)
    label = names[int(idx)]
    log.info("%s: %dx%d image, model input %dx%d, predicted %r (p=%.3f)", args.image, *image.size, W, H, label, prob)

    scale = display_scale(image.size, args.display_min)
    title = f"{Path(args.image).name}: {label} ({prob:.2f})"
    paths = save_overlays(image, attn[0], args.out, scale, args.cmap, args.alpha, title)
    if channel_blocks:
        with torch.no_grad():
            maps = model.channel_attention(x, channel_blocks)
        paths += save_channel_maps({i: m[0] for i, m in maps.items()}, args.out)
    summary = {"image": str(args.image), "input_size": [H, W], "label": label, "prob": float(prob)}
    (Path(args.out) / "attention.json").write_text(json.dumps({**summary, "files": [p.name for p in paths]}) + "\n")
    log.info("wrote %d images to %s", len(paths), args.out)
    return 0
