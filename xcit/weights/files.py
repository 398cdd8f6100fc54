"""Reading, converting and writing XCiT weights.

Every format is first turned into a state dict in this project's layout (which is timm's) by pure functions:

* official release ``.pth``: ``pos_embeder.*`` and a fused class-attention ``qkv`` -> :func:`official_to_timm`
* timm ``.pth`` / ``.safetensors``: used as is
* MindCV / MindSpore ``.ckpt`` (protobuf): :func:`xcit.weights.mindspore_ckpt.mindcv_to_timm`, ``mindcv`` numerics
flavour
* this project's training checkpoints (``{"model": ..., "ema": ..., "arch": ..., "flavour": ...}``) and
  ``.safetensors`` weight files (architecture and flavour in the metadata)

``.pth`` files are only ever read with ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.train_config import recorded_preprocessing
from ..model.arch import VARIANTS
from ..model.preprocessing import Preprocessing
from ..runtime.checkpoint import SUPPORTED, load_torch_file  # noqa: F401 - SUPPORTED: the formats, for messages
from ..runtime.errors import WeightsError
from ..runtime.fileio import atomic_write
from ..runtime.limits import check_recorded

log = logging.getLogger("xcit")

FORMATS = ("safetensors", "official", "timm", "mindspore")
# the file names each target takes; anything else (``.onnx``, ``.pt2``, ...) names another kind of file
SUFFIXES = {
    "safetensors": (".safetensors",),
    "mindspore": (".ckpt",),
    "timm": (".pth", ".pt", ".bin", ".ckpt", ".safetensors"),
    "official": (".pth", ".pt", ".bin", ".ckpt", ".safetensors"),
}
# string entries of the .ckpt files this project writes (MindSpore's append_dict form): the numerics the weights
# were trained with; a .ckpt without one is MindCV's own and has MindCV's numerics
CKPT_FLAVOUR, CKPT_ARCH = "xcit_flavour", "xcit_arch"
FLAVOURS = ("official", "mindcv")


@dataclass
class Weights:
    """A state dict in this project's layout plus what the file says about itself."""

    state_dict: dict[str, torch.Tensor]
    source_format: str  # "official" | "timm" | "mindcv" | "xcit"
    flavour: str = "official"
    arch: str | None = None
    extra: dict = field(default_factory=dict)  # the wrapper's plain fields, e.g. epoch and class names
    config: dict = field(default_factory=dict)  # the training config an ``xcit train`` checkpoint records
    model_config: dict = field(default_factory=dict)  # the XCiTConfig fields it records (overrides included)
    has_ema: bool = False  # the file also holds EMA weights
    used_ema: bool = False  # ``state_dict`` is the EMA copy
    sealed: bool | None = None  # a verified ``xcit train`` checksum (True), or none (None); a mismatch raises
    source: object = "state dict"  # the file, for messages

    @property
    def num_classes(self) -> int | None:
        w = self.state_dict.get("head.weight")
        return None if w is None else int(w.shape[0])

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The evaluation preprocessing the file records (an ``xcit train`` checkpoint's training config), or None."""
        return recorded_preprocessing(self.config)

    def __repr__(self) -> str:  # a summary: the dataclass repr would print every tensor
        params = sum(v.numel() for v in self.state_dict.values())
        return (
            f"Weights({self.source}: {self.source_format}, flavour={self.flavour!r}, arch={self.arch!r}, "
            f"{len(self.state_dict)} tensors, {params / 1e6:.2f}M values, num_classes={self.num_classes}, "
            f"has_ema={self.has_ema}, used_ema={self.used_ema})"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Pure key maps
# ----------------------------------------------------------------------------------------------------------------------


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP ``module.``, ``model.``, torch.compile ``_orig_mod.``) shared by all keys."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in ("module.", "model.", "_orig_mod."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def official_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official facebookresearch/xcit layout -> this project's (timm's) layout.

    ``pos_embeder.`` becomes ``pos_embed.`` and each class-attention ``attn.qkv`` (3D, D) splits in q, k, v order.
    """
    out = {}
    for k, v in sd.items():
        k = k.replace("pos_embeder.", "pos_embed.")
        if k.startswith("cls_attn_blocks.") and ".attn.qkv." in k:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[k.replace(".attn.qkv.", f".attn.{name}.")] = part.clone()
        else:
            out[k] = v
    return out


def timm_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_timm`."""
    out = {}
    for k, v in sd.items():
        if k.startswith("cls_attn_blocks.") and ".attn.q." in k:
            parts = [sd[k.replace(".attn.q.", f".attn.{n}.")] for n in "qkv"]
            out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts, dim=0)
        elif k.startswith("cls_attn_blocks.") and (".attn.k." in k or ".attn.v." in k):
            continue
        else:
            out[k.replace("pos_embed.", "pos_embeder.")] = v
    return out


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """``"official"`` if the keys use the official release's names, else ``"timm"``."""
    if any(k.startswith("pos_embeder.") or (k.startswith("cls_attn_blocks.") and ".attn.qkv." in k) for k in sd):
        return "official"
    return "timm"


def arch_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """The :class:`xcit.XCiTConfig` fields that a timm-layout state dict's shapes pin down (empty if it is not an
    XCiT state dict): width, depth, heads, patch size, class-attention layers, input channels, MLP ratio."""
    try:
        found = {
            "embed_dim": int(sd["cls_token"].shape[-1]),
            "depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
            "num_heads": int(sd["blocks.0.attn.temperature"].shape[0]),
            "patch_size": 16 if "patch_embed.proj.6.0.weight" in sd else 8,
            "cls_attn_layers": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("cls_attn_blocks.")),
            "in_chans": int(sd["patch_embed.proj.0.0.weight"].shape[1]),
        }
        found["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / found["embed_dim"]
    except (KeyError, ValueError):
        return {}
    return found


def infer_arch(sd: dict[str, torch.Tensor], img_size: int = 224) -> str | None:
    """The variant name whose shapes fit a state dict (resolution cannot be read from weights: 224 by default)."""
    found = arch_from_state_dict(sd)
    keys = ("embed_dim", "depth", "num_heads", "patch_size")
    for name, cfg in VARIANTS.items():
        if found and all(getattr(cfg, k) == found[k] for k in keys) and cfg.img_size == img_size:
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def _is_mindspore_ckpt(path: Path) -> bool:
    if path.suffix != ".ckpt":
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    # torch zip archives start with PK, pickles with 0x80; MindSpore's protobuf starts with field 1, wire type 2
    return not head.startswith(b"PK") and head[:1] != b"\x80"


_EMA_KEYS = ("ema", "model_ema", "state_dict_ema")  # this project's, timm's and the official ModelEma's
# DINO's full checkpoints (facebookresearch/dino main_dino.py save_dict): the teacher is the network DINO evaluates
# and releases; ``checkpoint_key="student"`` takes the other one
_DINO_KEYS = ("teacher", "student")


def _unwrap(
    obj: object, path: Path, use_ema: bool | None, key: str | None = None
) -> tuple[dict[str, torch.Tensor], dict, bool, str | None]:
    """Find the state dict inside a loaded .pth object; return it, the wrapper's plain fields, whether it is the EMA
    copy and the top-level key it came from. ``use_ema``: True takes the EMA copy (warning when there is none), None
    takes it when present. ``key`` names the top-level entry to take (DINO's ``teacher`` / ``student``, ...)."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    extra = {k: v for k, v in obj.items() if not isinstance(v, (dict, torch.Tensor))}
    if key is None and all(isinstance(obj.get(k), dict) for k in _DINO_KEYS):
        key = _DINO_KEYS[0]
    if key is not None:
        if not isinstance(obj.get(key), dict) or not all(isinstance(v, torch.Tensor) for v in obj[key].values()):
            found = sorted(k for k, v in obj.items() if isinstance(v, dict))
            raise WeightsError(f"{path}: no state dict under {key!r} (entries holding dicts: {found})")
        return obj[key], extra, False, key
    if use_ema is not False:
        for k in _EMA_KEYS:
            if isinstance(obj.get(k), dict) and obj[k]:
                return obj[k], extra, True, k
        if use_ema:
            log.warning("%s has no EMA weights; using the model weights", path)
    for k in ("model", "state_dict", "module"):
        if isinstance(obj.get(k), dict) and all(isinstance(v, torch.Tensor) for v in obj[k].values()):
            return obj[k], extra, False, k
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}, False, None
    raise WeightsError(f"{path}: no state dict found (top-level keys: {sorted(obj)[:10]})")


def split_backbone(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The ``backbone.`` part of a whole-network state dict and the number of tensors left out per other module.

    mmdet / mmseg checkpoints of the official dense-task code hold ``backbone.*`` next to ``neck.*``,
    ``rpn_head.*``, ``roi_head.*`` (detection) or ``decode_head.*``, ``auxiliary_head.*`` (segmentation); DINO's
    ``MultiCropWrapper`` holds ``backbone.*`` and ``head.*``. A state dict without ``backbone.`` keys is returned as is.
    """
    if not any(k.startswith("backbone.") for k in sd):
        return sd, {}
    left: dict[str, int] = {}
    for k in sd:
        if not k.startswith("backbone."):
            group = k.split(".", 1)[0]
            left[group] = left.get(group, 0) + 1
    return {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}, left


def _left_out_notice(path: Path, obj: dict, key: str | None, left: dict[str, int], n: int) -> None:
    """One line saying which parts of a detection / segmentation / DINO checkpoint are not used."""
    parts = [f"{g} ({c} tensors)" for g, c in left.items()]
    parts += [k for k, v in obj.items() if isinstance(v, dict) and k != key]
    which = f"the {key!r} entry's backbone" if key in _DINO_KEYS else "the backbone"
    other = " (checkpoint_key='student' takes the student's)" if key == "teacher" else ""
    log.info("%s: using %s (%d tensors)%s; left out: %s", path, which, n, other, ", ".join(parts) or "nothing")


def _timm_layout(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    sd = strip_prefixes(sd)
    layout = detect_layout(sd)
    return (official_to_timm(sd) if layout == "official" else sd), layout


def read_weights(path: str | os.PathLike, use_ema: bool | None = False, checkpoint_key: str | None = None) -> Weights:
    """Read any supported weight file, once, into this project's layout, with what the file records about itself
    (architecture, flavour, classes, the training config and architecture of an ``xcit train`` checkpoint).

    ``use_ema``: False the model weights, True the EMA copy, None the EMA copy when the file has one. A training
    checkpoint's checksum is checked while it is read. Raises :class:`WeightsError` naming the file.

    Whole-network checkpoints give their backbone (:func:`split_backbone`, with a notice of what is left out):
    mmdet / mmseg files of the official dense-task code, and DINO's full checkpoints, whose ``teacher`` is taken
    unless ``checkpoint_key`` names another entry (``"student"``).
    """
    w = _read(Path(path), use_ema, checkpoint_key)
    w.source = path
    return w


def _read_ckpt(path: Path, use_ema: bool | None) -> Weights:
    """A MindSpore ``.ckpt``: MindCV's numerics unless the file records its flavour (:data:`CKPT_FLAVOUR`)."""
    from .mindspore_ckpt import _split_training_checkpoint, mindcv_to_timm, read_mindspore_ckpt_strings

    try:
        tensors, strings = read_mindspore_ckpt_strings(path)
        has_ema = bool(_split_training_checkpoint(tensors)[1])
        used_ema = has_ema and use_ema is not False
        if use_ema and not has_ema:
            log.warning("%s has no EMA weights; using the model weights", path)
        sd = mindcv_to_timm(tensors, use_ema=used_ema)
    except WeightsError:
        raise
    except (ValueError, KeyError) as e:
        raise WeightsError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    flavour = strings.get(CKPT_FLAVOUR, "mindcv")
    if flavour not in FLAVOURS:
        raise WeightsError(f"{path}: unknown numerics flavour {flavour!r} recorded (expected one of {FLAVOURS})")
    fmt = "xcit" if CKPT_FLAVOUR in strings else "mindcv"
    return Weights(sd, fmt, flavour, strings.get(CKPT_ARCH), has_ema=has_ema, used_ema=used_ema)


def _read(path: Path, use_ema: bool | None, checkpoint_key: str | None = None) -> Weights:
    if path.is_dir():
        raise WeightsError(f"{path} is a folder, not a weights file (a save_pretrained folder holds model.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        sd, layout = _timm_layout(sd)
        extra = {"classes": json.loads(meta["classes"])} if "classes" in meta else {}
        fmt = "xcit" if meta.get("format") == "xcit" else layout
        return Weights(sd, fmt, meta.get("flavour", "official"), meta.get("arch"), extra)
    if _is_mindspore_ckpt(path):
        return _read_ckpt(path, use_ema)
    obj, sealed = load_torch_file(path)
    sd, extra, used_ema, key = _unwrap(obj, path, use_ema, checkpoint_key)
    sd, left = split_backbone(strip_prefixes(sd))
    if left or key in _DINO_KEYS:
        _left_out_notice(path, obj, key, left, len(sd))
    sd, layout = _timm_layout(sd)
    flavour = extra.get("flavour", "official") if isinstance(extra.get("flavour"), str) else "official"
    fmt = "xcit" if "arch" in extra else layout
    arch = extra.get("arch") if isinstance(extra.get("arch"), str) else None
    recorded = {k: obj[k] if isinstance(obj.get(k), dict) else {} for k in ("config", "model_config")}
    check_recorded(path, recorded["model_config"], recorded["config"], sd)  # before a model is built from them
    has_ema = any(isinstance(obj.get(k), dict) and obj[k] for k in _EMA_KEYS)
    return Weights(sd, fmt, flavour, arch, extra, **recorded, has_ema=has_ema, used_ema=used_ema, sealed=sealed)


# ----------------------------------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------------------------------


def _report(path: object, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    lines = [f"{path}: weights do not fit the model."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    return "\n".join(lines)


def load_state_dict_checked(
    model: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    strict: bool = True,
    drop_head: bool = False,
    source: object = "state dict",
) -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` with a readable report of missing/unexpected keys and shape mismatches.

    With ``drop_head`` a classifier of a different size is skipped (the model keeps its fresh head) with a notice.
    Returns (missing, unexpected) when not strict.
    """
    own = model.state_dict()
    sd = dict(sd)
    for k in own:  # BN counters are bookkeeping, not weights: tolerate their absence
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    head_keys = [k for k in ("head.weight", "head.bias") if k in sd]
    if drop_head and any(k not in own or own[k].shape != sd[k].shape for k in head_keys):
        n = sd["head.weight"].shape[0] if "head.weight" in sd else "?"
        if model.num_classes:
            log.warning("%s: dropping the %s-class head; the model keeps a new %d-class head", source, n,
                        model.num_classes)  # fmt: skip
        else:  # features only (num_classes=0, e.g. XCiTBackbone): nothing is lost that the model would use
            log.info("%s: the %s-class head is not used (the model has no head)", source, n)
        for k in head_keys:
            del sd[k]
        missing_ok = {"head.weight", "head.bias"}
    else:
        missing_ok = set()
    missing = [k for k in own if k not in sd and k not in missing_ok]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if shapes and any(s.startswith("head.") for s in shapes):
        shapes.append("(the classifier size differs: pass num_classes / drop_head=True to replace the head)")
    if shapes or (strict and (missing or unexpected)):
        raise WeightsError(_report(source, missing, unexpected, shapes))
    if missing or unexpected:
        log.warning(_report(source, missing, unexpected, []))
    model.load_state_dict(sd, strict=False)
    return missing, unexpected


def load_weights(
    model: torch.nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    drop_head: bool = False,
    use_ema: bool | None = False,
) -> Weights:
    """Load any supported weight file into ``model`` (an :class:`xcit.XCiT`).

    MindCV files switch the model to the ``mindcv`` numerics flavour (logged); other files to their recorded
    flavour. ``use_ema``: True or None take the EMA copy when the file has one, False the model weights.
    """
    w = read_weights(path, use_ema=use_ema)
    if hasattr(model, "set_flavour") and model.flavour != w.flavour:
        log.info("%s: %s weights, switching to the %r numerics flavour", path, w.source_format, w.flavour)
        model.set_flavour(w.flavour)
    load_state_dict_checked(model, w.state_dict, strict=strict, drop_head=drop_head, source=path)
    return w


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def save_safetensors(
    sd: dict[str, torch.Tensor], path: str | os.PathLike, arch: str | None, flavour: str = "official", **meta: str
) -> None:
    """Write a state dict as ``.safetensors`` with the architecture and numerics flavour in its metadata."""
    from safetensors.torch import save_file

    metadata = {"format": "xcit", "flavour": flavour, **({"arch": arch} if arch else {}), **meta}
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; follow the umask as torch.save does

    atomic_write(path, write)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return mask


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str | None = None,
    arch: str | None = None,
    use_ema: bool | None = None,
) -> Weights:
    """Convert a weight file. ``to``: ``safetensors`` (default for .safetensors), ``official``, ``timm`` (.pth)
    or ``mindspore`` (default for .ckpt). ``use_ema``: None (default) takes a training checkpoint's EMA weights
    when it has them, as every command does; False its raw weights.

    * ``official`` writes the official release's layout, ``{"model": state_dict}`` with ``pos_embeder.*`` and the
      fused class-attention ``qkv``: what the official ``main.py`` reads (``checkpoint["model"]``) for
      ``--resume``, ``--finetune`` and ``--teacher-path``, and what this project reads back.
    * ``mindspore`` records the weights' numerics flavour (and architecture) as string entries, so this project
      loads the file back with the numerics it was trained with; MindCV's own model computes official-numerics
      weights differently (a warning says so).
    """
    dst = Path(dst)
    to = to or {".ckpt": "mindspore", ".safetensors": "safetensors"}.get(dst.suffix, "timm")
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {FORMATS}")
    if dst.suffix.lower() not in SUFFIXES[to]:
        hint = " (ONNX, TorchScript and .pt2 files come from xcit export)" if dst.suffix in (".onnx", ".pt2") else ""
        named = f"not {dst.suffix!r}" if dst.suffix else "not without an extension"
        raise ValueError(f"{dst}: a {to} weights file is named {' or '.join(SUFFIXES[to])}, {named}{hint}")
    w = read_weights(src, use_ema=use_ema)
    arch = arch or w.arch or infer_arch(w.state_dict)
    if to == "safetensors":
        extra = {"classes": json.dumps(list(w.extra["classes"]))} if "classes" in w.extra else {}
        save_safetensors(w.state_dict, dst, arch, w.flavour, **extra)
    elif to == "mindspore":
        from .mindspore_ckpt import timm_to_mindcv, write_mindspore_ckpt

        strings = {CKPT_FLAVOUR: w.flavour, **({CKPT_ARCH: arch} if arch else {})}
        write_mindspore_ckpt(dst, timm_to_mindcv(w.state_dict), strings)
        if w.flavour != "mindcv":
            log.warning("%s: %s-numerics weights; this project loads them back with those numerics (recorded in "
                        "the file), but MindCV's own model (no q/k normalisation, tanh GELU) computes them "
                        "differently", dst, w.flavour)  # fmt: skip
    else:  # timm layout: a bare state dict; official: the release's {"model": ...}; safetensors when so named
        sd = timm_to_official(w.state_dict) if to == "official" else w.state_dict
        if dst.suffix == ".safetensors":
            save_safetensors(sd, dst, arch, w.flavour)
        else:
            obj = {"model": sd} if to == "official" else sd
            atomic_write(dst, lambda tmp: torch.save(obj, tmp))
    if to in ("official", "timm") and w.flavour == "mindcv":
        log.warning("%s holds MindCV-trained weights; they only reproduce MindCV's outputs with flavour='mindcv'", src)
    return Weights(w.state_dict, w.source_format, w.flavour, arch, w.extra, has_ema=w.has_ema, used_ema=w.used_ema,
                   source=w.source)  # fmt: skip
