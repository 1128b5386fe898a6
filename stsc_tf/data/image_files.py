"""Image files a user points at (`predict`, `explain`): finding them, and reading each into model inputs.

Decoding and the pixel limit are `augment.decode`'s (the function serving uses), the preprocessing is
`augment.eval_preprocess` (the function evaluation and serving use): one path from bytes to model input everywhere.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow as tf

from stsc_tf.config import MAX_IMAGE_PIXELS
from stsc_tf.data import augment
from stsc_tf.errors import ConfigError, DataError


def expand_images(spec: str, flag: str = "--images") -> list[str]:
    """Files named by a comma list of paths and globs (`**` recurses), in order; a folder or no match is an error.

    A part naming an existing file is that file, even when its name holds glob characters ('scan[1].png'); so is
    the whole value when it names one ('a,b.jpg').
    """
    if os.path.isfile(spec):
        return [spec]
    paths = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        found = [part] if os.path.isfile(part) else sorted(glob.glob(part, recursive=True))
        if not found:
            raise ConfigError(f"{flag}: no file matches {part!r}")
        folders = [p for p in found if os.path.isdir(p)]
        if folders and not glob.has_magic(part):
            raise ConfigError(f"{flag}: {part!r} is a folder; give a glob of its images, e.g. '{part}/*.jpg'")
        paths += [p for p in found if not os.path.isdir(p)]
    if not paths:
        raise ConfigError(f"{flag}={spec!r} matches no image file")
    return paths


def read_image_bytes(path: str) -> bytes:
    """The file's bytes; DataError with the reason for a missing, unreadable or empty file or a folder."""
    if os.path.isdir(path):
        raise DataError("is a folder, not an image file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError("file not found") from None
    except OSError as e:
        raise DataError(f"cannot be read ({e.strerror or e})") from None
    if not data:
        raise DataError("empty file")
    return data


def decode_reason(error: tf.errors.InvalidArgumentError) -> str:
    """A one-line reason for a failed `augment.decode` (without TensorFlow's op and function names)."""
    text = str(error.message if hasattr(error, "message") else error)
    for known in ("not a JPEG or PNG image", "truncated PNG header", "more pixels than the limit"):
        if known in text:
            start = text.find("image has more pixels") if "more pixels" in known else -1
            return text[start:].split("(height")[0].strip() if start >= 0 else known
    return "corrupt or truncated image data (the decoder failed)"


def read_image_file(path: str, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(display pixels [S, S, 3] 0..255, model input [S, S, 3]) of one JPEG/PNG file. DataError gives the reason."""
    data = read_image_bytes(path)
    try:
        image = augment.decode(tf.constant(data), max_pixels)
    except tf.errors.InvalidArgumentError as e:
        raise DataError(decode_reason(e)) from None
    return augment.resize(image, image_size).numpy(), augment.eval_preprocess(image, image_size).numpy()


def read_images(paths: list[str], image_size: int, max_pixels: int = MAX_IMAGE_PIXELS,
                flag: str = "--images") -> tuple[np.ndarray, np.ndarray]:
    """Every file of `paths` (all must be good: ConfigError naming the first bad one) -> (pixels, inputs)."""
    pixels, inputs = [], []
    for path in paths:
        try:
            px, x = read_image_file(path, image_size, max_pixels)
        except DataError as e:
            raise ConfigError(f"{flag}: {path}: {e}") from None
        pixels.append(px)
        inputs.append(x)
    return np.stack(pixels), np.stack(inputs)


def unique_stems(paths: list[str]) -> list[str]:
    """File stems for output names; where two files in different folders share a name, the folder is prefixed
    (and, if that is not enough, the position in the list)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    shared = {s for s in stems if stems.count(s) > 1}
    out = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{s}" if s in shared else s
           for p, s in zip(paths, stems)]
    if len(set(out)) < len(out):
        out = [f"{i:04d}_{s}" for i, s in enumerate(out)]
    return out
