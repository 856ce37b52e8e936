"""Optimizers for fine-tuning: a lower learning rate for the backbone, frozen for the first steps.

``FineTuningSGD`` and ``FineTuningAdamW`` are Keras's SGD and Adam with decoupled weight decay,
except that the variables of the backbone layers take ``backbone_lr_multiplier`` times the
learning rate (and the weight decay that goes with it), and none at all during the first
``freeze_steps`` steps: a linear probe, then full fine-tuning. The phase is a function of the
optimizer's step counter, which checkpoints carry, so a resumed run continues it exactly.

While frozen the backbone's weights do not move, but its BatchNorm layers still run in training
mode and keep updating their moving statistics on the new data.

Gradient accumulation (``gradient_accumulation_steps=N``, ``accumulation_options``): Keras's
optimizers add up the gradients of N batches and update once with their mean, so N batches of B
give the update of one batch of N * B (for a loss that averages over its batch). Keras evaluates a
learning-rate schedule at its count of batches, not of updates: a schedule written in batches per
epoch (car_tf.training.schedules) keeps its epochs, and the update closing batches kN .. kN + N - 1
takes the rate of batch kN + N - 1, which is the rate of update k of a run at batch N * B when N
divides the batches per epoch. ``freeze_steps`` counts batches the same way.
"""

import keras
from keras import ops

from car_tf.keras_compat import optimizer_variable_index


class _BackboneLearningRate:
    """Per-variable learning-rate multiplier for the variables whose paths are ``backbone_variables``."""

    def __init__(
        self, *args, backbone_variables=(), backbone_lr_multiplier=1.0, freeze_steps=0, weight_decay=None, **kwargs
    ):
        super().__init__(*args, weight_decay=None, **kwargs)
        if backbone_lr_multiplier < 0:
            raise ValueError(
                f"backbone_lr_multiplier={backbone_lr_multiplier} must be at least 0 (1 trains the "
                "backbone at the head's rate)."
            )
        if freeze_steps < 0:
            raise ValueError(f"freeze_steps={freeze_steps} must be at least 0.")
        self.backbone_variables = sorted(str(path) for path in backbone_variables)
        self.backbone_lr_multiplier = float(backbone_lr_multiplier)
        self.freeze_steps = int(freeze_steps)
        self.decoupled_weight_decay = float(weight_decay or 0.0)
        self._in_backbone = []

    def build(self, var_list):
        super().build(var_list)
        backbone = set(self.backbone_variables)
        # Indexed like the optimizer's own slot variables (see optimizer_variable_index).
        self._in_backbone = [v.path in backbone for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        if self._in_backbone[optimizer_variable_index(self, variable)]:
            # ``iterations`` counts updates; the update's last batch, as the schedule counts batches.
            n = self.gradient_accumulation_steps or 1
            frozen = ops.less(self.iterations * n + (n - 1), self.freeze_steps)
            multiplier = ops.where(frozen, 0.0, self.backbone_lr_multiplier)
            learning_rate = learning_rate * ops.cast(multiplier, variable.dtype)
        if self.decoupled_weight_decay:
            decay = ops.cast(self.decoupled_weight_decay, variable.dtype)
            self.assign_sub(variable, variable * decay * learning_rate)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {
            **super().get_config(),
            "weight_decay": self.decoupled_weight_decay,
            "backbone_variables": self.backbone_variables,
            "backbone_lr_multiplier": self.backbone_lr_multiplier,
            "freeze_steps": self.freeze_steps,
        }


@keras.saving.register_keras_serializable(package="car_tf")
class FineTuningSGD(_BackboneLearningRate, keras.optimizers.SGD):
    """keras.optimizers.SGD with a backbone learning-rate multiplier and an initial freeze.

    Args:
        backbone_variables: paths of the backbone's variables (``backbone_variable_paths(model)``).
        backbone_lr_multiplier: the backbone's learning rate relative to the head's.
        freeze_steps: batches during which the backbone does not move (its multiplier is 0); with
            gradient accumulation, an update is frozen when its last batch is one of them.
        weight_decay: decoupled weight decay, scaled like the learning rate.
        Other arguments as keras.optimizers.SGD.
    """


@keras.saving.register_keras_serializable(package="car_tf")
class FineTuningAdamW(_BackboneLearningRate, keras.optimizers.Adam):
    """AdamW (Adam with decoupled weight decay) with a backbone multiplier and an initial freeze.

    Arguments as FineTuningSGD, other arguments as keras.optimizers.Adam.
    """


def accumulation_options(steps):
    """Keyword arguments of a Keras optimizer that updates once per ``steps`` batches (see above).

    Keras refuses ``gradient_accumulation_steps=1``; 1 means no accumulation, i.e. no argument.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"gradient_accumulation_steps={steps} must be at least 1 (1: update after every batch).")
    return {"gradient_accumulation_steps": steps} if steps > 1 else {}


def backbone_variable_paths(model):
    """Paths of the trainable variables of a car_tf model's layers up to its "features" layer.

    A nested backbone (keras-hub's, keras.applications') is one of those layers.
    """
    names = [layer.name for layer in model.layers]
    if "features" not in names:
        raise ValueError(
            f"model {model.name!r} has no layer named 'features'; build it with car_tf.models.create_model."
        )
    layers = model.layers[: names.index("features") + 1]
    return [v.path for layer in layers for v in layer.trainable_weights]
