"""Decoupled margin loss, uniformity and feature-norm terms, and the per-group diagnostics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf.decoupled.diagnostics import DecoupledDiagnostics, decoupled_quantities
from car_tf.decoupled.margin import DecoupledMarginLoss, additive_angular_margin
from car_tf.losses.registry import get_base_loss
from car_tf.models.heads import CosineClassifier
from car_tf.decoupled.terms import (
    FeatureNormPenalty,
    UniformityRegularizer,
    attach_decoupled_terms,
    feature_norm_penalty,
    gaussian_potential,
    hyperspherical_energy,
)
from keras_roundtrip import assert_mixed_precision, assert_serialization_roundtrip
from strategy_helpers import assert_results_close, run_under_strategies

SCALE, MARGIN = 16.0, 0.3


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_margin(cos, m):
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    return np.where(theta + m <= np.pi, np.cos(theta + m), cos - m * np.sin(m))


def np_margin_loss(targets, cos, scale, m):
    mask = np.eye(cos.shape[1], dtype=bool)[targets.argmax(axis=1)]
    logits = np.where(mask, scale * np_margin(cos, m), scale * cos)
    return -(targets * np_log_softmax(logits)).sum(axis=1)


def np_unit_columns(kernel):
    return kernel / np.linalg.norm(kernel, axis=0, keepdims=True)


def np_pair_distances(kernel):
    unit = np_unit_columns(kernel)
    k = unit.shape[1]
    return np.array([np.linalg.norm(unit[:, i] - unit[:, j]) for i in range(k) for j in range(k)
                     if i != j])


@pytest.fixture
def cosines():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.95, 0.95, size=(6, 5)).astype(np.float32)
    cos[0, 2] = -0.99  # theta + m > pi on a target
    labels = np.array([2, 0, 1, 4, 3, 2], np.int32)
    soft = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    return cos, labels, soft


def test_additive_angular_margin_matches_numpy_on_both_sides_of_pi():
    cos = np.linspace(-1.0, 1.0, 41).astype(np.float32)
    np.testing.assert_allclose(additive_angular_margin(cos, MARGIN), np_margin(cos, MARGIN),
                               atol=2e-3)  # the clip at +-(1 - 1e-6) moves sin by up to 1.4e-3
    inner = cos[2:-2]
    np.testing.assert_allclose(additive_angular_margin(inner, MARGIN), np_margin(inner, MARGIN),
                               atol=1e-5)


def test_margin_loss_matches_numpy_for_int_and_soft_labels(cosines):
    cos, labels, soft = cosines
    loss = DecoupledMarginLoss(scale=SCALE, margin=MARGIN)
    logits = SCALE * cos
    expected = np_margin_loss(np.eye(5)[labels], cos.astype(np.float64), SCALE, MARGIN)
    np.testing.assert_allclose(loss.call(labels, logits), expected, rtol=1e-4)
    np.testing.assert_allclose(loss.call(labels[:, None], logits), expected, rtol=1e-4)
    soft_expected = np_margin_loss(soft, cos.astype(np.float64), SCALE, MARGIN)
    np.testing.assert_allclose(loss.call(soft, logits), soft_expected, rtol=1e-4)


def test_margin_loss_gradient_is_finite_at_cos_plus_minus_one_and_past_pi():
    loss = DecoupledMarginLoss(scale=SCALE, margin=MARGIN)
    cos = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.2], [-0.999, 0.5, 0.1]], np.float32)
    logits = tf.Variable(SCALE * cos)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(loss.call(np.array([0, 0, 0]), logits))
    grad = tape.gradient(total, logits).numpy()
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(total.numpy()))
    assert grad[2, 0] < 0  # past pi the fallback still pulls the target logit up


def test_margin_loss_gradient_matches_finite_differences(cosines):
    cos, labels, _ = cosines
    cos = cos.astype(np.float64)
    loss = DecoupledMarginLoss(scale=SCALE, margin=MARGIN)
    logits = tf.Variable(SCALE * cos)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(loss.call(labels, tf.cast(logits, tf.float32)))
    grad = tape.gradient(total, logits).numpy()
    targets, step = np.eye(5)[labels], 1e-5
    numeric = np.zeros_like(cos)
    for index in np.ndindex(cos.shape):
        up, down = cos.copy(), cos.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (
            np_margin_loss(targets, up, SCALE, MARGIN).sum()
            - np_margin_loss(targets, down, SCALE, MARGIN).sum()
        ) / (2 * step * SCALE)
    np.testing.assert_allclose(grad, numeric, atol=2e-3)


def test_margin_loss_float16_logits_give_float32_and_config_round_trips(cosines):
    cos, labels, _ = cosines
    loss = DecoupledMarginLoss(scale=SCALE, margin=MARGIN)
    per_sample = loss.call(labels, tf.constant(SCALE * cos, tf.float16))
    assert per_sample.dtype == tf.float32 and per_sample.shape == (6,)
    assert_serialization_roundtrip(loss, (labels, SCALE * cos))
    with pytest.raises(ValueError, match="margin"):
        DecoupledMarginLoss(margin=2.0)


def test_uniformity_terms_match_numpy():
    kernel = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    distances = np_pair_distances(kernel.astype(np.float64))
    np.testing.assert_allclose(hyperspherical_energy(kernel), np.mean(1 / distances), rtol=1e-4)
    np.testing.assert_allclose(hyperspherical_energy(kernel, power=2.0),
                               np.mean(distances**-2.0), rtol=1e-4)
    np.testing.assert_allclose(gaussian_potential(kernel, 2.0),
                               np.log(np.mean(np.exp(-2.0 * distances**2))), rtol=1e-4)


@pytest.mark.parametrize("kind", ["mhe", "gaussian"])
def test_uniformity_is_lower_for_spread_vectors_and_its_gradient_spreads_them(kind):
    rng = np.random.default_rng(2)
    clustered = (np.array([1.0, 0, 0, 0])[:, None] + 0.2 * rng.normal(size=(4, 5))).astype(
        np.float32
    )
    spread = np.linalg.qr(rng.normal(size=(4, 4)))[0][:, :4].astype(np.float32)
    regularizer = UniformityRegularizer(weight=1.0, kind=kind)
    assert float(regularizer(spread)) < float(regularizer(clustered[:, :4]))
    kernel = tf.Variable(clustered)
    start = np_pair_distances(clustered).min()
    for _ in range(50):
        with tf.GradientTape() as tape:
            value = regularizer(kernel)
        kernel.assign_sub(0.05 * tape.gradient(value, kernel))
    assert float(regularizer(kernel)) < float(regularizer(clustered))
    assert np_pair_distances(kernel.numpy()).min() > start


def test_feature_norm_terms_match_numpy():
    features = np.array([[3.0, 4.0], [0.6, 0.8], [6.0, 8.0]], np.float32)  # norms 5, 1, 10
    norms = np.array([5.0, 1.0, 10.0])
    np.testing.assert_allclose(feature_norm_penalty(features, 6.0, "hinge"),
                               np.mean(np.maximum(6.0 - norms, 0)), rtol=1e-6)
    np.testing.assert_allclose(feature_norm_penalty(features, 6.0, "ring"),
                               np.mean((norms - 6.0) ** 2), rtol=1e-6)
    layer = FeatureNormPenalty(weight=0.5, target_norm=6.0, kind="ring")
    np.testing.assert_allclose(layer(features), features)
    np.testing.assert_allclose(layer.losses[0], 0.5 * np.mean((norms - 6.0) ** 2), rtol=1e-6)
    assert_mixed_precision(layer, features)
    mixed = FeatureNormPenalty(weight=0.5, target_norm=6.0, dtype="mixed_float16")
    mixed(features)
    assert mixed.losses[0].dtype == tf.float32


def test_terms_serialize_and_reject_unknown_kinds():
    rng = np.random.default_rng(12)
    kernel = rng.normal(size=(5, 3)).astype(np.float32)
    assert_serialization_roundtrip(UniformityRegularizer(0.3, "gaussian", temperature=3.0), kernel)
    assert_serialization_roundtrip(FeatureNormPenalty(0.2, 4.0, "ring", name="fn"), kernel)
    with pytest.raises(ValueError, match="uniformity"):
        UniformityRegularizer(kind="riesz")
    with pytest.raises(ValueError, match="feature_norm"):
        FeatureNormPenalty(kind="square")


def tiny_model(input_dim=6, width=8, num_classes=4, scale=SCALE):
    inputs = keras.Input((input_dim,))
    features = keras.layers.Dense(width, activation="relu", name="features")(inputs)
    logits = CosineClassifier(num_classes, scale=scale, name="classifier")(features)
    return keras.Model(inputs, logits)


def test_attach_keeps_outputs_and_adds_both_terms():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    x = np.random.default_rng(3).normal(size=(10, 6)).astype(np.float32)
    attached = attach_decoupled_terms(model, uniformity_weight=0.5, feature_norm_weight=0.2,
                                      target_norm=3.0, uniformity="mhe", feature_norm="hinge")
    np.testing.assert_allclose(attached(x), model(x), rtol=1e-6)
    kernel = attached.get_layer("classifier").kernel.numpy()
    features = model.get_layer("features")(x).numpy()
    norms = np.linalg.norm(features, axis=1)
    uniformity = 0.5 * np.mean(1 / np_pair_distances(kernel))
    feature_norm = 0.2 * np.mean(np.maximum(3 - norms, 0))
    got = sorted(float(loss) for loss in attached.losses)
    np.testing.assert_allclose(got, sorted([uniformity, feature_norm]), rtol=1e-4)
    assert len(model.losses) == 0  # the original is untouched
    assert attach_decoupled_terms(model, 0.0, 0.0).losses == []
    with pytest.raises(ValueError, match="'features' and 'classifier'"):
        attach_decoupled_terms(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_decoupled_terms_train_the_same_on_one_and_two_replicas():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=16).astype(np.int32)

    def train(strategy):
        keras.utils.set_random_seed(5)
        with strategy.scope():
            model = attach_decoupled_terms(tiny_model(), uniformity_weight=0.5,
                                           feature_norm_weight=0.1, target_norm=5.0)
            model.compile(keras.optimizers.SGD(0.05),
                          loss=DecoupledMarginLoss(scale=SCALE, margin=MARGIN))
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=2, verbose=0,
                  shuffle=False)
        return [w.numpy() for w in model.weights]

    assert_results_close(run_under_strategies(train))


def blobs(rng, counts, dim=6):
    centers = 3.0 * rng.normal(size=(len(counts), dim))
    labels = np.repeat(np.arange(len(counts)), counts)
    return (centers[labels] + rng.normal(size=(labels.size, dim))).astype(np.float32), labels


def test_tiny_model_trains_with_the_decoupled_loss_and_beats_chance():
    rng = np.random.default_rng(6)
    counts = [150, 60, 30, 12]
    x, y = blobs(rng, counts)
    keras.utils.set_random_seed(7)
    model = attach_decoupled_terms(tiny_model(width=16))
    model.compile(keras.optimizers.Adam(0.01), loss=get_base_loss("decoupled", counts,
                                                                   scale=SCALE))
    model.fit(x, y, batch_size=32, epochs=15, verbose=0)
    test_x, test_y = blobs(np.random.default_rng(6), [40] * 4)
    accuracy = np.mean(model.predict(test_x, verbose=0).argmax(axis=1) == test_y)
    assert accuracy > 0.8  # chance is 0.25


def test_decoupled_quantities_match_numpy_per_group():
    keras.utils.set_random_seed(8)
    model = tiny_model(num_classes=3)
    counts = [200, 50, 5]  # one class per group: many, medium, few
    rng = np.random.default_rng(9)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    soft = np.eye(3, dtype=np.float32)[y] * 0.7 + 0.1
    features = model.get_layer("features")(x).numpy()
    kernel = model.get_layer("classifier").kernel.numpy()
    unit = np_unit_columns(kernel)
    for labels in (y, soft):
        dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(5)
        result = decoupled_quantities(model, dataset, counts)
        for group, cls in (("many", 0), ("medium", 1), ("few", 2)):
            f = features[y == cls]
            norms = np.linalg.norm(f, axis=1)
            np.testing.assert_allclose(result[group]["classifier_norm"],
                                       np.linalg.norm(kernel[:, cls]), rtol=1e-5)
            np.testing.assert_allclose(result[group]["feature_norm"], norms.mean(), rtol=1e-5)
            np.testing.assert_allclose(result[group]["target_cosine"],
                                       np.mean(f @ unit[:, cls] / norms), rtol=1e-4, atol=1e-6)
    only_many = decoupled_quantities(model, dataset, [300, 200, 150])
    assert list(only_many) == ["many"]


def test_diagnostics_callback_logs_into_history():
    keras.utils.set_random_seed(10)
    rng = np.random.default_rng(11)
    counts = [150, 40, 10, 10]
    x, y = blobs(rng, [30, 20, 10, 10])
    model = attach_decoupled_terms(tiny_model())
    model.compile(keras.optimizers.SGD(0.05), loss=DecoupledMarginLoss(scale=SCALE))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False,
                        callbacks=[DecoupledDiagnostics(dataset, counts)])
    for group in ("many", "medium", "few"):
        for name in ("classifier_norm", "feature_norm", "target_cosine"):
            values = history.history[f"dec/{group}/{name}"]
            assert len(values) == 2 and np.all(np.isfinite(values))


def test_decoupled_quantities_read_the_image_network_inside_a_concutmix_model():
    # --method=car --base_loss=decoupled --concutmix: the diagnostics see the ConCutMix wrapper.
    from car_tf.concutmix.model import ConCutMixModel
    from concutmix_helpers import tiny_classifier

    keras.utils.set_random_seed(12)
    inner = tiny_classifier(num_classes=3)
    counts = [200, 50, 5]
    wrapper = ConCutMixModel(inner, 3, counts, projection_dim=4, top_k=2)
    rng = np.random.default_rng(13)
    images = rng.uniform(0, 255, size=(9, 8, 8, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.array([0, 1, 2] * 3))).batch(4)
    assert decoupled_quantities(wrapper, dataset, counts) == decoupled_quantities(inner, dataset, counts)
    callback = DecoupledDiagnostics(dataset, counts)
    callback.set_model(wrapper)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert set(logs) == {f"dec/{g}/{n}" for g in ("many", "medium", "few")
                         for n in ("classifier_norm", "feature_norm", "target_cosine")}
