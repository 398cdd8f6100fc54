"""Datasets, transforms, loss and loaders: bad files, class checks, the recipe's augmentations, sharding."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xcit.config.train_config import load_config
from xcit.data.demo import write_digits
from xcit.data.pipeline import DataError, build_datasets, mixup_fn, train_loader, val_loader
from xcit.model.preprocessing import Preprocessing
from xcit.train.losses import Criterion


def make_folder(root: Path, classes=("a", "b", "c"), per_class: int = 6, size: int = 20, seed: int = 0) -> Path:
    """A small ImageFolder with train/val splits of random-coloured RGB JPEGs whose class sets a colour bias."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                arr[..., ci % 3] += 150
                Image.fromarray(arr).save(d / f"{i}.jpg", quality=95)
    return root


def add_bad_files(root: Path) -> dict[str, Path]:
    """Every kind of awkward file in train/a: convertible modes and broken files."""
    d = root / "train" / "a"
    rgb = np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    files = {
        "cmyk": d / "cmyk.jpg",
        "rgba": d / "rgba.png",
        "gray16": d / "gray16.png",
        "palette": d / "palette.png",
        "gray": d / "gray.png",
        "zero": d / "zero.jpg",
        "garbage": d / "garbage.jpg",
        "text": d / "notes.txt",
        "truncated": d / "truncated.jpg",
    }
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"])
    Image.fromarray(np.dstack([rgb, np.full((20, 20), 128, np.uint8)])).save(files["rgba"])
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(files["gray16"])  # I;16, ~61% grey
    Image.fromarray(rgb).convert("P").save(files["palette"])
    Image.fromarray(rgb[..., 0]).save(files["gray"])
    files["zero"].write_bytes(b"")
    files["garbage"].write_bytes(b"<html>404 not found</html>" * 10)
    files["text"].write_text("not an image")
    full = root / "full.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    files["truncated"].write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # header intact, pixels missing
    full.unlink()
    return files


def cfg_for(root: Path, *extra: str):
    base = ["--data_dir", str(root), "--image_resize", "32", "--batch_size", "4", "--num_parallel_workers", "0"]
    return load_config([*base, *extra])[0]


def test_odd_files_convert_and_bad_ones_are_found_when_read(tmp_path, caplog):
    root = make_folder(tmp_path / "ds")
    files = add_bad_files(root)
    with caplog.at_level(logging.WARNING, logger="xcit"):
        train, val = build_datasets(cfg_for(root))
    assert "skipped 1 files that are not images (by name): a/notes.txt" in caplog.text  # the listing opens nothing
    paths = [p for p, _ in train.samples]
    assert str(files["text"]) not in paths
    for name in ("cmyk", "rgba", "gray16", "palette", "gray", "zero", "garbage", "truncated"):
        assert str(files[name]) in paths, name
    train.transform, train.mode = None, "RGB"  # Pillow images (the fast backend decodes JPEGs to tensors)
    for name in ("cmyk", "rgba", "gray16", "palette", "gray"):
        img, y, bad = train[paths.index(str(files[name]))]
        assert img.mode == "RGB" and img.size == (20, 20) and y == 0 and bad == (), name
    grey = np.asarray(train[paths.index(str(files["gray16"]))][0])
    assert 150 < grey.mean() < 160  # 40000/65535 of full scale, not clipped to white
    for name in ("zero", "garbage", "truncated"):  # replaced by the next good image, the bad one named
        i = paths.index(str(files[name]))
        img, y, bad = train[i]
        assert img.mode == "RGB" and len(bad) >= 1 and str(files[name]) in bad[0], name
        nxt = next(j for j in range(i + 1, len(paths)) if not any(s in paths[j] for s in ("zero", "garbage", "trunc")))
        assert np.array_equal(np.asarray(img), np.asarray(train[nxt][0]))
    assert len(val) == 3 * 3


def test_validation_scores_each_decodable_image_once_and_names_the_rest(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", per_class=8)  # 3 classes x 4 val images
    files = add_bad_files(root)
    for key in ("zero", "garbage", "truncated"):  # move them to val, beside 12 good images
        files[key] = files[key].rename(root / "val" / "b" / files[key].name)
    from xcit.train.evaluate import evaluate

    class Count(torch.nn.Module):  # logits from the label's colour channel: every image is classified right
        def forward(self, x):
            return x.mean(dim=(2, 3))

    _, val = build_datasets(cfg_for(root))
    assert len(val) == 15  # listed; which of them decode is found when read
    for world in (1, 2, 3):  # each rank's shard on its own: the counts add up to the whole split
        n = skipped = 0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="xcit"):
            for rank in range(world):
                result = evaluate(Count(), val_loader(val, 4, 0, world, rank), torch.device("cpu"))
                n, skipped = n + result["num_images"], skipped + result["skipped_images"]
        assert (n, skipped) == (12, 3), world
        assert all(str(files[key]) in caplog.text for key in ("zero", "garbage", "truncated")), world
    loader = val_loader(val, 4, 0, 1, 0)
    with caplog.at_level(logging.WARNING, logger="xcit"):
        caplog.clear()
        result = evaluate(Count(), loader, torch.device("cpu"))
    assert result["top1"] == 100.0 and result["num_images"] == 12
    assert "validation: 3 unreadable images skipped, not scored" in caplog.text
    for key in ("zero", "garbage", "truncated"):
        assert str(files[key]) in caplog.text


def test_split_and_class_errors_come_before_training(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "val" / "zebra").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / "zebra" / "z.png")
    with pytest.raises(DataError, match=r"1 classes are not in .*train: \['zebra'\]"):
        build_datasets(cfg_for(root))
    with pytest.raises(DataError, match="val split not found"):
        build_datasets(cfg_for(root, "--val_split", "validation"))
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    (empty / "train" / "a" / "x.txt").write_text("")
    with pytest.raises(DataError, match="no images in 1 class folders"):
        build_datasets(cfg_for(empty))


def test_custom_split_names_and_checkpoint_classes(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "train").rename(root / "training")
    (root / "val").rename(root / "validation")
    cfg = cfg_for(root, "--train_split", "training", "--val_split", "validation")
    train, val = build_datasets(cfg)
    assert train.classes == ["a", "b", "c"] and len(train) == 18
    _, val = build_datasets(cfg, classes=["c", "b", "a", "d"], need_train=False)
    assert sorted({val.classes[y] for y in val.targets}) == ["a", "b", "c"] and val.classes[0] == "c"


def test_recipe_transforms_come_from_timm(tmp_path):
    cfg = cfg_for(tmp_path, "--auto_augment", "randaug-m9-mstd0.5-inc1", "--re_prob", "0.25", "--re_value", "pixel")
    cfg.re_scale = (0.1, 0.2)
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from xcit.data.pipeline import batch_stage, eval_transform, train_transform

    ops = train_transform(cfg).transforms
    names = [type(t).__name__ for t in ops]
    assert isinstance(ops[0], RandomResizedCropAndInterpolation) and names[1] == "RandomHorizontalFlip"
    assert "RandAugment" in names and names[-1] == "MaybePILToTensor"  # workers stop at uint8 pixels
    erase = batch_stage(cfg).erase  # erasing runs once per batch on the device
    assert (erase.min_area, erase.max_area, erase.mode, erase.probability) == (0.1, 0.2, "pixel", 0.25)
    assert "ColorJitter" not in names  # timm switches it off under RandAugment, as the official recipe does
    ev = eval_transform(Preprocessing.from_train_config(load_config(["--image_resize", "224", "--crop_pct", "0.875",
                                                                     "--interpolation", "bicubic"])[0]))  # fmt: skip
    assert ev.transforms[0].size == 256 and ev.transforms[1].size == (224, 224)  # 224 / 0.875
    out = train_transform(cfg)(Image.fromarray(np.zeros((40, 50, 3), np.uint8)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_trivial_augment_wide_is_torchvisions_in_the_augmentation_slot(tmp_path):
    from torchvision.transforms import InterpolationMode, TrivialAugmentWide

    from xcit.data.pipeline import train_transform

    cfg = cfg_for(tmp_path, "--auto_augment", "trivialaugwide", "--color_jitter", "0.4", "--interpolation", "bilinear")
    t = train_transform(cfg)
    names = [type(op).__name__ for op in t.transforms]
    # after the flips, before the tensor; no ColorJitter (timm drops it under an auto_augment policy too)
    assert names == ["OnePassRandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide", "MaybePILToTensor"]
    ta = t.transforms[2]
    assert isinstance(ta, TrivialAugmentWide) and ta.num_magnitude_bins == 31
    assert ta.interpolation == InterpolationMode.BILINEAR
    assert ta.fill == [124, 116, 104]  # the mean pixel (ImageNet mean x 255)
    cfg = cfg_for(tmp_path, "--auto_augment", "trivialaugwide-m20")
    assert train_transform(cfg).transforms[2].num_magnitude_bins == 20
    # it changes pixels (the op draw is seeded by torch): against the same pipeline without it, same crop and flip
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    base = cfg_for(tmp_path)
    changed = 0
    for seed in range(8):
        outs = []
        for c in (cfg, base):
            random.seed(seed), torch.manual_seed(seed)
            outs.append(train_transform(c)(img))
        assert outs[0].shape == outs[1].shape == (3, 32, 32)
        changed += not torch.equal(outs[0], outs[1])
    assert changed >= 6  # "Identity" is one of the 14 ops; a weak op at strength 0 may leave the image too


def test_mixup_targets_and_losses():
    cfg = load_config(["--mixup", "0.8", "--cutmix", "1.0", "--label_smoothing", "0.1", "--batch_size", "4"])[0]
    mix = mixup_fn(cfg, num_classes=5)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    xm, ym = mix(x.clone(), y)
    assert ym.shape == (4, 5) and torch.allclose(ym.sum(1), torch.ones(4)) and ym.min() > 0
    logits = torch.randn(4, 5)
    ce = Criterion("CE", 0.1)
    assert torch.allclose(ce(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))
    onehot = F.one_hot(y, 5).float()
    assert torch.allclose(Criterion("CE")(logits, onehot), F.cross_entropy(logits, y))  # soft == hard for one-hot
    assert torch.allclose(Criterion("BCE")(logits, y), F.binary_cross_entropy_with_logits(logits, onehot))
    assert torch.allclose(Criterion("CE", reduction="sum")(logits, y), F.cross_entropy(logits, y, reduction="sum"))
    with pytest.raises(ValueError, match="even"):
        mixup_fn(load_config(["--mixup", "0.8", "--batch_size", "3"])[0], 5)


def test_two_ranks_see_the_single_process_batch_with_identical_augmentation(tmp_path):
    root = write_digits(tmp_path / "digits", classes=3, per_class=12)
    cfg = cfg_for(root, "--scale", "0.3,1", "--hflip", "0.5", "--batch_size", "4", "--seed", "3")
    train, _ = build_datasets(cfg)
    single = next(iter(train_loader(train, cfg, world=1, rank=0)))
    cfg.batch_size = 2
    ranks = [next(iter(train_loader(train, cfg, world=2, rank=r))) for r in (0, 1)]
    both = torch.cat([ranks[0][0], ranks[1][0]])
    ys = torch.cat([ranks[0][1], ranks[1][1]])
    # rank r holds positions r, r + 2, ... of the same permutation: the same 4 samples, the same crops
    order = [0, 2, 1, 3]
    assert torch.equal(single[0][order], both) and torch.equal(single[1][order], ys)


def test_validation_shards_cover_every_image_once(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=7)  # 3 classes x 3 val images = 9: uneven over 2 or 4 ranks
    _, val = build_datasets(cfg_for(root))
    for world in (1, 2, 4):
        seen = [i for r in range(world) for i in val_loader(val, 2, 0, world, r).dataset.indices]
        assert sorted(seen) == list(range(len(val)))


def _photo_jpeg(path: Path, quality: int = 90) -> Path:
    """A 500x375 JPEG cut from scikit-learn's sample photo (a real photograph: edges, texture, flat sky)."""
    from sklearn.datasets import load_sample_images

    Image.fromarray(load_sample_images().images[0][20:395, 70:570]).save(path, quality=quality)
    return path


def test_pil_backend_with_the_batch_stage_gives_timms_tensors(tmp_path):
    """uint8 workers + normalisation on the batch give timm's per-image values (train with the same seeds, eval);
    the erasing is timm's RandomErasing on the batch."""
    from timm.data import create_transform

    from xcit.data.device import BatchStage
    from xcit.data.pipeline import ToNormalizedTensor, batch_stage, eval_transform, train_transform

    cfg = cfg_for(tmp_path, "--auto_augment", "randaug-m9-mstd0.5-inc1", "--data_backend", "pil")
    ours, stage = train_transform(cfg), batch_stage(cfg)
    ref = create_transform(
        cfg.image_resize, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0,
        interpolation=cfg.interpolation, hflip=cfg.hflip, scale=cfg.scale, ratio=cfg.ratio,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)) for _ in range(8)]
    outs = {"ours": [], "ref": []}
    for i, img in enumerate(imgs):
        for k, t in (("ours", ours), ("ref", ref)):
            random.seed(i), np.random.seed(i), torch.manual_seed(i)
            outs[k].append(t(img))
    assert all(o.dtype == torch.uint8 for o in outs["ours"])
    torch.testing.assert_close(stage(torch.stack(outs["ours"])), torch.stack(outs["ref"]), rtol=0, atol=1e-5)
    ev = load_config(["--image_resize", "32", "--crop_pct", "0.875", "--interpolation", "bicubic"])[0]
    prep = Preprocessing.from_train_config(ev)
    ref = create_transform(32, is_training=False, crop_pct=0.875, interpolation="bicubic")
    img = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    torch.testing.assert_close(eval_transform(prep)(img), ref(img), rtol=0, atol=1e-5)
    u8 = eval_transform(prep, uint8=True)
    batch = BatchStage(u8.mean, u8.std)(u8(img)[None])
    torch.testing.assert_close(batch[0], ref(img), rtol=0, atol=1e-5)
    gray = ToNormalizedTensor((0.5,), (0.5,))(img.convert("L"))
    assert gray.shape == (1, 50, 40) and gray.min() >= -1 and gray.max() <= 1


def test_torchvision_jpeg_decode_gives_pillows_pixels(tmp_path):
    """The fast backend's decode (torchvision's decode_jpeg) is Pillow's, pixel for pixel: colour, grey and
    progressive JPEGs; CMYK and PNG files come back as Pillow images."""
    from xcit.data.imageio import TENSOR_RGB, load_rgb

    photo = _photo_jpeg(tmp_path / "photo.jpg")
    Image.open(photo).convert("L").save(tmp_path / "grey.jpg", quality=85)
    Image.open(photo).save(tmp_path / "progressive.jpg", quality=80, progressive=True)
    Image.open(photo).save(tmp_path / "s444.jpg", quality=95, subsampling=0)
    for name in ("photo.jpg", "grey.jpg", "progressive.jpg", "s444.jpg"):
        t = load_rgb(tmp_path / name, mode=TENSOR_RGB)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape[0] == 3, name
        assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(load_rgb(tmp_path / name))), name
    Image.open(photo).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.open(photo).save(tmp_path / "photo.png")
    for name in ("cmyk.jpg", "photo.png"):
        img = load_rgb(tmp_path / name, mode=TENSOR_RGB)
        assert isinstance(img, Image.Image) and img.mode == "RGB", name


def test_one_pass_crop_is_timms_crop_within_the_documented_bound(tmp_path):
    """Same seeds -> the same crop boxes and flips as timm's transform; the one-pass antialiased resize stays within
    xcit.data.fastcrop's bound of Pillow's (23 levels, from the filter's overshoot; 10 seen on this photo)."""
    from timm.data import create_transform

    from xcit.data.imageio import TENSOR_RGB, load_rgb
    from xcit.data.pipeline import train_transform

    photo = _photo_jpeg(tmp_path / "photo.jpg")
    tensor, pil = load_rgb(photo, mode=TENSOR_RGB), load_rgb(photo)
    cfg = cfg_for(tmp_path, "--image_resize", "224", "--interpolation", "bicubic", "--color_jitter", "0")
    ours = train_transform(cfg)  # crop and flip: the jitter would amplify a level's difference into several
    ref = create_transform(224, is_training=True, interpolation="bicubic", hflip=cfg.hflip, scale=cfg.scale,
                           ratio=cfg.ratio, color_jitter=None, use_prefetcher=True)  # fmt: skip
    diffs = []
    for seed in range(24):
        outs = []
        for t, img in ((ours, tensor), (ref, pil)):
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
            outs.append(t(img).int())
        diffs.append((outs[0] - outs[1]).abs())
    d = torch.stack(diffs)
    assert d.max() <= 23 and d.float().mean() < 0.05, (d.max(), d.float().mean())
    assert (d == 0).float().mean() > 0.95


def test_data_benchmark_runs_on_a_flat_folder_of_jpegs(tmp_path):
    """A plain folder of JPEGs (no class folders), as a new user tries it: every pipeline and every format is timed
    (the per-format comparison used to end in datasets' IndexError on such a folder)."""
    from xcit.bench.data import bench_data, write_jpegs
    from xcit.bench.formats import bench_formats

    write_jpegs(tmp_path / "gen", n=4, size=(100, 75))
    flat = tmp_path / "flat"
    (tmp_path / "gen" / "images").rename(flat)
    res = bench_data(flat, rounds=2, batch=2, dali=False)
    assert res["images"] == 4 and res["ours"]["img_per_s"] > 0 and res["timm"]["img_per_s"] > 0
    assert res["ratio"] > 0 and len(res["round_ratios"]) == 2 and "dali" not in res
    fmt = bench_formats(flat, tmp_path / "work", rounds=1)
    assert fmt["images"] == 4 and set(fmt["ratio_to_timm"]) == {"folder", "wds", "hf"}


def test_device_batches_resume_exactly_and_leave_the_global_generators_alone(tmp_path):
    """uint8 from the workers, normalised and erased on the batch: a resumed epoch gives the same batches (erasing
    included) as the uninterrupted one, and the erasing does not move the loop's own random streams."""
    root = write_digits(tmp_path / "digits", classes=3, per_class=12)
    cfg = cfg_for(root, "--batch_size", "4", "--re_prob", "0.5", "--re_value", "pixel", "--seed", "5")
    train, _ = build_datasets(cfg)
    loader = train_loader(train, cfg, world=1, rank=0)
    loader.sampler.set_epoch(2)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    full = [(x.clone(), y) for x, y in loader]
    assert torch.equal(torch.random.get_rng_state(), before)  # the batch seeds, not the global stream
    assert all(x.dtype == torch.float32 for x, _ in full) and len(full) == 7
    resumed = train_loader(train, cfg, world=1, rank=0)
    resumed.sampler.load_state_dict(loader.sampler.state_dict(batches_done=3))
    resumed.sampler.set_epoch(2)
    rest = list(resumed)
    assert len(rest) == 4
    for (a, ya), (b, yb) in zip(full[3:], rest):
        assert torch.equal(a, b) and torch.equal(ya, yb)
