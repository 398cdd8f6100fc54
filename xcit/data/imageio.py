"""Reading training images safely: any mode to RGB, decompression bombs refused, broken files a named error.

Datasets scraped from the web hold grayscale, CMYK, palette, RGBA and 16-bit files, zero-byte and truncated
downloads, HTML error pages saved as ``.jpg``, and now and then a tiny file that declares a gigantic canvas (a
"decompression bomb"). :func:`load_rgb` turns each into an 8-bit RGB image or an :class:`ImageError` naming the
file, so a data loader can skip it with a counted warning instead of crashing the run.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# PIL's own bomb threshold (about 89 Mpx, a 0.25 GB RGB buffer); far above any training image
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# ``mode`` asking for 8-bit RGB as a uint8 tensor (C, H, W) where torchvision decodes the file (baseline and
# progressive RGB or grey JPEGs), a PIL RGB image otherwise; see :func:`_decode_jpeg`
TENSOR_RGB = "RGB:tensor"


class ImageError(ValueError):
    """An image file that cannot be decoded, or that is refused. The message names the file."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. 16/32-bit integer images are rescaled, not clipped (PIL's ``convert`` clips
    ``I;16`` to 255, which turns most 16-bit photos white)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        else:
            top = 65535.0 if im.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
        arr = np.nan_to_num(np.clip(arr / top * 255.0, 0, 255)).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode in ("P", "PA") or (im.mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")  # palette transparency first, or PIL warns and mis-maps it
    return im.convert("RGB")  # RGBA/LA drop alpha like torchvision's pil_loader; CMYK/YCbCr/LAB/1/L convert


def to_mode(im: Image.Image, mode: str = "RGB") -> Image.Image:
    """An 8-bit image in ``mode``: ``"RGB"`` (:func:`_to_rgb`), ``"L"`` (grey: the RGB image's luma, ITU-R 601 as
    PIL's ``convert("L")``) or ``"RGBA"`` (4 bands: a 4-band file's bands as stored, RGBA or CMYK; alpha from any
    transparency; other images opaque)."""
    if mode == "RGB" or im.mode == mode and "transparency" not in im.info:
        return _to_rgb(im) if mode == "RGB" else im
    if mode == "L":
        return _to_rgb(im).convert("L")
    if mode != "RGBA":
        raise ValueError(f"image mode {mode!r}: use RGB, L or RGBA")
    if len(im.getbands()) == 4:
        return Image.merge("RGBA", im.split())  # CMYK and other 4-band files: the bands as stored
    if im.mode in ("P", "PA", "LA") or "transparency" in im.info:
        return im.convert("RGBA")
    return _to_rgb(im).convert("RGBA")


def load_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, mode: str = "RGB") -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image (or another ``mode``, :func:`to_mode`; :data:`TENSOR_RGB`: a
    uint8 tensor for JPEGs).

    Raises ``FileNotFoundError`` for a missing file and :class:`ImageError` for an empty, corrupt, truncated or
    non-image file, or one that declares more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    if mode == TENSOR_RGB:  # one read of the file: the header check and the decoder share the bytes
        return _decode(io.BytesIO(path.read_bytes()), str(path), max_pixels, mode)
    return _decode(path, str(path), max_pixels, mode)


def decode_rgb(data: bytes, name: str, max_pixels: int = MAX_PIXELS, mode: str = "RGB") -> Image.Image:
    """:func:`load_rgb` for an image held in memory (a tar member, a dataset cell); ``name`` is used in errors."""
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name, max_pixels, mode)


def _decode(src, name: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's bomb and EXIF warnings: the size is checked explicitly below
            with Image.open(src) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"{name}: refused, declares {w}x{h} = {w * h} pixels (limit {max_pixels}); "
                        f"possible decompression bomb"
                    )
                if mode == TENSOR_RGB:
                    pixels = _decode_jpeg(src, im)
                    if pixels is not None:
                        return pixels
                    mode = "RGB"
                im.load()
                return to_mode(im, mode)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused, possible decompression bomb ({e})") from None
    except MemoryError:
        raise ImageError(f"{name}: refused, decoding it needs more memory than is available") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ImageError(f"{name}: cannot decode image ({reason})") from None


def _decode_jpeg(src, im: Image.Image):
    """An RGB or grey JPEG decoded by torchvision's ``decode_jpeg`` as 8-bit RGB ``(3, H, W)`` (a view of HWC
    memory), else None (other formats and modes, or a file it refuses: Pillow then decodes it and names the error).

    Both libraries decode with libjpeg-turbo (islow DCT, fancy upsampling): the pixels are Pillow's exactly (checked
    in tests/test_data.py), in about two thirds of the time, because Pillow also unpacks RGB into its 4-byte pixels.
    """
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or not isinstance(src, io.BytesIO):
        return None
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(src.getbuffer()), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
