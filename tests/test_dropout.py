"""``drop_rate`` is the official code's and MindCV's dropout; ``head_drop_rate`` is timm's ``drop_rate``.

The official ``xcit.py`` and MindCV's ``xcit.py`` apply ``drop_rate`` after the positional encoding, after the XCA
and class-attention projections and after the GELU and fc2 of every MLP, and have no dropout before the head. timm
splits these into ``pos_drop_rate`` and ``proj_drop_rate`` (its ``Mlp`` drops with ``proj_drop_rate``) and uses
``drop_rate`` for the head. A timm model with ``pos_drop_rate = proj_drop_rate = p`` draws the same masks in the
same order as ours with ``drop_rate = p``, so the two agree exactly in train mode under one seed (once timm's
positional dropout sees its (B, N, C) tokens in the (B, N, C) memory order ours has: a mask is drawn in memory
order, and timm's tokens are a transposed view of the (B, C, N) patch embedding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xcit
from xcit.config.train_config import ConfigError, config_from_dict

from .conftest import perturb_

timm = pytest.importorskip("timm")

NAME = "xcit_nano_12_p16_224"
ARCH = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)


class _ContiguousDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def _pair(timm_kwargs: dict, ours_kwargs: dict):
    ref = perturb_(timm.create_model(NAME, **ARCH, **timm_kwargs), 0)
    ref.pos_drop = _ContiguousDropout(ref.pos_drop.p)
    ours = xcit.create_model(NAME, **ARCH, **ours_kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref.train(), ours.train()


def _run(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(x)


def _rates(model: nn.Module) -> dict[str, float]:
    return {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}


def test_drop_rate_positions_are_the_official_ones():
    model = xcit.create_model(NAME, **ARCH, drop_rate=0.1)
    where = _rates(model)
    expected = {"pos_drop"}
    expected |= {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.proj_drop", "mlp.drop")}
    expected |= {f"cls_attn_blocks.{i}.{m}" for i in range(2) for m in ("attn.proj_drop", "mlp.drop")}
    assert set(where) == expected and set(where.values()) == {0.1}
    assert _rates(xcit.create_model(NAME, **ARCH, head_drop_rate=0.3)) == {"head_drop": 0.3}


def test_drop_rate_is_timm_pos_and_proj_drop_in_train_mode():
    ref, ours = _pair(dict(pos_drop_rate=0.2, proj_drop_rate=0.2), dict(drop_rate=0.2))
    x = torch.randn(2, 3, 64, 48)
    want = _run(ref, x, 7)
    torch.testing.assert_close(_run(ours, x, 7), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_run(ours, x, 8), want, atol=1e-3)  # the masks are really drawn
    _run(ref, x, 8)  # the same BatchNorm updates as ours
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)  # eval: the fused path, no dropout


def test_head_drop_rate_is_timm_drop_rate():
    ref, ours = _pair(dict(drop_rate=0.5), dict(head_drop_rate=0.5))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_run(ours, x, 3), _run(ref, x, 3), atol=1e-5, rtol=1e-5)


def test_drop_rate_with_drop_path_and_backward():
    model = xcit.create_model(NAME, **ARCH, drop_rate=0.1, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timm_drop_rate_is_not_read_as_ours():
    from xcit.weights.hub import TIMM_ARGS

    assert "drop_rate" not in TIMM_ARGS and "drop_path_rate" in TIMM_ARGS  # timm's drop_rate is the head dropout


def test_config_keys():
    cfg = config_from_dict({"drop_rate": 0.1, "head_drop_rate": 0.2})
    assert (cfg.drop_rate, cfg.head_drop_rate) == (0.1, 0.2)
    with pytest.raises(ConfigError, match="head_drop_rate"):
        config_from_dict({"head_drop_rate": 1.5})
