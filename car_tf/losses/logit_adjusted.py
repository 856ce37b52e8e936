"""Logit-adjusted cross-entropy (Menon et al. 2021); Balanced Softmax (Ren et al. 2020) is tau = 1.

The loss is CE(f + tau * log pi, y) with the class prior pi_j = n_j / N; at test time the plain
logits f are used, which undoes the training-time bias toward head classes.
"""

import keras
import numpy as np
from keras import ops

from car_tf.losses.cross_entropy import (
    checked_class_counts,
    num_classes_of,
    soft_cross_entropy,
    target_distribution,
)


def log_prior(class_counts):
    """log(n_j / N) for each class, float32."""
    counts = checked_class_counts(class_counts).astype(np.float64)
    return np.log(counts / counts.sum()).astype(np.float32)


def logit_adjusted_cross_entropy(y_true, logits, log_prior, tau=1.0):
    """Per-sample CE(logits + tau * log_prior, y) for int or soft labels y.

    ``log_prior`` is NumPy [K]; any per-class constant added to it leaves the loss unchanged, so
    log n_c and log(n_c / N) give the same Balanced Softmax at tau = 1.
    """
    targets = target_distribution(y_true, num_classes_of(logits, log_prior))
    adjusted = ops.cast(logits, "float32") + tau * ops.convert_to_tensor(log_prior, "float32")
    return soft_cross_entropy(targets, adjusted)


@keras.saving.register_keras_serializable(package="car_tf")
class LogitAdjustedLoss(keras.losses.Loss):
    """Cross-entropy on logits + tau * log prior, per sample; int or soft labels.

    Args:
        class_counts: training images per class (length K, all positive).
        tau: strength of the adjustment; 1.0 is Balanced Softmax, 0.0 plain CE.
    """

    def __init__(self, class_counts, tau=1.0, name="logit_adjusted", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_counts = checked_class_counts(class_counts)
        self.tau = float(tau)
        self.log_prior = log_prior(self.class_counts)

    def call(self, y_true, y_pred):
        return logit_adjusted_cross_entropy(y_true, y_pred, self.log_prior, self.tau)

    def get_config(self):
        return {
            **super().get_config(),
            "class_counts": self.class_counts.tolist(),
            "tau": self.tau,
        }
