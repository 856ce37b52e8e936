"""Shared keras.ops helpers vs NumPy."""
import numpy as np
import tensorflow as tf

from car_tf.ops import l2_normalize


def test_l2_normalize_matches_numpy_along_either_axis():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    for axis in (0, -1):
        expected = x / np.linalg.norm(x, axis=axis, keepdims=True)
        np.testing.assert_allclose(np.asarray(l2_normalize(x, axis=axis)), expected, rtol=1e-5)


def test_l2_normalize_is_finite_at_zero_with_a_finite_gradient():
    x = tf.Variable(np.zeros((2, 3), np.float32))
    with tf.GradientTape() as tape:
        y = l2_normalize(x)
        total = tf.reduce_sum(y)
    gradient = tape.gradient(total, x)
    np.testing.assert_array_equal(y.numpy(), np.zeros((2, 3)))
    assert np.all(np.isfinite(gradient.numpy()))
