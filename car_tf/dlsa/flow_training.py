"""Training of DLSA's flow on frozen features (Xu et al., ECCV 2022, arXiv 2208.02567).

Each step draws P anchors (one pass over the samples per epoch, in a fresh random order) and,
for each anchor of class y, a partner: a class drawn uniformly from the other classes present,
then a sample drawn uniformly from that class. The step minimises

    L = L_lik + contrast_weight * L_con + balance_weight * L_bal

- L_lik, weighted negative log-likelihood per dimension, over the anchors:
      w_c = (n_max / n_c)^power / sum_c' (n_max / n_c')^power       (power = 2; n_c = the counts
                                                                     of the samples the flow fits)
      L_lik = sum_i w_{y_i} * (-log p(x_i) / D) / sum_i w_{y_i}
  Dividing by D keeps the scale (and the learning rate 0.2) independent of the feature width.
- L_con, contrast: the anchor's cluster k_i = argmax_k p(k | z_i) (no gradient); the partner,
  of another class, is pushed out of it:
      L_con = mean_i -log(1 - p(k_i | z_partner_i) + 1e-6)
  It is zero when the partner has no posterior mass on the anchor's cluster and grows without
  bound as the partner falls into it.
- L_bal, balance: cluster use u is a running average of the batch's mean posterior,
      u_t = m * sg(u_{t-1}) + (1 - m) * mean over the batch (anchors and partners) of p(. | z),
  m = 0.7, u_0 uniform, and L_bal = KL(u_t || uniform) = sum_k u_t,k log(K u_t,k), which is zero
  when every cluster is used equally. As in CAR's EMA, gradient flows only through this batch.
"""

import dataclasses

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from car_tf.backend import import_tensorflow
from car_tf.method import setting

tf = import_tensorflow(__name__)

CONTRAST_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class FlowTrainingConfig:
    """Hyper-parameters of one flow's training (defaults: DLSA's ImageNet-LT setting, 50 epochs);
    each field is a flag of ``python -m car_tf.dlsa``."""

    epochs: int = setting(50, flag="flow_epochs", lower_bound=1, help="Training epochs of each flow.")
    batch_size: int = setting(1024, flag="flow_batch_size", lower_bound=2,
                              help="Samples per flow step (half anchors, half partners).")
    learning_rate: float = setting(0.2, flag="flow_learning_rate", lower_bound=0.0,
                                   help="SGD learning rate of the flows.")
    momentum: float = setting(0.0, flag="flow_momentum", lower_bound=0.0, help="SGD momentum of the flows.")
    contrast_weight: float = setting(0.025, help="Weight of the flow's contrast term (DLSA: 0.02-0.03).")
    balance_weight: float = setting(1.5, help="Weight of the flow's cluster-balance term (DLSA: 1-2).")
    balance_momentum: float = setting(0.7, help="Momentum of the running cluster-use average.")
    likelihood_weight_power: float = setting(2.0, help="p of the likelihood weights (n_max / n_c)^p.")


def likelihood_class_weights(counts, power=2.0):
    """w_c = (n_max / n_c)^power normalised to sum 1 over the classes present; 0 for absent ones."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    ratio = np.zeros_like(counts)
    ratio[present] = (counts.max() / counts[present]) ** power
    return (ratio / ratio.sum()).astype(np.float32)


def weighted_likelihood_loss(log_prob, weights, dim):
    """sum_i w_i * (-log p(x_i) / D) / sum_i w_i."""
    return ops.sum(weights * (-log_prob / dim)) / ops.maximum(ops.sum(weights), 1e-12)


def contrast_loss(anchor_log_posterior, partner_log_posterior, pair_mask):
    """mean over valid pairs of -log(1 - p(k_anchor | z_partner)), k_anchor = argmax of the anchor."""
    anchor_cluster = ops.stop_gradient(ops.argmax(anchor_log_posterior, axis=-1))
    num_components = ops.shape(anchor_log_posterior)[-1]
    onehot = ops.one_hot(anchor_cluster, num_components, dtype=partner_log_posterior.dtype)
    partner_mass = ops.sum(onehot * ops.exp(partner_log_posterior), axis=-1)
    per_pair = -ops.log(1.0 - partner_mass + CONTRAST_EPSILON)
    return ops.sum(pair_mask * per_pair) / ops.maximum(ops.sum(pair_mask), 1.0)


def balance_loss(previous_usage, log_posterior, momentum):
    """(KL(u || uniform), u) with u = momentum * sg(previous_usage) + (1 - momentum) * batch use."""
    batch_usage = ops.mean(ops.exp(log_posterior), axis=0)
    usage = momentum * ops.stop_gradient(previous_usage) + (1.0 - momentum) * batch_usage
    num_components = ops.cast(ops.shape(usage)[0], usage.dtype)
    kl = ops.sum(usage * ops.log(ops.maximum(usage * num_components, 1e-12)))
    return kl, usage


def draw_partners(labels, anchors, rng):
    """For each anchor, a sample of a uniformly drawn other class present in ``labels``.

    Returns (partner indices, mask) where mask is 0 for an anchor whose class is the only one.
    """
    labels = np.asarray(labels)
    classes, starts, sizes = np.unique(np.sort(labels), return_index=True, return_counts=True)
    order = np.argsort(labels, kind="stable")
    if classes.size < 2:
        return np.asarray(anchors), np.zeros(len(anchors), np.float32)
    anchor_pos = np.searchsorted(classes, labels[anchors])
    draw = rng.integers(0, classes.size - 1, size=len(anchors))
    partner_pos = draw + (draw >= anchor_pos)
    within = np.floor(rng.random(len(anchors)) * sizes[partner_pos]).astype(np.int64)
    return order[starts[partner_pos] + within], np.ones(len(anchors), np.float32)


class FlowTrainer:
    """Fits a ``MaskedAutoregressiveFlow`` to features with DLSA's three-term objective."""

    def __init__(self, flow, config=FlowTrainingConfig(), seed=0):
        self.flow = flow
        self.config = config
        self.seed = int(seed)  # of the epochs' order and the partners drawn
        self.optimizer = keras.optimizers.SGD(config.learning_rate, momentum=config.momentum)
        self.usage = None

    def _build(self, dim):
        if not self.flow.built:
            self.flow.build((None, dim))
        self.optimizer.build(self.flow.trainable_variables)
        num_components = self.flow.num_components
        self.usage = keras.Variable(ops.full([num_components], 1.0 / num_components), trainable=False)
        self._step = tf.function(self._train_step, autograph=False)

    def _train_step(self, anchors, partners, anchor_weights, pair_mask):
        config = self.config
        num_anchors = tf.shape(anchors)[0]
        dim = tf.cast(tf.shape(anchors)[1], tf.float32)
        with tf.GradientTape() as tape:
            batch = tf.concat([anchors, partners], axis=0)
            log_prob, z = self.flow.log_prob_and_latent(batch, training=True)
            log_posterior = self.flow.cluster_log_posterior(z)
            likelihood = weighted_likelihood_loss(log_prob[:num_anchors], anchor_weights, dim)
            contrast = contrast_loss(
                log_posterior[:num_anchors], log_posterior[num_anchors:], pair_mask
            )
            balance, usage = balance_loss(self.usage, log_posterior, config.balance_momentum)
            loss = likelihood + config.contrast_weight * contrast + config.balance_weight * balance
        variables = self.flow.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self.usage.assign(usage)
        return tf.stack([loss, likelihood, contrast, balance])

    def fit(self, features, labels, progress=False):
        """Trains for ``config.epochs`` epochs; returns the per-epoch mean of each loss term."""
        features = np.asarray(features, np.float32)
        labels = np.asarray(labels, np.int64)
        num_samples = len(labels)
        if num_samples < 2:
            raise ValueError(
                f"the flow needs at least 2 training samples but got {num_samples}; lower the "
                "cascade depth or keep_fraction."
            )
        if self.usage is None:
            self._build(features.shape[1])
            self.flow.adapt(features)
        config = self.config
        counts = np.bincount(labels, minlength=int(labels.max()) + 1)
        class_weights = likelihood_class_weights(counts, config.likelihood_weight_power)
        anchors_per_step = max(1, min(config.batch_size // 2, num_samples))
        steps = num_samples // anchors_per_step
        rng = np.random.default_rng(self.seed)
        history = {name: [] for name in ("loss", "likelihood", "contrast", "balance")}
        for _ in tqdm(range(config.epochs), desc="flow", disable=not progress, leave=False):
            order = rng.permutation(num_samples)
            sums = np.zeros(4)
            for step in range(steps):
                anchors = order[step * anchors_per_step : (step + 1) * anchors_per_step]
                partners, mask = draw_partners(labels, anchors, rng)
                sums += self._step(
                    features[anchors], features[partners], class_weights[labels[anchors]], mask
                ).numpy()
            if not np.all(np.isfinite(sums)):
                raise ValueError(
                    "the flow's training loss became NaN or Inf; lower --flow_learning_rate."
                )
            for name, value in zip(history, sums / steps):
                history[name].append(float(value))
        return history


def flow_log_probs_and_latents(flow, features, batch_size=4096):
    """Inference-mode log p(x) [N] and z [N, D] in batches (float32 NumPy)."""
    log_probs, latents = [], []
    for start in range(0, len(features), batch_size):
        log_prob, z = flow.log_prob_and_latent(
            ops.convert_to_tensor(features[start : start + batch_size], "float32")
        )
        log_probs.append(ops.convert_to_numpy(log_prob))
        latents.append(ops.convert_to_numpy(z))
    return np.concatenate(log_probs), np.concatenate(latents)
