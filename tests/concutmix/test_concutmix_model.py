"""ConCutMix maths (semantic label, rectification, BCL) vs NumPy, and the model's train step."""
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from concutmix_helpers import tiny_classifier, toy_data, toy_stage
from strategy_helpers import assert_results_close, run_under_strategies

from car_tf.concutmix import (
    CONCUTMIX_DEFAULTS,
    ConCutMixModel,
    balanced_contrastive_loss,
    class_prototypes,
    rectification_weight,
    rectify,
    semantic_label,
)


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_semantic_label(z, prototypes, k):
    out = np.zeros((len(z), len(prototypes)))
    for b, row in enumerate(z):
        distance = np.linalg.norm(prototypes - row, axis=1)
        nearest = np.argsort(distance)[:k]
        out[b, nearest] = 1.0 / distance[nearest]
        out[b] /= out[b].sum()
    return out


def np_bcl(features, labels, prototypes, temperature):
    """BCL from its definition, one anchor at a time; returns the two views' mean per sample."""
    keys = np.concatenate([features, prototypes])
    key_labels = np.concatenate([labels, np.arange(len(prototypes))])
    losses = []
    for i, anchor in enumerate(features):
        others = [j for j in range(len(keys)) if j != i]
        denominator = 0.0
        for c in np.unique(key_labels):
            members = [j for j in others if key_labels[j] == c]
            denominator += np.mean([np.exp(anchor @ keys[j] / temperature) for j in members])
        positives = [j for j in others if key_labels[j] == labels[i]]
        losses.append(
            -np.mean([anchor @ keys[j] / temperature - np.log(denominator) for j in positives])
        )
    return np.mean(np.reshape(losses, (2, -1)), axis=0)


def test_semantic_label_matches_numpy():
    rng = np.random.default_rng(0)
    z, prototypes = normalize(rng.normal(size=(6, 5))), normalize(rng.normal(size=(7, 5)))
    for k in (1, 3, 7, 30):
        got = np.asarray(semantic_label(z, prototypes, k))
        np.testing.assert_allclose(got, np_semantic_label(z, prototypes, min(k, 7)), atol=1e-5)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        semantic_label(z, prototypes, 0)


def test_semantic_label_has_no_gradient():
    z = tf.Variable(normalize(np.random.default_rng(1).normal(size=(3, 4))).astype(np.float32))
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(semantic_label(z, tf.eye(4), 2) * tf.range(4.0))
    assert tape.gradient(out, z) is None


def test_rectification_matches_numpy():
    counts = np.array([500, 100, 20, 5])
    lam = np.array([0.3, 0.9, 0.5, 1.0])
    a, b = np.array([0, 1, 2, 3]), np.array([3, 3, 0, 1])
    w = np.asarray(rectification_weight(lam, counts[a], counts[b], counts))
    expected_w = np.log(lam * counts[a] + (1 - lam) * counts[b]) / np.log(counts).sum()
    np.testing.assert_allclose(w, expected_w, rtol=1e-6)

    onehot = np.eye(4)
    area = lam[:, None] * onehot[a] + (1 - lam[:, None]) * onehot[b]
    semantic = np.random.default_rng(2).dirichlet(np.ones(4), size=4)
    flag = np.array([1.0, 1.0, 0.0, 1.0])
    omega = 0.8
    got = np.asarray(rectify(area, semantic, w, omega, flag, epoch=5, warmup_epochs=5))
    coefficient = (w * omega * flag)[:, None]
    np.testing.assert_allclose(got, coefficient * semantic + (1 - coefficient) * area, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(got[2], area[2])  # not mixed: area label kept
    before_warmup = rectify(area, semantic, w, omega, flag, epoch=4, warmup_epochs=5)
    np.testing.assert_allclose(before_warmup, area, atol=1e-7)
    with pytest.raises(ValueError, match="class_counts"):
        rectification_weight(lam, counts[a], counts[b], [5, 0, 3])


def test_class_prototypes_are_head_of_kernel_columns():
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(6, 4)).astype(np.float32)  # D = 6, K = 4
    head = keras.layers.Dense(3)
    head.build((None, 6))
    got = np.asarray(class_prototypes(kernel, head))
    w, bias = (np.asarray(v) for v in head.weights)
    np.testing.assert_allclose(got, normalize(kernel.T @ w + bias), atol=1e-5)


def test_balanced_contrastive_loss_matches_numpy_and_split_keys():
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 1, 2, 2, 2])
    features = normalize(rng.normal(size=(12, 5)))
    prototypes = normalize(rng.normal(size=(4, 5)))
    labels2 = np.concatenate([labels, labels])
    got = np.asarray(balanced_contrastive_loss(features, labels2, prototypes, 0.5))
    np.testing.assert_allclose(got, np_bcl(features, labels2, prototypes, 0.5), rtol=1e-5)
    # Two "replicas" with 3 samples each, contrasting their anchors with all gathered keys.
    halves = []
    keys, key_labels = [], []
    for part in (slice(0, 3), slice(3, 6)):
        local = np.concatenate([features[:6][part], features[6:][part]])
        keys.append(local)
        key_labels.append(np.concatenate([labels[part], labels[part]]))
    keys, key_labels = np.concatenate(keys), np.concatenate(key_labels)
    for r, part in enumerate((slice(0, 3), slice(3, 6))):
        halves.append(
            balanced_contrastive_loss(
                keys[6 * r : 6 * r + 6],
                key_labels[6 * r : 6 * r + 6],
                prototypes,
                0.5,
                key_features=keys,
                key_labels=key_labels,
                anchor_offset=6 * r,
            )
        )
    np.testing.assert_allclose(np.concatenate(halves), got, rtol=1e-5)


def test_balanced_contrastive_loss_gradient_vs_finite_differences():
    rng = np.random.default_rng(5)
    labels = tf.constant([0, 1, 1, 0, 1, 1])
    prototypes = tf.constant(rng.normal(size=(2, 4)), tf.float32)
    x = tf.Variable(rng.normal(size=(6, 4)), dtype=tf.float32)

    def loss(value):
        return tf.reduce_sum(balanced_contrastive_loss(value, labels, prototypes, 0.5))

    with tf.GradientTape() as tape:
        value = loss(x)
    grad = tape.gradient(value, x).numpy()
    eps = 1e-2
    numeric = np.zeros_like(grad)
    for idx in np.ndindex(*grad.shape):
        step = np.zeros(grad.shape, np.float32)
        step[idx] = eps
        numeric[idx] = (loss(x + step) - loss(x - step)).numpy() / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-3, rtol=2e-2)


def soft_ce(y_true, y_pred):
    """Per-sample soft-label cross-entropy on logits."""
    return keras.losses.categorical_crossentropy(y_true, y_pred, from_logits=True)


def identity(images, seed):
    del seed
    return images


def test_model_trains_on_toy_problem():
    keras.utils.set_random_seed(0)
    images, labels, counts = toy_data()
    model = ConCutMixModel(
        tiny_classifier(), 4, counts, projection_dim=16, top_k=2, omega=0.5, l_d_warm=2
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=soft_ce, metrics=["sparse_categorical_accuracy"]
    )
    stage = toy_stage(images, labels, epochs=4)
    history = model.fit(stage, epochs=4, steps_per_epoch=15, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert history.history["contrastive_loss"][-1] < history.history["contrastive_loss"][0]
    test_images, test_labels, _ = toy_data(seed=1)
    result = model.evaluate(
        test_images.astype(np.float32), test_labels, verbose=0, return_dict=True
    )
    assert result["sparse_categorical_accuracy"] > 0.6  # chance 0.25
    assert set(result) == {"loss", "sparse_categorical_accuracy"}
    np.testing.assert_allclose(
        model.predict(test_images[:5], verbose=0), model.classifier(test_images[:5]), atol=1e-6
    )


def test_layer_losses_count_once():
    images, labels, counts = toy_data(num=32)
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.GlobalAveragePooling2D(name="features")(inputs)
    logits = keras.layers.Dense(
        4, name="classifier", kernel_regularizer=keras.regularizers.L2(0.5)
    )(features)
    model = ConCutMixModel(keras.Model(inputs, logits), 4, counts, projection_dim=4, top_k=2)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=soft_ce)
    penalty = 0.5 * float(np.sum(np.square(model.classifier.get_layer("classifier").kernel)))
    history = model.fit(toy_stage(images, labels, batch=32), epochs=1, verbose=0).history
    total = model.alpha * history["ce_loss"][0] + model.beta * history["contrastive_loss"][0]
    assert history["loss"][0] == pytest.approx(total + penalty, rel=1e-5)


def test_one_and_two_replicas_take_the_same_step():
    images, labels, counts = toy_data(num=64)
    batch = next(iter(toy_stage(images, labels, batch=8, seed=4)))
    # Force a mixed batch with rectification active so every term of the step is exercised.
    batch["mixed_flag"] = tf.ones_like(batch["mixed_flag"])
    batch["epoch"] = tf.fill(tf.shape(batch["epoch"]), 1)

    def one_step(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = ConCutMixModel(
                tiny_classifier(), 4, counts, projection_dim=8, top_k=2, omega=2.0, l_d_warm=1
            )
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=soft_ce)
        history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
        return [history.history["loss"], history.history["contrastive_loss"]] + [
            np.asarray(v) for v in model.weights
        ]

    results = run_under_strategies(one_step)
    assert_results_close(results, atol=1e-5, rtol=1e-4)


def test_config_and_save_round_trip_and_errors(tmp_path):
    images, _, counts = toy_data(num=8)
    model = ConCutMixModel(tiny_classifier(), 4, counts, projection_dim=8, top_k=3, omega=0.1)
    clone = ConCutMixModel.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    images = images.astype(np.float32)
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-6)
    np.testing.assert_allclose(loaded.prototypes(), model.prototypes(), atol=1e-6)
    inputs = keras.Input((8, 8, 3))
    no_features = keras.Model(inputs, keras.layers.Dense(4, name="classifier")(inputs))
    with pytest.raises(ValueError, match="features"):
        ConCutMixModel(no_features, 4, counts)
    with pytest.raises(ValueError, match="num_classes"):
        ConCutMixModel(tiny_classifier(), 5, counts)


def test_defaults_fit_the_model():
    model_args = set(inspect.signature(ConCutMixModel).parameters)
    for name, defaults in CONCUTMIX_DEFAULTS.items():
        args = {key: value for key, value in defaults.items() if key in model_args}
        assert {"alpha", "beta", "temperature", "top_k", "omega", "l_d_warm"} <= set(args), name
        ConCutMixModel(tiny_classifier(), 4, [9, 5, 3, 2], **args)
    assert CONCUTMIX_DEFAULTS["cifar10"]["top_k"] == 3
    assert CONCUTMIX_DEFAULTS["imagenet_lt"]["omega"] == pytest.approx(200 / 255)
