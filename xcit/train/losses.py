"""Training losses: :class:`Criterion` (cross-entropy, soft targets, BCE) and :class:`DistillationLoss`.

Knowledge distillation follows the official XCiT training (DeiT's ``DistillationLoss``). XCiT has no distillation
token: in training the official model returns its class-token logits twice, so the student's one output serves both
the label loss and the teacher loss::

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

from ..runtime.precision import autocast


@dataclass(frozen=True)
class Criterion:
    """Training loss over a batch. Soft targets (from mixup) use soft-target cross-entropy (timm's
    ``SoftTargetCrossEntropy``, which already holds the smoothing); hard targets use cross-entropy with
    ``label_smoothing``; ``BCE`` uses sigmoid cross-entropy on (smoothed) one-hot targets, averaged over classes."""

    kind: str = "CE"
    label_smoothing: float = 0.0
    reduction: str = "mean"

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs`` (the images) is unused here; :class:`DistillationLoss` takes the same call."""
        logits = logits.float()
        k = logits.shape[-1]
        if self.kind == "BCE":
            if target.ndim == 1:
                off = self.label_smoothing / k
                target = torch.full_like(logits, off).scatter_(1, target[:, None], 1.0 - self.label_smoothing + off)
            per = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
        elif target.ndim == 2:
            per = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)
        else:
            per = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="none")
        return per.sum() if self.reduction == "sum" else per.mean()


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
