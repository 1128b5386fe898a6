"""Every use of a private Keras API in stsc_tf, in one place (Keras 3.15.1, TensorFlow backend).

Each function wraps one private name and `tests/test_keras_internals.py` checks it against the installed Keras,
so an upgrade that renames or changes one fails there, by name, instead of deep inside a training run.

- `SkipSymbolicBuild._maybe_symbolic_build`: Keras' TF trainer builds a model from its first (distributed) batch
  by MEAN-reducing it across replicas; MultiWorkerMirroredStrategy cannot reduce a dict of tensors, and an
  STSCModel creates every variable in `__init__`, so there is nothing to build.
- `compiled_metrics`: the container `compile(metrics=...)` creates (`Trainer._compile_metrics`), so an STSCModel
  can update it in its own `test_step` and list it in its own `metrics`.
- `build_compiled_metrics`: builds that container, and the state of every metric in it, from symbolic `[None, K]`
  tensors at compile time (`keras.src.backend.compute_output_spec`, what `_symbolic_build` would have done), so no
  metric variable is created inside a traced step (some metrics, e.g. F1Score, create theirs on first update).
- `mark_built`: sets `built` on a model whose variables were all created in `__init__` (Keras would otherwise try to
  build it from the first batch).
- `adam_slots`: the moment slots Keras' Adam keeps for a variable (`_momentums`, `_velocities`,
  `_get_variable_index`), for `FusedAdam`'s one-kernel update.
"""

from __future__ import annotations

import keras
from keras.src.backend import compute_output_spec


class SkipSymbolicBuild:
    """Mixin for a keras.Model whose variables all exist after `__init__` (see the module docstring)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        return


def mark_built(model: keras.Model) -> None:
    """Declares `model` built: every variable it needs exists already."""
    model.built = True


def compiled_metrics(model: keras.Model):
    """The metrics container of `model.compile(metrics=...)`, or None."""
    return getattr(model, "_compile_metrics", None)


def build_compiled_metrics(model: keras.Model, num_classes: int) -> None:
    """Creates the variables of `compile(metrics=...)` for labels and predictions of shape [N, K]."""
    container = compiled_metrics(model)
    if container is not None and not container.built:
        spec = keras.KerasTensor((None, num_classes), dtype="float32")
        compute_output_spec(container.update_state, spec, spec)


def adam_slots(optimizer: keras.optimizers.Adam, variable) -> tuple:
    """(first moment, second moment) slot variables of `variable` in a built Keras Adam."""
    index = optimizer._get_variable_index(variable)
    return optimizer._momentums[index], optimizer._velocities[index]
