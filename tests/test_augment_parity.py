"""The default pipeline's augmentations against timm's, over many samples: crop scale and aspect histograms,
RandAugment's operation frequencies and magnitudes, the erasing rate and area, mixup's lambda.

Each comparison is a two-sample test between this project's pipeline (uint8 workers, the one-pass crop on decoded
JPEG tensors, erasing on the batch) and timm's (``create_transform`` on Pillow images, erasing per image), drawn
with different fixed seeds, so it can fail: a changed range, operation set or probability moves the statistic
far past the threshold (each test also shows that a slightly wrong reference is rejected). Thresholds: p > 1e-3.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from xcit.config.train_config import load_config
from xcit.data.imageio import TENSOR_RGB, load_rgb
from xcit.data.pipeline import batch_stage, mixup_fn, train_transform

RECIPE = ["--image_resize", "32", "--auto_augment", "randaug-m9-mstd0.5-inc1", "--re_prob", "0.25",
          "--re_value", "pixel", "--interpolation", "bicubic", "--hflip", "0.5", "--mixup", "0.8", "--cutmix", "1.0",
          "--label_smoothing", "0.1", "--batch_size", "64"]  # fmt: skip
P_MIN = 1e-3


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 500x375 JPEG cut from scikit-learn's sample photo."""
    from sklearn.datasets import load_sample_images

    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    Image.fromarray(load_sample_images().images[1][20:395, 70:570]).save(path, quality=90)
    return path


def _cfg():
    return load_config(RECIPE)[0]


def _timm_transform(cfg, **kw):
    from timm.data import create_transform

    from xcit.data.pipeline import _posterize_accepts_zero_bits

    args = dict(is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, interpolation="bicubic",
                auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel")  # fmt: skip
    t = create_transform(cfg.image_resize, **{**args, **kw})
    _posterize_accepts_zero_bits(t)  # Pillow 13 refuses 0 bits, which timm's magnitude noise reaches (1 in 550)
    return t


def _seed(s: int) -> None:
    random.seed(s), np.random.seed(s), torch.manual_seed(s)


def _chi2(a: Counter, b: Counter) -> float:
    """p-value of the chi-square test that two samples of categories come from one distribution."""
    keys = sorted(set(a) | set(b))
    return stats.chi2_contingency(np.array([[a[k] for k in keys], [b[k] for k in keys]]))[1]


def _crop_params(transform, img, n: int, seed0: int) -> np.ndarray:
    """(area fraction, aspect) of the crop boxes ``transform`` draws on ``img``, seeds ``seed0 ...``."""
    crop = transform.transforms[0]
    boxes = []
    draw = crop.get_params

    def record(im, scale, ratio):
        boxes.append(draw(im, scale, ratio))
        return boxes[-1]

    crop.get_params = record
    try:
        for s in range(seed0, seed0 + n):
            _seed(s)
            transform(img)
    finally:
        del crop.get_params
    w, h = (img.shape[2], img.shape[1]) if isinstance(img, torch.Tensor) else img.size
    return np.array([(bh * bw / (w * h), bw / bh) for _, _, bh, bw in boxes])


def test_crop_scale_and_aspect_histograms_match_timms(photo):
    cfg = _cfg()
    ours = _crop_params(train_transform(cfg), load_rgb(photo, mode=TENSOR_RGB), 800, 0)  # the whole pipeline
    ref = _crop_params(_timm_transform(cfg), load_rgb(photo), 800, 100_000)
    area_bins, aspect_bins = np.linspace(0.08, 1.0, 11), np.exp(np.linspace(np.log(0.75), np.log(1.333), 9))
    for col, bins in ((0, area_bins), (1, aspect_bins)):
        h_ours = np.histogram(np.clip(ours[:, col], bins[0], bins[-1]), bins)[0]
        h_ref = np.histogram(np.clip(ref[:, col], bins[0], bins[-1]), bins)[0]
        assert stats.chi2_contingency(np.array([h_ours, h_ref]))[1] > P_MIN, (col, h_ours, h_ref)
    assert stats.ks_2samp(ours[:, 0], ref[:, 0]).pvalue > P_MIN
    # the test has power: a scale range of (0.25, 1) instead of (0.08, 1) is rejected
    shifted = _crop_params(_timm_transform(cfg, scale=(0.25, 1.0)), load_rgb(photo), 800, 100_000)
    assert stats.ks_2samp(ours[:, 0], shifted[:, 0]).pvalue < 1e-6


def _augment_ops(transform, img, n: int, seed0: int) -> tuple[Counter, dict[str, list[float]]]:
    """RandAugment's applied operations (name counts) and each one's first magnitude argument."""
    from timm.data.auto_augment import RandAugment

    ra = next(t for t in transform.transforms if isinstance(t, RandAugment))
    counts, levels = Counter(), {}
    for op in ra.ops:

        def wrap(im, *args, _fn=op.aug_fn, _name=op.name, **kw):
            counts[_name] += 1
            if args and isinstance(args[0], (int, float)):
                levels.setdefault(_name, []).append(abs(float(args[0])))
            return _fn(im, *args, **kw)

        op.aug_fn = wrap
    for s in range(seed0, seed0 + n):
        _seed(s)
        transform(img)
    return counts, levels


def test_randaugment_operation_frequencies_and_magnitudes_match_timms(photo):
    cfg = _cfg()
    ours, ours_lv = _augment_ops(train_transform(cfg), load_rgb(photo, mode=TENSOR_RGB), 800, 0)
    ref, ref_lv = _augment_ops(_timm_transform(cfg), load_rgb(photo), 800, 100_000)
    assert set(ours) == set(ref) and len(ours) == 15  # timm's rand increasing set, every op seen
    assert _chi2(ours, ref) > P_MIN, (ours, ref)
    assert 0.4 < sum(ours.values()) / (2 * 800) < 0.6  # two ops per image, each applied with probability 0.5
    for name in ("Rotate", "ShearX", "TranslateXRel", "BrightnessIncreasing", "SolarizeIncreasing"):
        assert stats.ks_2samp(ours_lv[name], ref_lv[name]).pvalue > P_MIN, name
    # power: a magnitude of 7 instead of 9 moves the rotation angles far past the threshold
    _, low = _augment_ops(_timm_transform(cfg, auto_augment="rand-m7-mstd0.5-inc1"), load_rgb(photo), 800, 100_000)
    assert stats.ks_2samp(ours_lv["Rotate"], low["Rotate"]).pvalue < 1e-4


def test_erasing_rate_and_area_match_timms():
    """The batch stage erases as timm's per-image RandomErasing: the same share of images, the same areas."""
    cfg = _cfg()
    cfg.re_scale, cfg.re_ratio = (0.02, 1 / 3), (0.3, 1 / 0.3)  # timm's defaults, to compare with its transform
    stage = batch_stage(cfg)
    from timm.data.random_erasing import RandomErasing

    ref = RandomErasing(0.25, mode="pixel", device="cpu")
    n, size = 4000, 32
    torch.manual_seed(0), random.seed(0)
    ours = stage(torch.full((n, 3, size, size), 128, dtype=torch.uint8))
    assert stage.erase is not None
    flat = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    ours_area = ((ours - flat.view(1, 3, 1, 1)).abs() > 1e-4).any(1).float().mean((1, 2))
    torch.manual_seed(1), random.seed(1)
    imgs = flat.view(1, 3, 1, 1).repeat(n, 1, size, size)
    ref_out = torch.stack([ref(im.clone()) for im in imgs])
    ref_area = ((ref_out - flat.view(1, 3, 1, 1)).abs() > 1e-4).any(1).float().mean((1, 2))
    rates = [(ours_area > 0).sum().item(), (ref_area > 0).sum().item()]
    assert stats.chi2_contingency(np.array([rates, [n - rates[0], n - rates[1]]]))[1] > P_MIN, rates
    assert 0.22 < rates[0] / n < 0.28
    assert stats.ks_2samp(ours_area[ours_area > 0], ref_area[ref_area > 0]).pvalue > P_MIN
    # power: 0.3 instead of 0.25 is rejected over these many images
    assert stats.binomtest(rates[0], n, 0.30).pvalue < 1e-4


def test_mixup_lambda_matches_timms_and_the_beta_laws():
    from timm.data import Mixup

    cfg = _cfg()
    ours = mixup_fn(cfg, num_classes=10)
    ref = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1,
                num_classes=10)  # fmt: skip

    def draws(mix, seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
        np.random.seed(seed)
        out = [mix._params_per_batch() for _ in range(n)]
        return np.array([lam for lam, _ in out]), np.array([cut for _, cut in out])

    lam, cut = draws(ours, 0)
    lam_ref, cut_ref = draws(ref, 1)
    assert (
        stats.chi2_contingency(np.array([np.bincount(cut, minlength=2), np.bincount(cut_ref, minlength=2)]))[1] > P_MIN
    )
    assert 0.47 < cut.mean() < 0.53  # switch probability 0.5
    assert stats.ks_2samp(lam[~cut], lam_ref[~cut_ref]).pvalue > P_MIN
    assert stats.kstest(lam[~cut], stats.beta(0.8, 0.8).cdf).pvalue > P_MIN  # mixup: Beta(0.8, 0.8)
    assert stats.kstest(lam[cut], stats.uniform.cdf).pvalue > P_MIN  # cutmix: Beta(1, 1) before the box
    half = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=10)
    lam_half, cut_half = draws(half, 1)
    assert stats.ks_2samp(lam[~cut], lam_half[~cut_half]).pvalue < 1e-6  # power: alpha 0.4 instead of 0.8
    # label smoothing folded into the targets: off value 0.1 / 10, rows sum to 1, on the batch's device
    x, y = torch.zeros(64, 3, 8, 8), torch.arange(64) % 10
    np.random.seed(2)
    _, target = ours(x, y)
    assert torch.allclose(target.sum(1), torch.ones(64)) and target.min() >= 0.01 - 1e-6
