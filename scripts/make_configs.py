"""Write configs/xcit/official/<variant>.yaml: the official training recipe for each of the 28 variants.

Sources: the official ``main.py`` defaults (facebookresearch/xcit), the paper's per-model stochastic depth (appendix
hyper-parameter table; the official README's example uses 0.05 for XCiT-S12/16), and DeiT's 224 -> 384 fine-tune
recipe, which the paper's distilled 384 models follow (DeiT README: 30 epochs, lr 5e-6 at batch 512, wd 1e-8,
min lr 5e-6). Run from the repository root: ``python scripts/make_configs.py``.
"""

from __future__ import annotations

from pathlib import Path

from xcit.weights.factory import VARIANTS, official_top1

OUT = Path("configs/xcit/official")

# paper appendix: stochastic depth per model size (constant across blocks)
DROP_PATH = {"nano_12": 0.0, "tiny_12": 0.0, "tiny_24": 0.05, "small_12": 0.05, "small_24": 0.1}
DROP_PATH |= {"medium_24": 0.15, "large_24": 0.25}

# per-GPU batch so that 8-GPU nodes reach the official global batch with the memory of a 32 GB V100
PER_GPU_224 = {"p16": {"medium_24": 64, "large_24": 64}, "p8": {"small_12": 64, "small_24": 64}}
PER_GPU_224["p8"] |= {"medium_24": 32, "large_24": 32}

# official main.py: everything the 224 from-scratch recipe sets
RECIPE_224 = {
    "mode": 0,
    "distribute": True,
    "val_while_train": True,
    "num_parallel_workers": 10,
    "dataset": "imagenet",
    "data_dir": "/path/to/imagenet",
    "shuffle": True,
    "drop_remainder": True,
    "aug_repeats": 3,
    "scale": [0.08, 1.0],
    "ratio": [0.75, 1.3333333],
    "hflip": 0.5,
    "color_jitter": 0.4,  # timm turns it off when RandAugment is on
    "interpolation": "bicubic",
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "re_value": "pixel",
    "re_count": 1,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 1.0,  # official README: results use --full_crop (main.py's default without it is 0.875)
    "mixup": 0.8,
    "cutmix": 1.0,
    "cutmix_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "num_classes": 1000,
    "drop_rate": 0.0,
    "keep_checkpoint_max": 10,
    "epoch_size": 400,
    "ema": True,
    "ema_decay": 0.99996,
    "ema_warmup": "none",  # official main.py: timm 0.4 ModelEma, constant decay from the first step
    "clip_grad": False,
    "opt": "adamw",
    "eps": 1.0e-8,
    "weight_decay": 0.05,
    "weight_decay_filter": "official",
    "amp_level": "O2",
    "amp_dtype": "fp16",
    "loss_scale": 65536.0,  # torch GradScaler's initial scale (the official NativeScaler)
    "loss_scale_type": "dynamic",
    "scheduler": "cosine_decay",
    "lr": 5.0e-4,
    "lr_scale": "linear",  # lr x global_batch / 512
    "warmup_lr": 1.0e-6,
    "min_lr": 1.0e-5,
    "warmup_epochs": 5,
    "decay_epochs": 395,
    "loss": "CE",
    "label_smoothing": 0.1,
    "seed": 0,
}

# DeiT's 384 fine-tune (README), starting from the 224 distilled weights
FINETUNE_384 = {"epoch_size": 30, "lr": 5.0e-6, "min_lr": 5.0e-6, "warmup_epochs": 5, "decay_epochs": 25}
FINETUNE_384 |= {"weight_decay": 1.0e-8, "keep_checkpoint_max": 5}


def recipe(name: str) -> tuple[dict, str]:
    """(keys, header comment) of one variant's official recipe."""
    size, patch, res = name[len("xcit_") :].rsplit("_", 2)
    per_gpu = PER_GPU_224.get(patch, {}).get(size, 128)
    keys = dict(RECIPE_224, model=name, image_resize=int(res), drop_path_rate=DROP_PATH[size])
    if res == "384":
        per_gpu = max(8, per_gpu // 4)  # 384 px costs ~3x the memory of 224
        keys |= FINETUNE_384
        keys["pretrained"] = f"/path/to/{name.replace('_384', '_224')}_dist.pth"
        keys["batch_size"], global_batch = per_gpu, 512
    else:
        keys["batch_size"], global_batch = per_gpu, 1024
    keys["ckpt_save_dir"] = f"./ckpt/{name}"
    nodes = max(1, global_batch // (8 * per_gpu))
    launch = "torchrun --nproc_per_node 8"
    if nodes > 1:
        launch = f"torchrun --nnodes {nodes} --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500"
    top1 = official_top1(name)
    what = "fine-tune at 384 from the 224 distilled weights (30 epochs)" if res == "384" else "from scratch, 400 epochs"
    header = [
        f"Official XCiT recipe for {name}: {what}.",
        f"Command:  {launch} train.py -c configs/xcit/official/{name}.yaml --data_dir /path/to/imagenet",
        f"Hardware: {nodes} node(s) x 8 GPUs (32 GB), batch {per_gpu} per GPU = global {global_batch}; "
        f"lr {keys['lr']:g} x {global_batch}/512.",
        f"Expected: top-1 {top1:.1f} on ImageNet-1k val (paper / official weights"
        + (
            "; those used hard distillation from a RegNetY-16GF teacher: add --distillation_type hard "
            "--teacher_path /path/to/regnety_160.pth, DeiT's weights)."
            if res == "384"
            else ")."
        ),
    ]
    return keys, "".join(f"# {line}\n" for line in header)


def to_yaml(keys: dict) -> str:
    import yaml

    return yaml.safe_dump(keys, sort_keys=False, default_flow_style=None)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in VARIANTS:
        keys, header = recipe(name)
        (OUT / f"{name}.yaml").write_text(header + to_yaml(keys))
    print(f"wrote {len(VARIANTS)} configs to {OUT}")


if __name__ == "__main__":
    main()
