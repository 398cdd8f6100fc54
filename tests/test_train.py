"""Training and validation end to end: the seed's commands, the demo, bad data, resume, NaN, optimiser pieces."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xcit
from xcit.config.train_config import ConfigError, load_config
from xcit.data.demo import DEMO_RECIPE, write_digits
from xcit.runtime.checkpoint import load_checkpoint
from xcit.train.ema import ModelEma
from xcit.train.fit import TrainingDiverged, fit
from xcit.train.optim import param_groups

from .test_data import add_bad_files, make_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "xcit_nano_12_p8_224", "--model_overrides", "{embed_dim: 32, depth: 2, num_heads: 2}"]
FAST = ["--image_resize", "16", "--num_parallel_workers", "0", "--tensorboard", "False", "--log_interval", "1"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_seed_train_then_validate_commands(tmp_path):
    data = write_digits(tmp_path / "digits", classes=4, per_class=20)
    out, train_json, val_json = tmp_path / "ckpt", tmp_path / "train.json", tmp_path / "val.json"
    size = ["--image_resize", "32", "--model_overrides", "{embed_dim: 32, depth: 2, num_heads: 2}"]
    small = [*size, "--epoch_size", "3", "--batch_size", "16", "--warmup_epochs", "1", "--decay_epochs", "2"]
    small += ["--ema_decay", "0.9", "--num_parallel_workers", "0", "--lr", "0.003"]
    run(
        "train.py",
        *["--config", "configs/xcit/xcit_tiny_12_p16_ascend.yaml", "--data_dir", str(data), "--distribute", "False"],
        *small,
        *["--ckpt_save_dir", str(out), "--results_file", str(train_json)],
    )
    trained = json.loads(train_json.read_text())
    proc = run(
        "validate.py",
        *["-c", "configs/xcit/xcit_tiny_12_p16_224_ascend.yaml", "--data_dir", str(data)],
        *["--ckpt_path", trained["checkpoint"], *size, "--results_file", str(val_json)],
    )
    checked = json.loads(val_json.read_text())
    assert "EMA weights" in proc.stdout + proc.stderr
    assert checked["num_images"] == trained["num_images"] == 16
    assert checked["top1"] == trained["top1"] and checked["top5"] == trained["top5"]
    assert checked["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert {"top1", "top5", "loss", "num_images", "img_per_sec", "model"} <= set(checked)
    # without the recipe, the preprocessing recorded in the checkpoint applies (32 px here, not the default 224)
    proc = run("validate.py", "--data_dir", str(data), "--ckpt_path", trained["checkpoint"], "--results_file",
               str(val_json))  # fmt: skip
    assert "preprocessing from the checkpoint: image_resize 32" in proc.stdout + proc.stderr
    bare = json.loads(val_json.read_text())
    assert bare["top1"] == trained["top1"] and bare["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    proc = run("validate.py", "--data_dir", str(data), "--ckpt_path", trained["checkpoint"], "--ema", "False")
    assert "model weights from epoch 3" in proc.stdout + proc.stderr  # the raw weights, when asked for
    # what the run leaves beside its checkpoints
    for name in ("config.yaml", "train.log", "metrics.csv", "metrics.jsonl", "metrics.png", "best.pth"):
        assert (out / name).is_file(), name
    assert load_config(["-c", str(out / "config.yaml")])[0].amp_level == "O2"  # the resolved MindCV recipe
    ckpt = load_checkpoint(trained["checkpoint"])  # weights_only=True, checksum verified
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "sampler", "rng", "config"):
        assert key in ckpt, key
    assert ckpt["classes"] == ["0", "1", "2", "3"] and ckpt["arch"] == "xcit_tiny_12_p16_224" and ckpt["epoch"] == 3
    assert xcit.read_weights(trained["checkpoint"], use_ema=True).extra["classes"] == ckpt["classes"]
    log_text = (out / "train.log").read_text()
    assert "global batch 16 = batch_size 16 x 1 process(es)" in log_text and "lr_scale none" in log_text
    assert log_text.count("epoch 3/3: train loss") == 1


def test_demo_is_the_default_command(tmp_path, monkeypatch, caplog):
    from xcit.cli import main

    monkeypatch.setenv("XCIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="xcit"):
        assert main(["train", "--epoch_size", "1", "--num_samples", "256", "--tensorboard", "False"]) == 0
    assert (tmp_path / "cache" / "digits" / "train" / "9").is_dir()
    assert len(list((tmp_path / "cache" / "digits" / "val").rglob("*.png"))) == 360
    for name in ("ckpt_e0001.pth", "train.log", "metrics.png"):
        assert (tmp_path / "ckpt" / "demo" / name).is_file(), name
    assert "demo: top-1" in caplog.text and "xcit validate -c" in caplog.text
    cfg, _ = load_config(["-c", str(ROOT / "configs" / "demo.yaml")])
    assert cfg == load_config([], base=DEMO_RECIPE)[0]  # configs/demo.yaml is the built-in recipe


def test_bad_files_are_skipped_and_training_runs(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", per_class=6, size=24)
    add_bad_files(root)
    cfg, _ = load_config(["--data_dir", str(root), "--ckpt_save_dir", str(tmp_path / "out"), *TINY, *FAST])
    cfg.epoch_size, cfg.batch_size, cfg.keep_checkpoint_max = 2, 8, 1
    with caplog.at_level(logging.WARNING, logger="xcit"):
        result = fit(cfg)
    assert sorted(p.name for p in (tmp_path / "out").glob("ckpt_e*.pth")) == ["ckpt_e0002.pth"]  # keep_checkpoint_max
    assert "skipped 1 files that are not images (by name): a/notes.txt" in caplog.text
    for name in ("zero.jpg", "garbage.jpg", "truncated.jpg"):  # found when read, replaced, named
        assert name in caplog.text
    assert "epoch 1: 3 unreadable images replaced by the next good image" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # each bad file read in an epoch counts once (drop_remainder leaves a few images out of epoch 2)
    assert rows[0]["bad_images"] == 3 and 1 <= rows[1]["bad_images"] <= 3 and rows[-1]["val_skipped"] == 0
    assert "bad_images" in (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0]
    assert result["num_images"] == 9 and result["skipped_images"] == 0 and math.isfinite(result["loss"])


def _state(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    return {k: ckpt[k] for k in ("model", "ema", "ema_updates", "optimizer", "scheduler", "epoch", "step", "best_top1")}


def _assert_bitwise_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_after_epoch_one_and_mid_epoch_is_bit_exact(tmp_path):
    data = write_digits(tmp_path / "digits", classes=3, per_class=14)
    recipe = [*TINY, *FAST, "--data_dir", str(data), "--batch_size", "6", "--seed", "7", "--ema", "True"]
    recipe += ["--mixup", "0.8", "--cutmix", "1.0", "--label_smoothing", "0.1", "--drop_path_rate", "0.1"]
    recipe += ["--auto_augment", "rand-m9-mstd0.5-inc1", "--re_prob", "0.5", "--opt", "adamw", "--lr", "0.003"]
    recipe += ["--warmup_epochs", "1", "--decay_epochs", "1", "--val_while_train", "True", "--weight_decay", "0.05"]

    def train(out: str, *extra: str, on_step=None) -> dict:
        cfg, explicit = load_config([*recipe, "--ckpt_save_dir", str(tmp_path / out), *extra])
        return fit(cfg, explicit, on_step=on_step)

    train("straight", "--epoch_size", "2")
    train("resumed", "--epoch_size", "1")  # stop after epoch 1 ...
    train("resumed", "--epoch_size", "2", "--resume", "auto")  # ... and carry on
    reference = _state(tmp_path / "straight" / "ckpt_e0002.pth")
    _assert_bitwise_equal(reference, _state(tmp_path / "resumed" / "ckpt_e0002.pth"))

    class Crash(Exception):
        pass

    def crash(state):  # a kill in the middle of epoch 2, after a step checkpoint
        if state.epoch == 1 and state.batches_done == 3:
            raise Crash

    with pytest.raises(Crash):
        train("crashed", "--epoch_size", "2", "--ckpt_interval_steps", "2", on_step=crash)
    assert (tmp_path / "crashed" / "ckpt_e0001_s00000008.pth").is_file()  # 5 steps per epoch: step 8 = mid epoch 2
    train("crashed", "--epoch_size", "2", "--resume", "auto")
    _assert_bitwise_equal(reference, _state(tmp_path / "crashed" / "ckpt_e0002.pth"))
    # MindCV's spelling of a resume: --ckpt_path X --resume_opt True
    train("mindcv", "--epoch_size", "2", "--ckpt_path", str(tmp_path / "resumed" / "ckpt_e0001.pth"), "--resume_opt")
    _assert_bitwise_equal(reference, _state(tmp_path / "mindcv" / "ckpt_e0002.pth"))


def test_grad_checkpointing_key_trains_the_same_model(tmp_path):
    from xcit.train.fit import build_model

    data = write_digits(tmp_path / "digits", classes=3, per_class=8)
    recipe = [*TINY, *FAST, "--data_dir", str(data), "--batch_size", "6", "--seed", "5", "--epoch_size", "1"]
    recipe += ["--drop_path_rate", "0.2", "--opt", "adamw", "--lr", "0.003", "--warmup_epochs", "0"]
    states = []
    for flag in ("False", "True"):
        cfg, explicit = load_config([*recipe, "--grad_checkpointing", flag, "--ckpt_save_dir", str(tmp_path / flag)])
        assert build_model(cfg, 3, torch.device("cpu")).grad_checkpointing is (flag == "True")
        fit(cfg, explicit)
        states.append(load_checkpoint(tmp_path / flag / "ckpt_e0001.pth")["model"])
    # recomputation replays the same drop-path draws, so the weights after training match
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=4)
    out = tmp_path / "out"
    # epoch 1 at lr 1e-3, then step decay multiplies the lr by 1e30: the logits overflow in epoch 2
    cfg, _ = load_config(["--data_dir", str(root), "--ckpt_save_dir", str(out), *TINY, *FAST, "--opt", "adamw"])
    cfg.epoch_size, cfg.batch_size, cfg.warmup_epochs, cfg.scheduler = 3, 4, 0, "step_decay"
    cfg.decay_epochs, cfg.decay_rate = 1, 1e30
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at epoch 2.*Last good checkpoint: .*ckpt_e0001"):
        fit(cfg)
    assert sorted(p.name for p in out.glob("ckpt_e*.pth")) == ["ckpt_e0001.pth"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out / "ckpt_e0001.pth")["model"].values())


def test_validate_refuses_missing_weights_and_other_classes(tmp_path):
    from xcit.cli.validate import main

    root = make_folder(tmp_path / "ds", per_class=4)
    out = tmp_path / "out"
    cfg, _ = load_config(["--data_dir", str(root), "--ckpt_save_dir", str(out), *TINY, *FAST, "--epoch_size", "1"])
    cfg.batch_size = 4
    fit(cfg)
    common = ["--data_dir", str(root), *FAST]
    assert main([*common, "--ckpt_path", str(tmp_path / "missing.pth")]) == 2
    assert main([*common]) == 2  # no ckpt_path at all
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    assert main([*common, "--ckpt_path", str(tmp_path / "broken.pth")]) == 2
    ckpt = ["--ckpt_path", str(out / "ckpt_e0001.pth")]
    assert main([*common, *ckpt, "--results_file", str(tmp_path / "ok.json")]) == 0
    assert json.loads((tmp_path / "ok.json").read_text())["num_images"] == 6
    gone = ["--distillation_type", "hard", "--teacher_path", str(tmp_path / "gone.pth")]  # as a KD run's config.yaml
    assert main([*common, *ckpt, *gone]) == 0  # validation never needs the teacher
    (root / "val" / "c").rename(root / "val" / "d")  # a class the checkpoint never saw: refused unless asked for
    assert main([*common, *ckpt]) == 2
    skip = ["--ignore_class_mismatch", "True", "--results_file", str(tmp_path / "skip.json")]
    assert main([*common, *ckpt, *skip]) == 0  # then its images are left out: they have no label to score
    assert json.loads((tmp_path / "skip.json").read_text())["num_images"] == 4
    for f in (root / "val" / "d").iterdir():
        f.unlink()
    (root / "val" / "d").rmdir()  # val holds a subset of the checkpoint's classes: refused unless asked for
    assert main([*common, *ckpt]) == 2
    assert main([*common, *ckpt, "--ignore_class_mismatch", "True", "--results_file", str(tmp_path / "sub.json")]) == 0
    assert json.loads((tmp_path / "sub.json").read_text())["num_images"] == 4


def test_fine_tune_from_pretrained_resets_the_head(tmp_path, caplog):
    from xcit.train.fit import build_model

    three, four = make_folder(tmp_path / "three", per_class=4), make_folder(tmp_path / "four", ("a", "b", "c", "d"))
    cfg, _ = load_config(["--data_dir", str(three), "--ckpt_save_dir", str(tmp_path / "a"), *TINY, *FAST])
    cfg.epoch_size, cfg.batch_size = 1, 4
    source = fit(cfg)["checkpoint"]
    args = ["--data_dir", str(four), "--ckpt_save_dir", str(tmp_path / "b"), *TINY, *FAST, "--pretrained", source]
    cfg, _ = load_config([*args, "--layer_decay", "0.75", "--epoch_size", "1", "--batch_size", "4"])
    model = build_model(cfg, 4, torch.device("cpu"))
    weights = load_checkpoint(source)["model"]
    assert model.head.weight.shape[0] == 4 and weights["head.weight"].shape[0] == 3
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], weights["blocks.1.attn.qkv.weight"])
    with caplog.at_level(logging.INFO, logger="xcit"):
        assert fit(cfg)["num_images"] == 4 * 3
    assert "dropping the 3-class head" in caplog.text


@pytest.mark.gpu
def test_gpu_graph_mode_fp16_and_channels_last(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=8, size=32)
    args = ["--data_dir", str(root), "--ckpt_save_dir", str(tmp_path / "out"), *TINY, *FAST, "--mode", "0"]
    args += ["--amp_level", "O2", "--amp_dtype", "fp16", "--loss_scale", "1024", "--channels_last", "--ema"]
    cfg, _ = load_config([*args, "--device_target", "cuda", "--epoch_size", "2", "--batch_size", "8"])
    result = fit(cfg)  # torch.compile (mode 0 on CUDA), fp16 autocast with a GradScaler
    assert math.isfinite(result["loss"]) and load_checkpoint(result["checkpoint"])["scaler"]["scale"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Optimiser pieces
# ----------------------------------------------------------------------------------------------------------------------


def _decayed(groups) -> set[str]:
    return {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}


def test_weight_decay_groups_follow_the_official_recipe():
    model = xcit.create_model("xcit_nano_12_p8_224", embed_dim=32, depth=2, num_heads=2, num_classes=5)
    official = _decayed(param_groups(model, 0.05, "official"))
    assert "blocks.0.attn.temperature" in official  # shape (heads, 1, 1): decayed by timm 0.4's add_weight_decay
    assert "blocks.0.attn.qkv.weight" in official and "head.weight" in official
    for name in ("cls_token", "blocks.0.gamma1", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert name not in official, name
    strict = _decayed(param_groups(model, 0.05, "all"))
    assert official - strict == {f"blocks.{i}.attn.temperature" for i in range(2)}
    assert "cls_token" in _decayed(param_groups(model, 0.05, "norm_and_bias"))  # MindCV's filter
    assert len(_decayed(param_groups(model, 0.05, "disable"))) == len(list(model.parameters()))
    layered = param_groups(model, 0.05, "official", layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in layered for n in g["param_names"]}
    assert scale["head.weight"] == 1.0 and scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.mlp.fc1.weight"] == 0.25 and scale["patch_embed.proj.0.0.weight"] == 0.125


def test_ema_is_applied_once_per_optimiser_step():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEma(model, decay=0.9, warmup="none")
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    # ema_k = 0.9 * ema_(k-1) + 0.1 * w_k with w = 1, 2, 3
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.1 * (0.81 * 1 + 0.9 * 2 + 3)))


def test_config_errors_surface_before_training(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=2)
    cfg, _ = load_config(["--data_dir", str(root), *TINY, *FAST, "--num_classes", "2"])
    with pytest.raises(ConfigError, match="num_classes 2 is smaller than the 3 classes"):
        fit(cfg)


@pytest.mark.slow
def test_resume_reads_its_checkpoint_once(tmp_path, monkeypatch):
    """Resuming (from a named checkpoint, or the newest one by recorded progress) reads the checkpoint's bytes once:
    one full torch.load and one checksum pass, where it used to be two loads and up to three checksum passes."""
    import xcit.runtime.checkpoint as ckpt_mod

    data = write_digits(tmp_path / "digits", classes=3, per_class=6)
    recipe = [*TINY, *FAST, "--data_dir", str(data), "--batch_size", "6", "--val_while_train", "False"]
    recipe += ["--ckpt_save_dir", str(tmp_path / "out")]
    fit(*load_config([*recipe, "--epoch_size", "1"]))
    first = (tmp_path / "out" / "ckpt_e0001.pth").resolve()
    loads, digests = [], []
    real_load, real_digest = torch.load, ckpt_mod._digest

    def load(f, *args, **kwargs):
        if not kwargs.get("mmap") and Path(getattr(f, "name", f)).resolve() == first:
            loads.append(f)
        return real_load(f, *args, **kwargs)

    def digest(f, length):
        if Path(f.name).resolve() == first:
            digests.append(length)
        return real_digest(f, length)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(ckpt_mod, "_digest", digest)
    for epochs, how in (("2", str(first)), ("3", "auto")):
        loads.clear(), digests.clear()
        if how == "auto":
            (tmp_path / "out" / "ckpt_e0002.pth").unlink()  # the newest by progress is ckpt_e0001 again
        fit(*load_config([*recipe, "--epoch_size", epochs, "--resume", how]))
        assert (len(loads), len(digests)) == (1, 1), how
