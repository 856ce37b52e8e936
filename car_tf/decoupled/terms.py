"""Uniformity and feature-norm terms of the decoupled loss (Gao et al., CAAI TIT 2025).

What follows the paper: its abstract decouples the logit w_c . x = |w_c| |x| cos(theta_c) and
answers three problems with three terms: hyperspherical uniformity of the classifier vectors
(imbalanced angle distribution), an additive angular margin (weak feature discrimination; see
car_tf.decoupled.margin) and feature-norm regularisation (low feature norm). What is chosen
here: the paper's formulas, weights and defaults could not be read, so the terms take canonical
forms, each weight exposed:

- uniformity "mhe": minimum hyperspherical energy (Liu et al. 2018), the Riesz s-energy
  mean_{i != j} |w_i - w_j|^(-s) over L2-normalised classifier columns, s = 1 by default;
- uniformity "gaussian": the Gaussian potential log mean_{i != j} exp(-t |w_i - w_j|^2)
  (Wang & Isola 2020), t = 2 by default;
- feature norm "hinge": mean_b relu(target - |x_b|), pulling small norms up to the target;
- feature norm "ring": mean_b (|x_b| - target)^2 (ring loss, Zheng et al. 2018, fixed radius).

Defaults, car_tf's choice rather than the paper's: uniformity weight 0.1, feature-norm weight 0.01,
target norm 10 (a scale-dependent choice: set it near the head classes' mean feature norm, which
car_tf.decoupled.diagnostics reports). The uniformity term builds K x K pairwise matrices, fine for
K up to a few thousand classes.

Both terms reach the gradient through Keras's own loss collection: the uniformity term is the
regularizer of the classifier's kernel variable, the feature-norm term a pass-through layer calling
``add_loss`` after the "features" layer. Keras scales such additional losses by 1 / replicas
under a tf.distribute strategy, so one and several replicas take the same step.
"""

import keras
import numpy as np
from keras import ops

from car_tf.ops import l2_normalize

UNIFORMITY_KINDS = ("mhe", "gaussian")
FEATURE_NORM_KINDS = ("hinge", "ring")

DEFAULT_UNIFORMITY_WEIGHT = 0.1
DEFAULT_FEATURE_NORM_WEIGHT = 0.01
DEFAULT_TARGET_NORM = 10.0
# Squared distances are floored at this value, so coincident vectors give a finite energy.
DISTANCE_EPS = 1e-6


def pairwise_squared_distances(kernel):
    """|w_i - w_j|^2 [K, K] between the unit-normalised columns of kernel [D, K]."""
    unit = l2_normalize(ops.cast(kernel, "float32"), axis=0)
    return ops.maximum(2.0 - 2.0 * ops.matmul(ops.transpose(unit), unit), 0.0)


def _off_diagonal(num_classes):
    return ops.convert_to_tensor(~np.eye(num_classes, dtype=bool))


def hyperspherical_energy(kernel, power=1.0):
    """Riesz ``power``-energy mean_{i != j} |w_i - w_j|^(-power) of the normalised columns."""
    num_classes = kernel.shape[-1]
    energies = ops.power(pairwise_squared_distances(kernel) + DISTANCE_EPS, -0.5 * power)
    off_diagonal = _off_diagonal(num_classes)
    return ops.sum(ops.where(off_diagonal, energies, 0.0)) / (num_classes * (num_classes - 1))


def gaussian_potential(kernel, temperature=2.0):
    """log mean_{i != j} exp(-temperature |w_i - w_j|^2) of the normalised columns."""
    num_classes = kernel.shape[-1]
    exponents = -temperature * pairwise_squared_distances(kernel)
    exponents = ops.where(_off_diagonal(num_classes), exponents, -np.inf)
    return ops.logsumexp(exponents) - float(np.log(num_classes * (num_classes - 1)))


def feature_norm_penalty(features, target_norm=DEFAULT_TARGET_NORM, kind="hinge"):
    """Batch mean of relu(target - |x|) ("hinge") or (|x| - target)^2 ("ring"), float32."""
    features = ops.cast(features, "float32")
    norms = ops.sqrt(ops.sum(ops.square(features), axis=-1) + 1e-12)
    if kind == "hinge":
        return ops.mean(ops.relu(target_norm - norms))
    return ops.mean(ops.square(norms - target_norm))


def _check_kind(kind, kinds, what):
    if kind not in kinds:
        raise ValueError(f"{what}={kind!r} is not known; use one of {kinds}.")


@keras.saving.register_keras_serializable(package="car_tf")
class UniformityRegularizer(keras.regularizers.Regularizer):
    """weight * uniformity of a classifier kernel [D, K] (columns = class vectors).

    Args:
        weight: multiplier of the term.
        kind: "mhe" (Riesz energy) or "gaussian" (Gaussian potential).
        power: s of the Riesz energy.
        temperature: t of the Gaussian potential.
    """

    def __init__(self, weight=DEFAULT_UNIFORMITY_WEIGHT, kind="mhe", power=1.0, temperature=2.0):
        _check_kind(kind, UNIFORMITY_KINDS, "uniformity")
        self.weight = float(weight)
        self.kind = kind
        self.power = float(power)
        self.temperature = float(temperature)

    def __call__(self, kernel):
        if self.kind == "mhe":
            return self.weight * hyperspherical_energy(kernel, self.power)
        return self.weight * gaussian_potential(kernel, self.temperature)

    def get_config(self):
        return {
            "weight": self.weight,
            "kind": self.kind,
            "power": self.power,
            "temperature": self.temperature,
        }


@keras.saving.register_keras_serializable(package="car_tf")
class FeatureNormPenalty(keras.layers.Layer):
    """Pass-through layer adding weight * feature_norm_penalty(inputs) to the model's losses.

    Args:
        weight: multiplier of the term.
        target_norm: the norm the features are pulled to.
        kind: "hinge" (only norms below the target are penalised) or "ring" (both sides).
    """

    def __init__(
        self,
        weight=DEFAULT_FEATURE_NORM_WEIGHT,
        target_norm=DEFAULT_TARGET_NORM,
        kind="hinge",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_kind(kind, FEATURE_NORM_KINDS, "feature_norm")
        self.weight = float(weight)
        self.target_norm = float(target_norm)
        self.kind = kind

    def call(self, inputs):
        self.add_loss(self.weight * feature_norm_penalty(inputs, self.target_norm, self.kind))
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "weight": self.weight,
            "target_norm": self.target_norm,
            "kind": self.kind,
        }


def attach_decoupled_terms(
    model,
    uniformity_weight=DEFAULT_UNIFORMITY_WEIGHT,
    feature_norm_weight=DEFAULT_FEATURE_NORM_WEIGHT,
    target_norm=DEFAULT_TARGET_NORM,
    uniformity="mhe",
    feature_norm="hinge",
):
    """A functional model with the same inputs and outputs as ``model`` plus the two terms.

    ``model`` is cloned with its weights (no layer is shared, so the clone's "features" layer
    belongs to the clone's graph alone); a FeatureNormPenalty follows the "features" layer and a
    UniformityRegularizer is set on the kernel variable of the "classifier" layer (any layer with
    a ``kernel`` [D, K]: Dense or a cosine classifier). A weight of 0 leaves that term out.
    Call it inside the ``strategy.scope()`` the model was built in. The regularizer becomes the
    classifier's ``kernel_regularizer`` and the feature-norm layer a layer of the graph, so both are
    in the model's config: a model saved with ``model.save("x.keras")`` loads (with car_tf
    imported) with both terms in place.
    """
    _check_kind(uniformity, UNIFORMITY_KINDS, "uniformity")
    _check_kind(feature_norm, FEATURE_NORM_KINDS, "feature_norm")
    names = {layer.name for layer in model.layers}
    if not {"features", "classifier"} <= names:
        raise ValueError(
            f"model {model.name!r} needs top-level layers named 'features' and 'classifier' for "
            "the decoupled terms; build it with car_tf.models.create_model or name those layers."
        )
    classifier = model.get_layer("classifier")
    kernel = getattr(classifier, "kernel", None)
    regularizable = "kernel_regularizer" in classifier.get_config()
    if uniformity_weight and (kernel is None or len(kernel.shape) != 2 or not regularizable):
        raise ValueError(
            f"classifier layer {classifier.name!r} has no kernel [D, K] with a kernel_regularizer "
            "for the uniformity term; use a Dense or cosine classifier."
        )

    def call_layer(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer.name == "features" and feature_norm_weight:
            penalty = FeatureNormPenalty(feature_norm_weight, target_norm, feature_norm)
            outputs = penalty(outputs)
        return outputs

    attached = keras.models.clone_model(model, call_function=call_layer)
    attached.set_weights(model.get_weights())
    if uniformity_weight:
        regularizer = UniformityRegularizer(uniformity_weight, uniformity)
        attached_classifier = attached.get_layer("classifier")
        attached_classifier.kernel_regularizer = regularizer  # what its config records
        attached_classifier.kernel.regularizer = regularizer  # what the built variable applies
    return attached
