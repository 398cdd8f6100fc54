"""Released XCiT weights by name (``xcit_tiny_12_p16_224.fb_in1k``), fetched once into the caches timm and torch.hub
use.

The table holds timm's 42 pretrained XCiT entries (``timm/models/xcit.py``, ``default_cfgs``): ``fb_in1k`` and
``fb_dist_in1k`` for the 224-pixel variants, ``fb_dist_in1k`` for the ``_384`` ones; a name without a tag means
timm's default, the first tag listed (``fb_in1k`` at 224, ``fb_dist_in1k`` at 384). Each release's file comes from
the Hugging Face Hub (``timm/<variant>.<tag>``, ``model.safetensors``) through ``huggingface_hub``'s own cache
(``HF_HUB_CACHE``, honouring ``HF_HUB_OFFLINE``), exactly as ``timm.create_model(name, pretrained=True)`` reads it;
the official release URL (``https://dl.fbaipublicfiles.com/xcit/...``) is the fallback, downloaded by torch.hub's
downloader into ``$TORCH_HOME/hub/checkpoints`` (a temporary file in that folder, renamed into place: atomic).
MindCV's own ``xcit_tiny_12_p16_224`` checkpoint (``mindcv/models/xcit.py``, ``default_cfgs``) is the extra tag
``mindcv_in1k``: a URL only, loaded with MindCV's numerics (:mod:`xcit.weights.mindspore_ckpt`).

A cached hub file is checked against its blob name (the Hub stores LFS files under their sha256), so a truncated or
altered file is refused, naming it, instead of loading garbage.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..model.arch import VARIANTS, get_config
from ..model.preprocessing import Preprocessing, timm_conventions
from ..model.xcit import XCiT
from ..runtime.errors import WeightsError
from .files import Weights, read_weights

log = logging.getLogger("xcit")

HUB_FILE = "model.safetensors"  # what timm's hub repos hold and timm's pretrained loader asks for first
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/xcit/{}.pth"  # official README; timm's cfgs keep the same URLs
MINDCV_URL = "https://download.mindspore.cn/toolkits/mindcv/xcit/xcit_tiny_12_p16_224-1b1c9301.ckpt"  # MindCV cfg
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")
HUB_EXTRA = "pip install -e '.[hub]', or pip install huggingface_hub"

# ImageNet-1k top-1 of the official weights: (fb_in1k 224, fb_dist_in1k 224, fb_dist_in1k 384) for p16, then p8
# (official README tables; paper table 9)
_TOP1: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "nano_12": ((69.9, 72.2, 75.4), (73.8, 76.3, 77.8)),
    "tiny_12": ((77.1, 78.6, 80.9), (79.7, 81.2, 82.4)),
    "tiny_24": ((79.4, 80.4, 82.6), (81.9, 82.6, 83.7)),
    "small_12": ((82.0, 83.3, 84.7), (83.4, 84.2, 85.1)),
    "small_24": ((82.6, 83.9, 85.1), (83.9, 84.9, 85.6)),
    "medium_24": ((82.7, 84.3, 85.4), (83.7, 85.1, 85.8)),
    "large_24": ((82.9, 84.9, 85.8), (84.4, 85.4, 86.0)),
}
MINDCV_TOP1 = 77.16  # MindCV's README: 8 Ascend cards, xcit_tiny_12_p16_ascend.yaml


class PretrainedError(WeightsError):
    """Released weights that cannot be named, found or read; the message names the weights and the way out."""


@dataclass(frozen=True)
class Release:
    """One set of released weights: the variant, its tag, where the file comes from and the top-1 it reaches."""

    variant: str
    tag: str
    top1: float  # ImageNet-1k top-1, as published with the weights
    url: str  # the release file (official ``{'model': state_dict}`` .pth, or MindCV's .ckpt)
    hf_hub_id: str | None = None  # timm's copy on the Hub (model.safetensors); None: the URL only
    crop_pct: float = 1.0  # timm's cfg for the official weights (their results use --full_crop); MindCV: 0.875
    license: str = "apache-2.0"

    @property
    def name(self) -> str:
        return f"{self.variant}.{self.tag}"

    def preprocessing(self) -> Preprocessing:
        """The evaluation preprocessing the release's top-1 was measured with."""
        return Preprocessing(size=VARIANTS[self.variant].img_size, crop_pct=self.crop_pct, interpolation="bicubic")

    def pretrained_cfg(self) -> dict:
        """timm's source keys for this release (merged into a model's ``pretrained_cfg``)."""
        return {"architecture": self.variant, "tag": self.tag, "hf_hub_id": self.hf_hub_id, "url": self.url,
                "license": self.license}  # fmt: skip


def _table() -> dict[str, Release]:
    out: dict[str, Release] = {}
    for size, by_patch in _TOP1.items():
        for patch, (in1k, dist224, dist384) in zip((16, 8), by_patch):
            for res in (224, 384):
                variant = f"xcit_{size}_p{patch}_{res}"
                tags = [("fb_in1k", in1k, ""), ("fb_dist_in1k", dist224, "_dist")] if res == 224 else []
                tags = tags or [("fb_dist_in1k", dist384, "_dist")]
                for tag, top1, suffix in tags:
                    hub = f"timm/{variant}.{tag}"
                    out[f"{variant}.{tag}"] = Release(variant, tag, top1, OFFICIAL_URL.format(variant + suffix), hub)
    out["xcit_tiny_12_p16_224.mindcv_in1k"] = Release(
        "xcit_tiny_12_p16_224", "mindcv_in1k", MINDCV_TOP1, MINDCV_URL, None, crop_pct=0.875
    )
    return out


RELEASES: dict[str, Release] = _table()


def default_tag(variant: str) -> str:
    """timm's default tag of a variant: the first one its cfgs list (``fb_in1k`` at 224, ``fb_dist_in1k`` at 384)."""
    return "fb_in1k" if f"{variant}.fb_in1k" in RELEASES else "fb_dist_in1k"


def list_pretrained(pattern: str = "") -> list[str]:
    """Every ``variant.tag`` with released weights, optionally filtered by a substring."""
    return [n for n in RELEASES if pattern in n]


def is_release_name(value: object) -> bool:
    """Whether ``value`` names released weights rather than a file: ``True``, or an ``xcit_...`` string that is not an
    existing path, has no folder part and no weight-file suffix (``xcit_nano_12_p16_224.fb_in1k``)."""
    if value is True:
        return True
    if not isinstance(value, str) or not value.startswith("xcit_") or "/" in value or os.sep in value:
        return False
    return not Path(value).exists() and Path(value).suffix.lower() not in WEIGHT_SUFFIXES


def resolve(name: str) -> Release:
    """The release ``variant[.tag]`` names (no tag: timm's default). An unknown variant or tag raises, naming the
    nearest valid name."""
    variant, _, tag = name.partition(".")
    try:
        get_config(variant)
    except ValueError as e:
        raise PretrainedError(str(e)) from None
    key = f"{variant}.{tag or default_tag(variant)}"
    if key in RELEASES:
        return RELEASES[key]
    own = [n for n in RELEASES if n.startswith(variant + ".")]
    near = difflib.get_close_matches(key, own, n=1, cutoff=0.0)[0]
    tags = ", ".join(n.split(".", 1)[1] for n in own)
    raise PretrainedError(f"no released weights {key!r}: did you mean {near!r}? ({variant} has tags: {tags})")


# ----------------------------------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------------------------------


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (at its import), or as set now."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode())


def url_cache_path(release: Release) -> Path:
    """Where the release URL's file is kept: where torch.hub's ``load_state_dict_from_url`` keeps it
    (``<torch.hub.get_dir()>/checkpoints/<file>``), or for MindCV's checkpoint where MindCV's ``load_pretrained``
    does (``~/.mindspore/models/<file>``, mindcv/models/helpers.py), so that either library's download is found."""
    name = Path(urlparse(release.url).path).name
    if release.tag.startswith("mindcv"):
        return Path.home() / ".mindspore" / "models" / name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def hub_cache_folder(hf_hub_id: str) -> Path:
    """The Hugging Face cache folder of a model repo (``<HF_HUB_CACHE>/models--timm--<variant>.<tag>``)."""
    try:
        from huggingface_hub import constants

        root = constants.HF_HUB_CACHE
    except ImportError:
        root = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    return Path(root).expanduser() / ("models--" + hf_hub_id.replace("/", "--"))


def cached_file(release: Release) -> Path | None:
    """The release's file if one of the caches holds it (no network), else None."""
    if release.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            pass
        else:
            found = try_to_load_from_cache(release.hf_hub_id, HUB_FILE)
            if isinstance(found, str):
                return Path(found)
    path = url_cache_path(release)
    return path if path.is_file() else None


def fetch(release: Release, progress: bool = True) -> Path:
    """The local file of ``release``: from the Hugging Face cache (downloaded once, unless offline), else from the
    release URL through torch.hub's cache (downloaded once, atomically). Raises :class:`PretrainedError` with one
    line naming the file, why it could not be downloaded and the command that fetches it where there is network."""
    why: list[str] = []
    if release.hf_hub_id:
        path = _from_hub(release, why)
        if path is not None:
            return _verified(path, release)
    path = _from_url(release, why, progress)
    if path is not None:
        return path
    where = [str(hub_cache_folder(release.hf_hub_id))] if release.hf_hub_id else []
    where.append(str(url_cache_path(release)))
    raise PretrainedError(
        f"{release.name} is not cached here (looked in {' and '.join(where)}) and cannot be downloaded: "
        f"{'; '.join(why)}. {_how_to_fetch(release)}"
    )


def _from_hub(release: Release, why: list[str]) -> Path | None:
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        why.append(f"the optional package 'huggingface_hub' is not installed ({HUB_EXTRA})")
        return None
    offline = _offline()
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    # without network, huggingface_hub retries for about 20 s before it looks in its cache: look there at once
    unreachable = not offline and not _resolves(host)
    try:  # timm's loader makes the same call (timm/models/_hub.py, load_state_dict_from_hf)
        local = offline or unreachable  # HF_HUB_OFFLINE set after huggingface_hub was imported counts too
        found = hf_hub_download(release.hf_hub_id, HUB_FILE, library_name="xcit", local_files_only=local)
        return Path(found)
    except Exception as e:  # noqa: BLE001 - uncached offline, no network, no such repo: the URL is tried next
        if offline:
            why.append("HF_HUB_OFFLINE is set")
        elif unreachable:
            why.append(f"{host} cannot be reached (its name does not resolve)")
        else:
            why.append(f"the Hub refused it ({_first_line(e)})")
        return None


def _resolves(host: str) -> bool:
    """Whether ``host`` has an address, or a proxy is configured (which resolves names itself)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _from_url(release: Release, why: list[str], progress: bool) -> Path | None:
    dst = url_cache_path(release)
    if dst.is_file():
        return dst
    if urlparse(release.url).scheme in ("http", "https"):
        if _offline():
            if "HF_HUB_OFFLINE is set" not in why:
                why.append("HF_HUB_OFFLINE is set")
            return None
        host = urlparse(release.url).hostname or ""
        if not _resolves(host):
            why.append(f"{host} cannot be reached (its name does not resolve)")
            return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading %s to %s", release.name, release.url, dst)
    try:
        with _socket_timeout(60.0):  # torch.hub's urlopen has no timeout: a stalled connection would hang forever
            torch.hub.download_url_to_file(release.url, str(dst), progress=progress)  # temp file + rename: atomic
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, timeouts, disk errors: reported with the others
        why.append(f"{release.url} could not be fetched ({_first_line(e)})")
        return None
    return dst


@contextmanager
def _socket_timeout(seconds: float):
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _how_to_fetch(release: Release) -> str:
    if release.hf_hub_id:
        folder = hub_cache_folder(release.hf_hub_id)
        return (f"On a machine with network, `hf download {release.hf_hub_id} {HUB_FILE}` fetches it: copy that "
                f"machine's {folder.name} folder into {folder.parent} here")  # fmt: skip
    return (f"On a machine with network, `curl -L --create-dirs -o {url_cache_path(release)} {release.url}` "
            "fetches it: copy the file to the same path here")  # fmt: skip


def _verified(path: Path, release: Release) -> Path:
    """``path``, after checking a Hub blob against its name (the sha256 of an LFS file's content)."""
    real = path.resolve()
    if real.parent.name != "blobs" or not re.fullmatch(r"[0-9a-f]{64}", real.name):
        return path  # a copy outside the blob store (e.g. where symlinks are unavailable): read as it is
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != real.name:
        raise PretrainedError(
            f"{release.name}: the cached file {path} is corrupt (its sha256 is not the one its blob {real} names); "
            "delete the blob to fetch it again"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Building a model from a release
# ----------------------------------------------------------------------------------------------------------------------


def read_release(release: Release, progress: bool = True) -> Weights:
    """The release's weights, read from its cached file (fetched first when needed)."""
    path = fetch(release, progress)
    try:
        return read_weights(path)
    except WeightsError as e:
        raise PretrainedError(
            f"{release.name}: the cached file cannot be read, delete it to fetch it again: {e}"
        ) from None


def model_from_release(release: Release, num_classes: int | None = None, strict: bool = True, **arch) -> XCiT:
    """The release's variant with its weights (``num_classes`` other than 1000 replaces the head, with a notice), its
    ``pretrained_cfg`` holding the release's preprocessing, hub id and URL, as timm's does."""
    from .loading import model_from_weights

    w = read_release(release)
    model = model_from_weights(w, release.variant, num_classes=num_classes, strict=strict, trust_name=True, **arch)
    log.info("%s: weights from %s", release.name, w.source)
    timm_conventions(model, release.preprocessing())
    return add_source_keys(model, release)


def add_source_keys(model: XCiT, release: Release) -> XCiT:
    """Add the release's ``hf_hub_id``, ``url``, ``tag`` and ``license`` to ``model.pretrained_cfg``, as timm's
    models carry them (weights loaded or not); returns the model."""
    model.pretrained_cfg.update(release.pretrained_cfg())
    model.pretrained_cfg["architecture"] = model.name
    return model


def release_for(name: str, pretrained: object) -> tuple[str, Release | None]:
    """``create_model``'s reading of ``(name, pretrained)``: the variant to build and the release to load (None when
    ``pretrained`` is a path or nothing). ``name`` may carry a tag (``xcit_nano_12_p16_224.fb_dist_in1k``), as in
    timm; ``pretrained`` is ``True`` (that tag, else the default) or a release name of the same variant."""
    variant, _, tag = name.partition(".")
    if pretrained is True:
        return variant, resolve(name)
    if is_release_name(pretrained):
        release = resolve(str(pretrained))
        if release.variant != variant:
            raise PretrainedError(f"pretrained={pretrained!r} holds {release.variant} weights, not {variant}'s")
        return variant, release
    if tag:
        resolve(name)  # an unknown tag fails here too, with the nearest name
    return variant, None


def overlay(release: Release, changes: dict | None) -> Release:
    """``release`` with timm's ``pretrained_cfg_overlay`` keys applied (``url``, ``hf_hub_id``)."""
    if not changes:
        return release
    unknown = set(changes) - {"url", "hf_hub_id"}
    if unknown:
        raise ValueError(f"pretrained_cfg_overlay: only 'url' and 'hf_hub_id' are read, not {sorted(unknown)}")
    return replace(release, **changes)


def markdown_table() -> str:
    """Every release as a Markdown table (name, default tag, published top-1, Hub id, release URL): the table of
    ``docs/how-to/pretrained-weights.md``, which a test checks against this one."""
    lines = ["| weights | default | top-1 | Hugging Face Hub (first source) | release URL (fallback) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in RELEASES.values():
        hub = f"[`{r.hf_hub_id}`](https://huggingface.co/{r.hf_hub_id})" if r.hf_hub_id else "none (URL only)"
        default = "yes" if r.tag == default_tag(r.variant) else ""
        lines.append(f"| `{r.name}` | {default} | {r.top1:g} | {hub} | <{r.url}> |")
    return "\n".join(lines) + "\n"
