"""Callbacks every training run uses (checkpoints: car_tf.training.checkpointing)."""

import math

import keras


class NaNGuard(keras.callbacks.Callback):
    """Stops a run whose loss turns NaN or Inf with one sentence saying what to do.

    A run's flags cannot change when it resumes (car_tf.training.run_directory), so the advice is
    to start over with a lower learning rate: with ``--overwrite``, or in a new ``--model_dir``.

    Args:
        run_dir: the run directory (``--model_dir``), named in the advice.
    """

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"the training loss became {float(loss)} at epoch {self.epoch}, step {batch}; "
                f"lower --lr (or raise --warmup_epochs) and start the run over: rerun with the lower "
                f"--lr and --overwrite to replace {self.run_dir}, or pass a new --model_dir."
            )
