"""Image decoding, validation and re-encoding for the converter (PIL + numpy; no TensorFlow import, so the
converter's worker processes start in a fraction of a second)."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

FORMATS = {"JPEG": "jpeg", "PNG": "png"}  # PIL format -> image/format; anything else is stored re-encoded as PNG


def _to_8bit(im):
    """Grayscale stays one channel (decoded to 3 at read time); 16-bit is scaled to 8; alpha is dropped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.round(arr * 255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "LA":
        return im.convert("L")
    return im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA", "RGBA") else im.convert("RGB")


def encode_image(path: str, image_size: int) -> tuple[bytes, str, int, int]:
    """Reads and fully decodes `path`; returns (bytes, 'jpeg'|'png', height, width) of what is stored.

    With image_size == 0 the original bytes are kept (a JPEG or PNG; other formats are re-encoded as PNG).
    Otherwise the shorter side is scaled down to image_size (never up) and the image re-encoded in its format.
    Raises OSError / ValueError for a missing, truncated or corrupt file.
    """
    with open(path, "rb") as f:
        raw = f.read()
    im = Image.open(io.BytesIO(raw))
    fmt = FORMATS.get(im.format or "", "")
    if image_size and fmt == "jpeg":
        im.draft("RGB" if im.mode != "L" else "L", (image_size, image_size))  # DCT scaling: a cheaper decode
    im.load()  # raises on truncated / corrupt data
    if image_size == 0 and fmt:
        return raw, fmt, im.height, im.width
    im = _to_8bit(im)
    if image_size and min(im.size) > image_size:
        scale = image_size / min(im.size)
        new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(new, Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    fmt = fmt or "png"
    if fmt == "jpeg":
        im.save(out, format="JPEG", quality=95)
    else:
        im.save(out, format="PNG", compress_level=1)
    return out.getvalue(), fmt, im.height, im.width


def limit_pixels(max_pixels: int) -> None:
    """Sets PIL's decompression-bomb guard to the package's limit (PIL then refuses twice as many pixels itself)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def validate_image(args) -> tuple[int, str | None, tuple | None]:
    """(i, path, max_pixels) -> (i, why it is bad or None, (format, height, width) of a good JPEG/PNG kept as is).

    The size is read from the header first: an image above `max_pixels` is refused before it is decoded.
    """
    i, path, max_pixels = args
    if path is None:
        return i, "missing image file", None
    limit_pixels(max_pixels)
    try:
        with Image.open(path) as im:  # reads the header only (PIL itself refuses twice the limit here)
            fmt = FORMATS.get(im.format or "", "")
            if im.width * im.height > max_pixels:
                return i, (f"image has {im.width * im.height} pixels ({im.width} x {im.height}), above the limit "
                           f"of {max_pixels} (--max_image_pixels)"), None
            im.load()  # a full decode: raises on truncated / corrupt data
            size = (im.height, im.width)
        if not fmt:  # stored re-encoded as PNG: check that conversion too
            encode_image(path, image_size=0)
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        return i, (f"image has {pixels.group(1) if pixels else 'more'} pixels, above the limit of {max_pixels} "
                   "(--max_image_pixels)"), None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return i, f"corrupt or truncated image ({type(e).__name__}: {e})", None
    return i, None, ((fmt, *size) if fmt else None)


def encode_task(args) -> tuple[bytes, str, int, int]:
    """(path, image_size, known, max_pixels) -> what is stored: a worker task (picklable, TF-free module).

    `known` = (format, height, width) from `validate_image` when the original bytes are kept (image_size 0):
    the image was decoded once already, so it is only read, not decoded again.
    """
    path, image_size, known, max_pixels = args
    limit_pixels(max_pixels)
    if image_size == 0 and known is not None:
        with open(path, "rb") as f:
            return (f.read(), *known)
    return encode_image(path, image_size)
