"""CAR's pure maths against NumPy references and finite differences."""

import numpy as np
import pytest
import tensorflow as tf

from car_tf import confusion, spectral


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_batch_confusion(logits, labels, temperature=1.0, margin=0.0):
    """Loop-by-loop transcription of SPEC.md section 1 for integer or soft (top-2) labels."""
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
        assert 1.08 < spread < 1.14  # SPEC: about 1.11 on CIFAR-100-LT


def test_frequency_weights_clamp():
    w = confusion.frequency_weights([1, 10**9], r0=0.0, count_based=True).numpy()
    assert w.min() == pytest.approx(1e-3)


def test_ema_update_values_and_gradient_path():
    prev = tf.Variable(np.full((3, 3), 0.5, np.float32))
    cur = tf.Variable(np.eye(3, dtype=np.float32))
    with tf.GradientTape(persistent=True) as tape:
        out = confusion.ema_update(prev, cur, 0.9)
        first = confusion.ema_update(prev, cur, 0.9, initialized=False)
        total, total_first = tf.reduce_sum(out), tf.reduce_sum(first)
    np.testing.assert_allclose(out.numpy(), 0.9 * 0.5 + 0.1 * np.eye(3), rtol=1e-6)
    np.testing.assert_allclose(first.numpy(), np.eye(3))
    assert tape.gradient(total, prev) is None
    np.testing.assert_allclose(tape.gradient(total, cur).numpy(), np.full((3, 3), 0.1))
    # released code: the first step is sg(C_1), no gradient through the surrogate
    np.testing.assert_array_equal(tape.gradient(total_first, cur).numpy(), 0.0)


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


@pytest.mark.parametrize("near_identity", [False, True])
def test_warm_started_power_iteration_agrees_with_svd(near_identity):
    rng = np.random.default_rng(4)
    k = 300
    base = random_confusion(k, rng, near_identity)
    v = tf.fill([k], k**-0.5)
    for step in range(60):  # a slowly drifting EMA matrix, 4 rounds a step, as in training
        a = base * (1.0 + 0.001 * np.sin(step)) + 1e-4 * rng.uniform(size=(k, k)).astype(np.float32)
        u, v = spectral.power_iteration(a, v, 4)
    sigma = spectral.spectral_norm(a, u, v).numpy()
    exact = np.linalg.norm(a.astype(np.float64), 2)
    assert abs(sigma - exact) / exact < 1e-4


def test_auto_method_threshold_and_unknown_method():
    assert spectral.resolve_method("auto", 1024) == "svd"
    assert spectral.resolve_method("auto", 1025) == "power"
    with pytest.raises(ValueError, match="spectral_method"):
        spectral.resolve_method("lanczos", 10)
