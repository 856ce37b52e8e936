"""Largest singular value of a square matrix, with the gradient d sigma / dA = u v^T.

sigma = u^T A v with u, v the top singular vectors held under stop-gradient gives the same value and
gradient as differentiating a full SVD, at the cost of finding u and v. They come from an SVD
(small K) or from a power iteration warm-started with the previous step's vectors (large K).
"""

from keras import ops

SPECTRAL_METHODS = ("auto", "svd", "power")
_EPS = 1e-12


def _unit(x):
    return x / (ops.sqrt(ops.sum(ops.square(x))) + _EPS)


def top_singular_vectors_svd(a):
    """(u1, v1) of a float32 matrix from a full SVD; no gradient."""
    u, _, vh = ops.svd(ops.stop_gradient(ops.cast(a, "float32")), full_matrices=False)
    return u[:, 0], vh[0, :]


def power_iteration(a, v, iterations):
    """(u, v) after ``iterations`` rounds of u <- A v / |A v|, v <- A^T u / |A^T u| from ``v``; no gradient."""
    a = ops.stop_gradient(ops.cast(a, "float32"))
    v = _unit(ops.stop_gradient(v))
    u = v
    for _ in range(iterations):
        u = _unit(ops.matmul(a, v))
        v = _unit(ops.matmul(u, a))
    return u, v


def spectral_norm(a, u, v):
    """sigma = u^T A v with u, v under stop-gradient, so d sigma / dA = u v^T."""
    u, v = ops.stop_gradient(u), ops.stop_gradient(v)
    return ops.sum(u * ops.matmul(ops.cast(a, "float32"), v))


def resolve_method(method, num_classes, svd_max_classes=1024):
    """Maps "auto" to "svd" up to ``svd_max_classes`` classes and to "power" above."""
    if method not in SPECTRAL_METHODS:
        raise ValueError(
            f"spectral_method={method!r} is not known; use one of {', '.join(SPECTRAL_METHODS)}."
        )
    if method == "auto":
        return "svd" if num_classes <= svd_max_classes else "power"
    return method
