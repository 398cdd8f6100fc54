"""Fine-tune torchvision's Mask R-CNN on an XCiT backbone, starting from a detection checkpoint of the official code.

The path a user takes to a COCO run, small enough to run on a CPU: a dataset of generated shapes with masks
(rectangles and ellipses on noise), ``xcit.XCiTBackbone`` loaded from an mmdet checkpoint of the official
dense-task code (``mask_rcnn_xcit_*.pth``: the backbone and its fpn1-fpn4 are used; neck and heads, which are
mmdet's modules, start fresh in torchvision's detector), ``XCiTFPN`` as the detector backbone, and a few AdamW
steps. For a real dataset, replace :func:`shapes` by a dataset that yields the same ``(image, target)`` pairs
(torchvision's ``CocoDetection`` with ``v2`` transforms does).

    python examples/finetune_mask_rcnn.py --checkpoint mask_rcnn_xcit_small_12_p16_3x_coco.pth \
        --model xcit_small_12_p16_224 --steps 20

``--checkpoint`` also takes classification or DINO weights (then the fpn layers start fresh) or nothing.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN

import xcit
from xcit.weights.backbone import XCiTFPN

log = logging.getLogger("xcit")

CLASSES = ("background", "rectangle", "ellipse")


def shapes(n: int, size: int = 128, max_shapes: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, dict]]:
    """``n`` images (3, size, size) in [0, 1] with 1 to ``max_shapes`` filled rectangles or ellipses each, and
    torchvision's detection targets: ``boxes`` (x0, y0, x1, y1), ``labels`` (1 rectangle, 2 ellipse), ``masks``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    data = []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels, masks = [], [], []
        for _ in range(int(torch.randint(1, max_shapes + 1, (1,), generator=g))):
            w, h = torch.randint(size // 6, size // 2, (2,), generator=g).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            label = int(torch.randint(1, 3, (1,), generator=g))
            if label == 1:
                mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            else:
                cx, cy = x0 + w / 2, y0 + h / 2
                mask = ((xx + 0.5 - cx) / (w / 2)) ** 2 + ((yy + 0.5 - cy) / (h / 2)) ** 2 <= 1
            img[:, mask] = torch.rand(3, 1, generator=g) * 0.6 + 0.4
            ys, xs = mask.nonzero(as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(label)
            masks.append(mask)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.stack(masks).to(torch.uint8),
        }
        data.append((img, target))
    return data


def build_detector(
    name: str,
    checkpoint: str | Path | None,
    num_classes: int = len(CLASSES),
    image_size: int = 128,
    drop_path_rate: float = 0.1,
    fpn_channels: int = 256,
    detector_args: dict | None = None,
    **overrides,
) -> MaskRCNN:
    """Mask R-CNN on :class:`xcit.weights.backbone.XCiTFPN`, the backbone from ``checkpoint`` (any format XCiTBackbone
    reads; ``overrides`` go to it); images are resized to ``image_size`` (torchvision's transform pads them to a
    multiple of 32). ``detector_args`` go to torchvision's ``MaskRCNN`` (proposal counts, sampling sizes, ...)."""
    backbone = xcit.XCiTBackbone(name, pretrained=checkpoint, drop_path_rate=drop_path_rate, **overrides)
    args = detector_args or {}
    n = None if "box_predictor" in args else num_classes  # torchvision's rule: the given predictors set the classes
    detector = MaskRCNN(XCiTFPN(backbone, out_channels=fpn_channels), num_classes=n, **args)
    detector.transform.min_size, detector.transform.max_size = (image_size,), image_size
    return detector


def train(
    detector: MaskRCNN, data: list, steps: int, batch_size: int = 2, lr: float = 1e-4, weight_decay: float = 0.05
) -> list[float]:
    """``steps`` AdamW steps over ``data`` in order (the official recipes' optimiser); the summed losses per step."""
    params = [p for p in detector.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    detector.train()
    losses = []
    for step in range(steps):
        batch = [data[(step * batch_size + i) % len(data)] for i in range(batch_size)]
        parts = detector([img for img, _ in batch], [t for _, t in batch])
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        terms = ", ".join(f"{k} {v.item():.3f}" for k, v in parts.items())
        log.info("step %d: loss %.4f (%s)", step + 1, losses[-1], terms)
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="xcit_nano_12_p16_224")
    p.add_argument("--checkpoint", default=None, help="official mmdet checkpoint (or any weights XCiTBackbone reads)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--model_overrides", default="{}", help="XCiTConfig fields as YAML, e.g. '{depth: 4}'")
    p.add_argument("--out", default=None, help="save the fine-tuned detector's state_dict here")
    args = p.parse_args(argv)
    import yaml

    torch.manual_seed(0)
    detector = build_detector(args.model, args.checkpoint, image_size=args.image_size,
                              **yaml.safe_load(args.model_overrides))  # fmt: skip
    losses = train(detector, shapes(args.images, args.image_size), args.steps, args.batch_size, args.lr)
    if args.out:
        torch.save(detector.state_dict(), args.out)
    return losses


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
