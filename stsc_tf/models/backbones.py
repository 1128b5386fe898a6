"""Backbones: a registry of feature extractors, and the student network STSC trains.

A backbone builder is a function `builder(*, image_size: int, weights: str | None) -> keras.Model` that returns a
feature extractor, image [B, S, S, 3] -> feature map [B, h, w, C] (keras.applications' `include_top=False` form;
`weights` is "imagenet" or None). Builders are registered by name with `@register_backbone("name")`; `--backbone`
also accepts `package.module:function`, a builder of the user's that is imported, so a new network needs no edit of
this package:

    @register_backbone("mobilenetv3s")
    def mobilenet(*, image_size, weights):
        return keras.applications.MobileNetV3Small(include_top=False, weights=weights,
                                                   input_shape=(image_size, image_size, 3),
                                                   include_preprocessing=False)

`build_network` puts SRC-MT's head on a backbone — global average pooling -> dropout (SRC-MT: 0.2) -> Dense(K)
logits (softmax or sigmoid are applied by the losses, never twice) — and returns the form `STSCModel` trains:
image -> (relation features, logits), one flat functional graph so Grad-CAM and `relation_layer` reach every layer
by name. The relation features are the backbone's last feature map after its activation (DenseNet-121: 7x7x1024 at
224 px), another layer's map (`relation_layer`), or, with `relation_features='avg'` and no `relation_layer`, the
pooled features after the dropout (exactly SRC-MT's `activations = drop(pool(relu(features)))`; with a
`relation_layer`, 'avg' averages that layer's map, without dropout).

`with_relation_output` turns any ordinary Keras classifier (image -> logits) into the same form.

`weights`: 'imagenet' (keras.applications' download; needs the internet), 'none', or a path to a weights file saved
from the same backbone (`backbone.save_weights`). `sync_bn=True` makes every BatchNormalization synchronise its
batch statistics across replicas; otherwise `fused_bn=True` (the default) swaps Keras' BatchNormalization for the
numerically equal `FusedBatchNormalization` (TensorFlow's fused kernel; see `stsc_tf/models/layers.py`).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import keras
import numpy as np

from stsc_tf.config import RELATION_FEATURES
from stsc_tf.errors import ConfigError
from stsc_tf.models.layers import fuse_batchnorm

log = logging.getLogger("stsc_tf")
Builder = Callable[..., keras.Model]
_REGISTRY: dict[str, Builder] = {}
SOFT_ACTIVATIONS = ("softmax", "softmax_v2", "sigmoid", "log_softmax")  # softmax_v2: tf.nn.softmax


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator: registers `builder(*, image_size, weights) -> feature extractor` under `name`."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"a backbone named {name!r} is already registered ({_REGISTRY[name]})")
        _REGISTRY[name] = builder
        return builder

    return decorate


def registered_backbones() -> list[str]:
    """The registered backbone names (what `--backbone` accepts besides `package.module:function`)."""
    return sorted(_REGISTRY)


def resolve_backbone(spec: str) -> Builder:
    """A registered name, or `package.module:function` (imported). Raises ConfigError naming --backbone."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" not in spec:
        raise ConfigError(f"--backbone={spec!r} is unknown; choose one of {registered_backbones()} or give a "
                          "builder of your own as package.module:function")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--backbone={spec!r}: cannot import {module_name!r} ({e})") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"--backbone={spec!r}: {module_name} has no function {attr!r}")
    return builder


# ------------------------------------------------------------------------------------------------ built-in backbones
@register_backbone("tiny")
def tiny(*, image_size: int, weights: str | None) -> keras.Model:
    """A few conv layers for tests and quick runs: conv-BN-ReLU x3, 8 -> 16 -> 32 channels, S/4 resolution."""
    if weights == "imagenet":
        raise ConfigError("--backbone=tiny has no ImageNet weights; use --weights=none or a path")
    x = inputs = keras.Input((image_size, image_size, 3))
    for i, filters in enumerate((8, 16, 32)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu{i}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    return keras.Model(inputs, x, name="tiny")


def _application(factory: Callable, **extra) -> Builder:
    def build(*, image_size: int, weights: str | None) -> keras.Model:
        return factory(include_top=False, weights=weights, input_shape=(image_size, image_size, 3), **extra)

    build.__doc__ = f"keras.applications.{factory.__name__} without its top."
    return build


register_backbone("densenet121")(_application(keras.applications.DenseNet121))
register_backbone("resnet50")(_application(keras.applications.ResNet50))
# Inputs are ImageNet-normalised by the pipeline, so the model's own rescaling layer is left out.
register_backbone("efficientnetv2_b0")(_application(keras.applications.EfficientNetV2B0, include_preprocessing=False))


# ------------------------------------------------------------------------------------------------ the student network
def _synchronized(model: keras.Model) -> keras.Model:
    """The same model with every BatchNormalization synchronised across replicas (weights kept)."""
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] in ("BatchNormalization", "FusedBatchNormalization"):
            layer["class_name"] = "BatchNormalization"
            layer["module"] = "keras.layers"
            layer.pop("registered_name", None)
            layer["config"]["synchronized"] = True
    synced = model.__class__.from_config(config)
    synced.set_weights(model.get_weights())
    return synced


def build_features(backbone: str, *, image_size: int, weights: str = "none", sync_bn: bool = False,
                   fused_bn: bool = True) -> keras.Model:
    """The backbone's feature extractor with its weights and BatchNorm variant. Raises ConfigError naming the flag."""
    builder = resolve_backbone(backbone)
    path = None
    if weights not in ("imagenet", "none", "", None):
        path = weights
        if not os.path.isfile(path):
            raise ConfigError(f"--weights={path!r}: no such file (use imagenet, none, or a path to a weights file)")
    try:
        base = builder(image_size=image_size, weights="imagenet" if weights == "imagenet" else None)
    except ConfigError:
        raise
    except TypeError as e:
        if backbone in _REGISTRY:
            raise
        raise ConfigError(f"--backbone={backbone!r}: calling it as {backbone}(image_size={image_size}, weights=...) "
                          f"failed ({e}); a builder takes the keywords image_size and weights and returns a "
                          "functional keras.Model") from None
    except Exception as e:  # the download of ImageNet weights, most often
        if weights == "imagenet":
            raise ConfigError(f"--weights=imagenet: could not load ImageNet weights for {backbone} ({e}); use "
                              "--weights=none or --weights=PATH to a saved weights file") from e
        raise
    if not isinstance(base, keras.Model) or len(base.outputs) != 1 or len(base.outputs[0].shape) != 4:
        raise ConfigError(f"--backbone={backbone!r}: the builder must return a functional keras.Model with one "
                          "4-D output (a feature map [B, h, w, C])")
    if path:
        try:
            base.load_weights(path)
        except Exception as e:
            raise ConfigError(f"--weights={path!r}: not a weights file of {backbone} ({e})") from None
    if sync_bn:
        return _synchronized(base)
    return fuse_batchnorm(base) if fused_bn else base


def build_network(backbone: str, *, num_classes: int, image_size: int, weights: str = "none", dropout: float = 0.2,
                  relation_layer: str = "", relation_features: str = "flatten", sync_bn: bool = False,
                  fused_bn: bool = True, name: str = "student") -> keras.Model:
    """Builds image -> (relation features, logits [B, K]) on a backbone (see the module docstring)."""
    if relation_features not in RELATION_FEATURES:
        raise ConfigError(f"--relation_features={relation_features!r}; choose one of {list(RELATION_FEATURES)}")
    base = build_features(backbone, image_size=image_size, weights=weights, sync_bn=sync_bn, fused_bn=fused_bn)
    if relation_layer:
        try:
            relation = base.get_layer(relation_layer).output
        except ValueError:
            raise ConfigError(f"--relation_layer={relation_layer!r} is not a layer of {backbone}") from None
    else:
        relation = base.output
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
    dropped = keras.layers.Dropout(dropout, name="dropout")(pooled)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(dropped)
    if relation_features == "avg" and not relation_layer:
        relation = dropped  # [B, C]: SRC-MT's relation features, after the classifier's dropout
    return keras.Model(base.input, [relation, logits], name=name)


def relation_reduction(relation_features: str) -> str:
    """How STSCModel reduces a 4-D relation map for a `relation_features` choice: 'flatten' or 'avg'."""
    return "flatten" if relation_features == "flatten" else "avg"


def _producer(model: keras.Model, tensor) -> keras.layers.Layer | None:
    for layer in reversed(model.layers):
        try:
            if layer.output is tensor:
                return layer
        except (AttributeError, ValueError):  # a layer called several times has no single output
            continue
    return None


def feature_map_layer(network: keras.Model) -> str:
    """The name of the layer Grad-CAM uses by default: the relation map's layer, or the last 4-D feature map."""
    relation = network.outputs[0]
    if len(relation.shape) == 4:
        layer = _producer(network, relation)
        if layer is not None:
            return layer.name
    for layer in reversed(network.layers):
        try:
            if len(layer.output.shape) == 4:
                return layer.name
        except (AttributeError, ValueError):
            continue
    raise ConfigError(f"network {network.name!r} has no layer with a 4-D feature map for Grad-CAM; pass --layer")


def _last_feature_map(model: keras.Model):
    """The last 4-D output with a spatial extent (a feature map; a 1x1 map is taken only when there is no other)."""
    maps = []
    for layer in model.layers[:-1]:
        try:
            if len(layer.output.shape) == 4:
                maps.append(layer.output)
        except (AttributeError, ValueError):
            continue
    spatial = [m for m in maps if (m.shape[1] or 2) * (m.shape[2] or 2) > 1]
    if not maps:
        raise ValueError(f"{model.name}: no layer with a 4-D output; pass layer= the name of one")
    return (spatial or maps)[-1]


def with_relation_output(model: keras.Model, layer: str | None = None) -> keras.Model:
    """Turns a Keras classifier (image -> logits) into the form STSCModel trains: image -> (relation features, logits).

    Args:
      model: a functional or Sequential keras.Model with one image input and one output [B, K]. If its last layer
        applies softmax or sigmoid, that activation is removed (STSC's losses take logits): an `Activation` /
        `Softmax` layer is skipped, a Dense with such an activation is replaced by a copy without it (same weights).
      layer: name of the layer whose output are the relation features (a feature map [B, h, w, C] or a vector
        [B, D]); default: the last layer with a 4-D output larger than 1 x 1 (the last feature map).

    Returns:
      A functional keras.Model sharing `model`'s layers (training it trains them; a softmax Dense head is the
      exception: its copy is trained, not the original), with outputs (relation features, logits).
    """
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
        raise ValueError("with_relation_output needs a functional or Sequential keras.Model that has been built "
                         "with an Input (a subclassed model: return (features, logits) from its call instead)")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{model.name}: expected one image input and one logits output, got "
                         f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
    if layer:
        try:
            relation = model.get_layer(layer).output
        except ValueError:
            raise ValueError(f"{model.name} has no layer named {layer!r}") from None
    else:
        relation = _last_feature_map(model)
    logits = model.outputs[0]
    head = model.layers[-1]
    activation = getattr(head, "activation", None)
    activation_name = getattr(activation, "__name__", "")
    if isinstance(head, keras.layers.Softmax) or (
            isinstance(head, keras.layers.Activation) and activation_name in SOFT_ACTIVATIONS):
        logits = head.input
        log.info("with_relation_output: %s's final %s is left out (STSC's losses take logits)", model.name,
                 activation_name or "softmax")
    elif isinstance(head, keras.layers.Dense) and activation_name in SOFT_ACTIVATIONS:
        linear = keras.layers.Dense.from_config({**head.get_config(), "activation": "linear",
                                                 "name": head.name + "_logits"})
        logits = linear(head.input)
        linear.set_weights(head.get_weights())
        log.info("with_relation_output: %s's final Dense applies %s; a copy without it gives the logits",
                 model.name, activation_name)
    network = keras.Model(model.inputs[0], [relation, logits], name=model.name)
    _refuse_probabilities(network)
    return network


def _refuse_probabilities(network: keras.Model) -> None:
    """Raises when the 'logits' are plainly probabilities (a softmax or sigmoid in a form not recognised above, e.g.
    inside a Lambda or a custom activation): STSC's losses would then train on probabilities.

    The probe is images of huge contrast. Softmax outputs: every row sums to 1. Sigmoid outputs: saturated, most
    values within 1e-3 of 0 or 1 while logits would have grown far out of [0, 1]. A zero-initialised or small head
    (constant or tiny logits) is neither, and is accepted.
    """
    shape = [8] + [d or 32 for d in network.inputs[0].shape[1:]]
    _, z = network(keras.random.normal(shape, stddev=1000.0, seed=0), training=False)
    z = keras.ops.convert_to_numpy(z).astype(np.float64)
    if not ((z >= 0).all() and (z <= 1).all()):
        return
    softmax = z.shape[-1] > 1 and np.allclose(z.sum(-1), 1.0, atol=1e-3)
    saturated = np.mean(np.minimum(z, 1.0 - z) < 1e-3) >= 0.5 and np.ptp(z) > 0.5
    if softmax or saturated:
        raise ValueError(f"{network.name}'s output stays in [0, 1] even on images of huge contrast "
                         f"({'rows summing to 1' if softmax else 'saturated at 0 and 1'}): it looks like "
                         "probabilities, not logits. STSC's losses take "
                         "logits: give a classifier whose last layer has no softmax or sigmoid")
