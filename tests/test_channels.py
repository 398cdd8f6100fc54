"""Input channels other than 3: 3-channel weights adapted for grey and 4-band models, and training on such images."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import xcit
from xcit.config.train_config import ConfigError, load_config
from xcit.data.imageio import to_mode
from xcit.model.preprocessing import Preprocessing, channel_stats

from .conftest import perturb_
from .test_data import make_folder

TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=32)


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(xcit.create_model("xcit_nano_12_p16_224", num_classes=5, **TINY)).eval()
    path = tmp_path_factory.mktemp("w") / "rgb.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_grey_model_from_rgb_weights_equals_rgb_model_on_repeated_grey(rgb_weights, caplog):
    rgb, path = rgb_weights
    with caplog.at_level(logging.INFO, logger="xcit"):
        grey = xcit.create_model("xcit_nano_12_p16_224", pretrained=path, in_chans=1, **TINY).eval()
    assert "adapted from 3 to 1 input channels (summed)" in caplog.text
    assert grey.patch_embed.proj[0][0].weight.shape[1] == 1 and grey.pretrained_cfg["input_size"] == (1, 32, 32)
    x = torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=0, atol=1e-4)
    loaded = xcit.load_model(path, "xcit_nano_12_p16_224", in_chans=1, img_size=32)  # shapes give the rest
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), rgb(x.repeat(1, 3, 1, 1)), rtol=0, atol=1e-4)


def test_four_band_model_from_rgb_weights(rgb_weights, caplog):
    rgb, path = rgb_weights
    with caplog.at_level(logging.INFO, logger="xcit"):
        model = xcit.load_model(path, "xcit_nano_12_p16_224", in_chans=4, img_size=32)
    assert "adapted from 3 to 4 input channels (repeated and scaled by 3/4)" in caplog.text
    w3, w4 = rgb.patch_embed.proj[0][0].weight, model.patch_embed.proj[0][0].weight
    torch.testing.assert_close(w4, torch.cat([w3, w3[:, :1]], dim=1) * 0.75)  # timm's adapt_input_conv
    assert model(torch.rand(1, 4, 32, 32)).shape == (1, 5)
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406, pytest.approx(0.449))
    backbone = xcit.XCiTBackbone("xcit_nano_12_p16_224", pretrained=path, in_chans=4, **TINY)
    assert backbone(torch.rand(1, 4, 32, 32))["0"].shape == (1, 32, 8, 8)


def test_channel_stats_and_image_modes():
    assert channel_stats((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), 1) == ((pytest.approx(0.4),), (pytest.approx(0.2),))
    assert channel_stats((0.5,), (0.25,), 4) == ((0.5,) * 4, (0.25,) * 4)
    with pytest.raises(ValueError, match="give 4 values"):
        channel_stats((0.1, 0.2), (0.1, 0.2), 4)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(to_mode(rgb, "L")), np.asarray(rgb.convert("L")))
    rgba = to_mode(rgb, "RGBA")
    assert rgba.mode == "RGBA" and (np.asarray(rgba)[..., 3] == 255).all()
    cmyk = rgb.convert("CMYK")
    assert np.array_equal(np.asarray(to_mode(cmyk, "RGBA")), np.asarray(cmyk))  # 4-band files: bands as stored
    with pytest.raises(ConfigError, match="in_channels"):
        load_config(["--in_channels", "2"])
    with pytest.raises(ConfigError, match="auto_augment"):
        load_config(["--in_channels", "4", "--auto_augment", "randaug-m9-mstd0.5-inc1"])
    cfg, _ = load_config(["--in_channels", "1"])  # MindCV's default mean/std (0-255 RGB) become one grey value
    assert Preprocessing.from_train_config(cfg).mean == (pytest.approx(0.449),)


def _rgba_folder(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for ci, c in enumerate("ab"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                arr = rng.integers(0, 80, (20, 20, 4), dtype=np.uint8)
                arr[..., ci] += 150
                Image.fromarray(arr, "RGBA").save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("channels", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_xcit_train_on_grey_and_four_band_images(tmp_path, channels):
    """`xcit train` with MindCV's `in_channels`, then the checkpoint loads and predicts with the same preprocessing."""
    import timm

    from xcit.cli import main

    data = make_folder(tmp_path / "grey", ("a", "b"), per_class=4) if channels == 1 else _rgba_folder(tmp_path / "4")
    out = tmp_path / "run"
    args = ["train", "--data_dir", str(data), "--ckpt_save_dir", str(out), "--in_channels", str(channels)]
    args += ["--model", "xcit_nano_12_p16_224", "--model_overrides", "{embed_dim: 32, depth: 2, num_heads: 2}"]
    args += ["--image_resize", "32", "--epoch_size", "1", "--batch_size", "4", "--num_parallel_workers", "0"]
    assert main([*args, "--tensorboard", "False"]) == 0
    ckpt = sorted(out.glob("*.pth"))[-1]
    model = xcit.load_model(ckpt)
    assert model.cfg.in_chans == channels
    prep = timm.data.resolve_data_config(model=model)
    assert prep["input_size"] == (channels, 32, 32) and len(prep["mean"]) == channels
    assert (prep["interpolation"], prep["crop_pct"]) == ("bilinear", 0.875)  # the training config's (MindCV's)
    from xcit.infer.predict import eval_preprocessing, eval_transform, find_images, predict

    files = find_images([data / "val"])
    results, errors = predict(model, files, eval_transform(eval_preprocessing(model)), ["a", "b"], topk=1)
    assert len(results) == len(files) and not errors
    scores = tmp_path / "val.json"
    assert main(["validate", "--data_dir", str(data), "--ckpt_path", str(ckpt), "--results_file", str(scores)]) == 0
    assert json.loads(scores.read_text())["num_images"] == len(files)
    assert main(["attention", str(files[0]), "--pretrained", str(ckpt), "--out", str(tmp_path / "maps")]) == 0
