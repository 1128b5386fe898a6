"""A backbone builder of a user's own, for `--backbone=user_backbones:small_cnn` (tests put this folder on the path)."""

import keras


def small_cnn(*, image_size, weights):
    """image -> feature map [B, S/2, S/2, 12]: a network stsc_tf has never seen."""
    if weights not in (None, "none"):
        raise ValueError("small_cnn has no pretrained weights")
    x = inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(12, 3, padding="same", name="c1")(x)
    x = keras.layers.BatchNormalization(name="n1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.AveragePooling2D(2, name="p1")(x)
    return keras.Model(inputs, x, name="small_cnn")
