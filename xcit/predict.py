"""Inference helpers shared by ``xcit predict``, ``xcit attention`` and ``xcit export``.

* :func:`load_model`: a model from a weight file or a hub-style folder, the architecture taken from the file when
  no name is given;
* :func:`eval_preprocessing` / :func:`eval_transform`: the exact transform ``xcit validate`` applies (the training
  config recorded in a checkpoint wins over the defaults), so predictions agree with validation;
* :func:`class_names`: the checkpoint's class names, the 1000 ImageNet names, or indices;
* :func:`find_images` and :func:`predict`: batched top-k over files, unreadable files reported and skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from .model import XCiT
from .readers import IMG_EXTENSIONS

log = logging.getLogger("xcit")


# ----------------------------------------------------------------------------------------------------------------------
# Model and preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def load_model(
    name: str | None, pretrained: str | os.PathLike | None, use_ema: bool | None = None, **overrides
) -> XCiT:
    """Build ``name`` with ``pretrained`` weights (any supported file, or a ``save_pretrained`` folder).

    Without ``name`` the architecture recorded in the weights (training checkpoints, our safetensors, hub
    folders) is used. A training checkpoint rebuilds its recorded architecture (``model_config``, overrides
    included); other files take what their shapes pin down (width, depth, heads, patch). ``use_ema=None`` takes
    a checkpoint's EMA weights when it has them, as ``xcit validate`` does. Without ``pretrained`` the weights
    are random (logged as a warning).
    """
    from .hub import from_pretrained
    from .variants import create_model, get_config
    from .weights import load_state_dict_checked, read_weights

    if pretrained is not None and Path(pretrained).is_dir():
        model = from_pretrained(pretrained, **overrides)
        if name and name != model.name:
            raise ValueError(f"--model {name} does not match the folder's architecture {model.name}")
        return model.eval()
    if pretrained is None:
        if name is None:
            raise ValueError("give --model NAME (and --pretrained PATH for trained weights)")
        log.warning("no --pretrained weights: %s is randomly initialised", name)
        return create_model(name, **overrides).eval()
    ckpt = checkpoint_meta(Path(pretrained))
    w = read_weights(pretrained, use_ema=ckpt["has_ema"] if use_ema is None else use_ema)
    name = name or w.arch
    if name is None:
        raise ValueError(f"{pretrained} does not record its architecture: pass --model NAME")
    recorded = {k: v for k, v in ckpt["model_config"].items() if k not in ("num_classes", "drop_path_rate")}
    arch = {**shape_overrides(w.state_dict, get_config(name)), **recorded, **overrides}
    arch.setdefault("flavour", w.flavour)
    model = create_model(name, num_classes=w.num_classes or 1000, **arch)
    load_state_dict_checked(model, w.state_dict, source=pretrained)
    classes = w.extra.get("classes")
    model.class_names = list(classes) if classes else None
    return model.eval()


def shape_overrides(sd: dict[str, torch.Tensor], cfg) -> dict:
    """The :class:`xcit.XCiTConfig` fields a state dict's shapes pin down, where they differ from ``cfg``."""
    try:
        found = {
            "embed_dim": sd["cls_token"].shape[-1],
            "depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
            "num_heads": sd["blocks.0.attn.temperature"].shape[0],
            "patch_size": 16 if "patch_embed.proj.6.0.weight" in sd else 8,
            "cls_attn_layers": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("cls_attn_blocks.")),
            "in_chans": sd["patch_embed.proj.0.0.weight"].shape[1],
        }
        found["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / found["embed_dim"]
    except (KeyError, ValueError):
        return {}  # not an XCiT state dict: let the loader report what is wrong
    return {k: type(getattr(cfg, k))(v) for k, v in found.items() if v != getattr(cfg, k)}


def checkpoint_meta(path: Path) -> dict:
    """What ``xcit train`` records in a checkpoint besides weights: ``config`` (the resolved training config),
    ``model_config`` (the architecture) and whether it holds EMA weights. Empty entries for other files."""
    meta = {"config": {}, "model_config": {}, "has_ema": False}
    if path.suffix not in (".pth", ".pt", ".bin") or not path.is_file():
        return meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: tensors are not read
    except Exception:  # noqa: BLE001 - not a torch zip file; the weights reader reports real problems
        return meta
    if isinstance(obj, dict):
        for key in ("config", "model_config"):
            meta[key] = obj[key] if isinstance(obj.get(key), dict) else {}
        meta["has_ema"] = any(isinstance(obj.get(k), dict) and obj[k] for k in ("ema", "model_ema", "state_dict_ema"))
    return meta


def eval_preprocessing(model: XCiT, pretrained: str | os.PathLike | None = None, img_size: int | None = None) -> dict:
    """The evaluation preprocessing for ``model``: ``input_size``, ``interpolation``, ``crop_pct``, ``mean``,
    ``std``. A hub folder's ``pretrained_cfg`` and a training checkpoint's recorded config take precedence over
    the defaults of :func:`xcit.hub.default_pretrained_cfg`; ``img_size`` overrides the resolution."""
    from .hub import default_pretrained_cfg

    cfg = default_pretrained_cfg(model)
    if pretrained is not None and Path(pretrained).is_dir():
        import json

        cfg.update(json.loads((Path(pretrained) / "config.json").read_text()).get("pretrained_cfg", {}))
    elif pretrained is not None:
        cfg.update(_checkpoint_preprocessing(Path(pretrained)))
    if img_size:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    return cfg


def _checkpoint_preprocessing(path: Path) -> dict:
    """Preprocessing recorded by ``xcit train`` in a checkpoint's config (empty for other files)."""
    conf = checkpoint_meta(path)["config"]
    if not conf:
        return {}
    from .config import TrainConfig

    tc = TrainConfig(**{k: v for k, v in conf.items() if k in TrainConfig.__dataclass_fields__})
    mean, std = tc.norm_mean_std
    size = int(tc.image_resize)
    return {
        "input_size": (3, size, size),
        "interpolation": tc.interpolation,
        "crop_pct": float(tc.crop_pct),
        "mean": mean,
        "std": std,
    }


def eval_transform(preprocessing: dict) -> Callable:
    """PIL image -> normalised tensor: :func:`xcit.data.eval_transform`, the transform ``xcit validate`` applies,
    built for these settings (resize to ``size / crop_pct``, centre crop, normalise)."""
    from .config import TrainConfig
    from .data import eval_transform as build

    cfg = TrainConfig(
        image_resize=int(preprocessing["input_size"][-1]),
        interpolation=preprocessing["interpolation"],
        crop_pct=float(preprocessing["crop_pct"]),
        mean=list(preprocessing["mean"]),
        std=list(preprocessing["std"]),
    )
    return build(cfg)


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard index order (WordNet lemmas, as timm lists them)."""
    text = resources.files("xcit").joinpath("imagenet_classes.txt").read_text()
    return tuple(text.splitlines())


def class_names(model: XCiT) -> list[str]:
    """Names for the model's outputs: from its checkpoint, the ImageNet names for 1000 classes, else indices."""
    if model.class_names and len(model.class_names) == model.num_classes:
        return list(model.class_names)
    if model.num_classes == 1000:
        return list(imagenet_class_names())
    return [str(i) for i in range(model.num_classes)]


# ----------------------------------------------------------------------------------------------------------------------
# Batched prediction
# ----------------------------------------------------------------------------------------------------------------------


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Files given directly (any extension), plus the images under given folders (recursive, sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        else:
            found.append(p)  # missing files are reported by predict(), not dropped silently
    return found


@dataclass
class Prediction:
    path: str
    topk: list[tuple[int, str, float]]  # (class index, name, probability)

    def to_dict(self) -> dict:
        return {"path": self.path, "topk": [{"index": i, "label": n, "prob": p} for i, n, p in self.topk]}


def _load_batches(
    files: list[Path], transform: Callable, batch_size: int, errors: list[tuple[str, str]]
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    from .imageio import load_rgb

    batch: list[tuple[Path, torch.Tensor]] = []
    for f in files:
        try:
            batch.append((f, transform(load_rgb(f))))
        except (OSError, ValueError) as e:  # ImageError is a ValueError; missing files an OSError
            errors.append((str(f), str(e)))
            log.warning("skipped %s", e if str(f) in str(e) else f"{f}: {e}")
        if len(batch) == batch_size:
            yield [b[0] for b in batch], torch.stack([b[1] for b in batch])
            batch = []
    if batch:
        yield [b[0] for b in batch], torch.stack([b[1] for b in batch])


@torch.no_grad()
def predict(
    model: XCiT,
    files: list[Path],
    transform: Callable,
    names: list[str],
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Top-k predictions for ``files`` in order; unreadable files go to the returned ``(path, reason)`` list.
    ``amp_dtype`` (``torch.bfloat16`` / ``torch.float16``) runs the model under autocast."""
    from tqdm import tqdm

    from .precision import autocast

    model = model.eval().to(device)
    k = min(topk, model.num_classes)
    results: list[Prediction] = []
    errors: list[tuple[str, str]] = []
    bar = tqdm(
        total=len(files), unit="img", disable=None if progress else True, leave=False
    )  # None: off when not a TTY
    for paths, x in _load_batches(files, transform, batch_size, errors):
        with autocast(torch.device(device), amp_dtype):
            logits = model(x.to(device))
        probs = logits.float().softmax(dim=-1).cpu()
        p, idx = probs.topk(k, dim=-1)
        for path, pi, ii in zip(paths, p.tolist(), idx.tolist()):
            results.append(Prediction(str(path), [(i, names[i], round(q, 6)) for i, q in zip(ii, pi)]))
        bar.update(len(paths))
    bar.update(len(errors))
    bar.close()
    return results, errors
