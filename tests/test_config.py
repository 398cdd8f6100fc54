"""The training config: MindCV keys, defaults < YAML < flags, loud errors, shipped recipes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from xcit.config.train_config import ConfigError, TrainConfig, load_config, notices, save_config
from xcit.weights.factory import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))

# mindspore-lab/mindcv configs/xcit/xcit_tiny_12_p16_ascend.yaml, verbatim
MINDCV_XCIT_YAML = """# system
mode: 0
distribute: True
num_parallel_workers: 16
val_while_train: True

# dataset
dataset: 'imagenet'
data_dir: '/path/to/imagenet'
shuffle: True
dataset_download: False
batch_size: 128
drop_remainder: True

# augmentation
image_resize: 224
hflip: 0.5
color_jitter: 0.4
interpolation: 'bicubic'
crop_pct: 0.875
re_prob: 0.25
mixup: 0.8
cutmix: 1.0
auto_augment: 'randaug-m9-mstd0.5-inc1'
ema: True
ema_decay: 0.99996

# model
model: 'xcit_tiny_12_p16_224'
num_classes: 1000
pretrained: False
ckpt_path: ""
keep_checkpoint_max: 30
ckpt_save_dir: './ckpt'
epoch_size: 500
dataset_sink_mode: True
amp_level: 'O2'
drop_rate: 0.0
drop_path_rate: 0.0

# loss
loss: 'CE'
label_smoothing: 0.1

# lr scheduler
scheduler: 'cosine_decay'
min_lr: 0.00001
lr: 0.0005
warmup_epochs: 40
decay_epochs: 460
decay_rate: 0.1

# optimizer
opt: 'adamw'
weight_decay: 0.05
loss_scale: 1024
use_nesterov: False
"""


def test_every_shipped_yaml_loads_and_documents_itself():
    assert len(SHIPPED) >= 2 + len(VARIANTS) + 1  # two MindCV names, 28 official recipes, the demo
    for path in SHIPPED:
        cfg, explicit = load_config(["-c", str(path)])
        head = path.read_text().splitlines()[:6]
        for word in ("Command:", "Hardware:", "Expected:"):
            assert any(line.startswith("#") and word in line for line in head), (path, word)
        assert explicit, path


@pytest.mark.parametrize("name", ["xcit_tiny_12_p16_ascend.yaml", "xcit_tiny_12_p16_224_ascend.yaml"])
def test_mindcv_recipe_is_verbatim_and_keeps_its_values(name, tmp_path):
    text = (ROOT / "configs" / "xcit" / name).read_text()
    header, body = text[: text.index("# system\n")], text[text.index("# system\n") :]
    assert body == MINDCV_XCIT_YAML and all(line.startswith("#") for line in header.splitlines())
    raw = tmp_path / "mindcv.yaml"
    raw.write_text(MINDCV_XCIT_YAML)  # MindCV's own file, without our header
    cfg, explicit = load_config(["-c", str(raw)])
    assert (cfg.mode, cfg.distribute, cfg.epoch_size, cfg.batch_size) == (0, True, 500, 128)
    assert (cfg.amp_level, cfg.loss_scale, cfg.ema, cfg.ema_decay) == ("O2", 1024.0, True, 0.99996)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.decay_epochs) == (5e-4, 1e-5, 40, 460)
    assert cfg.timm_auto_augment == "rand-m9-mstd0.5-inc1"
    assert cfg.pretrained is False and cfg.ckpt_path == "" and cfg.lr_scale == "none"
    assert cfg.aug_repeats == 0  # MindCV's default: its recipe has no repeated augmentation
    assert "dataset_sink_mode" in explicit


def test_defaults_then_yaml_then_flags(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("lr: 0.002\nbatch_size: 32\nema: true\nscale: [0.5, 1.0]\nweight_decay: 1e-4\n")
    cfg, explicit = load_config(["-c", str(y), "--batch_size", "8", "--data-dir", "/d", "--ema=False"])
    assert cfg.lr == 0.002 and cfg.batch_size == 8 and cfg.data_dir == "/d" and cfg.ema is False
    assert cfg.scale == (0.5, 1.0) and cfg.weight_decay == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.epoch_size == TrainConfig().epoch_size == 90  # MindCV's default
    assert {"lr", "batch_size", "data_dir", "ema"} <= explicit and "epoch_size" not in explicit


@pytest.mark.parametrize("text", ["True", "False", "true", "false", "yes", "0"])
def test_mindcv_booleans(text):
    cfg, _ = load_config(["--ema", text, "--distribute", text])
    assert cfg.ema is cfg.distribute is (text.lower() in ("true", "yes"))


def test_bare_boolean_flag_means_true_and_lists_parse():
    cfg, _ = load_config(["--ema", "--scale", "0.25,1", "--model_overrides", "{embed_dim: 64, depth: 2}"])
    assert cfg.ema is True and cfg.scale == (0.25, 1.0) and cfg.model_overrides == {"embed_dim": 64, "depth": 2}


def test_unknown_keys_fail_with_the_nearest_name(tmp_path):
    with pytest.raises(ConfigError, match="'warmup_epoch'.*did you mean 'warmup_epochs'"):
        load_config(["--warmup_epoch", "3"])
    y = tmp_path / "typo.yaml"
    y.write_text("lr: 0.1\nlabel_smothing: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'label_smothing'.*'label_smoothing'"):
        load_config(["-c", str(y)])
    with pytest.raises(ConfigError, match="unexpected argument"):
        load_config(["stray"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--batch_size", "many"], "batch_size"),
        (["--batch_size", "0"], "batch_size"),
        (["--ema", "maybe"], "boolean"),
        (["--hflip", "1.5"], "probability"),
        (["--opt", "adamww"], "did you mean 'adamw'"),
        (["--amp_level", "O4"], "amp_level"),
        (["--model", "xcit_tiny_12_p16"], "Did you mean"),
        (["--auto_augment", "randomaug-m9"], "auto_augment"),
        (["--model_overrides", "{embed_dims: 8}"], "did you mean 'embed_dim'"),
        (["--scale", "1.0,0.5"], "scale"),
        (["--resume_opt", "True"], "ckpt_path"),
        (["-c", "/no/such.yaml"], "does not exist"),
        (["--mode", "3"], "'mode': 3 is not 0"),
        (["--auto_augment", "trivialaugwide-x3"], r"not trivialaugwide\[-mN\]"),
        (["--auto_augment", "trivialaugwide-m1"], "N >= 2"),
    ],
)
def test_bad_values_fail_before_any_work(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv)


def test_ascend_keys_are_mapped():
    cfg, _ = load_config(
        ["--amp_level", "o2", "--device_target", "GPU", "--mode", "1", "--weight_decay_filter", "auto"]
    )
    assert cfg.amp_level == "O2" and cfg.device_target == "cuda" and cfg.use_compile is False
    assert cfg.weight_decay_filter == "official"  # MindSpore's automatic norm filtering = the official grouping
    cfg, _ = load_config(["--mode", "0"])
    assert cfg.use_compile is None  # graph mode: torch.compile where it helps (CUDA)
    cfg, _ = load_config(["--filter_bias_and_bn", "False"])
    assert cfg.weight_decay_filter == "disable"
    assert load_config([])[0].norm_mean_std[0] == pytest.approx((0.485, 0.456, 0.406))  # MindCV's 0-255 scale


def test_notices_name_keys_without_effect_and_spare_a_saved_config(tmp_path):
    from xcit.config.train_config import notices

    save_config(load_config([])[0], tmp_path / "config.yaml")  # every key written, at its default
    assert notices(*load_config(["-c", str(tmp_path / "config.yaml")])) == []
    said = notices(*load_config(["--dataset_sink_mode", "False", "--device_target", "Ascend", "--enable_modelarts"]))
    assert [line.split(":")[0] for line in said] == ["dataset_sink_mode", "device_target", "enable_modelarts"]
    assert "Ascend is not available" in said[1]


def test_resolved_config_round_trips(tmp_path):
    cfg, _ = load_config(["-c", str(ROOT / "configs/xcit/official/xcit_small_12_p8_384.yaml"), "--lr", "1e-3"])
    save_config(cfg, tmp_path / "config.yaml", header="resolved")
    again, _ = load_config(["-c", str(tmp_path / "config.yaml")])
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_official_recipes_match_their_generator_and_the_paper():
    spec = importlib.util.spec_from_file_location("make_configs", ROOT / "scripts" / "make_configs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name in VARIANTS:
        keys, header = gen.recipe(name)
        assert (ROOT / "configs/xcit/official" / f"{name}.yaml").read_text() == header + gen.to_yaml(keys), name
    paper = {"nano_12": 0.0, "tiny_12": 0.0, "tiny_24": 0.05, "small_12": 0.05, "small_24": 0.1}
    paper |= {"medium_24": 0.15, "large_24": 0.25}
    for size, dpr in paper.items():
        cfg, _ = load_config(["-c", str(ROOT / f"configs/xcit/official/xcit_{size}_p16_224.yaml")])
        assert cfg.drop_path_rate == dpr and cfg.epoch_size == 400 and cfg.aug_repeats == 3
        assert cfg.lr_scale == "linear" and cfg.ema_decay == 0.99996 and cfg.weight_decay_filter == "official"
        ft, _ = load_config(["-c", str(ROOT / f"configs/xcit/official/xcit_{size}_p8_384.yaml")])
        assert ft.image_resize == 384 and ft.epoch_size == 30 and ft.lr == 5e-6 and ft.pretrained.endswith("_dist.pth")


def test_a_config_saved_by_mindcv_loads(tmp_path):
    """MindCV's train.py saves every argument, ``config`` (its -c path) included, via config.save_args; the file in
    tests/fixtures/mindcv was written by MindCV's own config.py from the seed recipe
    (scripts/make_mindcv_train_fixture.py --what config). It resolves to exactly the seed recipe's config."""
    saved = ROOT / "tests" / "fixtures" / "mindcv" / "mindcv_saved_config.yaml"
    assert "config" in yaml.safe_load(saved.read_text())
    cfg, explicit = load_config(["-c", str(saved)])
    seed, _ = load_config(["-c", str(ROOT / "configs" / "xcit" / "xcit_tiny_12_p16_ascend.yaml")])
    # the two keys whose defaults here are not MindCV's: the saved file records MindCV's defaults explicitly
    assert (cfg.device_target, cfg.weight_decay_filter) == ("ascend", "disable")
    assert (seed.device_target, seed.weight_decay_filter) == ("auto", "official")
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("device_target", "weight_decay_filter")} == {
        k: v for k, v in seed.to_dict().items() if k not in ("device_target", "weight_decay_filter")
    }
    assert "config: the recipe path a MindCV run recorded in its saved config; ignored" in notices(cfg, explicit)
    copy = tmp_path / "xcit_tiny_12_p16_224.yaml"
    copy.write_text(saved.read_text() + "config_typo: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'config_typo'"):
        load_config(["-c", str(copy)])
