"""Base losses by name, and the callbacks a loss needs during training.

"decoupled" is the decoupled method's margin term (car_tf.decoupled): the
model also needs the uniformity and feature-norm terms from ``attach_decoupled_terms`` and a
cosine classifier whose scale equals the loss's ``scale``.
"""

import inspect

import keras

from car_tf.losses.cross_entropy import CrossEntropy
from car_tf.losses.ldam import DRWSchedule, LDAMLoss
from car_tf.losses.logit_adjusted import LogitAdjustedLoss

BASE_LOSSES = ("ce", "ldam_drw", "logit_adjusted", "balanced_softmax", "decoupled")

# DRW starts at epoch 160 of 200 in the CIFAR-LT recipe; other run lengths keep the fraction.
DRW_START_FRACTION = 0.8


def _build(cls, fixed, kwargs):
    """cls(**fixed, **kwargs), with unknown or fixed keyword names reported as a ValueError."""
    accepted = [
        name
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD and name not in fixed
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {unknown}; its options are {accepted}.")
    return cls(**fixed, **kwargs)


def get_base_loss(name, class_counts, **kwargs):
    """The base loss called ``name`` (one of BASE_LOSSES), built with ``kwargs``.

    "balanced_softmax" is LogitAdjustedLoss with tau fixed at 1; "ce" and "decoupled" ignore
    class_counts.
    """
    if name == "ce":
        return _build(CrossEntropy, {}, kwargs)
    if name == "ldam_drw":
        return _build(LDAMLoss, {"class_counts": class_counts}, kwargs)
    if name == "logit_adjusted":
        return _build(LogitAdjustedLoss, {"class_counts": class_counts}, kwargs)
    if name == "balanced_softmax":
        return _build(LogitAdjustedLoss, {"class_counts": class_counts, "tau": 1.0}, kwargs)
    if name == "decoupled":
        from car_tf.decoupled.margin import DecoupledMarginLoss

        return _build(DecoupledMarginLoss, {}, kwargs)
    raise ValueError(f"base loss {name!r} is not known; use one of {BASE_LOSSES}.")


def callbacks_for_loss(loss, epochs):
    """Callbacks ``loss`` needs in a run of ``epochs`` epochs (DRW for LDAM; else none).

    A wrapper holding its base loss as ``.base`` (CARLoss) is looked through.
    """
    base = getattr(loss, "base", None)
    if isinstance(base, keras.losses.Loss):
        loss = base
    if isinstance(loss, LDAMLoss):
        return [DRWSchedule(loss, start_epoch=drw_start_epoch(epochs))]
    return []


def drw_start_epoch(epochs):
    """First re-weighted epoch of LDAM-DRW in a run of ``epochs`` epochs (160 of 200)."""
    return round(DRW_START_FRACTION * epochs)


def length_dependence(name, epochs, other_epochs, epochs_done):
    """Why the base loss ``name`` treats epochs 0 .. epochs_done - 1 differently in runs of ``epochs``
    and ``other_epochs`` epochs ("" where it does not): LDAM-DRW's re-weighting starts at a share of
    the run."""
    if name == "ldam_drw" and min(drw_start_epoch(epochs), epochs_done) != min(drw_start_epoch(other_epochs),
                                                                              epochs_done):
        return "LDAM-DRW re-weighting"
    return ""


def required_head(name):
    """(head, scale) the base loss ``name`` needs on the classifier, or None for any head.

    LDAM, as released, takes plain cosines (scale 1) and applies its own scale.
    """
    return ("cosine", 1.0) if name == "ldam_drw" else None
