"""CARLoss against the plain statement of the penalty (car_tf.car.reference): values and gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import car_tf
from car_tf.car import reference
from car_tf.car.carrier import attach_car_state
from test_math import np_batch_confusion, np_frequency_weights

COUNTS = [40, 20, 8, 4, 2]


def test_the_reference_is_the_paper_transcribed():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 5)).astype("float32")
    labels = rng.integers(0, 5, size=12)
    np.testing.assert_allclose(reference.batch_confusion(logits, labels, 5).numpy(),
                               np_batch_confusion(logits, labels), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(reference.frequency_weights(COUNTS, 0.2).numpy(),
                               np_frequency_weights(COUNTS, 0.2), rtol=1e-6)


@pytest.mark.parametrize("spectral_method", ["svd", "power"])
def test_car_loss_gives_the_references_penalty_and_gradient_step_after_step(spectral_method):
    rng = np.random.default_rng(1)
    loss = car_tf.CARLoss(COUNTS, base="ce", spec_lambda=1.0, beta=0.9, spectral_method=spectral_method,
                          power_iterations=200, power_tolerance=1e-9)
    attach_car_state(keras.Sequential([keras.Input((2,)), keras.layers.Dense(5)]), loss)
    weights = reference.frequency_weights(COUNTS, 0.2)
    ema = None
    for step in range(4):
        logits = tf.constant(rng.normal(size=(16, 5)).astype("float32"))
        labels = tf.constant(rng.integers(0, 5, size=16))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(logits)
            got = loss.penalty(logits, labels)
            ema = reference.ema_step(ema, reference.batch_confusion(logits, labels, 5), 0.9)
            want = reference.penalty(ema, weights)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
        got_grad, want_grad = tape.gradient(got, logits), tape.gradient(want, logits)
        if step == 0:  # the first step sets the EMA to sg(C_1), as released: no gradient
            assert want_grad is None or not np.any(want_grad.numpy())
        else:
            np.testing.assert_allclose(got_grad.numpy(), want_grad.numpy(), rtol=1e-4, atol=1e-5)  # float32 products
        ema = tf.constant(ema)
