"""Knowledge distillation as in the official XCiT training (DeiT's ``DistillationLoss``).

XCiT has no distillation token: in training the official model returns its class-token logits twice, so the
student's one output serves both the label loss and the teacher loss::

    loss = (1 - alpha) * criterion(logits, targets) + alpha * kd(logits, teacher(images))

``hard``: cross-entropy against the teacher's top-1 class. ``soft``: KL divergence at temperature ``tau``, scaled
by ``tau**2``. The teacher sees the same (mixed-up) images as the student, in eval mode and without gradients. The
official ``*_dist`` variants used DeiT's RegNetY-16GF (``regnety_160`` in timm), alpha 0.5, ``hard``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import Criterion
from .precision import autocast
from .weights import load_weights


def build_teacher(name: str, path: str, num_classes: int, device: torch.device) -> nn.Module:
    """The frozen teacher, with weights from ``path``: an XCiT variant of this package (any weight file it reads;
    a training checkpoint rebuilds its recorded architecture and gives its EMA weights, as ``xcit validate``), or
    any timm model."""
    from .loading import load_model
    from .variants import VARIANTS

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


@dataclass
class DistillationLoss:
    """``criterion`` on the labels mixed with a loss against the teacher's predictions on the same images."""

    base: Criterion
    teacher: nn.Module
    kind: str = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    amp_dtype: torch.dtype | None = None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        base = self.base(logits, target)
        with torch.no_grad(), autocast(inputs.device, self.amp_dtype):
            teacher = self.teacher(inputs).float()
        logits = logits.float()
        if self.kind == "hard":
            kd = F.cross_entropy(logits, teacher.argmax(dim=1))
        else:
            t = self.tau
            kd = F.kl_div(
                F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="sum", log_target=True
            )
            kd = kd * (t * t) / logits.numel()
        return base * (1 - self.alpha) + kd * self.alpha
