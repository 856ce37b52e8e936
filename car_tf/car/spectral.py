"""Largest singular value of a square matrix, with the gradient d sigma / dA = u v^T.

sigma = u^T A v with u, v the top singular vectors held under stop-gradient gives the same value and
gradient as differentiating a full SVD, at the cost of finding u and v. They come from an SVD
(small K) or from a warm-started block power iteration that sees A only through the products A X
and A^T Y of K x r blocks (large K), so A is never formed. The products of A with the current
bases are kept up to date between steps by whoever changes A, and a pass runs only while sigma has
not converged to a tolerance. A block of r vectors converges at the rate sigma_{r+1} / sigma_1
rather than sigma_2 / sigma_1: confusion matrices of a model that has learned something have
nearly equal leading singular values, where a single vector needs many passes and still misses.
A pass over the K x K matrix with r vectors costs little more than one with a single vector
(1.3x at r = 4 here), as reading the matrix bounds it.
"""

from keras import ops

SPECTRAL_METHODS = ("auto", "svd", "power")
SVD_MAX_CLASSES = 100
POWER_VECTORS = 4  # r, the block size of the power iteration
POWER_TOLERANCE = 3e-6  # sigma within about 1e-4 of an SVD even on near-identity matrices
_EPS = 1e-30


def top_singular_vectors_svd(a):
    """(u1, v1) of a float32 matrix from a full SVD; no gradient.

    Non-finite entries are zeroed for the SVD alone (PyTorch's refuses NaN and infinity with an
    error, TensorFlow's and JAX's return NaN): sigma = u^T A v of the matrix itself is then NaN,
    and a NaN loss reaches the trainer's NaN guard on every backend.
    """
    u, _, vh = ops.svd(_finite(ops.stop_gradient(ops.cast(a, "float32"))), full_matrices=False)
    return u[:, 0], vh[0, :]


def start_basis(num_classes, vectors):
    """r orthonormal K-vectors to start from: the constant vector and the next cosines (DCT-II)."""
    k = ops.cast(ops.arange(num_classes), "float32")[:, None] + 0.5
    frequency = ops.cast(ops.arange(vectors), "float32")[None, :]
    basis = ops.cos(3.141592653589793 * k * frequency / num_classes)
    return basis / ops.sqrt(ops.sum(ops.square(basis), axis=0, keepdims=True))


def _finite(small):
    """A small matrix with non-finite entries zeroed: decompositions refuse NaN; callers keep it."""
    return ops.where(ops.isfinite(small), small, 0.0)


def _largest_singular_value(m):
    """sigma_max of a tall K x r matrix, from its r x r Gram matrix (NaN if m holds a NaN)."""
    gram = ops.matmul(ops.transpose(m), m)
    largest = ops.max(ops.eigh(_finite(gram))[0])
    return ops.sqrt(ops.maximum(largest, 0.0)) + 0.0 * ops.sum(gram)


def ritz_pair(u, v, av):
    """(u, v, sigma): the best singular triple of A within the bases U, V, from A V alone.

    The top singular pair (p, q) of the r x r matrix U^T A V gives u = U p, v = V q and
    sigma = u^T A v, the largest value u^T A v takes over unit u, v in the bases' spans.
    """
    small = ops.matmul(ops.transpose(u), av)
    p, q = top_singular_vectors_svd(_finite(small))  # sigma below is NaN where small holds one
    return ops.matmul(u, p[:, None])[:, 0], ops.matmul(v, q[:, None])[:, 0], ops.sum(
        p * ops.matmul(small, q[:, None])[:, 0]
    )


def sigma_gain(u, v, av, atu):
    """How much half a block power round would raise sigma, relative: 0 for singular subspaces.

    sigma is the Ritz value of U^T A V; a half round replaces it by the largest singular value of
    A V or of A^T U (both >= sigma). For one vector the gain is about half the squared residual
    |A^T u - sigma v|^2 / sigma^2, so sigma has converged where it is small.
    """
    return _gain(u, v, av, _largest_singular_value(av), _largest_singular_value(atu))


def _gain(u, v, av, av_sigma, atu_sigma):
    """sigma_gain from the largest singular values of A V and A^T U, already at hand."""
    best = ops.maximum(av_sigma, atu_sigma)
    return (best - ritz_pair(u, v, av)[2]) / (best + _EPS)


def power_iteration(matvec, rmatvec, u, v, av, atu, tolerance, max_passes):
    """Warm-started block power iteration on A, seen through ``matvec`` (A X), ``rmatvec`` (A^T Y).

    Starts from orthonormal K x r bases U, V with their products av = A V and atu = A^T U, and
    runs half rounds, one pass over A each: V <- orth(A^T U) (then av = A V) or U <- orth(A V)
    (then atu = A^T U), whichever raises sigma more, while ``sigma_gain`` is above ``tolerance``
    and fewer than ``max_passes`` have run. Both products stay exact for the current bases, so a
    converged pair costs no pass at all. Stopping on sigma rather than on the vectors keeps
    near-identity confusion matrices cheap: with nearly equal top singular values the vectors
    wander among them for many rounds while sigma is already exact. Returns
    (U, V, av, atu, passes); ``ritz_pair(U, V, av)`` gives u, v and sigma. No gradient.
    """
    # The loop carries the largest singular values of av and atu; a half round renews one.

    def unfinished(passes, u, v, av, atu, av_sigma, atu_sigma):
        return ops.logical_and(passes < max_passes, _gain(u, v, av, av_sigma, atu_sigma) > tolerance)

    def new_v(u, v, av, atu, av_sigma, atu_sigma):
        v = ops.qr(atu)[0]
        av = matvec(v)
        return u, v, av, atu, _largest_singular_value(av), atu_sigma

    def new_u(u, v, av, atu, av_sigma, atu_sigma):
        u = ops.qr(av)[0]
        atu = rmatvec(u)
        return u, v, av, atu, av_sigma, _largest_singular_value(atu)

    def half_round(passes, *pair):
        left_larger = pair[5] >= pair[4]  # |A^T U| >= |A V|
        pair = ops.cond(left_larger, lambda: new_v(*pair), lambda: new_u(*pair))
        return (passes + 1, *pair)

    products = [ops.stop_gradient(x) for x in (u, v, av, atu)]
    start = [ops.convert_to_tensor(0, "int32"), *products,
             _largest_singular_value(products[2]), _largest_singular_value(products[3])]
    passes, u, v, av, atu, _, _ = ops.while_loop(unfinished, half_round, start)
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
