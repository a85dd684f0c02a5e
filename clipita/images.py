"""Decoding product images: JPEG/PNG/WebP bytes to the uint8 pixels the image encoder takes (``load_image``).

Torch-free on purpose: the CPU read/decode workers of jobs.embed import only this (and PIL), not torch or
open_clip, so they start in well under a second. ``clipita.encoders`` re-exports it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: the multi-picture JPEG that phone cameras write
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard, decoded and resized; product photos are far smaller


class ImageError(ValueError):
    """Image bytes that cannot be used; the message is a short reason for the quarantine table."""


def load_image(data: bytes, size: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes to RGB uint8 ``(size, size, 3)``: EXIF orientation applied, transparency
    composited on white, shortest side resized to ``size`` (bicubic), centre crop. Raises ``ImageError``."""
    if not data:
        raise ImageError("empty image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(f"image too large (over {2 * Image.MAX_IMAGE_PIXELS} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError("undecodable image") from None
    if im.format not in IMAGE_FORMATS:
        raise ImageError(f"unsupported image format ({im.format})")
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:  # checked on the header, before any pixel is decoded
        raise ImageError(f"image too large ({w}x{h})")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
    except OSError as e:
        raise ImageError("truncated image" if "truncat" in str(e).lower() else "undecodable image") from None
    except Exception:  # noqa: BLE001 - decoders of untrusted bytes fail in many ways; all mean the same here
        raise ImageError("undecodable image") from None
    im = _to_rgb(im)
    w, h = im.size
    # torchvision Resize(int) arithmetic (what open_clip's eval transform runs), so pixels match it exactly.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if new_w * new_h > MAX_IMAGE_PIXELS:  # a 1x100000 strip would blow up when its short side is upscaled
        raise ImageError(f"image too elongated ({w}x{h})")
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I"):  # 16-bit grey PNG: convert() would clip to 255, keep the high byte instead
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        # Product shots with a transparent background belong on white (dropping alpha would reveal junk colours).
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(im, mask=im.getchannel("A"))
        return white
    return im.convert("RGB")
