"""timm's model interface: get_classifier, and group_matcher so timm's optimiser factory applies layer decay."""

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import xcit

KW = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _lr_scales(model: torch.nn.Module) -> dict[str, float]:
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}


def test_get_classifier_is_the_head():
    model = xcit.create_model("xcit_nano_12_p16_224", **KW)
    assert model.get_classifier() is model.head
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)


@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "xcit_tiny_24_p8_224"])
def test_timm_layer_decay_gives_timms_own_xcit_scales(name):
    ours = _lr_scales(xcit.create_model(name, **KW))
    theirs = _lr_scales(timm.create_model(name, **KW))
    assert ours == theirs
    assert ours["cls_token"] == 0.5 ** (KW["depth"] + 2 + 1) and ours["head.weight"] == 1.0
    assert ours["blocks.0.attn.qkv.weight"] < ours["blocks.1.attn.qkv.weight"] < ours["norm.weight"]
