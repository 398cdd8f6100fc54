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

from ..data.readers import IMG_EXTENSIONS
from ..model.preprocessing import PIL_MODES, Preprocessing, model_preprocessing
from ..model.xcit import XCiT

log = logging.getLogger("xcit")


# ----------------------------------------------------------------------------------------------------------------------
# Model and preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def load_model(
    name: str | None, pretrained: bool | str | os.PathLike | None, use_ema: bool | None = None, **overrides
) -> XCiT:
    """Build ``name`` with ``pretrained`` weights (any supported file, or a ``save_pretrained`` folder), in eval mode.

    ``pretrained`` may also name released weights (``xcit_nano_12_p16_224.fb_in1k``; ``True``: ``name``'s default
    release), fetched once and cached (:mod:`xcit.weights.pretrained`); ``name`` may then be left out.

    Without ``name`` the architecture recorded in the weights (training checkpoints, our safetensors, hub
    folders) is used. A training checkpoint rebuilds its recorded architecture (``model_config``, overrides
    included); other files take what their shapes pin down (width, depth, heads, patch). ``use_ema=None`` takes
    a checkpoint's EMA weights when it has them, as ``xcit validate`` does. Without ``pretrained`` the weights
    are random (logged as a warning). See :func:`xcit.weights.loading.load_model`.
    """
    from ..weights.factory import create_model
    from ..weights.loading import load_model as load
    from ..weights.pretrained import is_release_name

    if pretrained is True and name is None:
        raise ValueError("--pretrained without a path or name needs --model NAME (or give a release name, e.g. "
                         "--pretrained xcit_tiny_12_p16_224.fb_in1k; `xcit models` lists them)")  # fmt: skip
    if is_release_name(pretrained):
        release = str(pretrained) if pretrained is not True else name
        return create_model(name or release.split(".")[0], pretrained=release, **overrides).eval()
    if pretrained is None:
        if name is None:
            raise ValueError("give --model NAME (and --pretrained PATH for trained weights)")
        log.warning("no --pretrained weights: %s is randomly initialised", name)
        return create_model(name, **overrides).eval()
    return load(pretrained, name, use_ema=use_ema, **overrides)


def eval_preprocessing(model: XCiT, img_size: int | None = None) -> dict:
    """The evaluation preprocessing for ``model`` in timm's keys (``input_size``, ``interpolation``, ``crop_pct``,
    ``mean``, ``std``): what its weight file recorded (a hub folder's ``pretrained_cfg``, a training checkpoint's
    config), else :class:`xcit.model.preprocessing.Preprocessing`'s defaults; ``img_size`` overrides the resolution."""
    return model_preprocessing(model, img_size).for_channels(model.cfg.in_chans).pretrained_cfg()


def eval_transform(preprocessing: dict | Preprocessing) -> Callable:
    """PIL image -> normalised tensor: :func:`xcit.data.pipeline.eval_transform`, the transform ``xcit validate``
    applies,
    for a :class:`Preprocessing` or timm's keys (resize to ``size / crop_pct``, centre crop, normalise)."""
    from ..data.pipeline import eval_transform as build

    if not isinstance(preprocessing, Preprocessing):
        preprocessing = Preprocessing.from_pretrained_cfg(preprocessing)
    return build(preprocessing)


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard index order (WordNet lemmas, as timm lists them)."""
    text = resources.files("xcit.infer").joinpath("imagenet_classes.txt").read_text()
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
    files: list[Path], transform: Callable, batch_size: int, errors: list[tuple[str, str]], mode: str = "RGB"
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    from ..data.imageio import load_rgb

    batch: list[tuple[Path, torch.Tensor]] = []
    for f in files:
        try:
            batch.append((f, transform(load_rgb(f, mode=mode))))
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

    from ..runtime.precision import autocast

    model = model.eval().to(device)
    k = min(topk, model.num_classes)
    results: list[Prediction] = []
    errors: list[tuple[str, str]] = []
    bar = tqdm(
        total=len(files), unit="img", disable=None if progress else True, leave=False
    )  # None: off when not a TTY
    mode = PIL_MODES[model.cfg.in_chans]  # grey or 4-band models read their images so
    for paths, x in _load_batches(files, transform, batch_size, errors, mode):
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
