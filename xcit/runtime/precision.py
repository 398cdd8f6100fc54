"""Numeric precision: the names the commands take, autocast, and MindCV's ``amp_level`` for training."""

from __future__ import annotations

import contextlib

import torch

# precision names of the inference commands -> autocast dtype (None: fp32, no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_setup(
    amp_level: str, amp_dtype: str, loss_scale: float, device: torch.device
) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """MindCV's ``amp_level`` -> (autocast dtype or None, gradient scaler). O0: fp32. O1/O2/O3: bf16 on CPU; on
    CUDA bf16 (``amp_dtype`` auto where supported, or bf16) or fp16 with a scaler starting at ``loss_scale``."""
    if amp_level == "O0":
        return None, torch.amp.GradScaler(device.type, enabled=False)
    if device.type != "cuda":
        return torch.bfloat16, torch.amp.GradScaler(device.type, enabled=False)
    bf16 = amp_dtype == "bf16" or (amp_dtype == "auto" and torch.cuda.is_bf16_supported())
    if bf16:
        return torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False)
    return torch.float16, torch.amp.GradScaler("cuda", init_scale=loss_scale, enabled=True)
