"""Callbacks every training run uses (checkpoints: car_tf.training.checkpointing)."""

import math

import keras


class NaNGuard(keras.callbacks.Callback):
    """Stops a run whose loss turns NaN or Inf with one sentence saying what to do."""

    def __init__(self, checkpoint_dir):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"the training loss became {float(loss)} at epoch {self.epoch}, step {batch}; "
                f"lower --lr (or enable warm-up) and rerun: the run resumes from the last good "
                f"checkpoint in {self.checkpoint_dir}."
            )
