"""The sparse EMA (SparseCARState): its truncated recurrence, products, penalty, saving, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import car_tf
from car_tf.car.carrier import attach_car_state
from test_math import feed_ema, np_frequency_weights, np_sparse_ema


@pytest.mark.parametrize("ema_init", ["first_batch", "zeros"])
def test_sparse_ema_matches_the_truncated_recurrence(ema_init):
    """Hundreds of steps, most classes absent from most batches, evaluation steps interleaved."""
    k, steps, entries, beta = 40, 400, 6, 0.9
    state = car_tf.SparseCARState(k, entries)
    for batches in feed_ema(state, beta, ema_init, steps, 0.85 ** np.arange(k)):
        want, got = np_sparse_ema(batches, beta, ema_init, entries), state.ema_matrix().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * want.max())
    seen = np.any([present for _, present in batches], axis=0)
    assert ((state.ema_values.numpy() != 0).sum(axis=1)[seen] == entries).all() and not seen.all()
    assert (state.ema_rest.numpy()[seen] > 0).all()
    in_batch = np.mean([present for _, present in batches], axis=0)
    assert np.mean(in_batch < 0.1) > 0.5  # most classes are absent from most batches


def sparse_state_after_steps(k, entries, rng, steps=4):
    state = car_tf.SparseCARState(k, entries)
    ids = np.arange(k, dtype=np.int32)
    state.update_ema(tf.constant(rng.uniform(size=(k, k)), tf.float32), ids, 1.0, 1.0, 1.0)
    for _ in range(steps):  # columns of different ages
        present = rng.choice(k, size=10, replace=False).astype(np.int32)
        state.update_ema(tf.constant(rng.uniform(size=(10, k)), tf.float32), present, 0.8, 0.2, 1.0)
    return state


def test_sparse_products_match_its_dense_matrix():
    k, rng = 60, np.random.default_rng(9)
    state = sparse_state_after_steps(k, 7, rng)
    dense = state.ema_matrix().numpy().astype(np.float64)
    assert (state.ema_rest.numpy() > 0).all()
    x, y = (rng.normal(size=(k, 3)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(state.ema_times(x).numpy(), dense @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.ema_transpose_times(y).numpy(), dense.T @ y, rtol=1e-5, atol=1e-6)


def linear_fit(counts, entries, epochs=2, seed=0):
    rng = np.random.default_rng(seed)
    k = len(counts)
    y = rng.choice(k, size=640, p=np.asarray(counts) / np.sum(counts)).astype("int32")
    x = (rng.normal(size=(640, 12)) + 2.0 * rng.normal(size=(k, 12))[y]).astype("float32")
    keras.utils.set_random_seed(seed)
    loss = car_tf.CARLoss(counts, sparse_ema_entries=entries, spectral_method="power")
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(k)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
    history = model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=[car_tf.CARCallback(loss)])
    return model, loss, history.history


COUNTS = np.maximum(200 * 50.0 ** (-np.arange(30) / 29), 1).astype(int)


def test_as_many_entries_as_classes_train_exactly_as_the_dense_ema():
    dense, _, dense_history = linear_fit(COUNTS, None)
    sparse, _, sparse_history = linear_fit(COUNTS, len(COUNTS))
    assert isinstance(sparse.car_state, car_tf.SparseCARState)
    np.testing.assert_allclose(sparse_history["loss"], dense_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(sparse.car_state.ema_matrix().numpy(), dense.car_state.ema_matrix().numpy(),
                               rtol=1e-5, atol=1e-7)
    for got, want in zip(sparse.trainable_weights, dense.trainable_weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_sparse_penalty_is_the_spectral_norm_of_its_matrix_and_near_the_dense_one():
    model, loss, history = linear_fit(COUNTS, 4, epochs=3)
    state = model.car_state
    a = state.ema_matrix().numpy().astype(np.float64) * np_frequency_weights(COUNTS, 0.2)[None, :]
    assert float(state.last_sigma.numpy()) == pytest.approx(np.linalg.norm(a, 2), rel=1e-4)
    _, _, dense_history = linear_fit(COUNTS, None, epochs=3)
    np.testing.assert_allclose(history["car_spectral_norm"], dense_history["car_spectral_norm"], rtol=0.05)
    assert history["loss"][-1] < history["loss"][0]


def test_a_saved_model_keeps_its_sparse_state(tmp_path):
    model, loss, _ = linear_fit(COUNTS, 5, epochs=1)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.car_state, car_tf.SparseCARState) and loaded.car_state.sparse_entries == 5
    for name in ("ema_rows", "ema_values", "ema_decay", "power_u"):
        np.testing.assert_array_equal(getattr(loaded.car_state, name).numpy(),
                                      getattr(model.car_state, name).numpy())
    with pytest.raises(ValueError, match=r"sparse EMA of 5 entries per class but the CARLoss asks "
                                         r"for a dense EMA; build the loss with sparse_ema_entries=5\.$"):
        attach_car_state(loaded, car_tf.CARLoss(COUNTS))


@pytest.mark.parametrize("entries", [0, 31, 2.5, True, -3])
def test_entries_outside_one_to_k_are_refused_in_one_sentence(entries):
    with pytest.raises(ValueError, match=r"^sparse_ema_entries=.* must be a whole number from 1 to the "
                                         r"30 classes \(for example 32\), or None for the dense EMA\.$"):
        car_tf.CARLoss(COUNTS, sparse_ema_entries=entries)
