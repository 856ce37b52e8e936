"""Learning-rate schedules of the long-tailed recipes, as functions of the optimizer step.

Being functions of ``optimizer.iterations`` (which checkpoints carry), they resume exactly.
"""

import keras
from keras import ops

SCHEDULES = ("step", "cosine", "constant")


@keras.saving.register_keras_serializable(package="car_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from lr / warmup_steps to lr, then step decay, cosine decay or constant.

    Args:
        base_lr: peak learning rate.
        total_steps: steps of the whole run (cosine reaches 0 there).
        warmup_steps: steps of linear warm-up (the CIFAR-LT recipe: 5 epochs).
        kind: "step", "cosine" or "constant".
        decay_steps: for "step", the steps at which the rate is multiplied by ``decay_factor``.
        decay_factor: the multiplier of each step decay (0.1; the LDAM code uses 0.01).
    """

    def __init__(self, base_lr, total_steps, warmup_steps=0, kind="step", decay_steps=(), decay_factor=0.1):
        if kind not in SCHEDULES:
            raise ValueError(f"--lr_schedule={kind!r} is not known; use one of {SCHEDULES}.")
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.decay_steps = [int(s) for s in decay_steps]
        self.decay_factor = float(decay_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = 0.5 * self.base_lr * (1.0 + ops.cos(progress * 3.141592653589793))
        else:
            lr = ops.convert_to_tensor(self.base_lr, "float32")
            for boundary in self.decay_steps if self.kind == "step" else ():
                lr = ops.where(step >= boundary, lr * self.decay_factor, lr)
        if self.warmup_steps > 0:
            warm = self.base_lr * (step + 1.0) / self.warmup_steps
            lr = ops.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "decay_steps": self.decay_steps,
            "decay_factor": self.decay_factor,
        }
