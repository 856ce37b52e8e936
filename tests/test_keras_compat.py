"""Every Keras internal car_tf relies on (car_tf.keras_compat) still exists and behaves as used.

A failure here after a Keras upgrade names the keras_compat function to adapt.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf import keras_compat
from strategy_helpers import strategies


def tiny_model(**dense_kwargs):
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, **dense_kwargs)(inputs))


def toy_batch(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32)


class RecordingLoss(keras.losses.Loss):
    """Mean squared error that records, per call, whether Keras is in its symbolic build pass."""

    def __init__(self):
        super().__init__()
        self.symbolic = []

    def call(self, y_true, y_pred):
        self.symbolic.append(keras_compat.in_symbolic_build())
        return keras.ops.mean((y_true - y_pred) ** 2, axis=-1)


def test_functional_model_class():
    model = tiny_model()
    assert type(model) is keras_compat.FunctionalModel, (
        f"keras.Model(inputs, outputs) is now {type(model)}, not keras_compat.FunctionalModel; "
        "update keras_compat.FunctionalModel (CARFunctional subclasses it)."
    )


def test_in_symbolic_build_marks_the_build_pass_of_fit_only():
    assert keras_compat.in_symbolic_build() is False
    with strategies()["one_device"].scope():
        model = tiny_model()
        loss = RecordingLoss()
        model.compile("sgd", loss=loss)
    model.fit(*toy_batch(), batch_size=4, epochs=1, verbose=0)
    assert loss.symbolic[:1] == [True], (
        "keras_compat.in_symbolic_build() was not True in fit's first (shape-only) loss call under "
        f"a strategy (calls: {loss.symbolic}); CARLoss relies on it."
    )
    assert loss.symbolic[-1] is False, "in_symbolic_build() stays True in the real train step"


def test_build_compiled_state_builds_loss_and_metrics():
    x, y = toy_batch()
    with strategies()["one_device"].scope():
        model = tiny_model()
        loss = RecordingLoss()
        model.compile("sgd", loss=loss, metrics=["mae"])
        assert not model.metrics_variables[2:], "compile already built the metrics"
        keras_compat.build_compiled_state(model, (x[:4], y[:4]))
    assert loss.symbolic == [True], "build_compiled_state did not run the shape-only loss pass"
    assert all(layer.built for layer in model.layers)
    assert len(model.metrics_variables) > 2, "build_compiled_state did not build the metrics"


def test_skip_fit_build_pass():
    with strategies()["one_device"].scope():
        model = tiny_model()
        loss = RecordingLoss()
        model.compile("sgd", loss=loss, metrics=["mae"])
    keras_compat.skip_fit_build_pass(model)
    history = model.fit(*toy_batch(), batch_size=4, epochs=1, verbose=0)
    assert True not in loss.symbolic, (
        "fit ran its own build pass after keras_compat.skip_fit_build_pass; Keras's "
        "_maybe_symbolic_build has changed."
    )
    assert set(history.history) == {"loss", "mae"}


def test_loss_tracker_is_the_loss_log():
    class ConstantLoss(keras.Model):
        def train_step(self, data):
            keras_compat.loss_tracker(self).update_state(7.0)
            return {m.name: m.result() for m in self.metrics}

    inputs = keras.Input((3,))
    model = ConstantLoss(inputs, keras.layers.Dense(2)(inputs))
    model.compile("sgd", loss="mse")
    tracker = keras_compat.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean) and tracker.name == "loss"
    assert any(m is tracker for m in model.metrics), "the loss tracker left model.metrics"
    history = model.fit(*toy_batch(), batch_size=4, epochs=2, verbose=0)
    assert history.history["loss"] == [7.0, 7.0]


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_aggregated_layer_loss_is_what_compute_loss_adds(strategy):
    strategy = strategies()[strategy]
    x, y = toy_batch()
    with strategy.scope():
        model = tiny_model(kernel_regularizer=keras.regularizers.L2(0.5))
        model.compile("sgd", loss="mse")

    def totals(x, y):
        y_pred = model(x)
        total = model.compute_loss(x, y, y_pred)
        layers = sum(keras_compat.aggregated_layer_loss(model, term) for term in model.losses)
        return total, layers

    total, layers = strategy.run(tf.function(totals), (x, y))
    replicas = strategy.num_replicas_in_sync
    total, layers = (strategy.experimental_local_results(v)[0].numpy() for v in (total, layers))
    kernel = model.layers[-1].kernel.numpy()
    np.testing.assert_allclose(layers, 0.5 * np.sum(kernel**2) / replicas, rtol=1e-5)
    mse = np.mean((model(x).numpy() - y) ** 2)  # strategy.run gives each replica all of x
    np.testing.assert_allclose(total - layers, mse / replicas, rtol=1e-5, err_msg=(
        "compute_loss minus keras_compat.aggregated_layer_loss is no longer the compiled loss; "
        "ConCutMixModel's alpha weighting relies on it."
    ))


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_optimizer_variable_index_in_update_step(strategy):
    strategy = strategies()[strategy]
    seen = []

    class Recording(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            seen.append((keras_compat.optimizer_variable_index(self, variable), variable.shape[0]))
            super().update_step(gradient, variable, learning_rate)

    with strategy.scope():
        variables = [keras.Variable(np.full(n, 1.0, np.float32), name=f"v{n}") for n in (1, 2, 3)]
        optimizer = Recording(learning_rate=0.5)
        optimizer.build(variables)

    @tf.function
    def step():
        grads = [tf.ones_like(v) * (i + 1) for i, v in enumerate(variables)]
        optimizer.apply_gradients(zip(grads, variables))

    strategy.run(step)
    assert set(seen) == {(0, 1), (1, 2), (2, 3)}, (
        f"(optimizer_variable_index, size) in update_step: {seen}; a variable of size n is "
        "number n - 1 of the list the optimizer was built with."
    )
    replicas = strategy.num_replicas_in_sync  # the replicas' gradients are summed
    for i, v in enumerate(variables):
        np.testing.assert_allclose(v.numpy(), 1.0 - 0.5 * (i + 1) * replicas)
