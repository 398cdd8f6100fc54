"""The 28 official XCiT variants (:mod:`xcit.model.arch`) and ``create_model``, which builds one by name."""

from __future__ import annotations

import difflib
from dataclasses import fields, replace
from pathlib import Path

from ..fast import accelerate, plain
from ..model.arch import VARIANTS, XCiTConfig, get_config, gmacs, list_models, official_top1
from ..model.preprocessing import pyramid_feature_info, timm_conventions
from ..model.pyramid import XCiTPyramid
from ..model.xcit import XCiT
from .files import read_weights
from .loading import model_from_weights
from .pretrained import add_source_keys, model_from_release, overlay, release_for, resolve

__all__ = ["VARIANTS", "create_model", "get_config", "gmacs", "list_models", "official_top1"]

_CFG_FIELDS = {f.name for f in fields(XCiTConfig)}


def create_model(
    name: str,
    pretrained: bool | str | Path | None = None,
    num_classes: int | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: list[int] | None = None,
    strict: bool = True,
    use_ema: bool = False,
    checkpoint_key: str | None = None,
    pretrained_cfg_overlay: dict | None = None,
    fast: bool = True,
    **overrides,
) -> XCiT | XCiTPyramid:
    """Build a variant by name. The model carries timm's ``pretrained_cfg`` (evaluation preprocessing: the weight
    file's when it records one, else :class:`xcit.model.preprocessing.Preprocessing`'s defaults) and ``feature_info``.

    Args:
        name: one of :func:`list_models`, optionally with a tag as in timm (``xcit_nano_12_p16_224.fb_dist_in1k``).
        pretrained: ``True`` for the released weights of ``name`` (its tag, else timm's default tag), a release name
            (``"xcit_nano_12_p16_224.fb_in1k"``, see :mod:`xcit.weights.pretrained` and ``xcit models``), fetched
            once from the Hugging Face Hub (or the release URL) and cached; or a path to weights in any supported
            format (official ``.pth``, timm ``.pth``/``.safetensors``,
            MindCV ``.ckpt``, or this project's checkpoints). MindCV weights switch the model to the ``mindcv``
            numerics flavour. If ``num_classes`` differs from the file's head, the head is dropped with a notice.
            Read by :func:`xcit.weights.loading.model_from_weights`.
        num_classes: classifier size (0 for no head). Default: the weight file's, else 1000. Asking for a size
            other than the file's replaces its head with a new one (logged).
        drop_path_rate: stochastic depth, constant across blocks.
        in_chans: input channels. Weights for another count (3-channel RGB weights for grey or 4-band images) are
            adapted as timm's ``adapt_input_conv`` does (summed for 1 channel, repeated and rescaled for more).
        features_only: return an :class:`XCiTPyramid` giving stride 4/8/16/32 maps instead of a classifier.
        out_indices: blocks tapped by the pyramid (default: the official detection backbone's).
        strict: refuse weight files with missing or unexpected keys.
        use_ema: load the EMA copy of a training checkpoint.
        checkpoint_key: the entry of a whole checkpoint to take, e.g. ``"student"`` of a DINO checkpoint (default:
            its ``teacher``).
        pretrained_cfg_overlay: timm's argument: ``url`` / ``hf_hub_id`` replace the release's sources (e.g. a
            mirror's URL; ``hf_hub_id=None`` goes to the URL directly).
        fast: run the fast forwards (:func:`xcit.fast.accelerate`: the same values in fewer passes, oneDNN's
            fused kernels on CPU); False keeps the plain ones (:func:`xcit.fast.plain` switches either way later).
        **overrides: any :class:`XCiTConfig` field (``embed_dim``, ``depth``, ``flavour``, ``drop_rate``, ...).
    """
    unknown = set(overrides) - _CFG_FIELDS
    if unknown:
        bad = sorted(unknown)[0]
        close = difflib.get_close_matches(bad, sorted(_CFG_FIELDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"create_model got an unknown argument {bad!r}{hint}")
    arch = dict(drop_path_rate=drop_path_rate, in_chans=in_chans, **overrides)
    full_name = name
    name, release = release_for(name, pretrained)
    if release is not None:
        release = overlay(release, pretrained_cfg_overlay)
        model = model_from_release(release, num_classes=num_classes, strict=strict, **arch)
    elif pretrained is None or pretrained is False:
        model = XCiT(replace(get_config(name), num_classes=1000 if num_classes is None else num_classes, **arch), name)
        add_source_keys(timm_conventions(model), resolve(full_name))
    else:
        w = read_weights(pretrained, use_ema=use_ema, checkpoint_key=checkpoint_key)
        model = model_from_weights(w, name, num_classes=num_classes, strict=strict, trust_name=True, **arch)
    (accelerate if fast else plain)(model)
    if not features_only:
        return model
    pyramid = XCiTPyramid(model, out_indices)
    pyramid.feature_info = pyramid_feature_info(pyramid)
    return pyramid
