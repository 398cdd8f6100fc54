"""examples/finetune_mask_rcnn.py: Mask R-CNN on XCiTFPN fine-tuned on generated shapes, starting from a detection
checkpoint in the official mmdet layout."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from .test_dense_weights import TAPS, _mm_checkpoint, _official_backbone

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_mask_rcnn.py"


def _small() -> dict:
    """torchvision's Mask R-CNN at CPU-test size: a few proposals and RoIs instead of 2000 and 512, 32-channel heads."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    return dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                rpn_post_nms_top_n_test=20, rpn_batch_size_per_image=32, box_batch_size_per_image=32,
                box_detections_per_img=10, box_head=TwoMLPHead(32 * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, 3),
                mask_head=MaskRCNNHeads(32, [32, 32], 1), mask_predictor=MaskRCNNPredictor(32, 32, 3))  # fmt: skip


def _example():
    spec = importlib.util.spec_from_file_location("finetune_mask_rcnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_have_boxes_around_their_masks():
    data = _example().shapes(4, size=64, seed=1)
    for img, t in data:
        assert img.shape == (3, 64, 64) and 0 <= img.min() and img.max() <= 1
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) >= 1
        for box, mask in zip(t["boxes"].int().tolist(), t["masks"]):
            ys, xs = mask.nonzero(as_tuple=True)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.slow  # 10-15 s on 2 cores; test_backbone.py's training step covers the detector in the default run
def test_fine_tune_mask_rcnn_from_official_detection_checkpoint(tmp_path, caplog):
    net = _official_backbone(16)
    ckpt = tmp_path / "mask_rcnn_xcit_nano_12_p16_3x_coco.pth"
    _mm_checkpoint(ckpt, net, "det")
    example = _example()
    overrides = dict(embed_dim=32, depth=4, num_heads=2, out_indices=TAPS)
    with caplog.at_level(logging.INFO, logger="xcit"):
        detector = example.build_detector(
            "xcit_nano_12_p16_224", ckpt, image_size=64, drop_path_rate=0.0, fpn_channels=32, detector_args=_small(),
            **overrides,
        )  # fmt: skip
    assert not any("fpn layers start fresh" in r.getMessage() for r in caplog.records)  # fpn1-fpn4 came from the file
    body = detector.backbone.body
    theirs = net.state_dict()
    for ours, official in (("body.fpn.0.0.weight", "fpn1.0.weight"), ("body.model.blocks.3.mlp.fc2.weight",
                                                                        "blocks.3.mlp.fc2.weight")):  # fmt: skip
        assert torch.equal(body.state_dict()[ours], theirs[official])
    before = body.state_dict()["body.model.blocks.0.attn.qkv.weight"].clone()
    torch.manual_seed(0)
    losses = example.train(detector, example.shapes(4, size=64), steps=3, batch_size=2, lr=1e-4)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, body.state_dict()["body.model.blocks.0.attn.qkv.weight"])
    detector.eval()
    with torch.no_grad():
        out = detector([example.shapes(1, size=64, seed=5)[0][0]])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}
