"""Baseline classification losses by name (CE, LDAM-DRW, logit adjustment / Balanced Softmax)."""

from car_tf.losses.cross_entropy import CrossEntropy
from car_tf.losses.ldam import DRWSchedule, LDAMLoss, drw_class_weights
from car_tf.losses.logit_adjusted import LogitAdjustedLoss
from car_tf.losses.registry import BASE_LOSSES, callbacks_for_loss, get_base_loss

__all__ = [
    "BASE_LOSSES",
    "CrossEntropy",
    "DRWSchedule",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "callbacks_for_loss",
    "drw_class_weights",
    "get_base_loss",
]
