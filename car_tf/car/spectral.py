"""Largest singular value of a square matrix, with the gradient d sigma / dA = u v^T.

sigma = u^T A v with u, v the top singular vectors held under stop-gradient gives the same value and
gradient as differentiating a full SVD, at the cost of finding u and v. They come from an SVD
(small K) or from a warm-started power iteration that sees A only through the products A x and
A^T y (large K), so A is never formed. The products of A with the current u and v are kept up to
date between steps by whoever changes A, and a pass runs only while sigma has not converged to a
tolerance: once the EMA drifts slowly most steps need no pass over the K x K matrix at all.
"""

from keras import ops

SPECTRAL_METHODS = ("auto", "svd", "power")
SVD_MAX_CLASSES = 100
POWER_TOLERANCE = 3e-6  # sigma within about 1e-4 of an SVD even on near-identity matrices
_EPS = 1e-30


def _norm(x):
    return ops.sqrt(ops.sum(ops.square(x)))


def _unit(x):
    return x / (_norm(x) + _EPS)


def top_singular_vectors_svd(a):
    """(u1, v1) of a float32 matrix from a full SVD; no gradient."""
    u, _, vh = ops.svd(ops.stop_gradient(ops.cast(a, "float32")), full_matrices=False)
    return u[:, 0], vh[0, :]


def sigma_gain(u, v, av, atu):
    """How much half a power round would raise sigma = u^T A v, relative: 0 for a singular pair.

    Each half round replaces sigma by |A v| or |A^T u| (both >= sigma); the gain is about half the
    squared residual |A^T u - sigma v|^2 / sigma^2, so sigma has converged where it is small.
    """
    sigma = ops.sum(u * av)
    best = ops.maximum(_norm(av), _norm(atu))
    return (best - sigma) / (best + _EPS)


def power_iteration(matvec, rmatvec, u, v, av, atu, tolerance, max_passes):
    """Warm-started power iteration on A, seen only through ``matvec`` (A x), ``rmatvec`` (A^T y).

    Starts from unit vectors u, v with their products av = A v and atu = A^T u, and runs half
    rounds, one pass over A each: v <- A^T u / |A^T u| (then av = A v) or u <- A v / |A v| (then
    atu = A^T u), whichever raises sigma more, while ``sigma_gain`` is above ``tolerance`` and
    fewer than ``max_passes`` have run. Both products stay exact for the current pair, so a
    converged pair costs no pass at all. Stopping on sigma rather than on the vectors keeps
    near-identity confusion matrices cheap: with nearly equal top singular values the vectors
    wander among them for many rounds while sigma is already exact. Returns
    (u, v, av, atu, passes); sigma = u^T A v = sum(u * av). No gradient.
    """

    def unfinished(passes, u, v, av, atu):
        return ops.logical_and(passes < max_passes, sigma_gain(u, v, av, atu) > tolerance)

    def new_v(u, v, av, atu):
        v = _unit(atu)
        return u, v, matvec(v), atu

    def new_u(u, v, av, atu):
        u = _unit(av)
        return u, v, av, rmatvec(u)

    def half_round(passes, u, v, av, atu):
        pair = ops.cond(_norm(atu) >= _norm(av), lambda: new_v(u, v, av, atu),
                        lambda: new_u(u, v, av, atu))
        return (passes + 1, *pair)

    start = [ops.convert_to_tensor(0, "int32")] + [ops.stop_gradient(x) for x in (u, v, av, atu)]
    passes, u, v, av, atu = ops.while_loop(unfinished, half_round, start)
    return u, v, av, atu, passes


def spectral_norm(a, u, v):
    """sigma = u^T A v with u, v under stop-gradient, so d sigma / dA = u v^T."""
    u, v = ops.stop_gradient(u), ops.stop_gradient(v)
    return ops.sum(u * ops.matmul(ops.cast(a, "float32"), v))


def resolve_method(method, num_classes, svd_max_classes=SVD_MAX_CLASSES):
    """Maps "auto" to "svd" up to ``svd_max_classes`` classes and to "power" above."""
    if method not in SPECTRAL_METHODS:
        raise ValueError(
            f"spectral_method={method!r} is not known; use one of {', '.join(SPECTRAL_METHODS)}."
        )
    if method == "auto":
        return "svd" if num_classes <= svd_max_classes else "power"
    return method
