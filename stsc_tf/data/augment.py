"""Decoding, the ONE eval/serving preprocessing, and the view augmentation (SRC-MT's), as TF ops for tf.data.

SRC-MT's training transform is `Resize(224) -> RandomAffine(degrees=10, translate=(0.02, 0.02)) ->
RandomHorizontalFlip -> ToTensor -> Normalize(ImageNet)`. Here rotation, translation and flip are folded into ONE
projective transform per view (one resampling instead of three; bilinear, zero fill like torchvision), drawn with
stateless random ops from an explicit seed, so a run is reproducible and both views of a sample are independent
draws of the same distribution. It runs on whole batches inside tf.data, never in the model (several Keras
augmentation layers break XLA) and never in Python.
"""

from __future__ import annotations

import math

import tensorflow as tf

from stsc_tf.config import IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_PIXELS

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_shape(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) int64 [2] of JPEG or PNG bytes, read from the header without decoding the pixels.

    Anything that is not a JPEG or PNG header raises InvalidArgumentError.
    """
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), PNG_MAGIC)
    check = tf.debugging.Assert(tf.logical_or(is_jpeg, is_png), ["not a JPEG or PNG image"])
    with tf.control_dependencies([check]):

        def png():  # IHDR: width and height, big-endian uint32, at bytes 16..23
            complete = tf.debugging.Assert(tf.strings.length(encoded) >= 24, ["truncated PNG header"])
            with tf.control_dependencies([complete]):  # (substr past the end would echo raw bytes in its error)
                header = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int64)  # [8]
            header = tf.reshape(header, [2, 4])
            width_height = tf.reduce_sum(header * tf.constant([2**24, 2**16, 2**8, 1], tf.int64), axis=1)
            return tf.reverse(width_height, [0])

        return tf.cond(is_jpeg, lambda: tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64), png)


def decode(encoded: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS) -> tf.Tensor:
    """JPEG/PNG bytes -> uint8 [H, W, 3]. Grayscale becomes 3 channels, alpha is dropped, 16-bit PNG -> 8-bit.

    The dimensions are read from the header first and an image of more than `max_pixels` pixels is refused before
    any pixel is decoded (a small PNG can declare 16000 x 16000 = 3.6 GB). Bytes that are not a JPEG or PNG, a
    truncated image, or one above the limit raise InvalidArgumentError.
    """
    shape = image_shape(encoded)
    check = tf.debugging.assert_less_equal(
        shape[0] * shape[1], tf.constant(max_pixels, tf.int64),
        message=f"image has more pixels than the limit of {max_pixels} (height x width from its header)")
    with tf.control_dependencies([check]):  # the check runs BEFORE the decoder allocates anything
        encoded = tf.identity(encoded)
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_at_least(encoded: tf.Tensor, fmt: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                    image_size: int) -> tf.Tensor:
    """Like `decode`, but a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, far cheaper than a
    full decode) when its shorter side stays >= image_size. For the training path, which resizes next anyway.
    """
    short = tf.minimum(height, width)
    ratio = tf.where(short >= 8 * image_size, 3, tf.where(short >= 4 * image_size, 2,
                                                           tf.where(short >= 2 * image_size, 1, 0)))
    ratio = tf.where(tf.equal(fmt, "jpeg"), ratio, -1)
    branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in (1, 2, 4, 8)]
    # Records hold what the converter checked (JPEG/PNG within its pixel limit): no header check here.
    image = tf.switch_case(tf.cast(ratio, tf.int32), branches,
                           default=lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 or float [H, W, 3] (or a batch) -> float32 [S, S, 3] in 0..255 (antialiased bilinear, as PIL's)."""
    return tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method="bilinear", antialias=True)


def resize_for_training(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Training-path resize: plain bilinear when the image is at most twice the target (aliasing is negligible
    there, and the views are resampled by the affine anyway), antialiased beyond. 1.2x faster input on the
    converter's default 256 px records; evaluation and serving keep `resize` (always antialiased)."""
    image = tf.cast(image, tf.float32)
    short = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
    return tf.cond(short > 2 * image_size, lambda: resize(image, image_size),
                   lambda: tf.image.resize(image, [image_size, image_size], method="bilinear"))


def normalize(pixels: tf.Tensor) -> tf.Tensor:
    """Float pixels in 0..255 -> ImageNet-normalised input (torchvision's ToTensor + Normalize)."""
    mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STD, tf.float32) * 255.0
    return (tf.cast(pixels, tf.float32) - mean) / std


def denormalize(inputs):
    """The inverse of `normalize`: model inputs -> pixels 0..255 (for display)."""
    return inputs * (tf.constant(IMAGENET_STD, tf.float32) * 255.0) + tf.constant(IMAGENET_MEAN, tf.float32) * 255.0


def eval_preprocess(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """THE evaluation preprocessing (resize + normalize), shared by evaluation, training's eval and serving.

    Args:
      pixels: uint8 or float [H, W, 3] or [N, H, W, 3], values 0..255.
    """
    return normalize(resize(pixels, image_size))


def preprocess_bytes(encoded: tf.Tensor, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (scalar) -> model input [S, S, 3]: decode (within the pixel limit) + eval_preprocess."""
    return eval_preprocess(decode(encoded, max_pixels), image_size)


def affine_matrices(seed: tf.Tensor, batch: int, height: int, width: int, rotation_deg: float, translate: float,
                    hflip: bool) -> tf.Tensor:
    """Random output->input projective transforms, [B, 8] (ImageProjectiveTransformV3's layout).

    Each sample: angle ~ U(-rotation_deg, rotation_deg), shift ~ U(-translate, translate) x size (pixels),
    horizontal flip with probability 1/2 (when hflip), about the image centre.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    theta = tf.random.stateless_uniform([batch], seeds[0], -1.0, 1.0) * (rotation_deg * math.pi / 180.0)
    tx = tf.random.stateless_uniform([batch], seeds[1], -1.0, 1.0) * translate * width
    ty = tf.random.stateless_uniform([batch], seeds[2], -1.0, 1.0) * translate * height
    flip = tf.random.stateless_uniform([batch], seeds[3]) < 0.5 if hflip else tf.zeros([batch], tf.bool)
    f = tf.where(flip, -1.0, 1.0)  # [B]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    # input = Flip(C + Rot(-theta) (output - C - t)); Flip mirrors x about the centre.
    u0, v0 = -(cx + tx), -(cy + ty)
    a0, a1 = f * cos, f * sin
    a2 = f * (cos * u0 + sin * v0) + cx
    b0, b1 = -sin, cos
    b2 = -sin * u0 + cos * v0 + cy
    zeros = tf.zeros([batch])
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def random_affine(images: tf.Tensor, seed: tf.Tensor, rotation_deg: float = 10.0, translate: float = 0.02,
                  hflip: bool = True) -> tf.Tensor:
    """Applies an independent random affine (+ flip) to each image of a float batch [B, H, W, 3]."""
    shape = tf.shape(images)
    h, w = images.shape[1], images.shape[2]
    transforms = affine_matrices(seed, shape[0], h, w, rotation_deg, translate, hflip)
    return tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms, output_shape=shape[1:3],
                                                 fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
