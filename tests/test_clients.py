"""The project's files in the hands of the clients that did not write them.

* timm's ``validate.py`` path: ``timm.create_model`` plus ``load_checkpoint`` on ``xcit convert --to timm`` weights,
  timm's data config, ``create_dataset`` and ``create_loader``, cross-entropy and ``timm.utils.accuracy`` averaged
  per image: the same top-1 and loss as ``xcit validate`` on the same images and preprocessing.
* the official release's ``main.py``: ``torch.load(path)["model"]`` into a model with the official module names
  (``pos_embeder``, one fused class-attention ``qkv``), every key matched.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xcit
from xcit.cli import main

from .conftest import perturb_
from .test_data import make_folder

timm = pytest.importorskip("timm")

NAME = "xcit_nano_12_p16_224"
KW = dict(embed_dim=32, depth=2, num_heads=2)
CLASSES = ["a", "b", "c"]


@pytest.fixture
def trained(tmp_path):
    """A training checkpoint as ``xcit train`` writes one (raw and EMA weights, architecture, classes), and an
    ImageFolder whose val split holds its classes."""
    model = perturb_(xcit.create_model(NAME, num_classes=3, img_size=32, **KW), seed=1).eval()
    ema = perturb_(xcit.create_model(NAME, num_classes=3, img_size=32, **KW), seed=2).eval()
    path = tmp_path / "best.pth"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "arch": NAME, "classes": CLASSES,
                "model_config": dataclasses.asdict(model.cfg)}, path)  # fmt: skip
    data = make_folder(tmp_path / "data", classes=CLASSES, per_class=8, size=40)
    return path, ema, data


def _timm_validate(weights, val_dir, img_size: int, crop_pct: float) -> dict:
    """The steps of timm's validate.py with ``--checkpoint weights --img-size --crop-pct --no-prefetcher``."""
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.models import load_checkpoint
    from timm.utils import AverageMeter, accuracy

    model = timm.create_model(NAME, pretrained=False, num_classes=len(CLASSES), **KW)
    load_checkpoint(model, str(weights), use_ema=False)
    args = {"img_size": img_size, "crop_pct": crop_pct, "interpolation": "", "mean": None, "std": None}
    data_config = resolve_data_config(args, model=model, use_test_size=True)
    dataset = create_dataset(root=str(val_dir), name="", split="validation")
    loader = create_loader(
        dataset, input_size=data_config["input_size"], batch_size=5, use_prefetcher=False,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"], num_workers=0,
        crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"],
    )  # fmt: skip
    losses, top1 = AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            losses.update(nn.CrossEntropyLoss()(out, y).item(), x.size(0))
            top1.update(accuracy(out, y, topk=(1,))[0].item(), x.size(0))
    return {"top1": top1.avg, "loss": losses.avg, "images": top1.count, "config": data_config}


def test_timm_validate_path_gives_xcit_validate_numbers(trained, tmp_path, capsys):
    path, ema, data = trained
    assert main(["convert", str(path), str(tmp_path / "timm.pth"), "--to", "timm"]) == 0  # EMA, as validate takes
    theirs = _timm_validate(tmp_path / "timm.pth", data / "val", img_size=32, crop_pct=0.875)
    assert theirs["config"]["interpolation"] == "bicubic" and theirs["config"]["crop_mode"] == "center"
    result = tmp_path / "val.json"
    # the same preprocessing: timm's data config for XCiT is bicubic (MindCV's default, and validate's, bilinear)
    argv = ["--data_dir", str(data), "--ckpt_path", str(path), "--image_resize", "32", "--crop_pct", "0.875",
            "--interpolation", "bicubic"]  # fmt: skip
    assert main(["validate", *argv, "--batch_size", "5", "--results_file", str(result)]) == 0
    ours = json.loads(result.read_text())
    assert ours["num_images"] == theirs["images"] == 12
    assert ours["top1"] == pytest.approx(theirs["top1"], abs=1e-9)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
    # and the raw weights are another model: the check can tell them apart
    assert main(["convert", str(path), str(tmp_path / "raw.pth"), "--to", "timm", "--ema", "False"]) == 0
    raw = _timm_validate(tmp_path / "raw.pth", data / "val", img_size=32, crop_pct=0.875)
    assert abs(raw["loss"] - ours["loss"]) > 1e-3


class OfficialClassAttention(nn.Module):
    """Class attention under the official module names: one ``qkv`` Linear (3D, D), rows in q, k, v order
    (facebookresearch/xcit ``ClassAttention``), computed with timm's blocks' math."""

    def __init__(self, timm_attn: nn.Module):
        super().__init__()
        dim = timm_attn.q.in_features
        self.num_heads = timm_attn.num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop, self.proj, self.proj_drop = timm_attn.attn_drop, timm_attn.proj, timm_attn.proj_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x_cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # the class token's query only
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))


class OfficialLayoutXcit(timm.models.xcit.Xcit):
    """An XCiT whose state dict has the official release's names: ``pos_embeder.*`` and fused class-attention
    ``qkv`` (tests/test_dense_weights.py builds the dense backbone the same way, from timm's blocks)."""

    @property
    def pos_embed(self) -> nn.Module:  # timm's forward reads pos_embed; the module is registered as pos_embeder
        return self._modules["pos_embeder"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._modules["pos_embeder"] = self._modules.pop("pos_embed")
        for blk in self.cls_attn_blocks:
            blk.attn = OfficialClassAttention(blk.attn)


def test_to_official_file_loads_as_official_main_py_loads_it(trained, tmp_path):
    path, ema, _ = trained
    assert main(["convert", str(path), str(tmp_path / "official.pth"), "--to", "official"]) == 0
    checkpoint = torch.load(tmp_path / "official.pth", map_location="cpu", weights_only=True)
    assert list(checkpoint) == ["model"]  # the release's layout: main.py reads checkpoint['model']
    official = OfficialLayoutXcit(patch_size=16, num_classes=3, eta=1.0, tokens_norm=False, **KW).eval()
    assert any(k.startswith("pos_embeder.") for k in official.state_dict())
    assert "cls_attn_blocks.0.attn.qkv.weight" in official.state_dict()
    assert set(checkpoint["model"]) == set(official.state_dict())  # the official key names, nothing else
    result = official.load_state_dict(checkpoint["model"], strict=True)  # main.py's --resume: strict
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (official(x) - ema(x)).abs().max() <= 1e-5
    again = xcit.create_model(NAME, pretrained=tmp_path / "official.pth", num_classes=3, **KW).eval()
    with torch.no_grad():  # and this project reads the file back
        assert torch.equal(again(x), ema(x))
