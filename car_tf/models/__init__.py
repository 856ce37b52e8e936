"""Backbones behind one create function: ``create_model(name, num_classes, ...)``."""

from car_tf.models import efficientnet_lite, resnet, resnet_cifar, vit  # noqa: F401  (registers the backbones)
from car_tf.models.heads import CosineClassifier, classifier_head
from car_tf.models.preprocessing import CHANNEL_STATS, PixelNormalization
from car_tf.models.registry import (
    create_model,
    features_model,
    list_models,
    load_model_weights,
    register_model,
)

__all__ = [
    "CHANNEL_STATS",
    "CosineClassifier",
    "PixelNormalization",
    "classifier_head",
    "create_model",
    "features_model",
    "list_models",
    "load_model_weights",
    "register_model",
]
