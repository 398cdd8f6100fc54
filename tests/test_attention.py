"""xcit attention: overlays per head and mean at the image's resolution, XCA channel maps, map orientation."""

import json

import numpy as np
import torch
from PIL import Image

import xcit
from xcit.cli import attention as attention_cmd
from xcit.cli.attention import model_input_size
from xcit.config.train_config import TrainConfig
from xcit.infer.visualize import overlay, upsample_maps

from .conftest import perturb_

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)


def _weights(tmp_path):
    m = perturb_(xcit.create_model("xcit_nano_12_p8_224", num_classes=3, **TINY))
    path = tmp_path / "w.pth"
    cfg = TrainConfig(image_resize=32, model_overrides=TINY, mean=[0.5] * 3, std=[0.5] * 3).to_dict()
    torch.save(
        {"model": m.state_dict(), "arch": "xcit_nano_12_p8_224", "classes": ["a", "b", "c"], "config": cfg}, path
    )
    return path


def test_attention_command_writes_overlays(tmp_path):
    rgb = np.zeros((44, 70, 3), np.uint8)
    rgb[10:30, 20:50] = 255
    Image.fromarray(rgb).save(tmp_path / "img.png")
    out = tmp_path / "out"
    argv = [str(tmp_path / "img.png"), "--pretrained", str(_weights(tmp_path)), "--out", str(out)]
    assert attention_cmd.main([*argv, "--channel-blocks", "0", "-1", "--display-min", "0"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"attn_head0.png", "attn_head1.png", "attn_mean.png", "attn_grid.png", "attention.json"} <= names
    assert {"xca_block0.png", "xca_block1.png"} <= names
    for name in ("attn_head0.png", "attn_mean.png"):
        with Image.open(out / name) as im:
            assert im.size == (70, 44) and im.mode == "RGB"  # the input's native resolution
    summary = json.loads((out / "attention.json").read_text())
    # native size (already above the checkpoint's 32) rounded to the patch size 8
    assert summary["input_size"] == [48, 72] and summary["label"] in {"a", "b", "c"}

    # tiny inputs are enlarged for display by an integer factor; --img-size sets the model's input
    assert attention_cmd.main([*argv, "--img-size", "64", "--display-min", "256"]) == 0
    with Image.open(out / "attn_mean.png") as im:
        assert im.size == (70 * 4, 44 * 4)
    assert json.loads((out / "attention.json").read_text())["input_size"] == [64, 64]


def test_model_input_size():
    assert model_input_size(8, 8, 8, 32) == (32, 32)  # a digit: up to the training resolution
    assert model_input_size(1000, 600, 16, 224) == (608, 992)  # large images keep (rounded) native size
    assert model_input_size(5, 3, 16, 0) == (16, 16)


def test_maps_keep_orientation_and_scale():
    """A peak at patch (row 1, col 3) of a 2x4 grid lands in the top-right of the image, not transposed."""
    attn = torch.zeros(1, 2, 4)
    attn[0, 0, 3] = 1.0
    heat = upsample_maps(attn, (20, 40))[0]
    assert heat.min() == 0 and heat.max() == 1
    r, c = divmod(int(heat.argmax()), 40)
    assert r < 10 and c >= 30
    img = np.full((20, 40, 3), 128, np.uint8)
    blended = overlay(img, heat.numpy(), cmap="gray", alpha=1.0)
    assert blended[r, c].tolist() == [255, 255, 255] and blended[19, 0].tolist() == [0, 0, 0]
    assert (overlay(img, heat.numpy(), alpha=0.0) == img).all()


def test_channel_blocks_past_the_end_are_one_line_and_exit_2(tmp_path, capsys):
    """`xcit attention --channel-blocks` on a 2-block model: 3 and -7 are refused by name before any map is drawn,
    not wrapped to blocks 1 and 0."""
    from xcit.cli.main import main

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    w = _weights(tmp_path)
    for bad in ("3", "-7"):
        out = tmp_path / f"out{bad}"
        argv = ["attention", str(tmp_path / "img.png"), "--pretrained", str(w), "--out", str(out)]
        assert main([*argv, "--channel-blocks", "0", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("xcit attention: error: feature index ") and len(err.splitlines()) == 1
        assert f"feature index {bad} is out of range (0 to 1" in err and "2 XCA blocks" in err
        assert not out.exists()
