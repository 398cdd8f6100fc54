"""Sample indexes from listings: torchvision's order, no file opened, symlink loops named and not followed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from xcit.data.pipeline import build_datasets, image_folder
from xcit.data.readers import list_folder

from .test_data import cfg_for, make_folder


def test_listing_gives_torchvisions_index_without_opening_a_file(tmp_path, monkeypatch):
    from torchvision.datasets import ImageFolder

    root = make_folder(tmp_path / "ds", per_class=5)
    nested = root / "train" / "b" / "sub" / "deeper"
    nested.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nested / "x.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "b" / "sub" / "y.jpeg")
    expected = ImageFolder(str(root / "train")).samples
    import builtins

    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or None)
    ds = image_folder(root / "train")
    assert opened == []
    assert ds.samples == expected and ds.classes == ["a", "b", "c"]
    assert ds.source.paths.dtype.kind == "S"  # one compact bytes array, not a list of Python strings


def _loop_tree(tmp_path: Path) -> Path:
    root = make_folder(tmp_path / "shapes", classes=("circle", "square"), per_class=6)
    os.symlink("..", root / "train" / "circle" / "loop")  # class level: circle/loop -> train
    os.symlink("../..", root / "train" / "square" / "up")  # two levels up: the data_dir
    os.symlink("..", root / "train" / "everything")  # split level: a "class" that is data_dir itself
    os.symlink("circle", root / "train" / "circle_alias")  # not a loop: a second class with the same files
    return root


def test_symlink_loops_are_named_and_each_image_counted_once(tmp_path, caplog):
    root = _loop_tree(tmp_path)
    source, listing = list_folder(root / "train")
    assert source.classes == ["circle", "circle_alias", "square"]  # the loop is no class
    per_class = np.bincount(source.targets, minlength=3).tolist()
    assert per_class == [6, 6, 6]  # 726 for circle before: the loop was followed about 40 levels deep
    assert len(set(source.paths.tolist())) == len(source)
    assert len(listing.loops) == 4  # circle/loop, square/up, everything, and circle_alias/loop
    source, _ = list_folder(root / "train", classes=["circle", "square"])
    assert np.bincount(source.targets).tolist() == [6, 6]
    with caplog.at_level(logging.WARNING, logger="xcit"):
        train, _ = build_datasets(cfg_for(root))
    assert len(train) == 18
    for name in ("circle/loop -> ..", "square/up -> ../..", "everything -> .."):
        assert f"symlink loop {root / 'train'}/{name} not followed" in caplog.text, name


def test_a_loop_in_a_deep_tree_costs_a_listing(tmp_path):
    """A loop high in a nested tree: once listed, each directory is entered once."""
    root = tmp_path / "deep" / "train"
    d = root / "a"
    for i in range(30):
        d = d / f"d{i}"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "x.png")
        os.symlink(os.path.relpath(root, d), d / "top")  # every level links back to the split
    source, listing = list_folder(root)
    assert len(source) == 30 and len(listing.loops) == 30
