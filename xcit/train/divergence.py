"""What the NaN guard keeps out of checkpoints: weights that have already diverged.

A non-finite loss at step ``s`` is computed with the weights of step ``s - 1``, so a checkpoint recording step
``s - 1`` holds weights that gave that loss: :func:`set_aside_diverged` renames it (``.diverged``, kept for
inspection, never picked by ``--resume auto``) and the guard names the checkpoint before it. And a loss can stay
finite for a step or two while the weights run away (at a learning rate of 1e5, AdamW moves every weight by
about 1e5 per step): :func:`diverged_weights` is checked before every checkpoint is written, so none holds weights
past :data:`WEIGHT_LIMIT`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..runtime.checkpoint import latest_checkpoint, recorded_progress

log = logging.getLogger("xcit")

# Trained XCiT weights stay within a few units (LayerScale gammas, the XCA temperature, norms and linears); this
# is far above any trained value and far below what a runaway step leaves
WEIGHT_LIMIT = 1e4


@torch.no_grad()
def diverged_weights(model: nn.Module, limit: float = WEIGHT_LIMIT) -> str | None:
    """A description of the parameter that is non-finite or larger than ``limit`` in magnitude, or None."""
    for name, p in model.named_parameters():
        if p.numel() == 0 or not p.is_floating_point():
            continue
        largest = float(p.detach().abs().max())
        if not largest <= limit:  # also true for NaN
            return f"{name} holds |w| = {largest:.3g} (limit {limit:.0e})"
    return None


def set_aside_diverged(directory: Path, pattern: str, step: int) -> Path | None:
    """Rename the checkpoints in ``directory`` recording ``step`` or later to ``<name>.diverged``; return the last
    good checkpoint left (greatest recorded progress, checksum verified), or None."""
    for path in directory.glob(pattern):
        progress = recorded_progress(path)
        if progress is not None and progress[1] >= step:
            aside = path.with_name(path.name + ".diverged")
            path.replace(aside)
            log.warning("%s holds the weights that gave the non-finite loss: moved to %s", path, aside.name)
    return latest_checkpoint(directory, pattern)
