"""timm's conventions on every model (``pretrained_cfg``, ``feature_info``) and the one set of preprocessing
defaults (:class:`xcit.model.preprocessing.Preprocessing`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import xcit
from xcit.config.train_config import load_config, recorded_preprocessing
from xcit.model.preprocessing import Preprocessing

timm = pytest.importorskip("timm")

TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=32)
OFFICIAL = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip


def test_preprocessing_is_frozen_data_with_one_set_of_defaults():
    prep = Preprocessing()
    assert (prep.size, prep.crop_pct, prep.interpolation) == (224, 1.0, "bicubic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        prep.size = 32
    assert Preprocessing.from_pretrained_cfg(prep.pretrained_cfg()) == prep
    assert Preprocessing.from_pretrained_cfg({}) == prep
    cfg, _ = load_config([])  # the training keys keep MindCV's meaning when left out: bilinear, crop 0.875
    assert Preprocessing.from_train_config(cfg) == Preprocessing(224, 0.875, "bilinear")
    assert recorded_preprocessing({"image_resize": 64, "interpolation": "random"}).interpolation == "bicubic"
    assert recorded_preprocessing({}) is None


def test_bare_variant_resolves_in_timm_and_has_feature_info():
    model = xcit.create_model("xcit_nano_12_p16_224", num_classes=3, **TINY)
    assert timm.data.resolve_data_config(model=model) == OFFICIAL
    assert model.pretrained_cfg["num_classes"] == 3 and model.pretrained_cfg["architecture"] == "xcit_nano_12_p16_224"
    assert model.feature_info == [dict(num_chs=32, reduction=16, module=f"blocks.{i}") for i in range(4)]
    assert timm.data.create_transform(**timm.data.resolve_data_config(model=model)).transforms[1].size == (32, 32)


def test_timm_feature_wrapper_on_the_classifier():
    from timm.models._features import FeatureGetterNet  # timm's wrapper for models with forward_intermediates

    model = xcit.create_model("xcit_nano_12_p16_224", num_classes=3, **TINY).eval()
    net = FeatureGetterNet(model, out_indices=(1, 3))
    assert net.feature_info.channels() == [32, 32] and net.feature_info.reduction() == [16, 16]
    x = torch.randn(1, 3, 32, 48)
    feats = net(x)
    assert [f.shape for f in feats] == [(1, 32, 2, 3)] * 2
    with torch.no_grad():
        _, ours = model.forward_intermediates(x, indices=[1, 3])
    torch.testing.assert_close(feats[1], ours[1])


def test_backbone_and_pyramid_feature_info():
    backbone = xcit.XCiTBackbone("xcit_nano_12_p16_224", **TINY)
    info = backbone.feature_info
    assert [(i["num_chs"], i["reduction"]) for i in info] == [(32, 4), (32, 8), (32, 16), (32, 32)]
    out = backbone(torch.randn(1, 3, 64, 64))
    assert [out[k].shape[-1] for k in out] == [64 // i["reduction"] for i in info]
    modules = dict(backbone.named_modules())
    assert all(i["module"] in modules for i in info)
    assert timm.data.resolve_data_config(model=backbone)["interpolation"] == "bicubic"
    pyramid = xcit.create_model("xcit_nano_12_p16_224", features_only=True, **TINY)
    assert [i["reduction"] for i in pyramid.feature_info] == [4, 8, 16, 32]


def test_hub_folder_and_training_checkpoint_resolve_their_preprocessing(tmp_path):
    model = xcit.create_model("xcit_nano_12_p16_224", num_classes=3, **TINY)
    xcit.save_pretrained(model, tmp_path / "hub", pretrained_cfg={"crop_pct": 0.9, "interpolation": "bilinear"})
    loaded = xcit.load_model(tmp_path / "hub")
    assert timm.data.resolve_data_config(model=loaded) == {**OFFICIAL, "crop_pct": 0.9, "interpolation": "bilinear"}
    again = tmp_path / "again"
    xcit.save_pretrained(loaded, again)  # what a folder records is written again
    assert json.loads((again / "config.json").read_text())["pretrained_cfg"]["crop_pct"] == 0.9
    cfg, _ = load_config(
        ["--image_resize", "48", "--crop_pct", "0.95", "--mean", "[0.5, 0.5, 0.5]", "--std", "[0.2, 0.2, 0.2]"]
    )
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "arch": "xcit_nano_12_p16_224",
                "model_config": dataclasses.asdict(model.cfg), "classes": ["a", "b", "c"]}, ckpt)  # fmt: skip
    assert xcit.read_weights(ckpt).preprocessing == Preprocessing(48, 0.95, "bilinear", (0.5,) * 3, (0.2,) * 3)
    assert xcit.read_weights(tmp_path / "hub" / "model.safetensors").preprocessing is None
    trained = xcit.load_model(ckpt)
    assert timm.data.resolve_data_config(model=trained) == {
        **OFFICIAL, "input_size": (3, 48, 48), "interpolation": "bilinear", "crop_pct": 0.95, "mean": (0.5,) * 3,
        "std": (0.2,) * 3,
    }  # fmt: skip
    assert trained.feature_info[-1]["module"] == "blocks.3"
