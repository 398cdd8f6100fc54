"""XCiTBackbone: the stride 4/8/16/32 pyramid, torchvision's FPN and a detector training step."""

import pytest
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.ops import FeaturePyramidNetwork

import xcit
from xcit.weights.backbone import XCiTFPN

from .conftest import perturb_

TINY = dict(embed_dim=32, depth=4, num_heads=2)


@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "xcit_nano_12_p8_224"])
def test_pyramid_strides_and_channels(name):
    bb = xcit.XCiTBackbone(name, **TINY).eval()
    feats = bb(torch.randn(2, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3"]
    for (key, f), stride in zip(feats.items(), bb.strides):
        assert f.shape == (2, bb.out_channels, 64 // stride, 96 // stride), key
        assert torch.isfinite(f).all()
    assert bb.channels == [32] * 4
    # the class-attention stage and head are gone: every parameter feeds the output (no unused params for DDP)
    bb.train()
    sum(f.mean() for f in bb(torch.randn(2, 3, 32, 32)).values()).backward()
    unused = [n for n, p in bb.named_parameters() if p.grad is None]
    assert not unused and not any("cls" in n or "head" in n for n, _ in bb.named_parameters())


def test_pretrained_classifier_weights_load(tmp_path):
    """Classification weights (with their head and class attention) load into the backbone, blocks unchanged."""
    clf = perturb_(xcit.create_model("xcit_nano_12_p16_224", num_classes=7, **TINY))
    path = tmp_path / "clf.pth"
    torch.save(clf.state_dict(), path)
    bb = xcit.XCiTBackbone("xcit_nano_12_p16_224", pretrained=path, out_indices=[0, 1, 2, 3], **TINY).eval()
    assert torch.equal(bb.body.model.blocks[3].mlp.fc2.weight, clf.blocks[3].mlp.fc2.weight)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # stride-16 level is the identity map of block 2's tokens (official fpn3)
        ref = clf.eval().forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        assert torch.equal(bb(x)["2"], ref)


def test_needs_four_distinct_blocks():
    with pytest.raises(ValueError, match="4 different XCA blocks"):
        xcit.XCiTBackbone("xcit_nano_12_p16_224", embed_dim=32, depth=2, num_heads=2)


def test_plugs_into_torchvision_fpn():
    bb = xcit.XCiTBackbone("xcit_nano_12_p16_224", **TINY).eval()
    fpn = FeaturePyramidNetwork(bb.channels, 16)
    out = fpn(bb(torch.randn(1, 3, 64, 64)))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_mask_rcnn_training_step():
    torch.manual_seed(0)
    model = MaskRCNN(XCiTFPN(xcit.XCiTBackbone("xcit_nano_12_p16_224", **TINY), 32), num_classes=3)
    model.transform.min_size, model.transform.max_size = (128,), 128
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]  # the transform pads to a multiple of 32
    targets = []
    for img, boxes in zip(images, ([[10, 20, 60, 90], [70, 30, 120, 90]], [[5, 5, 50, 60]])):
        boxes = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.zeros(len(boxes), *img.shape[1:], dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.arange(1, len(boxes) + 1), "masks": masks})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    before = model.backbone.body.body.model.blocks[0].attn.qkv.weight.detach().clone()
    loss.backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert not torch.equal(before, model.backbone.body.body.model.blocks[0].attn.qkv.weight)
    model.eval()
    with torch.no_grad():
        det = model(images[:1])[0]
    assert set(det) == {"boxes", "labels", "scores", "masks"}


def test_out_indices_past_the_last_block_are_refused():
    with pytest.raises(ValueError, match=r"feature index 12 is out of range \(0 to 11.* 12 XCA blocks"):
        xcit.XCiTBackbone("xcit_nano_12_p16_224", embed_dim=32, num_heads=2, out_indices=[3, 5, 7, 12])
    bb = xcit.XCiTBackbone("xcit_nano_12_p16_224", embed_dim=32, num_heads=2, out_indices=[3, 5, 7, -1])
    assert bb.out_indices == [3, 5, 7, 11]
