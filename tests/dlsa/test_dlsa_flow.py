"""DLSA's flow: change of variables against NumPy, invertibility, training and its loss terms."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf.dlsa import flow_training
from car_tf.dlsa.flow import MADE, FlowBatchNormalization, MaskedAutoregressiveFlow
from car_tf.dlsa.flow_training import FlowTrainer, FlowTrainingConfig


@pytest.fixture
def float64():
    """Runs a test with float64 layers, then restores the float32 defaults."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


def _randomize(flow, rng, scale=0.3):
    """Gives every weight (BN statistics included) a non-trivial value."""
    for variable in flow.weights:
        if variable.name == "prior_means":
            continue
        value = rng.normal(size=variable.shape) * scale
        if "variance" in variable.name:
            value = np.abs(value) + 0.5
        variable.assign(value.astype(variable.dtype))


def _numpy_log_likelihood(flow, x, eps=1e-5):
    """log p(x) = log p_mixture(z) + log|det dz/dx|, the Jacobian by central differences."""
    forward = lambda v: np.asarray(flow(v[None, :])[0])[0]  # noqa: E731
    means = np.asarray(flow.means, np.float64)
    out = []
    for row in x:
        z = forward(row)
        jacobian = np.stack(
            [(forward(row + eps * e) - forward(row - eps * e)) / (2 * eps) for e in np.eye(len(row))],
            axis=1,
        )
        log_n = -0.5 * np.sum((z - means) ** 2, axis=1) - 0.5 * len(z) * np.log(2 * np.pi)
        log_prior = np.logaddexp.reduce(log_n) - np.log(len(means))
        out.append(log_prior + np.linalg.slogdet(jacobian)[1])
    return np.asarray(out)


def test_log_likelihood_matches_numpy_change_of_variables(float64):
    rng = np.random.default_rng(0)
    flow = MaskedAutoregressiveFlow(num_components=5, prior_stddev=0.5, seed=3)
    flow.build((None, 3))
    _randomize(flow, rng)
    x = rng.normal(size=(6, 3))
    np.testing.assert_allclose(np.asarray(flow.log_prob(x)), _numpy_log_likelihood(flow, x), atol=1e-6)


def test_made_is_autoregressive(float64):
    rng = np.random.default_rng(1)
    made = MADE(hidden_units=7)
    made.build((None, 4))
    for variable in made.weights:
        variable.assign(rng.normal(size=variable.shape))
    x = tf.constant(rng.normal(size=(1, 4)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        u, _ = made(x)
    jacobian = tape.jacobian(u, x).numpy()[0, :, 0, :]
    assert np.all(jacobian[np.triu_indices(4, k=1)] == 0.0)
    assert np.all(np.abs(np.diag(jacobian)) > 0)


def test_flow_inverts_after_training():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(256, 5)) * [1, 2, 3, 0.5, 1] + 4).astype("float32")
    flow = MaskedAutoregressiveFlow(num_components=10, seed=0)
    FlowTrainer(flow, FlowTrainingConfig(epochs=3, batch_size=64)).fit(x, rng.integers(0, 3, 256))
    z, _ = flow(x)
    np.testing.assert_allclose(np.asarray(flow.inverse(z)), x, atol=1e-4)


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_at_inference():
    norm = FlowBatchNormalization(momentum=0.5)
    x = np.array([[1.0, 10.0], [3.0, 30.0]], np.float32)
    y, log_det = norm(x, training=True)
    np.testing.assert_allclose(np.asarray(y), [[-1, -1], [1, 1]], atol=1e-3)
    np.testing.assert_allclose(np.asarray(log_det), [-np.log(1.0) - np.log(10.0)] * 2, atol=1e-4)
    np.testing.assert_allclose(np.asarray(norm.moving_mean), [1.0, 10.0])
    np.testing.assert_allclose(np.asarray(norm.moving_variance), [1.0, 50.5])
    y_inference, _ = norm(x)
    np.testing.assert_allclose(np.asarray(norm.inverse(y_inference)), x, rtol=1e-5)


def _mixture_data(rng, counts, centers):
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    features = (centers[labels] + rng.normal(size=(labels.size, centers.shape[1]))) * 2 + 1
    return features.astype("float32"), labels


def test_flow_learns_held_out_likelihood_rises():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 6)) * 3
    x, y = _mixture_data(rng, [200, 80, 30, 10], centers)
    held_out, _ = _mixture_data(rng, [50, 50, 50, 50], centers)
    flow = MaskedAutoregressiveFlow(num_components=12, prior_stddev=1.0, seed=0)
    flow.adapt(x)
    before = float(np.mean(np.asarray(flow.log_prob(held_out))))
    history = FlowTrainer(flow, FlowTrainingConfig(epochs=25, batch_size=128)).fit(x, y)
    after = float(np.mean(np.asarray(flow.log_prob(held_out))))
    assert after > before + 1.0
    assert history["likelihood"][-1] < history["likelihood"][0]


def test_likelihood_class_weights():
    weights = flow_training.likelihood_class_weights([100, 50, 0, 10])
    expected = np.array([1.0, 4.0, 0.0, 100.0]) / 105.0
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_loss_terms_match_numpy():
    rng = np.random.default_rng(5)
    logits_a, logits_b = rng.normal(size=(2, 4, 6))
    log_post_a = logits_a - np.logaddexp.reduce(logits_a, axis=1, keepdims=True)
    log_post_b = logits_b - np.logaddexp.reduce(logits_b, axis=1, keepdims=True)
    mask = np.array([1, 1, 0, 1], np.float64)
    cluster = log_post_a.argmax(axis=1)
    mass = np.exp(log_post_b[np.arange(4), cluster])
    expected = np.sum(mask * -np.log(1 - mass + 1e-6)) / mask.sum()
    got = flow_training.contrast_loss(log_post_a, log_post_b, mask)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)

    previous = rng.dirichlet(np.ones(6))
    usage = 0.7 * previous + 0.3 * np.exp(np.concatenate([log_post_a, log_post_b])).mean(axis=0)
    kl, new_usage = flow_training.balance_loss(previous, np.concatenate([log_post_a, log_post_b]), 0.7)
    np.testing.assert_allclose(np.asarray(new_usage), usage, rtol=1e-6)
    np.testing.assert_allclose(float(kl), np.sum(usage * np.log(usage * 6)), rtol=1e-6)

    log_prob = rng.normal(size=4)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    got = flow_training.weighted_likelihood_loss(log_prob, weights, 3.0)
    np.testing.assert_allclose(float(got), np.sum(weights * -log_prob / 3) / weights.sum(), rtol=1e-6)


def test_partners_come_from_another_class_uniformly():
    labels = np.repeat([0, 1, 2, 5], [500, 50, 20, 5])
    rng = np.random.default_rng(6)
    anchors = rng.integers(0, labels.size, 4000)
    partners, mask = flow_training.draw_partners(labels, anchors, rng)
    assert np.all(mask == 1.0)
    assert np.all(labels[partners] != labels[anchors])
    partner_classes = labels[partners[labels[anchors] == 0]]
    shares = np.array([np.mean(partner_classes == c) for c in (1, 2, 5)])
    np.testing.assert_allclose(shares, 1 / 3, atol=0.05)
    _, single = flow_training.draw_partners(np.zeros(10, int), np.arange(10), rng)
    assert np.all(single == 0.0)


def test_flow_config_round_trip_gives_identical_outputs():
    flow = MaskedAutoregressiveFlow(num_components=7, prior_stddev=0.2, num_blocks=3, seed=4)
    flow.build((None, 4))
    _randomize(flow, np.random.default_rng(7))
    clone = MaskedAutoregressiveFlow.from_config(flow.get_config())
    clone.build((None, 4))
    clone.set_weights(flow.get_weights())
    x = np.random.default_rng(8).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(clone.log_prob(x)), np.asarray(flow.log_prob(x)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clone.clusters(clone(x)[0])), np.asarray(flow.clusters(flow(x)[0])))


def test_one_dimensional_features_are_rejected():
    with pytest.raises(ValueError, match="at least 2 feature dimensions"):
        MaskedAutoregressiveFlow(num_components=3).build((None, 1))
