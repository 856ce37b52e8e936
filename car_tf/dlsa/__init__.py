"""DLSA: flow-based label-space adjustment on frozen features (Xu et al., ECCV 2022, arXiv 2208.02567).

Run it on a trained run with ``python -m car_tf.dlsa --model_dir=RUN``; from Python, fit it on
features with ``fit_dlsa(features, labels, num_classes, DLSAConfig(...))``. Importing this package
registers its Keras classes, which loading a DLSA model.keras needs.
"""

from car_tf.dlsa.cascade import CascadeStage, Routing, route, routing_statistics, train_cascade
from car_tf.dlsa.classifiers import ClassifierTrainingConfig, StageClassifier, train_stage_classifier
from car_tf.data.longtail import stratified_split
from car_tf.dlsa.fit import DLSAConfig, DLSAResult, fit_dlsa
from car_tf.dlsa.flow import FlowBatchNormalization, MADE, MaskedAutoregressiveFlow
from car_tf.dlsa.flow_training import FlowTrainer, FlowTrainingConfig
from car_tf.dlsa.routed_classifier import DLSARoutedClassifier

__all__ = [
    "CascadeStage",
    "ClassifierTrainingConfig",
    "DLSAConfig",
    "DLSARoutedClassifier",
    "DLSAResult",
    "FlowBatchNormalization",
    "FlowTrainer",
    "FlowTrainingConfig",
    "MADE",
    "MaskedAutoregressiveFlow",
    "Routing",
    "StageClassifier",
    "fit_dlsa",
    "route",
    "routing_statistics",
    "stratified_split",
    "train_cascade",
    "train_stage_classifier",
]
