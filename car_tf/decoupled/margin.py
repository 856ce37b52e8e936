"""Additive angular margin loss: the margin term of the decoupled loss (Gao et al., CAAI TIT 2025).

What follows the paper: its abstract decouples the logit w_c . x = |w_c| |x| cos(theta_c) and
names three problems (imbalanced angle distribution, weak feature discrimination, low feature
norm), each answered by one term: hyperspherical uniformity of the classifier vectors, an
additive angular margin, and feature-norm regularisation. What is chosen here: the paper's
formulas, weights and defaults could not be read, so each term takes its canonical form. This
module is the margin term in ArcFace's form (Deng et al. 2019); the other two terms live in
car_tf.decoupled.terms (``attach_decoupled_terms``).

The loss expects logits from a cosine classifier, logits = scale * cos(theta), with the same
``scale`` as the classifier. It recovers cos(theta), clips it to [-1 + eps, 1 - eps] so that
sin(theta) = sqrt(1 - cos^2) has a finite gradient, replaces the target logit by
scale * cos(theta_y + m), and takes cross-entropy. Where theta_y + m > pi the angle would wrap
around and cos(theta + m) would rise again, so there (cos(theta) <= cos(pi - m)) the target logit is
scale * (cos(theta) - m * sin(m)), ArcFace's usual fallback, which keeps decreasing in theta.
Soft labels (ConCutMix): the margin applies to each row's heaviest class and the cross-entropy
uses the full soft row.
"""

import math

import keras
from keras import ops

from car_tf.losses.cross_entropy import num_classes_of, soft_cross_entropy, target_distribution

DEFAULT_MARGIN = 0.2  # additive angular margin m (--arc_margin)

# cos(theta) is clipped to [-1 + COS_EPS, 1 - COS_EPS]: |d sin / d cos| stays below about 700.
COS_EPS = 1e-6


def additive_angular_margin(cos, margin):
    """cos(theta + margin) where theta + margin <= pi, else cos(theta) - margin * sin(margin)."""
    cos = ops.clip(cos, -1.0 + COS_EPS, 1.0 - COS_EPS)
    sin = ops.sqrt(1.0 - ops.square(cos))
    shifted = cos * math.cos(margin) - sin * math.sin(margin)
    fallback = cos - margin * math.sin(margin)
    return ops.where(cos > math.cos(math.pi - margin), shifted, fallback)


@keras.saving.register_keras_serializable(package="car_tf")
class DecoupledMarginLoss(keras.losses.Loss):
    """ArcFace additive angular margin cross-entropy on cosine-classifier logits, per sample.

    Args:
        scale: s, the cosine classifier's scale (logits = s * cos); 30 by default.
        margin: m, the additive angular margin in radians; 0.2 by default.
    """

    def __init__(self, scale=30.0, margin=DEFAULT_MARGIN, name="decoupled_margin", **kwargs):
        super().__init__(name=name, **kwargs)
        if scale <= 0 or not 0.0 <= margin < math.pi / 2:
            raise ValueError(
                f"scale={scale} must be > 0 and margin={margin} must lie in [0, pi/2); the "
                "defaults are 30 and 0.2."
            )
        self.scale = float(scale)
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        num_classes = num_classes_of(y_pred)
        targets = target_distribution(y_true, num_classes)
        logits = ops.cast(y_pred, "float32")
        target_logit = self.scale * additive_angular_margin(logits / self.scale, self.margin)
        margin_mask = ops.one_hot(ops.argmax(targets, axis=-1), num_classes) > 0.5
        return soft_cross_entropy(targets, ops.where(margin_mask, target_logit, logits))

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "margin": self.margin}
