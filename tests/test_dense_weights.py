"""Whole-network checkpoints: mmdet / mmseg files of the official dense-task code and DINO's training checkpoints,
built here in their official layouts and checked against the official backbone's definition."""

import argparse
import logging
import os
from functools import partial

import pytest
import torch
from timm.models.xcit import ConvPatchEmbed, PositionalEncodingFourier, XCABlock, Xcit
from torch import nn

import xcit
from xcit.weights.files import WeightsError, timm_to_official

from .conftest import perturb_

TINY = dict(embed_dim=32, depth=4, num_heads=2)
TAPS = [0, 1, 2, 3]


class OfficialDenseXCiT(nn.Module):
    """facebookresearch/xcit ``detection/backbone/xcit.py`` ``XCiT`` (``semantic_segmentation/backbone/xcit.py`` is
    the same class), with timm's blocks, which are the official ones: the attribute names, the fpn1-fpn4 modules and
    ``forward_features`` follow the official file (SyncBatchNorm in fpn1 included)."""

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, out_indices: list[int]):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = ConvPatchEmbed(img_size=224, patch_size=patch_size, embed_dim=embed_dim)
        self.blocks = nn.ModuleList(
            XCABlock(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm, eta=1.0) for _ in range(depth)
        )
        self.pos_embeder = PositionalEncodingFourier(dim=embed_dim)
        self.out_indices = out_indices
        D = embed_dim
        if patch_size == 16:
            self.fpn1 = nn.Sequential(
                nn.ConvTranspose2d(D, D, 2, 2), nn.SyncBatchNorm(D), nn.GELU(), nn.ConvTranspose2d(D, D, 2, 2)
            )
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2))
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
            self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4))

    def forward(self, x):
        B = x.shape[0]
        x, (Hp, Wp) = self.patch_embed(x)
        x = x + self.pos_embeder(B, Hp, Wp).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        features = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, Hp, Wp)
            if i in self.out_indices:
                features.append(x.permute(0, 2, 1).reshape(B, -1, Hp, Wp))
        return tuple(op(f) for op, f in zip([self.fpn1, self.fpn2, self.fpn3, self.fpn4], features))


def _official_backbone(patch: int, seed: int = 0) -> OfficialDenseXCiT:
    return perturb_(OfficialDenseXCiT(patch, out_indices=TAPS, **TINY), seed).eval()


def _heads(task: str) -> dict[str, torch.Tensor]:
    """A few tensors under the official configs' module names (mask_rcnn_xcit_*.py, sem_fpn / upernet_xcit_*.py)."""
    g = torch.Generator().manual_seed(1)
    names = {
        "det": ["neck.lateral_convs.0.conv.weight", "neck.fpn_convs.0.conv.weight", "rpn_head.rpn_conv.weight",
                "rpn_head.rpn_cls.weight", "roi_head.bbox_head.fc_cls.weight", "roi_head.mask_head.conv_logits.weight"],
        "seg": ["neck.lateral_convs.0.conv.weight", "decode_head.conv_seg.weight", "auxiliary_head.conv_seg.weight"],
    }[task]  # fmt: skip
    return {k: torch.randn(4, 4, 1, 1, generator=g) for k in names}


def _mm_checkpoint(path, net: nn.Module, task: str) -> None:
    """mmcv's save_checkpoint layout: meta + state_dict (+ optimizer), the backbone under ``backbone.``."""
    sd = {f"backbone.{k}": v for k, v in net.state_dict().items()} | _heads(task)
    lib = "mmdet" if task == "det" else "mmseg"
    meta = {f"{lib}_version": "2.11.0", "mmcv_version": "1.3.1", "epoch": 36, "iter": 263736, "time": "Mon Jun 14",
            "CLASSES": ("person", "bicycle"), "config": "model = dict(type='MaskRCNN', ...)"}  # fmt: skip
    if task == "seg":
        meta["PALETTE"] = [[120, 120, 120], [180, 120, 120]]
    opt = torch.optim.AdamW(net.parameters()).state_dict()
    torch.save({"meta": meta, "state_dict": sd, "optimizer": opt}, path)


@pytest.mark.parametrize(("task", "patch"), [("det", 16), ("seg", 8)])
def test_official_dense_checkpoint_matches_official_backbone(tmp_path, caplog, task, patch):
    net = _official_backbone(patch)
    _mm_checkpoint(tmp_path / "ckpt.pth", net, task)
    name = f"xcit_nano_12_p{patch}_224"
    with caplog.at_level(logging.INFO, logger="xcit"):
        bb = xcit.XCiTBackbone(name, pretrained=tmp_path / "ckpt.pth", out_indices=TAPS, **TINY).eval()
    notice = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(notice) == 1 and "neck (" in notice[0] and "meta" in notice[0] and "optimizer" in notice[0]
    assert ("roi_head" in notice[0]) == (task == "det") and ("decode_head" in notice[0]) == (task == "seg")
    assert not any("fpn layers start fresh" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, want = list(bb(x).values()), net(x)
    assert len(ours) == 4
    for a, b in zip(ours, want):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4


def test_own_state_dict_and_missing_backbone_key(tmp_path):
    bb = perturb_(xcit.XCiTBackbone("xcit_nano_12_p16_224", out_indices=TAPS, **TINY)).eval()
    torch.save(bb.state_dict(), tmp_path / "own.pth")
    again = xcit.XCiTBackbone("xcit_nano_12_p16_224", pretrained=tmp_path / "own.pth", out_indices=TAPS, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(bb(x).values(), again.eval()(x).values()))
    # strict on what the backbone needs: an XCA block weight missing from a detection checkpoint is reported
    net = _official_backbone(16)
    sd = {f"backbone.{k}": v for k, v in net.state_dict().items() if k != "blocks.2.attn.qkv.weight"}
    torch.save({"meta": {}, "state_dict": sd}, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match=r"missing \(1\): body.model.blocks.2.attn.qkv.weight"):
        xcit.XCiTBackbone("xcit_nano_12_p16_224", pretrained=tmp_path / "cut.pth", out_indices=TAPS, **TINY)


# ----------------------------------------------------------------------------------------------------------------------
# DINO
# ----------------------------------------------------------------------------------------------------------------------


def _official_classifier(seed: int) -> dict[str, torch.Tensor]:
    """An official-layout XCiT state dict as DINO's backbone holds it (torch.hub xcit with its head an Identity)."""
    ref = perturb_(Xcit(patch_size=16, num_classes=0, eta=1.0, tokens_norm=False, **TINY), seed)
    return timm_to_official(ref.state_dict())


def _dino_head() -> dict[str, torch.Tensor]:
    """DINOHead's tensors (facebookresearch/dino vision_transformer.py: mlp, weight-normed last_layer)."""
    g = torch.Generator().manual_seed(2)
    shapes = {"mlp.0.weight": (64, 32), "mlp.0.bias": (64,), "mlp.2.weight": (16, 64), "mlp.2.bias": (16,),
              "last_layer.weight_g": (100, 1), "last_layer.weight_v": (100, 16)}  # fmt: skip
    return {f"head.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}


def _dino_checkpoint(path, args: argparse.Namespace | None = None) -> tuple[dict, dict]:
    """main_dino.py's save_dict. Both networks are DDP-wrapped for XCiT (it has BatchNorm): ``module.`` prefixes."""
    student, teacher = _official_classifier(0), _official_classifier(1)

    def wrap(sd):
        return {f"module.backbone.{k}": v for k, v in sd.items()} | {f"module.{k}": v for k, v in _dino_head().items()}

    args = args or argparse.Namespace(arch="xcit_small_12_p16", patch_size=16, out_dim=100, lr=0.0005, epochs=300)
    params = [torch.zeros(3, requires_grad=True)]
    torch.save({"student": wrap(student), "teacher": wrap(teacher), "optimizer": torch.optim.AdamW(params).state_dict(),
                "epoch": 300, "args": args, "dino_loss": {"center": torch.zeros(1, 100)},
                "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}, path)  # fmt: skip
    return student, teacher


def _features(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    ref = Xcit(patch_size=16, num_classes=0, eta=1.0, tokens_norm=False, **TINY).eval()
    sd = {k.replace("pos_embeder.", "pos_embed."): v for k, v in sd.items()}
    for k in [k for k in sd if ".attn.qkv." in k and k.startswith("cls_attn")]:
        for n, part in zip("qkv", sd.pop(k).chunk(3)):
            sd[k.replace(".qkv.", f".{n}.")] = part
    ref.load_state_dict(sd)
    with torch.no_grad():
        return ref(x)


def test_dino_full_checkpoint_teacher_by_default_student_on_request(tmp_path, caplog):
    student, teacher = _dino_checkpoint(tmp_path / "checkpoint.pth")
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="xcit"):
        m = xcit.create_model("xcit_nano_12_p16_224", pretrained=tmp_path / "checkpoint.pth", num_classes=0, **TINY)
    notice = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(notice) == 1 and "'teacher'" in notice[0] and "head (6 tensors)" in notice[0]
    assert "student" in notice[0] and "dino_loss" in notice[0]
    s = xcit.create_model(
        "xcit_nano_12_p16_224", pretrained=tmp_path / "checkpoint.pth", num_classes=0, checkpoint_key="student", **TINY
    )
    with torch.no_grad():
        assert (m.eval()(x) - _features(teacher, x)).abs().max() <= 1e-4
        assert (s.eval()(x) - _features(student, x)).abs().max() <= 1e-4
    w = xcit.read_weights(tmp_path / "checkpoint.pth")
    assert w.extra["epoch"] == 300 and w.extra["args"].arch == "xcit_small_12_p16"
    # the dense backbone takes the same teacher, fpn layers fresh
    bb = xcit.XCiTBackbone("xcit_nano_12_p16_224", pretrained=tmp_path / "checkpoint.pth", out_indices=TAPS, **TINY)
    assert torch.equal(bb.body.model.blocks[1].attn.qkv.weight, teacher["blocks.1.attn.qkv.weight"])
    with pytest.raises(WeightsError, match="no state dict under 'techer'"):
        xcit.read_weights(tmp_path / "checkpoint.pth", checkpoint_key="techer")


def test_dino_backbone_only_file(tmp_path):
    """The released dino_xcit_*_pretrain.pth files: the backbone's official-layout state dict, no head."""
    sd = _official_classifier(3)
    torch.save(sd, tmp_path / "dino_xcit_nano_12_p16_pretrain.pth")
    m = xcit.create_model(
        "xcit_nano_12_p16_224", pretrained=tmp_path / "dino_xcit_nano_12_p16_pretrain.pth", num_classes=0, **TINY
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (m.eval()(x) - _features(sd, x)).abs().max() <= 1e-4


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["args", "teacher"])
def test_pickle_hidden_in_dino_checkpoint_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pth"
    if where == "args":  # an object inside the allowed Namespace
        _dino_checkpoint(path, argparse.Namespace(arch="xcit_small_12_p16", hook=_RunsCode(marker)))
    else:
        _dino_checkpoint(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, weights_only=True)
        obj["teacher"]["module.backbone.evil"] = _RunsCode(marker)
        torch.save(obj, path)
    with pytest.raises(WeightsError, match="refused to load"):
        xcit.read_weights(path)
    assert not marker.exists()
