"""``xcit benchmark --agreement DIR``: does bf16 / fp16 autocast keep fp32's predictions on real images?

The images, their labels and the model come from exactly the code ``xcit validate`` runs
(:func:`xcit.train.evaluate.model_for_eval`, :func:`xcit.train.evaluate.eval_preprocessing` and
:func:`xcit.data.pipeline.build_datasets` with the checkpoint's classes), so the fp32 top-1 here is validate's top-1,
and a split validate refuses (classes the checkpoint lacks, a dataset root instead of a split) is refused here too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..runtime.precision import PRECISIONS, autocast

log = logging.getLogger("xcit")


def split_of(folder: str | Path, val_split: str = "val") -> tuple[Path, str]:
    """``(data_dir, val_split)`` for ``folder``: a dataset root holding ``val_split`` (any format validate reads),
    else the folder itself as the split (``.../digits/val``)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"--agreement {folder}: no such folder")
    if not folder.is_dir():
        raise ValueError(f"--agreement {folder}: not a folder (give an image split such as DATA_DIR/val, or DATA_DIR)")
    from ..data.formats import detect_format

    root = folder.resolve()
    if (root / val_split).is_dir() or detect_format(root, "train", val_split) != "folder":
        return root, val_split
    return root.parent, root.name


def agreement(
    folder: str | Path,
    pretrained: str,
    name: str | None = None,
    device: str = "cpu",
    batch: int = 16,
    img_size: int | None = None,
    use_ema: bool | None = None,
    ignore_class_mismatch: bool = False,
) -> dict:
    """Top-1 of fp32, bf16 and fp16 autocast over a split, labelled as ``xcit validate`` labels it, and how often
    each low precision picks fp32's class. ``use_ema``: None/True the EMA weights when the file has them."""
    from ..config.train_config import TrainConfig
    from ..data.pipeline import build_datasets, val_loader
    from ..train.evaluate import eval_preprocessing, model_for_eval

    data_dir, split = split_of(folder)
    cfg = TrainConfig(data_dir=str(data_dir), val_split=split, ignore_class_mismatch=ignore_class_mismatch)
    explicit = {"image_resize"} if img_size else set()
    if name:
        cfg.model = name
    if img_size:
        cfg.image_resize = img_size
    model, classes, recorded = model_for_eval(pretrained, cfg, torch.device(device), use_ema is not False, bool(name))
    prep = eval_preprocessing(cfg, recorded, explicit, model.cfg.in_chans)
    _, val = build_datasets(cfg, classes=classes, need_train=False, skip_unknown_val=ignore_class_mismatch,
                            exact_classes=True, eval_prep=prep)  # fmt: skip
    if classes is None and len(val.classes) != model.num_classes:
        log.warning("%d class folders, model head has %d outputs: labels are the sorted folder indices",
                    len(val.classes), model.num_classes)  # fmt: skip
    preds: dict[str, list[torch.Tensor]] = {p: [] for p in PRECISIONS}
    labels = []
    with torch.inference_mode():
        for x, y in val_loader(val, batch, 0, 1, 0):
            labels.append(y)
            for p, dtype in PRECISIONS.items():
                with autocast(torch.device(device), dtype):
                    preds[p].append(model(x.to(device)).float().argmax(-1).cpu())
    top1 = {p: torch.cat(v) for p, v in preds.items()}
    y = torch.cat(labels)
    where = str(Path(data_dir) / split)
    out = {"folder": where, "images": len(y), "top1": {p: float((v == y).float().mean()) for p, v in top1.items()}}
    out["agreement_with_fp32"] = {p: float((v == top1["fp32"]).float().mean()) for p, v in top1.items() if p != "fp32"}
    return out
