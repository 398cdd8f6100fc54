"""The frozen teacher of knowledge distillation (:class:`xcit.train.losses.DistillationLoss` is the loss)."""

from __future__ import annotations

import torch
from torch import nn

from ..model.arch import VARIANTS
from ..weights.files import load_weights
from ..weights.loading import load_model


def build_teacher(name: str, path: str, num_classes: int, device: torch.device) -> nn.Module:
    """The frozen teacher, with weights from ``path``: an XCiT variant of this package (any weight file it reads;
    a training checkpoint rebuilds its recorded architecture and gives its EMA weights, as ``xcit validate``), or
    any timm model."""

    if name in VARIANTS:
        teacher = load_model(path, name)
        if teacher.num_classes != num_classes:
            raise ValueError(f"teacher {path} has {teacher.num_classes} classes, the student {num_classes}")
    else:
        import timm

        try:
            teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ValueError(f"teacher_model {name!r}: {e}") from None
        load_weights(teacher, path, strict=True)
    teacher.requires_grad_(False)
    return teacher.eval().to(device)
