"""CARLoss + CARCallback: values, training, replicas, checkpoint/resume, config, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import car_tf
from car_tf.car.carrier import attach_car_state
from strategy_helpers import assert_results_close, run_under_strategies
from test_math import np_batch_confusion, np_frequency_weights, np_softmax, numeric_gradient

COUNTS = [40, 20, 8, 4]


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def with_state(loss):
    holder = keras.Sequential([keras.Input((2,)), keras.layers.Dense(len(COUNTS))])
    attach_car_state(holder, loss)
    return holder


def np_ce(logits, labels):
    return -np.log(np_softmax(logits)[np.arange(len(labels)), labels])


def test_loss_matches_numpy_over_two_steps():
    rng = np.random.default_rng(0)
    loss = car_tf.CARLoss(COUNTS, base=sparse_ce(), spec_lambda=0.5, beta=0.9)
    with_state(loss)
    w = np_frequency_weights(COUNTS, 0.2)
    ema = None
    for step in range(2):
        logits = rng.normal(size=(10, 4)).astype(np.float32)
        labels = rng.integers(0, 4, size=10)
        c = np_batch_confusion(logits, labels)
        ema = c if ema is None else 0.9 * ema + 0.1 * c
        sigma = np.linalg.norm(ema * w[None, :], 2)
        want = np_ce(logits, labels).mean() + 0.5 * sigma
        got = loss(labels, logits).numpy()
        assert got == pytest.approx(want, rel=1e-5)
        np.testing.assert_allclose(loss.state.ema_matrix().numpy(), ema, rtol=1e-5, atol=1e-8)


def test_paper_variant_starts_from_zero_ema():
    rng = np.random.default_rng(1)
    loss = car_tf.CARLoss(COUNTS, base=sparse_ce(), beta=0.5, ema_init="zeros")
    with_state(loss)
    logits = rng.normal(size=(8, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=8)
    loss(labels, logits)
    np.testing.assert_allclose(
        loss.state.ema_matrix().numpy(), 0.5 * np_batch_confusion(logits, labels), rtol=1e-5, atol=1e-8
    )


def test_power_method_matches_svd_method():
    rng = np.random.default_rng(2)
    svd = car_tf.CARLoss(COUNTS, base=sparse_ce(), spectral_method="svd")
    power = car_tf.CARLoss(COUNTS, base=sparse_ce(), spectral_method="power", power_iterations=60)
    with_state(svd), with_state(power)
    for _ in range(3):
        logits = rng.normal(size=(16, 4)).astype(np.float32)
        labels = rng.integers(0, 4, size=16)
        assert power(labels, logits).numpy() == pytest.approx(svd(labels, logits).numpy(), rel=1e-5)


def test_mixed_precision_logits_give_float32_loss():
    rng = np.random.default_rng(3)
    loss = car_tf.CARLoss(COUNTS, base=sparse_ce())
    reference = car_tf.CARLoss(COUNTS, base=sparse_ce())
    with_state(loss), with_state(reference)
    logits = rng.normal(size=(8, 4)).astype(np.float16)
    labels = rng.integers(0, 4, size=8)
    got = loss(labels, tf.constant(logits))
    assert got.dtype == tf.float32
    assert got.numpy() == pytest.approx(reference(labels, logits.astype(np.float32)).numpy(), rel=1e-4)


def test_config_round_trip():
    loss = car_tf.CARLoss(COUNTS, base=sparse_ce(), spec_lambda=0.7, beta=0.5, margin=0.1)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, car_tf.CARLoss)
    assert restored.get_config() == loss.get_config()


@pytest.mark.parametrize(
    "counts,kwargs,message",
    [
        ([10, 0, 3], {}, r"positive training count.*classes \[1\] have none"),
        ([10, -2, 3], {}, r"classes \[1\] have none"),
        ([10, 2.5, 3], {}, r"whole numbers, but class 1 has 2.5"),
        ([10, np.nan, 3], {}, r"whole numbers, but class 1 has nan"),
        ([10], {}, "at least 2"),
        (COUNTS, {"spec_lambda": -0.1}, r"spec_lambda=-0.1 must be a number >= 0"),
        (COUNTS, {"spec_lambda": float("nan")}, r"spec_lambda=nan must be a number >= 0"),
        (COUNTS, {"power_tolerance": 0.0}, "must be positive"),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence(counts, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        car_tf.CARLoss(counts, base=sparse_ce(), **kwargs)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_clear_errors():
    loss = car_tf.CARLoss(COUNTS, base=sparse_ce())
    with pytest.raises(ValueError, match="no state"):
        loss(np.array([0]), np.zeros((1, 4), np.float32))
    with_state(loss)
    with pytest.raises(ValueError, match="outputs 3 logits"):
        loss(np.array([0]), np.zeros((1, 3), np.float32))
    for spectral_method in ("svd", "power"):
        loss = car_tf.CARLoss(COUNTS, base=sparse_ce(), spectral_method=spectral_method)
        with_state(loss)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"a label lies outside \[0, 4\)"):
            loss(np.array([0, 7]), np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("spectral_method", ["svd", "power"])
def test_out_of_range_label_inside_fit_gets_the_package_message(spectral_method):
    x, y = toy_data(n=16)
    y[5] = 9
    model = toy_model()
    loss = car_tf.CARLoss(COUNTS, base="ce", spectral_method=spectral_method)
    model.compile(keras.optimizers.SGD(0.1), loss=loss)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[car_tf.CARCallback(loss)])
    text = str(error.value)
    assert "a label lies outside [0, 4); check the data set" in text
    assert "segment" not in text.lower() and "indices" not in text.lower()


class _RecordLoss(keras.callbacks.Callback):
    """Records each step's loss, as car_tf.train's NaN guard reads it."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


@pytest.mark.parametrize("spectral_method", ["svd", "power"])
def test_nan_input_gives_a_nan_loss_not_an_error(spectral_method):
    x, y = toy_data(n=32)
    x[20] = np.nan  # second batch
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    loss = car_tf.CARLoss(COUNTS, base="ce", spectral_method=spectral_method)
    model.compile(keras.optimizers.SGD(0.1), loss=loss)
    record = _RecordLoss()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[car_tf.CARCallback(loss), record])
    assert np.isfinite(record.losses[0]) and np.isnan(record.losses[1])


def toy_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size=n, p=np.asarray(COUNTS) / sum(COUNTS))
    centers = rng.normal(size=(4, 6)) * 3
    x = (centers[labels] + rng.normal(size=(n, 6))).astype(np.float32)
    return x, labels.astype(np.int32)


def toy_model():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(1)),
            keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(2)),
        ]
    )


def train(epochs, strategy=None, extra_callbacks=(), lambda_warmup_epochs=0, jit_compile=False,
          **loss_kwargs):
    strategy = strategy or tf.distribute.get_strategy()
    x, y = toy_data()
    with strategy.scope():
        model = toy_model()
        loss = car_tf.CARLoss(COUNTS, base=sparse_ce(), **loss_kwargs)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss=loss, jit_compile=jit_compile)
    history = model.fit(
        x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[car_tf.CARCallback(lambda_warmup_epochs=lambda_warmup_epochs), *extra_callbacks],
    )
    return model, history


def test_fit_logs_penalty_and_keeps_state_on_the_model(tmp_path):
    model, history = train(3, lambda_warmup_epochs=2)
    assert set(history.history) >= {"loss", "car_penalty", "car_spectral_norm"}
    sigma = history.history["car_spectral_norm"]
    assert all(s > 0 for s in sigma)
    penalty = history.history["car_penalty"]
    assert penalty[0] == 0.0  # lambda ramps from 0
    assert penalty[2] == pytest.approx(0.3 * sigma[2], rel=1e-5)
    ema = model.car_state.ema_matrix().numpy()
    assert ema.sum() > 0 and np.all(np.diag(ema) == 0)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    fresh = toy_model()
    attach_car_state(fresh, car_tf.CARLoss(COUNTS, base=sparse_ce()))
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh.car_state.ema_matrix().numpy(), ema)


def test_tensorboard_after_the_callback_writes_the_penalty(tmp_path):
    _, history = train(2, extra_callbacks=[keras.callbacks.TensorBoard(str(tmp_path))])
    written = {}
    for path in (tmp_path / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                written.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    for key in ("car_spectral_norm", "car_penalty"):
        logged = written.get(f"epoch_{key}", {})
        np.testing.assert_allclose([logged.get(e) for e in (0, 1)], history.history[key], rtol=1e-6)


def test_one_and_two_replicas_agree():
    def run(strategy):
        model, _ = train(2, strategy)
        return [w.numpy() for w in model.weights] + [model.car_state.ema_matrix().numpy()]

    assert_results_close(run_under_strategies(run), atol=1e-5)


@pytest.mark.parametrize("sparse_ema_entries", [None, 2])
def test_two_replicas_with_power_iteration_agree(sparse_ema_entries):
    def run(strategy):
        model, _ = train(1, strategy, spectral_method="power", sparse_ema_entries=sparse_ema_entries)
        return [model.car_state.ema_matrix().numpy(), model.car_state.power_v.numpy()]

    assert_results_close(run_under_strategies(run), atol=1e-5)


class _Kill(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("spectral_method, sparse_ema_entries", [("svd", None), ("power", None), ("power", 2)])
def test_an_xla_compiled_step_trains_as_the_plain_one(spectral_method, sparse_ema_entries):
    """jit_compile=True (Keras's default on a GPU) compiles CAR's step: same weights and EMA."""
    options = dict(spectral_method=spectral_method, sparse_ema_entries=sparse_ema_entries)
    keras.utils.set_random_seed(0)
    plain, _ = train(2, **options)
    keras.utils.set_random_seed(0)
    compiled, _ = train(2, jit_compile=True, **options)
    for got, want in zip(compiled.weights, plain.weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(compiled.car_state.ema_matrix().numpy(),
                               plain.car_state.ema_matrix().numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sparse_ema_entries", [None, 2])
def test_killed_run_resumes_with_its_ema(tmp_path, sparse_ema_entries):
    reference, _ = train(4, sparse_ema_entries=sparse_ema_entries)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        train(4, extra_callbacks=[backup, _Kill(epoch=2, batch=1)], sparse_ema_entries=sparse_ema_entries)
    resumed, history = train(4, extra_callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))],
                             sparse_ema_entries=sparse_ema_entries)
    assert len(history.history["loss"]) == 2  # epochs 2 and 3 only
    np.testing.assert_allclose(resumed.car_state.ema_matrix().numpy(), reference.car_state.ema_matrix().numpy(), atol=1e-6)
    for got, want in zip(resumed.weights, reference.weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


@pytest.mark.parametrize("sparse_ema_entries", [None, 2])
def test_validation_leaves_the_ema_alone(sparse_ema_entries):
    x, y = toy_data(seed=1)
    plain, _ = train(2, sparse_ema_entries=sparse_ema_entries)
    model = toy_model()
    loss = car_tf.CARLoss(COUNTS, base=sparse_ce(), sparse_ema_entries=sparse_ema_entries)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
    model.fit(*toy_data(), batch_size=16, epochs=2, shuffle=False, verbose=0,
              validation_data=(x, y), callbacks=[car_tf.CARCallback()])
    np.testing.assert_allclose(model.car_state.ema_matrix().numpy(), plain.car_state.ema_matrix().numpy(), atol=1e-7)
    assert model.car_state.updating.numpy() == 1.0


@pytest.mark.parametrize("spectral_method", ["svd", "power"])
def test_loss_gradient_matches_finite_differences(spectral_method):
    rng = np.random.default_rng(7)
    beta, lam = 0.6, 0.5
    loss = car_tf.CARLoss(COUNTS, base=sparse_ce(), spec_lambda=lam, beta=beta,
                          spectral_method=spectral_method, power_iterations=400,
                          power_tolerance=1e-7)
    with_state(loss)
    labels0 = np.array([0, 1, 2, 3, 0, 1])
    loss(labels0, rng.normal(size=(6, 4)).astype(np.float32))  # first step: the EMA starts
    previous = loss.state.ema_matrix().numpy().astype(np.float64)
    labels = np.array([0, 0, 1, 2, 3, 3, 1])
    x = rng.normal(size=(7, 4))
    z = tf.constant(x.astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = loss(labels, z)
    grad = tape.gradient(value, z).numpy()
    w = np_frequency_weights(COUNTS, 0.2)

    def objective(z):  # the released code's gate carries no gradient: it stays at x
        probs_z = np_softmax(z)
        current = np.zeros((4, 4))
        for q, j in enumerate(labels):
            for i in range(4):
                if i != j:
                    gate = 1.0 / (1.0 + np.exp(-(x[q, i] - x[q, j])))
                    current[i, j] += gate * probs_z[q, i] / np.sum(labels == j)
        ema = beta * previous + (1 - beta) * current
        return np_ce(z, labels).mean() + lam * np.linalg.norm(ema * w[None, :], 2)

    numeric = numeric_gradient(objective, x, 1e-5)
    np.testing.assert_allclose(grad, numeric, atol=2e-5)


@pytest.mark.parametrize("sparse_ema_entries", [None, 12])
def test_power_state_follows_the_ema_and_agrees_with_svd(sparse_ema_entries):
    """Matrix-free power iteration inside CARLoss: A V and A^T U stay exact, sigma matches an SVD."""
    k, rng = 150, np.random.default_rng(8)
    counts = np.maximum(500 * 100.0 ** (-np.arange(k) / (k - 1)), 1).astype(int)
    # A fast-moving EMA (a fifth of the columns renewed each step) needs more than the default cap.
    loss = car_tf.CARLoss(counts, base="ce", spectral_method="power", power_iterations=200,
                          sparse_ema_entries=sparse_ema_entries)
    attach_car_state(keras.Sequential([keras.Input((2,)), keras.layers.Dense(k)]), loss)
    centers = rng.normal(size=(k, k)) * 2  # a model that confuses some classes more than others
    w = np_frequency_weights(counts, 0.2)
    for step in range(40):
        labels = rng.choice(k, size=32, p=counts / counts.sum())
        sigma = float(loss.penalty(centers[labels] + rng.normal(size=(32, k)), labels))
        state = loss.state
        a = state.ema_matrix().numpy().astype(np.float64) * w[None, :]
        u, v = state.power_u.numpy(), state.power_v.numpy()
        for got, want in ((state.power_av, a @ v), (state.power_atu, a.T @ u)):
            # float32 updates: 1e-4 of the block's largest entry (its small entries cancel)
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        if step >= 10:
            assert sigma == pytest.approx(np.linalg.norm(a, 2), rel=1e-4)
