"""LDAM loss (Cao et al., NeurIPS 2019) and its deferred re-weighting (DRW) schedule.

LDAM subtracts a class margin m_j = C * n_j^(-1/4) from the true-class logit, with C chosen so the
largest margin is ``max_margin``, multiplies the logits by ``scale`` and takes cross-entropy.
The released code feeds LDAM the plain cosines of a normalised linear layer (no scale of its own),
so pair LDAMLoss(scale=30) with a cosine classifier of scale 1; with a linear head, or a cosine
head that already scales by 30, the margins and the scale no longer mean what the paper says.
DRW keeps per-class weights at 1 until ``start_epoch`` and then switches to class-balanced weights
(effective number of samples, Cui et al. 2019) normalised to sum to K.

Normalisation of the weighted loss: the released PyTorch code calls
``F.cross_entropy(..., weight=w)``, whose mean divides by the sum of the batch's weights
sum_b w_{y_b}. car_tf returns per-sample losses w_{y_b} * CE_b and lets Keras divide by the batch
size, because (a) per-sample losses are what keeps the loss right under MirroredStrategy (a
per-replica sum of weights would differ from the global one), and (b) the batch's weight sum is a
random per-batch scale. The two differ by the factor B / sum_b w_{y_b}, which under the long-tailed
sampling is > 1 on average: after the switch the released code takes larger steps than car_tf for
the same learning rate.

Soft labels: the margin is spread over classes as y_k * m_k (a one-hot label gives the paper's
form) and a sample's weight is sum_k y_k w_k.
"""

import keras
import numpy as np
from keras import ops

from car_tf.backend import is_tensorflow
from car_tf.losses.cross_entropy import (
    checked_class_counts,
    num_classes_of,
    soft_cross_entropy,
    target_distribution,
)


def ldam_margins(class_counts, max_margin=0.5):
    """Per-class margins m_j proportional to n_j^(-1/4), the largest equal to max_margin."""
    counts = checked_class_counts(class_counts).astype(np.float64)
    margins = counts**-0.25
    return (margins * (max_margin / margins.max())).astype(np.float32)


def drw_class_weights(class_counts, beta=0.9999):
    """Class-balanced weights (1 - beta) / (1 - beta^n_j), normalised to sum to K."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1); the usual DRW value is 0.9999.")
    counts = checked_class_counts(class_counts).astype(np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts)) if beta > 0 else np.ones_like(counts)
    return (weights / weights.sum() * counts.size).astype(np.float32)


@keras.saving.register_keras_serializable(package="car_tf")
class LDAMLoss(keras.losses.Loss):
    """Label-distribution-aware margin loss with per-class weights held in a keras.Variable.

    Args:
        class_counts: training images per class (length K, all positive).
        max_margin: the largest class margin (the rarest class's), 0.5 in the paper.
        scale: factor s on the margin-adjusted logits, 30 in the released code.
        class_weights: initial per-class weights (length K); ones by default. DRWSchedule
            overwrites ``self.class_weights`` at each epoch start.
    """

    def __init__(
        self,
        class_counts,
        max_margin=0.5,
        scale=30.0,
        class_weights=None,
        name="ldam",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.class_counts = checked_class_counts(class_counts)
        if max_margin < 0 or scale <= 0:
            raise ValueError(
                f"max_margin={max_margin} and scale={scale} must be >= 0 and > 0; the paper uses "
                "0.5 and 30."
            )
        self.max_margin = float(max_margin)
        self.scale = float(scale)
        self.margins = ldam_margins(self.class_counts, self.max_margin)
        num_classes = self.class_counts.size
        initial = np.ones(num_classes, np.float32) if class_weights is None else class_weights
        initial = np.asarray(initial, np.float32).reshape(-1)
        if initial.size != num_classes:
            raise ValueError(
                f"class_weights has {initial.size} entries but there are {num_classes} classes; "
                "give one weight per class."
            )
        self.class_weights = keras.Variable(initial, trainable=False, name="ldam_class_weights")

    def call(self, y_true, y_pred):
        num_classes = num_classes_of(y_pred, self.class_counts)
        targets = target_distribution(y_true, num_classes)
        logits = ops.cast(y_pred, "float32") - targets * ops.convert_to_tensor(self.margins)
        weights = ops.sum(targets * ops.convert_to_tensor(self.class_weights), axis=-1)
        return weights * soft_cross_entropy(targets, self.scale * logits)

    def get_config(self):
        return {
            **super().get_config(),
            "class_counts": self.class_counts.tolist(),
            "max_margin": self.max_margin,
            "scale": self.scale,
            "class_weights": self.class_weights.numpy().tolist(),
        }


class DRWSchedule(keras.callbacks.Callback):
    """Deferred re-weighting: LDAM's class weights are 1 before ``start_epoch``, then balanced.

    The weights are recomputed from the epoch number at every epoch start, so a run resumed with
    ``initial_epoch`` gets the right ones. Epochs count from 0, as in Keras and the released code.

    Args:
        loss: an LDAMLoss (anything with ``class_counts`` and a ``class_weights`` keras.Variable).
        start_epoch: first epoch with re-weighting (160 of 200 in the CIFAR-LT recipe).
        beta: effective-number parameter of the class-balanced weights.
    """

    def __init__(self, loss, start_epoch=160, beta=0.9999):
        super().__init__()
        if not isinstance(getattr(loss, "class_weights", None), keras.Variable):
            raise ValueError(
                f"DRWSchedule needs a loss with a class_weights variable such as LDAMLoss, got "
                f"{type(loss).__name__}; pass the LDAMLoss itself."
            )
        if start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch} must be >= 0.")
        self.loss = loss
        self.start_epoch = int(start_epoch)
        self.beta = float(beta)
        self.balanced_weights = drw_class_weights(loss.class_counts, self.beta)

    def weights_for_epoch(self, epoch):
        """The per-class weights in force during ``epoch``."""
        if epoch >= self.start_epoch:
            return self.balanced_weights
        return np.ones_like(self.balanced_weights)

    def on_epoch_begin(self, epoch, logs=None):
        weights = self.weights_for_epoch(epoch)
        changed = not np.array_equal(self.loss.class_weights.numpy(), weights)
        self.loss.class_weights.assign(weights)
        if changed and not is_tensorflow() and self.model is not None:
            # Compiled JAX steps hold a variable outside the model as a constant: trace anew.
            self.model.make_train_function(force=True)
            self.model.make_test_function(force=True)
