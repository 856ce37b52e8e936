"""DLSA's per-stage classifiers (Xu et al., ECCV 2022, arXiv 2208.02567).

Each stage's classifier is Linear(x) + Linear(side), side = [z; cluster prior] for a filter stage
and z for the final stage. It is trained with Balanced Softmax over the class counts of the
samples routed to that stage (logits + log n_c in the loss; counts floored at 1 so a class the
stage never saw is still pushed down), and predicts with the plain logits. Plain SGD with
momentum, cosine-decayed learning rate, weight decay; the epoch kept is the one with the best
class-balanced accuracy (mean per-class recall) on the stage's share of a validation split carved
from the training features, or the last epoch when the stage has no validation sample.
"""

import dataclasses

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from car_tf.backend import import_tensorflow
from car_tf.method import setting
from car_tf.losses.logit_adjusted import logit_adjusted_cross_entropy

tf = import_tensorflow(__name__)


@dataclasses.dataclass(frozen=True)
class ClassifierTrainingConfig:
    """Hyper-parameters of every stage classifier (DLSA: SGD, 150 epochs, batch 128); each field is
    a flag of ``python -m car_tf.dlsa``."""

    epochs: int = setting(150, flag="classifier_epochs", lower_bound=1,
                          help="Training epochs of each stage classifier.")
    batch_size: int = setting(128, flag="classifier_batch_size", lower_bound=1,
                              help="Batch size of the stage classifiers.")
    learning_rate: float = setting(0.05, flag="classifier_learning_rate", lower_bound=0.0,
                                   help="Peak SGD learning rate of the stage classifiers (cosine decay).")
    momentum: float = setting(0.9, flag="classifier_momentum", lower_bound=0.0,
                              help="SGD momentum of the stage classifiers.")
    weight_decay: float = setting(5e-4, flag="classifier_weight_decay", lower_bound=0.0,
                                  help="Weight decay of the stage classifiers.")


@keras.saving.register_keras_serializable(package="car_tf")
class StageClassifier(keras.layers.Layer):
    """Linear(x) + Linear(side): ``call([x, side]) -> logits [B, num_classes]``."""

    def __init__(self, num_classes, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.feature_linear = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.GlorotUniform(seed),
            name="feature_linear",
        )
        self.side_linear = keras.layers.Dense(
            num_classes,
            use_bias=False,
            kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
            name="side_linear",
        )

    def build(self, input_shape):
        feature_shape, side_shape = input_shape
        self.feature_linear.build(feature_shape)
        self.side_linear.build(side_shape)

    def call(self, inputs):
        features, side = inputs
        return self.feature_linear(features) + self.side_linear(side)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0][:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, seed=self.seed)
        return config


def balanced_accuracy(predictions, labels):
    """Mean recall over the classes present in ``labels`` (NaN when there are none)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    recalls = [np.mean(predictions[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls))


def predict_logits(classifier, features, side, batch_size=4096):
    outputs = [
        ops.convert_to_numpy(
            classifier([features[i : i + batch_size], side[i : i + batch_size]])
        )
        for i in range(0, len(features), batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, classifier.num_classes), np.float32)


def train_stage_classifier(
    features,
    side,
    labels,
    num_classes,
    config=ClassifierTrainingConfig(),
    validation=None,
    name="stage_classifier",
    progress=False,
    seed=0,
):
    """Trains one ``StageClassifier``; returns (classifier, history).

    Args:
        features, side: float32 [N, D] and [N, S] training inputs; labels: int [N].
        validation: optional (features, side, labels) of the stage's validation samples.
    History: per-epoch "loss" and "val_balanced_accuracy", and the kept "best_epoch" (0-based).
    Long because DLSA's stage classifier keeps its own loop (balanced softmax, epoch selection on
    validation).
    """
    features = np.asarray(features, np.float32)
    side = np.asarray(side, np.float32)
    labels = np.asarray(labels, np.int32)
    if len(labels) == 0:
        raise ValueError(
            f"{name} has no training sample; lower the cascade depth or raise keep_fraction."
        )
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1)
    log_counts = np.log(counts).astype(np.float32)
    classifier = StageClassifier(num_classes, seed=seed, name=name)
    classifier.build(((None, features.shape[1]), (None, side.shape[1])))
    steps_per_epoch = -(-len(labels) // config.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, config.epochs * steps_per_epoch)
    )
    optimizer = keras.optimizers.SGD(
        schedule, momentum=config.momentum, weight_decay=config.weight_decay or None
    )
    variables = classifier.trainable_variables

    @tf.function(
        autograph=False,
        input_signature=[
            tf.TensorSpec([None, features.shape[1]], tf.float32),
            tf.TensorSpec([None, side.shape[1]], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ],
    )
    def train_step(x, s, y):
        with tf.GradientTape() as tape:
            loss = ops.mean(logit_adjusted_cross_entropy(y, classifier([x, s]), log_counts))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    has_validation = validation is not None and len(validation[2]) > 0
    rng = np.random.default_rng(seed)
    history = {"loss": [], "val_balanced_accuracy": [], "best_epoch": config.epochs - 1}
    best_score, best_weights = -1.0, None
    for epoch in tqdm(range(config.epochs), desc=name, disable=not progress, leave=False):
        order = rng.permutation(len(labels))
        losses = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            losses.append(float(train_step(features[batch], side[batch], labels[batch])))
        history["loss"].append(float(np.mean(losses)))
        if not np.isfinite(history["loss"][-1]):
            raise ValueError(
                f"{name}'s loss became NaN or Inf; lower --classifier_learning_rate."
            )
        if has_validation:
            val_x, val_side, val_y = validation
            predictions = predict_logits(classifier, val_x, val_side).argmax(axis=-1)
            score = balanced_accuracy(predictions, val_y)
            history["val_balanced_accuracy"].append(score)
            if score > best_score:
                best_score, best_weights = score, classifier.get_weights()
                history["best_epoch"] = epoch
    if best_weights is not None:
        classifier.set_weights(best_weights)
    return classifier, history
