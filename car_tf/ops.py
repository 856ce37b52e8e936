"""keras.ops helpers shared across car_tf (backend-agnostic)."""

from keras import ops


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """x / sqrt(max(sum(x^2), epsilon)) along ``axis``: unit norm, finite value and gradient at 0."""
    squared_norm = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared_norm, epsilon))
