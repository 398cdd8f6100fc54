"""``xcit.train(config, **keys)``: a run from Python, as the README shows it."""

from __future__ import annotations

import pytest

import xcit
from xcit.config.train_config import load_config
from xcit.runtime.errors import ConfigError

from .test_data import make_folder

TINY = dict(model="xcit_nano_12_p8_224", model_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
            image_resize=16, num_parallel_workers=0, tensorboard=False, batch_size=4, warmup_epochs=0,
            epoch_size=1, val_while_train=True)  # fmt: skip


def test_train_from_a_dict_a_yaml_file_and_a_config(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, size=16)
    result = xcit.train({**TINY, "data_dir": str(data)}, ckpt_save_dir=str(tmp_path / "a"))
    assert result["top1"] is not None and (tmp_path / "a" / "ckpt_e0001.pth").is_file()

    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in {**TINY, "data_dir": data}.items()))
    again = xcit.train(recipe, ckpt_save_dir=str(tmp_path / "b"))
    assert again["top1"] == result["top1"]  # the same seed and data: the same run

    cfg, _ = load_config(["-c", str(recipe), "--ckpt_save_dir", str(tmp_path / "c")])
    assert xcit.train(cfg)["top1"] == result["top1"]


def test_a_bad_key_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'epochs'; did you mean 'epoch_size'"):
        xcit.train({**TINY, "data_dir": str(tmp_path)}, epochs=3)
    with pytest.raises(ConfigError, match="data_dir is not set"):
        xcit.train({"model": "xcit_nano_12_p8_224"})
    assert not any(tmp_path.iterdir())


def test_xcit_train_stays_the_package_too():
    from xcit.train.fit import fit

    assert xcit.train.fit.fit is fit and callable(xcit.train)
