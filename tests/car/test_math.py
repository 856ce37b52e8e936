"""CAR's pure maths against NumPy references and finite differences."""

import numpy as np
import pytest
import tensorflow as tf

from car_tf.car import confusion, spectral
from car_tf.car.state import CARState


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_confusion_with_fixed_gate(fixed_logits, probs, labels):
    """C_t with the gate sigmoid(f_i - f_j) taken from ``fixed_logits`` (the stop-gradient) and the
    softmax ``probs`` free: what the penalty's gradient sees, for finite-difference references."""
    k = probs.shape[1]
    current = np.zeros((k, k))
    for q, j in enumerate(labels):
        for i in range(k):
            if i != j:
                gate = 1 / (1 + np.exp(-(fixed_logits[q, i] - fixed_logits[q, j])))
                current[i, j] += gate * probs[q, i] / np.sum(labels == j)
    return current


def np_batch_confusion(logits, labels, temperature=1.0, margin=0.0):
    """Loop-by-loop transcription of the CAR paper (CVPR 2026, arXiv 2603.16732) for integer or soft (top-2) labels."""
    batch, k = logits.shape
    numerator = np.zeros((k, k))
    mass = np.zeros(k)
    probs = np_softmax(logits / temperature)
    for q in range(batch):
        if labels.ndim == 2:
            members = np.argsort(-labels[q], kind="stable")[:2]
            memberships = [(j, labels[q, j]) for j in members]
        else:
            memberships = [(labels[q], 1.0)]
        for j, weight in memberships:
            mass[j] += weight
            for i in range(k):
                if i != j:
                    gate = np_sigmoid(logits[q, i] - logits[q, j] + margin)
                    numerator[i, j] += weight * gate * probs[q, i]
    return numerator / np.maximum(mass, 1.0)[None, :]


def np_frequency_weights(counts, r0, count_based=False):
    counts = np.asarray(counts, float)
    m = counts if count_based else counts / counts.sum()
    w = 1.0 / np.sqrt(m + r0)
    return np.maximum(w / w.mean(), 1e-3)


def numeric_gradient(f, x, eps):
    """Central finite differences of the scalar function f at x."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


def cifar100_lt_counts():
    return np.floor(500 * 100.0 ** (-np.arange(100) / 99)).astype(int)


@pytest.mark.parametrize("temperature,margin", [(1.0, 0.0), (0.5, 0.3)])
def test_batch_confusion_matches_numpy(temperature, margin):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 5)).astype(np.float32) * 2
    labels = np.array([0, 0, 1, 2, 2, 2, 4, 4, 1, 0, 2, 4])  # class 3 absent
    got = confusion.batch_confusion(
        logits, labels, temperature=temperature, margin=margin
    ).numpy()
    want = np_batch_confusion(logits, labels, temperature, margin)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.diag(got) == 0)
    assert np.all(got[:, 3] == 0)


def test_soft_labels_count_fractionally_toward_their_two_classes():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    lam = rng.uniform(size=6)
    a, b = np.array([0, 1, 2, 3, 0, 1]), np.array([1, 1, 3, 0, 2, 3])
    soft = lam[:, None] * np.eye(4)[a] + (1 - lam[:, None]) * np.eye(4)[b]
    got = confusion.batch_confusion(logits, soft.astype(np.float32)).numpy()
    np.testing.assert_allclose(got, np_batch_confusion(logits, soft), rtol=1e-5, atol=1e-7)
    one_hot = confusion.batch_confusion(logits, np.eye(4, dtype=np.float32)[a]).numpy()
    np.testing.assert_allclose(one_hot, confusion.batch_confusion(logits, a).numpy(), atol=1e-7)


@pytest.mark.parametrize("differentiable_gate", [False, True])
def test_confusion_gradient_matches_finite_differences(differentiable_gate):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 4))
    labels = np.array([0, 1, 1, 3, 2])
    probe = rng.normal(size=(4, 4))

    def objective_tf(x):
        c = confusion.batch_confusion(x, labels, differentiable_gate=differentiable_gate)
        return tf.reduce_sum(c * probe)

    x = tf.Variable(logits, dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = objective_tf(tf.cast(x, tf.float32))
    grad = tape.gradient(value, x).numpy()

    def objective_np(x):
        probs = np_softmax(x)
        gate_logits = logits if not differentiable_gate else x  # sg(gate): gate from fixed logits
        total = 0.0
        for q, j in enumerate(labels):
            for i in range(4):
                if i != j:
                    gate = np_sigmoid(gate_logits[q, i] - gate_logits[q, j])
                    total += probe[i, j] * gate * probs[q, i] / np.sum(labels == j)
        return total

    np.testing.assert_allclose(grad, numeric_gradient(objective_np, logits, 1e-5), atol=2e-5)


@pytest.mark.parametrize("count_based", [False, True])
def test_frequency_weights_match_numpy(count_based):
    counts = cifar100_lt_counts()
    got = confusion.frequency_weights(counts, r0=0.2, count_based=count_based).numpy()
    np.testing.assert_allclose(got, np_frequency_weights(counts, 0.2, count_based), rtol=1e-6)
    spread = got.max() / got.min()
    if count_based:
        assert spread > 8  # about 10x between tail and head
    else:
        assert 1.08 < spread < 1.14  # about 1.11 on CIFAR-100-LT


def test_frequency_weights_clamp():
    w = confusion.frequency_weights([1, 10**9], r0=0.0, count_based=True).numpy()
    assert w.min() == pytest.approx(1e-3)


def np_ema(batches, beta, ema_init):
    """The dense recurrence of the CAR paper (CVPR 2026, arXiv 2603.16732) in float64, one C_t per training batch."""
    ema = None
    for c in batches:
        if ema is None:
            ema = c if ema_init == "first_batch" else (1 - beta) * c
        else:
            ema = beta * ema + (1 - beta) * c
    return ema


def np_sparse_ema(batches, beta, ema_init, entries):
    """The dense recurrence with each renewed column cut to its ``entries`` largest values; the
    mass of the others joins the column's spread mass, which sits evenly in all K rows."""
    kept = rest = None
    for c, present in batches:
        if kept is None:  # Cbar_1 = C_1 (released code), or (1 - beta) C_1 from Cbar_0 = 0 (paper)
            decay = 0.0 if ema_init == "first_batch" else beta
            kept, rest = np.zeros_like(c), np.zeros(c.shape[0])
        else:
            decay = beta
        new, renewed_rest = decay * kept + (1 - decay) * c, decay * rest
        kept, rest = beta * kept, beta * rest  # absent columns only decay
        for j in np.flatnonzero(present):
            column = new[:, j].copy()
            dropped = np.argsort(column)[:-entries]
            rest[j] = renewed_rest[j] + column[dropped].sum()
            column[dropped] = 0.0
            kept[:, j] = column
    return kept + rest[None, :] / kept.shape[0]


def feed_ema(state, beta, ema_init, steps, p, batch=8, seed=5):
    """Feeds ``state`` random batches of classes drawn with probabilities ``p``, every 7th step an
    evaluation step; yields [(C_t, classes present)] of the training steps so far after the
    second step and after the last."""
    k = state.num_classes
    rng = np.random.default_rng(seed)

    @tf.function
    def step(rows, ids, updating):
        initialized = 1.0 if ema_init == "zeros" else state.initialized
        scale, _ = confusion.column_scales(ids, tf.ones_like(rows[:, 0]), k)
        decay, weight = confusion.ema_coefficients(beta, initialized, updating)
        state.update_ema(rows * scale[:, None], ids, decay, weight, updating)
        state.initialized.assign(tf.maximum(state.initialized, updating))

    batches = []
    for t in range(steps):
        ids = rng.choice(k, size=batch, p=p / p.sum()).astype(np.int32)
        rows = rng.uniform(size=(batch, k)).astype(np.float32)
        updating = float(t % 7 != 3)
        step(tf.constant(rows), tf.constant(ids), tf.constant(updating))
        if updating:
            c = np.zeros((k, k))
            np.add.at(c.T, ids, rows.astype(np.float64))
            counts = np.bincount(ids, minlength=k)
            batches.append((c / np.maximum(counts, 1)[None, :], counts > 0))
        if t in (1, steps - 1):
            yield batches


@pytest.mark.parametrize("beta", [0.9, 0.5, 0.0])
@pytest.mark.parametrize("ema_init", ["first_batch", "zeros"])
def test_column_wise_ema_matches_the_dense_recurrence(beta, ema_init):
    """Thousands of steps, most classes absent from most batches, evaluation steps interleaved."""
    k, steps = 60, 2000
    p = 0.8 ** np.arange(k)  # long tail: the rarest classes are in a batch about once in 10^5 steps
    state = CARState(k)
    for batches in feed_ema(state, beta, ema_init, steps, p):
        want = np_ema([c for c, _ in batches], beta, ema_init)
        got = state.ema_matrix().numpy()
        representable = np.abs(want) > 1e-30  # float32 flushes older history to 0
        relative = np.abs(got - want)[representable] / np.abs(want)[representable]
        assert relative.max() < 1e-6
        np.testing.assert_array_less(np.abs(got[~representable]), 1e-29)
    in_batch = np.mean([present for _, present in batches], axis=0)  # share of batches per class
    assert np.mean(in_batch < 0.1) > 0.5  # most classes are absent from most batches


def test_matrix_free_products_match_the_dense_ema():
    k, rng = 60, np.random.default_rng(9)
    state = CARState(k)
    ids = np.arange(k, dtype=np.int32)
    state.update_ema(tf.constant(rng.uniform(size=(k, k)), tf.float32), ids, 1.0, 1.0, 1.0)
    for step in range(3):  # columns of different ages
        present = rng.choice(k, size=10, replace=False).astype(np.int32)
        state.update_ema(tf.constant(rng.uniform(size=(10, k)), tf.float32), present, 0.8, 0.2, 1.0)
    dense = state.ema_matrix().numpy().astype(np.float64)
    x, y = (rng.normal(size=(k, 3)).astype(np.float32) for _ in range(2))  # blocks of 3 vectors
    np.testing.assert_allclose(state.ema_times(x).numpy(), dense @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.ema_transpose_times(y).numpy(), dense.T @ y, rtol=1e-5, atol=1e-6)


def random_confusion(k, rng, near_identity=False):
    c = rng.dirichlet(np.ones(k) * 0.3, size=k).T * rng.uniform(0.01, 0.3, size=k)
    if near_identity:  # a slowly-converging case: nearly equal leading singular values
        c = np.eye(k) * 0.2 + 0.001 * rng.normal(size=(k, k))
    return c.astype(np.float32)


def test_svd_sigma_value_and_gradient():
    rng = np.random.default_rng(3)
    a = tf.Variable(random_confusion(7, rng))
    with tf.GradientTape() as tape:
        u, v = spectral.top_singular_vectors_svd(a)
        sigma = spectral.spectral_norm(a, u, v)
    grad = tape.gradient(sigma, a).numpy()
    a_np = a.numpy().astype(np.float64)
    assert sigma.numpy() == pytest.approx(np.linalg.norm(a_np, 2), rel=1e-5)
    numeric = numeric_gradient(lambda m: np.linalg.norm(m, 2), a_np, 1e-4)
    np.testing.assert_allclose(grad, numeric, atol=1e-3)


def dense_power_iteration(a, u, v, **kwargs):
    """spectral.power_iteration on a dense matrix, with the products of the warm-start bases."""
    a = tf.constant(a, tf.float32)
    return spectral.power_iteration(
        lambda x: tf.matmul(a, x),
        lambda y: tf.matmul(a, y, transpose_a=True),
        u, v, tf.matmul(a, v), tf.matmul(a, u, transpose_a=True), **kwargs,
    )


def ritz_sigma(u, v, av):
    return float(spectral.ritz_pair(u, v, av)[2])


@pytest.mark.parametrize("near_identity", [False, True])
def test_warm_started_power_iteration_agrees_with_svd(near_identity):
    rng = np.random.default_rng(4)
    k = 300
    base = random_confusion(k, rng, near_identity)
    u = v = spectral.start_basis(k, spectral.POWER_VECTORS)
    passes_per_step = []
    for step in range(60):  # a slowly drifting EMA matrix, warm-started, as in training
        a = base * np.float32(1.0 + 0.001 * np.sin(step))
        a += 1e-4 * rng.uniform(size=(k, k)).astype(np.float32)
        u, v, av, atu, passes = dense_power_iteration(
            a, u, v, tolerance=spectral.POWER_TOLERANCE, max_passes=20
        )
        passes_per_step.append(int(passes))
        exact = np.linalg.norm(a.astype(np.float64), 2)
        if step >= 30:  # after warm-up
            assert abs(ritz_sigma(u, v, av) - exact) / exact < 1e-4
    np.testing.assert_allclose(av.numpy(), a @ v.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(atu.numpy(), a.T @ u.numpy(), rtol=1e-5, atol=1e-7)
    assert np.mean(passes_per_step[30:]) <= 4  # a warm start needs few passes, not the cap


def matrix_with_spectrum(k, singular_values, rng):
    left, _ = np.linalg.qr(rng.normal(size=(k, k)))
    right, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return ((left * singular_values) @ right.T).astype(np.float32)


def test_a_block_converges_where_one_vector_stalls():
    """Close leading singular values (a model that has learned): a block reaches 1e-4, one vector not."""
    k, rng = 200, np.random.default_rng(5)
    spectrum = np.concatenate([[1.0, 0.99, 0.98, 0.97], np.linspace(0.6, 0.01, k - 4)])
    a = matrix_with_spectrum(k, spectrum, rng)
    results = {}
    for vectors in (1, spectral.POWER_VECTORS):
        start = spectral.start_basis(k, vectors)
        u, v, av, _, passes = dense_power_iteration(
            a, start, start, tolerance=spectral.POWER_TOLERANCE, max_passes=40
        )
        results[vectors] = (abs(ritz_sigma(u, v, av) - 1.0), int(passes))
    block_error, block_passes = results[spectral.POWER_VECTORS]
    assert block_error < 1e-4 and block_passes < 40
    assert results[1][0] > 10 * block_error


def test_power_iteration_stops_at_the_tolerance_and_the_cap():
    rng = np.random.default_rng(6)
    a = random_confusion(50, rng)
    start = spectral.start_basis(50, spectral.POWER_VECTORS)
    tolerance = spectral.POWER_TOLERANCE
    u, v, av, atu, passes = dense_power_iteration(a, start, start, tolerance=tolerance, max_passes=200)
    assert 0 < int(passes) < 200
    assert float(spectral.sigma_gain(u, v, av, atu)) <= spectral.POWER_TOLERANCE
    assert ritz_sigma(u, v, av) == pytest.approx(np.linalg.norm(a.astype(np.float64), 2), rel=1e-5)
    *_, passes_again = dense_power_iteration(a, u, v, tolerance=tolerance, max_passes=200)
    assert int(passes_again) == 0  # a converged pair costs no pass over A
    *_, capped = dense_power_iteration(a, start, start, tolerance=1e-12, max_passes=3)
    assert int(capped) == 3


def test_start_basis_is_orthonormal():
    basis = spectral.start_basis(37, spectral.POWER_VECTORS).numpy()
    np.testing.assert_allclose(basis.T @ basis, np.eye(spectral.POWER_VECTORS), atol=1e-5)


def test_auto_method_threshold_and_unknown_method():
    assert spectral.resolve_method("auto", spectral.SVD_MAX_CLASSES) == "svd"
    assert spectral.resolve_method("auto", spectral.SVD_MAX_CLASSES + 1) == "power"
    with pytest.raises(ValueError, match="spectral_method"):
        spectral.resolve_method("lanczos", 10)
