"""Masked autoregressive flow with a Gaussian-mixture prior (DLSA, Xu et al., ECCV 2022, arXiv 2208.02567).

The flow maps a feature x in R^D to a latent z through blocks of

    MADE -> FlowBatchNormalization        (the input order is reversed between blocks)

MADE (Germain et al. 2015) gives each coordinate a shift mu_i and log-scale alpha_i that depend
only on the coordinates before it, so u = (x - mu) * exp(-alpha) has a triangular Jacobian with
log|det| = -sum_i alpha_i. The flow-style batch norm is an invertible affine map whose statistics
are the batch's in training and running averages at inference.

Prior: an equal-weight mixture of K unit-covariance Gaussians with fixed means drawn once from
N(0, prior_stddev^2) with a seed:

    log p(z) = logsumexp_k log N(z; mu_k, I) - log K
    log p(x) = log p(z) + sum over layers of log|det J|

The cluster of a sample is the component with the largest posterior p(k | z), which for equal
weights and covariances is a softmax over k of -||z - mu_k||^2 / 2.
"""

import math

import keras
import numpy as np
from keras import ops

from car_tf.backend import import_tensorflow

tf = import_tensorflow(__name__)

LOG_2PI = math.log(2.0 * math.pi)


def mixture_means(num_components, dim, stddev=0.05, seed=0):
    """Fixed component means [K, D] drawn from N(0, stddev^2) with a NumPy seed."""
    rng = np.random.default_rng(seed)
    return (stddev * rng.standard_normal((num_components, dim))).astype(np.float32)


def component_log_densities(z, means):
    """log N(z; mu_k, I) for every sample and component: [B, K]."""
    squared = (
        ops.sum(z * z, axis=-1, keepdims=True)
        - 2.0 * ops.matmul(z, ops.transpose(means))
        + ops.sum(means * means, axis=-1)[None, :]
    )
    dim = ops.cast(ops.shape(z)[-1], z.dtype)
    return -0.5 * ops.maximum(squared, 0.0) - 0.5 * dim * LOG_2PI


def mixture_log_prob(z, means):
    """log p(z) under the equal-weight mixture: logsumexp_k log N(z; mu_k, I) - log K."""
    num_components = ops.shape(means)[0]
    log_k = ops.log(ops.cast(num_components, z.dtype))
    return ops.logsumexp(component_log_densities(z, means), axis=-1) - log_k


def cluster_log_posterior(z, means):
    """log p(k | z) for every component: [B, K]."""
    return ops.log_softmax(component_log_densities(z, means), axis=-1)


def made_masks(dim, hidden_units):
    """Masks of MADE's three layers (input->hidden, hidden->hidden, hidden->2D outputs).

    Inputs carry degrees 1..D, hidden units degrees cycling through 1..D-1; a hidden unit sees
    inputs of degree <= its own, an output of degree d sees hidden units of degree < d, so output d
    depends on inputs 1..d-1 only.
    """
    in_degrees = np.arange(1, dim + 1)
    hidden_degrees = np.arange(hidden_units) % (dim - 1) + 1
    first = (hidden_degrees[None, :] >= in_degrees[:, None]).astype(np.float32)
    middle = (hidden_degrees[None, :] >= hidden_degrees[:, None]).astype(np.float32)
    last = (in_degrees[None, :] > hidden_degrees[:, None]).astype(np.float32)
    return first, middle, np.concatenate([last, last], axis=1)


@keras.saving.register_keras_serializable(package="car_tf")
class MADE(keras.layers.Layer):
    """Masked autoencoder for distribution estimation as one affine autoregressive transform.

    ``call(x)`` returns ``(u, log_det)`` with u = (x - mu(x)) * exp(-alpha(x)) and
    log_det = -sum(alpha) per sample; ``inverse(u)`` undoes it in D sequential passes.

    Args:
        hidden_units: width of the two hidden layers; None = the feature dimension.
        seed: seed of the weight initialisers.
    """

    def __init__(self, hidden_units=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = None if hidden_units is None else int(hidden_units)
        self.seed = int(seed)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        if dim < 2:
            raise ValueError(
                f"MADE needs at least 2 feature dimensions but got {dim}; use features with D >= 2."
            )
        hidden = self.hidden_units or dim
        self.dim = dim
        masks = made_masks(dim, hidden)
        self._masks = [ops.convert_to_tensor(m, dtype=self.compute_dtype) for m in masks]
        shapes = [(dim, hidden), (hidden, hidden), (hidden, 2 * dim)]
        self.kernels, self.biases = [], []
        for i, shape in enumerate(shapes):
            init = keras.initializers.GlorotUniform(seed=self.seed + i)
            self.kernels.append(self.add_weight(shape=shape, initializer=init, name=f"kernel_{i}"))
            self.biases.append(self.add_weight(shape=(shape[1],), initializer="zeros", name=f"bias_{i}"))

    def shift_and_log_scale(self, x):
        """mu and alpha [B, D], each coordinate a function of the coordinates before it."""
        h = x
        for i, (kernel, bias, mask) in enumerate(zip(self.kernels, self.biases, self._masks)):
            h = ops.matmul(h, kernel * mask) + bias
            if i < 2:
                h = ops.relu(h)
        return h[:, : self.dim], h[:, self.dim :]

    def call(self, x):
        mu, alpha = self.shift_and_log_scale(x)
        return (x - mu) * ops.exp(-alpha), -ops.sum(alpha, axis=-1)

    def inverse(self, u):
        x = ops.zeros_like(u)
        for _ in range(self.dim):
            mu, alpha = self.shift_and_log_scale(x)
            x = u * ops.exp(alpha) + mu
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:-1])

    def get_config(self):
        config = super().get_config()
        config.update(hidden_units=self.hidden_units, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="car_tf")
class FlowBatchNormalization(keras.layers.Layer):
    """Invertible batch norm: y = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta.

    In training m, v are the batch's mean and variance and the running averages move toward them
    (running <- momentum * running + (1 - momentum) * batch); at inference the running averages
    are used, so the map is a fixed affine bijection. ``call`` returns ``(y, log_det)``.
    """

    def __init__(self, momentum=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        dim = (int(input_shape[-1]),)
        self.log_gamma = self.add_weight(shape=dim, initializer="zeros", name="log_gamma")
        self.beta = self.add_weight(shape=dim, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(
            shape=dim, initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=dim, initializer="ones", trainable=False, name="moving_variance"
        )

    def _statistics(self, x, training):
        if not training:
            return self.moving_mean, self.moving_variance
        mean = ops.mean(x, axis=0)
        variance = ops.mean(ops.square(x - mean), axis=0)
        m = self.momentum
        self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * ops.stop_gradient(mean))
        self.moving_variance.assign(
            m * self.moving_variance + (1.0 - m) * ops.stop_gradient(variance)
        )
        return mean, variance

    def call(self, x, training=False):
        mean, variance = self._statistics(x, training)
        inv_std = ops.rsqrt(variance + self.epsilon)
        y = (x - mean) * inv_std * ops.exp(self.log_gamma) + self.beta
        log_det = ops.sum(self.log_gamma + ops.log(inv_std))
        return y, ops.broadcast_to(log_det, ops.shape(x)[:1])

    def inverse(self, y):
        std = ops.sqrt(self.moving_variance + self.epsilon)
        return (y - self.beta) * ops.exp(-self.log_gamma) * std + self.moving_mean

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:-1])

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="car_tf")
class MaskedAutoregressiveFlow(keras.layers.Layer):
    """DLSA's flow: ``num_blocks`` x (MADE, FlowBatchNormalization), order reversed between blocks.

    A fixed per-dimension standardisation (set by ``adapt(features)``; identity until then) comes
    first so that raw features of any scale start the first MADE near unit scale; it is an affine
    bijection and its log-determinant is part of log p(x).

    ``call(x, training)`` returns ``(z, log_det)``; ``log_prob(x)`` adds the mixture prior;
    ``clusters(z)`` is the argmax posterior component; ``inverse(z)`` maps back (inference mode).

    Args:
        num_components: K, components of the Gaussian-mixture prior (DLSA: 500).
        prior_stddev: standard deviation of the fixed random component means (DLSA: 0.05).
        num_blocks: MADE + batch-norm blocks (DLSA: 2).
        hidden_units: MADE width; None = the feature dimension (DLSA's choice).
        batchnorm_momentum: momentum of the running statistics.
        seed: seed of the prior means and of the weight initialisers.
    """

    def __init__(
        self,
        num_components=500,
        prior_stddev=0.05,
        num_blocks=2,
        hidden_units=None,
        batchnorm_momentum=0.9,
        seed=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_components < 1 or num_blocks < 1:
            raise ValueError(
                f"num_components={num_components} and num_blocks={num_blocks} must both be >= 1."
            )
        self.num_components = int(num_components)
        self.prior_stddev = float(prior_stddev)
        self.num_blocks = int(num_blocks)
        self.hidden_units = None if hidden_units is None else int(hidden_units)
        self.batchnorm_momentum = float(batchnorm_momentum)
        self.seed = int(seed)
        self.mades = [
            MADE(hidden_units, seed=seed + 10 * b, name=f"made_{b}") for b in range(self.num_blocks)
        ]
        self.norms = [
            FlowBatchNormalization(batchnorm_momentum, name=f"batchnorm_{b}")
            for b in range(self.num_blocks)
        ]

    def build(self, input_shape):
        dim = int(input_shape[-1])
        for made, norm in zip(self.mades, self.norms):
            made.build(input_shape)
            norm.build(input_shape)
        self.input_mean = self.add_weight(
            shape=(dim,), initializer="zeros", trainable=False, name="input_mean"
        )
        self.input_log_scale = self.add_weight(
            shape=(dim,), initializer="zeros", trainable=False, name="input_log_scale"
        )
        means = mixture_means(self.num_components, dim, self.prior_stddev, self.seed)
        self.means = self.add_weight(
            shape=means.shape,
            initializer=keras.initializers.Constant(means),
            trainable=False,
            name="prior_means",
        )

    def adapt(self, features):
        """Sets the input standardisation to the features' per-dimension mean and std."""
        features = np.asarray(features, np.float64)
        if not self.built:
            self.build(features.shape)
        self.input_mean.assign(features.mean(axis=0).astype(np.float32))
        std = np.maximum(features.std(axis=0), 1e-6)
        self.input_log_scale.assign(np.log(std).astype(np.float32))

    def call(self, x, training=False):
        x = (x - self.input_mean) * ops.exp(-self.input_log_scale)
        log_det = ops.broadcast_to(-ops.sum(self.input_log_scale), ops.shape(x)[:1])
        for b, (made, norm) in enumerate(zip(self.mades, self.norms)):
            if b > 0:
                x = ops.flip(x, axis=-1)
            x, made_log_det = made(x)
            x, norm_log_det = norm(x, training=training)
            log_det = log_det + made_log_det + norm_log_det
        return x, log_det

    def inverse(self, z):
        for b in reversed(range(self.num_blocks)):
            z = self.mades[b].inverse(self.norms[b].inverse(z))
            if b > 0:
                z = ops.flip(z, axis=-1)
        return z * ops.exp(self.input_log_scale) + self.input_mean

    def log_prob_and_latent(self, x, training=False):
        """(log p(x) [B], z [B, D])."""
        z, log_det = self(x, training=training)
        return mixture_log_prob(z, self.means) + log_det, z

    def log_prob(self, x, training=False):
        return self.log_prob_and_latent(x, training)[0]

    def cluster_log_posterior(self, z):
        return cluster_log_posterior(z, self.means)

    def clusters(self, z):
        """Index of the most probable mixture component of each latent: int32 [B]."""
        # tf.math.argmax, not keras.ops.argmax: the latter's negative-zero handling (Bitcast,
        # BitwiseAnd) has no ONNX conversion, and the routed model must export to ONNX.
        return tf.math.argmax(component_log_densities(z, self.means), axis=-1, output_type="int32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_components=self.num_components,
            prior_stddev=self.prior_stddev,
            num_blocks=self.num_blocks,
            hidden_units=self.hidden_units,
            batchnorm_momentum=self.batchnorm_momentum,
            seed=self.seed,
        )
        return config
