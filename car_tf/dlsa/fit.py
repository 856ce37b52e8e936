"""End-to-end DLSA fit on frozen features: validation split, cascade, classifiers, routed model."""

import dataclasses

import numpy as np

from car_tf.data.longtail import stratified_split
from car_tf.dlsa import cascade
from car_tf.dlsa.classifiers import ClassifierTrainingConfig, train_stage_classifier
from car_tf.dlsa.flow_training import FlowTrainingConfig
from car_tf.dlsa.routed_classifier import DLSARoutedClassifier
from car_tf.method import setting


@dataclasses.dataclass(frozen=True)
class DLSAConfig:
    """Everything ``fit_dlsa`` needs besides the data (defaults: Xu et al., ECCV 2022, arXiv
    2208.02567); each field, and each of ``flow``'s and ``classifier``'s, is a flag of
    ``python -m car_tf.dlsa``."""

    depth: int = setting(1, lower_bound=1,
                         help="Filter stages of the cascade (DLSA: 3 for ImageNet-LT / iNat, else 1).")
    keep_fraction: float = setting(0.3, lower_bound=0.0, upper_bound=1.0,
                                   help="Share of each stage's samples its classifier takes (highest likelihood).")
    num_components: int = setting(500, lower_bound=1, help="Components K of the flow's Gaussian-mixture prior.")
    prior_stddev: float = setting(0.05, lower_bound=0.0, help="Standard deviation of the prior's fixed random means.")
    num_blocks: int = setting(2, flag="flow_blocks", lower_bound=1, help="MADE + batch-norm blocks of each flow.")
    validation_fraction: float = setting(0.1, lower_bound=0.0, upper_bound=0.9,
                                         help="Stratified share of the training features kept for epoch selection.")
    seed: int = setting(0, help="Seed of the split, the prior means, the weights and the sampling.")
    flow: FlowTrainingConfig = FlowTrainingConfig()
    classifier: ClassifierTrainingConfig = ClassifierTrainingConfig()

    def flow_options(self):
        return dict(
            num_components=self.num_components,
            prior_stddev=self.prior_stddev,
            num_blocks=self.num_blocks,
            seed=self.seed,
        )


@dataclasses.dataclass
class DLSAResult:
    """The routed model plus what the run directory reports about it."""

    model: DLSARoutedClassifier
    stages: list
    fit_indices: np.ndarray
    validation_indices: np.ndarray
    fit_routing: np.ndarray
    validation_routing: np.ndarray
    histories: dict


def fit_dlsa(features, labels, num_classes, config=DLSAConfig(), progress=False):
    """Trains DLSA on training features; returns a ``DLSAResult``.

    Flows, thresholds, cluster priors and classifiers see only the fit part; the validation part
    (``config.validation_fraction`` of each class) is routed like test data and picks each
    classifier's epoch.
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) but range over [{labels.min()}, {labels.max()}]; "
            "check num_classes against the features' labels."
        )
    fit_idx, val_idx = stratified_split(labels, config.validation_fraction, config.seed)
    stages = cascade.train_cascade(
        features[fit_idx],
        labels[fit_idx],
        num_classes,
        depth=config.depth,
        keep_fraction=config.keep_fraction,
        flow_options=config.flow_options(),
        training=config.flow,
        progress=progress,
    )
    fit_routing = cascade.route(stages, features[fit_idx])
    val_routing = cascade.route(stages, features[val_idx])
    classifiers, histories = [], {"flows": [stage.history for stage in stages], "classifiers": []}
    for s in range(config.depth + 1):
        idx, side = cascade.stage_side_inputs(stages, fit_routing, s)
        val_local, val_side = cascade.stage_side_inputs(stages, val_routing, s)
        name = "final_classifier" if s == config.depth else f"stage_classifier_{s}"
        classifier, history = train_stage_classifier(
            features[fit_idx][idx],
            side,
            labels[fit_idx][idx],
            num_classes,
            config.classifier,
            validation=(features[val_idx][val_local], val_side, labels[val_idx][val_local]),
            name=name,
            progress=progress,
            seed=config.seed + s,
        )
        classifiers.append(classifier)
        histories["classifiers"].append(history)
    model = DLSARoutedClassifier.from_trained(
        stages,
        classifiers[:-1],
        classifiers[-1],
        num_classes,
        features.shape[1],
        config.flow_options(),
    )
    return DLSAResult(
        model, stages, fit_idx, val_idx, fit_routing.stage, val_routing.stage, histories
    )
