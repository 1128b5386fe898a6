"""Backbone registry. Each builder returns a functional model: image [B, S, S, 3] -> (relation feature map, logits).

The relation feature map is, by default, the backbone's last feature map after its activation (DenseNet-121:
7x7x1024 at 224 px); `relation_layer` names another layer. The classifier is global average pooling -> dropout
(SRC-MT: 0.2) -> Dense(K) (logits; softmax or sigmoid are applied by the losses, never twice).

`weights`: 'imagenet' (keras.applications' download; needs the internet), 'none', or a path to a weights file
saved from the same backbone (`backbone.save_weights`). `sync_bn=True` makes every BatchNormalization
synchronise its batch statistics across replicas (`keras.layers.BatchNormalization(synchronized=True)`).
"""

from __future__ import annotations

import os
from typing import Callable

import keras

from stsc_tf.errors import ConfigError


def _tiny(image_size: int, weights, sync_bn: bool) -> keras.Model:
    """A few conv layers for tests and quick runs: conv-BN-ReLU x3, 8 -> 16 -> 32 channels, S/4 resolution."""
    x = inputs = keras.Input((image_size, image_size, 3))
    for i, filters in enumerate((8, 16, 32)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(synchronized=sync_bn, name=f"bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu{i}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    return keras.Model(inputs, x, name="tiny")


def _application(factory: Callable, **extra) -> Callable:
    def build(image_size: int, weights, sync_bn: bool) -> keras.Model:
        try:
            base = factory(include_top=False, weights=weights, input_shape=(image_size, image_size, 3), **extra)
        except Exception as e:  # the download of ImageNet weights, most often
            if weights == "imagenet":
                raise ConfigError(f"--weights=imagenet: could not load ImageNet weights ({e}); use --weights=none "
                                  "or --weights=PATH to a saved weights file") from e
            raise
        return _synchronized(base) if sync_bn else base

    return build


def _synchronized(model: keras.Model) -> keras.Model:
    """The same model with every BatchNormalization synchronised across replicas (weights kept)."""
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "BatchNormalization":
            layer["config"]["synchronized"] = True
    synced = model.__class__.from_config(config)
    synced.set_weights(model.get_weights())
    return synced


BACKBONES: dict[str, Callable] = {
    "tiny": _tiny,
    "densenet121": _application(keras.applications.DenseNet121),
    "resnet50": _application(keras.applications.ResNet50),
    # Inputs are ImageNet-normalised by the pipeline, so the model's own rescaling layer is left out.
    "efficientnetv2_b0": _application(keras.applications.EfficientNetV2B0, include_preprocessing=False),
}


def build_backbone(name: str, *, num_classes: int, image_size: int, weights: str = "none", dropout: float = 0.2,
                   relation_layer: str = "", sync_bn: bool = False, model_name: str = "student") -> keras.Model:
    """Builds image -> (relation feature map [B, h, w, C], logits [B, K]).

    Raises ConfigError naming the flag for an unknown backbone, a missing weights file or an unknown layer.
    """
    if name not in BACKBONES:
        raise ConfigError(f"--backbone={name!r} is unknown; choose one of {sorted(BACKBONES)}")
    path = None
    if weights not in ("imagenet", "none", "", None):
        path = weights
        if not os.path.isfile(path):
            raise ConfigError(f"--weights={path!r}: no such file (use imagenet, none, or a path to a weights file)")
    base = BACKBONES[name](image_size, "imagenet" if weights == "imagenet" else None, sync_bn)
    if path:
        base.load_weights(path)
    if relation_layer:
        try:
            feature_map = base.get_layer(relation_layer).output
        except ValueError:
            raise ConfigError(f"--relation_layer={relation_layer!r} is not a layer of {name}") from None
    else:
        feature_map = base.output
    # One flat graph (no nested model), so Grad-CAM and `relation_layer` reach every layer by name.
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
    pooled = keras.layers.Dropout(dropout, name="dropout")(pooled)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(pooled)
    return keras.Model(base.inputs, [feature_map, logits], name=model_name)
