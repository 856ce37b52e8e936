"""Cross-entropy on int or soft labels, and the label and count handling every base loss shares.

Every base loss here returns per-sample losses [B] in float32 (never a scalar: Keras divides the
per-sample mean by the replica count under a distribution strategy, but not a scalar a loss returns
itself), and accepts int labels [B] or [B, 1] as well as soft labels [B, K] whose rows sum to 1.
"""

import keras
import numpy as np
from keras import ops

from car_tf.backend import checked_labels


def checked_class_counts(class_counts):
    """class_counts as int64 [K]: whole, finite, positive numbers for at least 2 classes."""
    raw = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    if raw.size < 2:
        raise ValueError(
            f"class_counts has {raw.size} class(es); the loss needs the training counts of at "
            "least 2 classes."
        )
    bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
    if bad.size:
        raise ValueError(
            f"class_counts must be whole numbers, but class {bad[0]} has {raw[bad[0]]}; pass the "
            "number of training images of each class."
        )
    bad = np.flatnonzero(raw <= 0)
    if bad.size:
        raise ValueError(
            f"class_counts must hold a positive training count for each class, but classes "
            f"{bad.tolist()} have none; drop those classes or fix the counts."
        )
    return raw.astype(np.int64)


def class_ids(y_true):
    """Int64 class ids [B] (NumPy) from int labels [B] / [B, 1] or soft labels [B, K] (argmax)."""
    y_true = np.asarray(y_true)
    if y_true.ndim == 2 and y_true.shape[-1] > 1:
        return y_true.argmax(axis=-1).astype(np.int64)
    return y_true.reshape(-1).astype(np.int64)


def target_distribution(y_true, num_classes):
    """Float32 targets [B, K]: soft labels [B, K] as given, int labels [B] or [B, 1] one-hot."""
    if len(y_true.shape) == 2 and y_true.shape[-1] == num_classes and num_classes > 1:
        return ops.cast(y_true, "float32")
    if len(y_true.shape) > 2 or (len(y_true.shape) == 2 and y_true.shape[-1] != 1):
        raise ValueError(
            f"labels of shape {tuple(y_true.shape)} are neither int class ids [B] / [B, 1] nor "
            f"soft labels [B, {num_classes}]; give the data set one of those label shapes."
        )
    labels = checked_labels(ops.reshape(y_true, (-1,)), num_classes)  # one_hot gives 0 rows else
    return ops.one_hot(labels, num_classes, dtype="float32")


def soft_cross_entropy(targets, logits):
    """Per-sample -sum_k targets_k log softmax(logits)_k, in float32."""
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    return -ops.sum(targets * log_probs, axis=-1)


def num_classes_of(logits, class_counts=None):
    """The static class count K of logits [B, K], checked against class_counts when given."""
    num_classes = logits.shape[-1]
    if num_classes is None:
        raise ValueError(
            "the model's logits have an unknown last dimension; give the classifier a fixed "
            "number of classes."
        )
    if class_counts is not None and len(class_counts) != num_classes:
        raise ValueError(
            f"the model outputs {num_classes} logits but the loss has {len(class_counts)} class "
            "counts; pass one count per class of the model's output."
        )
    return int(num_classes)


@keras.saving.register_keras_serializable(package="car_tf")
class CrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy with optional label smoothing, per sample.

    Args:
        label_smoothing: epsilon in [0, 1); targets become (1 - eps) * y + eps / K.
    """

    def __init__(self, label_smoothing=0.0, name="cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing={label_smoothing} must lie in [0, 1); use 0.0 for plain CE."
            )
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        num_classes = num_classes_of(y_pred)
        targets = target_distribution(y_true, num_classes)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        return soft_cross_entropy(targets, y_pred)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
