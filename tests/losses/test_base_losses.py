"""CE, LDAM (+ DRW) and logit-adjusted losses against NumPy references; the base-loss registry."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf.losses.cross_entropy import CrossEntropy, class_ids
from car_tf.losses.ldam import DRWSchedule, LDAMLoss, drw_class_weights, ldam_margins
from car_tf.losses.logit_adjusted import LogitAdjustedLoss
from car_tf.losses.registry import BASE_LOSSES, callbacks_for_loss, get_base_loss
from keras_roundtrip import assert_serialization_roundtrip
from strategy_helpers import assert_results_close, run_under_strategies

COUNTS = [500, 120, 40, 8]
K = len(COUNTS)


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_soft_ce(targets, logits):
    return -(targets * np_log_softmax(logits.astype(np.float64))).sum(axis=-1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, K)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 3, 1], np.int32)
    soft = rng.dirichlet(np.ones(K), size=6).astype(np.float32)
    return logits, labels, soft


def one_hot(labels):
    return np.eye(K)[labels]


def all_losses():
    return [
        CrossEntropy(),
        CrossEntropy(label_smoothing=0.1),
        LDAMLoss(COUNTS),
        LDAMLoss(COUNTS, class_weights=drw_class_weights(COUNTS)),
        LogitAdjustedLoss(COUNTS, tau=0.75),
    ]


def test_cross_entropy_matches_numpy_for_int_shaped_and_soft_labels(batch):
    logits, labels, soft = batch
    loss = CrossEntropy()
    expected = np_soft_ce(one_hot(labels), logits)
    np.testing.assert_allclose(loss.call(labels, logits), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss.call(labels[:, None], logits), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        loss.call(soft, logits), np_soft_ce(soft, logits), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(loss(labels, logits), expected.mean(), rtol=1e-5, atol=1e-6)


def test_label_smoothing_matches_numpy(batch):
    logits, labels, _ = batch
    smoothed = one_hot(labels) * 0.8 + 0.2 / K
    got = CrossEntropy(label_smoothing=0.2).call(labels, logits)
    np.testing.assert_allclose(got, np_soft_ce(smoothed, logits), rtol=1e-5, atol=1e-6)


def test_ldam_margins_follow_the_quarter_power_formula():
    margins = ldam_margins(COUNTS, max_margin=0.5)
    expected = np.array(COUNTS, np.float64) ** -0.25
    np.testing.assert_allclose(margins, 0.5 * expected / expected.max(), rtol=1e-6)
    assert margins.argmax() == K - 1 and np.isclose(margins.max(), 0.5)


def test_ldam_loss_matches_numpy_for_int_and_soft_labels(batch):
    logits, labels, soft = batch
    margins = np.array(COUNTS, np.float64) ** -0.25
    margins *= 0.4 / margins.max()
    weights = np.array([0.5, 1.0, 1.5, 2.0])
    loss = LDAMLoss(COUNTS, max_margin=0.4, scale=10.0, class_weights=weights)
    adjusted = 10.0 * (logits - one_hot(labels) * margins)
    expected = weights[labels] * np_soft_ce(one_hot(labels), adjusted)
    np.testing.assert_allclose(loss.call(labels, logits), expected, rtol=1e-5, atol=1e-6)
    soft_adjusted = 10.0 * (logits - soft * margins)
    soft_expected = (soft @ weights) * np_soft_ce(soft, soft_adjusted)
    np.testing.assert_allclose(loss.call(soft, logits), soft_expected, rtol=1e-5, atol=1e-6)


def test_drw_weights_follow_the_effective_number_formula():
    counts = np.array(COUNTS, np.float64)
    raw = (1 - 0.999) / (1 - 0.999**counts)
    np.testing.assert_allclose(drw_class_weights(COUNTS, 0.999), raw / raw.sum() * K, rtol=1e-6)
    np.testing.assert_allclose(drw_class_weights(COUNTS, 0.0), np.ones(K))


def test_drw_schedule_switches_at_start_epoch_and_is_right_after_a_resume():
    loss = LDAMLoss(COUNTS)
    schedule = DRWSchedule(loss, start_epoch=3, beta=0.9999)
    schedule.on_epoch_begin(5)  # a run resumed at epoch 5
    np.testing.assert_allclose(loss.class_weights.numpy(), drw_class_weights(COUNTS, 0.9999))
    schedule.on_epoch_begin(2)
    np.testing.assert_allclose(loss.class_weights.numpy(), np.ones(K))
    with pytest.raises(ValueError, match="class_weights"):
        DRWSchedule(CrossEntropy())


def test_drw_weights_reach_the_compiled_train_step(batch):
    """lr = 0 keeps the model fixed, so the epoch losses are the unweighted and weighted means."""
    logits, labels, _ = batch
    model = keras.Sequential([keras.Input((K,)), keras.layers.Dense(K, use_bias=False)])
    model.layers[0].set_weights([np.eye(K, dtype=np.float32)])  # outputs = inputs
    loss = LDAMLoss(COUNTS, scale=5.0)
    model.compile(keras.optimizers.SGD(0.0), loss=loss)
    schedule = DRWSchedule(loss, start_epoch=1)
    history = model.fit(logits, labels, batch_size=6, epochs=2, verbose=0, callbacks=[schedule])
    adjusted = 5.0 * (logits - one_hot(labels) * ldam_margins(COUNTS))
    per_sample = np_soft_ce(one_hot(labels), adjusted)
    weights = drw_class_weights(COUNTS)[labels]
    np.testing.assert_allclose(history.history["loss"][0], per_sample.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        history.history["loss"][1], (weights * per_sample).mean(), rtol=1e-5, atol=1e-6
    )


def test_logit_adjusted_loss_matches_numpy(batch):
    logits, labels, soft = batch
    prior = np.array(COUNTS, np.float64) / sum(COUNTS)
    for tau in (0.0, 0.5, 1.0):
        loss = LogitAdjustedLoss(COUNTS, tau=tau)
        adjusted = logits + tau * np.log(prior)
        np.testing.assert_allclose(
            loss.call(labels, logits), np_soft_ce(one_hot(labels), adjusted), rtol=1e-5
        )
        np.testing.assert_allclose(
            loss.call(soft, logits), np_soft_ce(soft, adjusted), rtol=1e-5, atol=1e-6
        )


def test_logit_adjusted_gradient_matches_finite_differences(batch):
    logits, _, soft = batch
    loss = LogitAdjustedLoss(COUNTS, tau=1.0)
    x = tf.Variable(logits.astype(np.float64))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(loss.call(soft, tf.cast(x, tf.float32)))
    grad = tape.gradient(total, x).numpy()
    prior = np.log(np.array(COUNTS, np.float64) / sum(COUNTS))
    step = 1e-4
    numeric = np.zeros_like(logits, np.float64)
    for index in np.ndindex(logits.shape):
        up, down = logits.astype(np.float64), logits.astype(np.float64)
        up[index] += step
        down[index] -= step
        numeric[index] = (
            np_soft_ce(soft, up + prior).sum() - np_soft_ce(soft, down + prior).sum()
        ) / (2 * step)
    np.testing.assert_allclose(grad, numeric, atol=1e-4)


@pytest.mark.parametrize("loss", all_losses(), ids=lambda loss: loss.name)
def test_float16_logits_give_float32_per_sample_losses(loss, batch):
    logits, labels, soft = batch
    for targets in (labels, soft):
        per_sample = loss.call(targets, tf.constant(logits, tf.float16))
        assert per_sample.dtype == tf.float32 and per_sample.shape == (6,)
        np.testing.assert_allclose(
            per_sample, loss.call(targets, logits.astype(np.float16).astype(np.float32)), rtol=1e-5
        )


@pytest.mark.parametrize("loss", all_losses(), ids=lambda loss: loss.name)
def test_get_config_round_trips(loss, batch):
    logits, labels, soft = batch
    assert_serialization_roundtrip(loss, (labels, logits))
    assert_serialization_roundtrip(loss, (soft, logits))


def test_user_errors_are_clear_value_errors(batch):
    logits, labels, _ = batch
    with pytest.raises(ValueError, match="positive training count"):
        LDAMLoss([10, 0, 5])
    with pytest.raises(ValueError, match="outputs 4 logits"):
        LogitAdjustedLoss([10, 5]).call(labels, logits)
    with pytest.raises(ValueError, match="soft labels"):
        CrossEntropy().call(np.zeros((6, 3), np.float32), logits)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        CrossEntropy().call(labels + 1, logits)


def test_registry_builds_every_base_loss():
    expected = {
        "ce": CrossEntropy,
        "ldam_drw": LDAMLoss,
        "logit_adjusted": LogitAdjustedLoss,
        "balanced_softmax": LogitAdjustedLoss,
    }
    for name in BASE_LOSSES:
        loss = get_base_loss(name, COUNTS)
        assert isinstance(loss, keras.losses.Loss)
        if name in expected:
            assert type(loss) is expected[name]
    assert get_base_loss("balanced_softmax", COUNTS).tau == 1.0
    assert get_base_loss("logit_adjusted", COUNTS, tau=0.5).tau == 0.5
    assert get_base_loss("ldam_drw", COUNTS, max_margin=0.3).max_margin == 0.3


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="ldam_drw"):
        get_base_loss("focal", COUNTS)
    with pytest.raises(ValueError, match="options are"):
        get_base_loss("ce", COUNTS, tau=1.0)
    with pytest.raises(ValueError, match="options are"):
        get_base_loss("balanced_softmax", COUNTS, tau=0.5)


def test_callbacks_for_loss_scale_the_drw_start_and_look_through_wrappers():
    ldam = get_base_loss("ldam_drw", COUNTS)
    (schedule,) = callbacks_for_loss(ldam, epochs=200)
    assert isinstance(schedule, DRWSchedule) and schedule.start_epoch == 160
    assert callbacks_for_loss(ldam, epochs=10)[0].start_epoch == 8

    class Wrapper:
        base = ldam

    assert callbacks_for_loss(Wrapper(), epochs=200)[0].loss is ldam
    assert callbacks_for_loss(get_base_loss("ce", COUNTS), epochs=200) == []


def test_ldam_with_drw_weights_trains_the_same_on_one_and_two_replicas():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.integers(0, K, size=16).astype(np.int32)

    def train(strategy):
        keras.utils.set_random_seed(3)
        with strategy.scope():
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(K)])
            loss = LDAMLoss(COUNTS, scale=5.0, class_weights=drw_class_weights(COUNTS))
            model.compile(keras.optimizers.SGD(0.1), loss=loss)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        model.fit(dataset, epochs=2, verbose=0, shuffle=False)
        return [w.numpy() for w in model.weights]

    assert_results_close(run_under_strategies(train))


def test_class_ids_of_int_column_and_soft_labels():
    np.testing.assert_array_equal(class_ids(np.array([2, 0, 1])), [2, 0, 1])
    np.testing.assert_array_equal(class_ids(np.array([[2], [0], [1]])), [2, 0, 1])
    soft = np.array([[0.1, 0.2, 0.7], [0.6, 0.4, 0.0]], np.float32)
    np.testing.assert_array_equal(class_ids(soft), [2, 0])
    assert class_ids(soft).dtype == np.int64


def test_ldam_drw_makes_a_run_length_dependent_once_its_reweighting_would_move():
    from car_tf.losses.registry import length_dependence

    # DRW starts at 80 % of the run: 160 of 200, 240 of 300.
    assert length_dependence("ldam_drw", 200, 300, epochs_done=100) == ""  # neither has started
    assert length_dependence("ldam_drw", 200, 300, epochs_done=200) == "LDAM-DRW re-weighting"
    assert length_dependence("ce", 200, 300, epochs_done=200) == ""
