"""What training attaches to a model survives model.save(".keras") and keras.models.load_model."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import car_tf
from car_tf.car.state import ATTRIBUTE
from car_tf.concutmix.model import ConCutMixModel
from car_tf.models import create_model
from car_tf.models.heads import CosineClassifier
from car_tf.decoupled.terms import (
    FeatureNormPenalty,
    UniformityRegularizer,
    attach_decoupled_terms,
    feature_norm_penalty,
    hyperspherical_energy,
)
from concutmix_helpers import tiny_classifier, toy_data, toy_stage

COUNTS = [12, 6, 4, 2]
K = len(COUNTS)


def state_values(state):
    """{weight name: value} of a CARState, whatever weights it has."""
    values = {v.name: np.asarray(v.numpy()) for v in state.weights}
    assert len(values) == len(state.weights), "state weight names are not unique"
    return values


def assert_same_state(got, expected, atol=0.0):
    got, expected = state_values(got), state_values(expected)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=atol, rtol=0, err_msg=name)


def assert_same_weights(got, expected, atol=0.0):
    """Two lists of weights, in order, named alike ("layer/weight"; a model's own prefix aside)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.path.split("/")[-2:] == e.path.split("/")[-2:], (g.path, e.path)
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=atol, rtol=0, err_msg=e.path)


def assert_left_initial_values(state):
    """Training changed the state beyond its per-epoch statistics (EMA, power iteration, ...)."""
    fresh = state_values(car_tf.CARState(state.num_classes))
    values = state_values(state)
    changed = {name for name, value in values.items() if not np.array_equal(value, fresh[name])}
    assert changed - {"sigma_sum", "sigma_count", "last_sigma"}, changed


def toy_arrays(input_shape, seed=0, num=24):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, *input_shape)).astype(np.float32)
    y = np.repeat(np.arange(K), np.array(COUNTS) * num // sum(COUNTS)).astype(np.int32)
    return x, y[:num]


def dataset(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


def fit_car(model, x, y, epochs=1, **callback_args):
    model.fit(
        dataset(x, y), epochs=epochs, shuffle=False, verbose=0,
        callbacks=[car_tf.CARCallback(**callback_args)],
    )


def functional_model():
    inputs = keras.Input((5,))
    features = keras.layers.Dense(6, activation="relu", name="features")(inputs)
    return keras.Model(inputs, keras.layers.Dense(K, name="classifier")(features))


def sequential_model():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(K)]
    )


def resnet_model():
    return create_model("resnet32", K, input_shape=(16, 16, 3))


@pytest.mark.parametrize(
    "build, input_shape",
    [
        pytest.param(functional_model, (5,), id="functional"),
        pytest.param(sequential_model, (5,), id="sequential"),
        pytest.param(resnet_model, (16, 16, 3), id="create_model", marks=pytest.mark.slow),
    ],
)
def test_car_state_survives_keras_file_and_training_continues_from_it(tmp_path, build, input_shape):
    keras.utils.set_random_seed(0)
    x, y = toy_arrays(input_shape)
    model = build()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss=car_tf.CARLoss(COUNTS))
    fit_car(model, x, y)
    state = getattr(model, ATTRIBUTE)
    assert_left_initial_values(state)

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    loaded_state = getattr(loaded, ATTRIBUTE)
    assert isinstance(loaded_state, car_tf.CARState)
    assert_same_state(loaded_state, state)
    assert_same_weights(loaded.weights, model.weights)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)

    # A second epoch from the file matches a second epoch of the original: the EMA, the power
    # iteration vector and the optimizer continue rather than restart.
    fit_car(model, x, y)
    fit_car(loaded, x, y)
    assert loaded.loss.state is loaded_state
    assert_same_state(loaded_state, state, atol=1e-5)
    assert_same_weights(loaded.weights, model.weights, atol=1e-5)


def test_full_model_checkpoint_keeps_the_car_state(tmp_path):
    keras.utils.set_random_seed(1)
    x, y = toy_arrays((5,))
    model = functional_model()
    model.compile(keras.optimizers.SGD(0.1), loss=car_tf.CARLoss(COUNTS, spec_lambda=0.5))
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch_{epoch}.keras"))
    model.fit(
        dataset(x, y),
        epochs=2,
        verbose=0,
        callbacks=[car_tf.CARCallback(lambda_warmup_epochs=2), checkpoint],
    )
    loaded = keras.models.load_model(tmp_path / "epoch_2.keras")
    assert_same_state(getattr(loaded, ATTRIBUTE), model.car_state)
    first = keras.models.load_model(tmp_path / "epoch_1.keras")
    np.testing.assert_allclose(first.car_state.spec_lambda.numpy(), 0.0)  # ramp at epoch 0
    np.testing.assert_allclose(loaded.car_state.spec_lambda.numpy(), 0.25)  # half way


class Subclassed(keras.Model):
    def __init__(self, with_state=False, **kwargs):
        super().__init__(**kwargs)
        self.with_state = with_state
        self.dense = keras.layers.Dense(K)
        if with_state:
            self.car_state = car_tf.CARState(K)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, inputs):
        return self.dense(inputs)

    def get_config(self):
        return {**super().get_config(), "with_state": self.with_state}


keras.saving.register_keras_serializable(package="test_state_roundtrip")(Subclassed)


def test_a_subclassed_model_keeps_a_state_made_in_init_and_is_told_otherwise(tmp_path):
    x, y = toy_arrays((5,))
    model = Subclassed(with_state=True)
    model.compile("sgd", loss=car_tf.CARLoss(COUNTS))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*car_state")
        fit_car(model, x, y)
    assert_left_initial_values(model.car_state)
    model.save(tmp_path / "subclassed.keras")
    loaded = keras.models.load_model(tmp_path / "subclassed.keras")
    assert type(loaded) is Subclassed
    assert_same_state(loaded.car_state, model.car_state)

    # Without it: a built model is refused in one sentence, an unbuilt one is warned.
    built = Subclassed()
    built(x[:1])
    built.compile("sgd", loss=car_tf.CARLoss(COUNTS))
    with pytest.raises(ValueError, match=r"^Subclassed is built and takes no new layer; create the "
                       r"state in the model's __init__: self.car_state = car_tf.CARState\(4, "):
        fit_car(built, x, y)
    with pytest.warns(UserWarning, match="Subclassed does not rebuild car_state from its config"):
        car_tf.attach_car_state(Subclassed(), car_tf.CARLoss(COUNTS))


def test_attach_keeps_the_model_and_refuses_another_class_count():
    model = functional_model()
    x = np.ones((2, 5), np.float32)
    before = model(x)
    state = car_tf.attach_car_state(model, car_tf.CARLoss(COUNTS))
    assert isinstance(model, keras.Model) and model.car_state is state
    np.testing.assert_allclose(model(x), before)
    assert car_tf.attach_car_state(model, car_tf.CARLoss(COUNTS)) is state
    with pytest.raises(ValueError, match="CAR state for 4 classes but the CARLoss has 3"):
        car_tf.attach_car_state(model, car_tf.CARLoss([3, 2, 1]))


def test_concutmix_model_keeps_heads_and_car_state(tmp_path):
    keras.utils.set_random_seed(2)
    images, labels, counts = toy_data(num=64)
    model = ConCutMixModel(tiny_classifier(), 4, counts, projection_dim=8, top_k=2, l_d_warm=0)
    model.compile(keras.optimizers.SGD(0.05), loss=car_tf.CARLoss(counts))
    initial_head = [w.numpy() for w in model.projection_head.trainable_weights]
    model.fit(toy_stage(images, labels), epochs=1, steps_per_epoch=4, verbose=0,
              callbacks=[car_tf.CARCallback()])
    trained_head = [w.numpy() for w in model.projection_head.trainable_weights]
    assert not all(np.allclose(a, b) for a, b in zip(trained_head, initial_head))
    assert_left_initial_values(model.car_state)

    model.save(tmp_path / "concutmix.keras")
    loaded = keras.models.load_model(tmp_path / "concutmix.keras")
    assert isinstance(loaded, ConCutMixModel)
    assert_same_state(loaded.car_state, model.car_state)
    assert_same_weights(loaded.projection_head.weights, model.projection_head.weights)
    assert_same_weights(loaded.prototype_head.weights, model.prototype_head.weights)
    assert_same_weights(loaded.weights, model.weights)
    probe = images[:6].astype(np.float32)
    np.testing.assert_allclose(
        loaded.projection_head(loaded.embedder(probe)[0]),
        model.projection_head(model.embedder(probe)[0]),
        atol=1e-5,
    )
    # Without a CAR loss the config holds no state and the model loads without one.
    plain = ConCutMixModel(tiny_classifier(), 4, counts, projection_dim=8, top_k=2)
    assert ATTRIBUTE not in plain.get_config()
    plain.save(tmp_path / "plain.keras")
    assert not hasattr(keras.models.load_model(tmp_path / "plain.keras"), ATTRIBUTE)


def decoupled_model(head):
    inputs = keras.Input((6,))
    features = keras.layers.Dense(8, activation="relu", name="features")(inputs)
    if head == "cosine":
        classifier = CosineClassifier(K, scale=10.0, name="classifier")
    else:
        classifier = keras.layers.Dense(K, name="classifier")
    return keras.Model(inputs, classifier(features))


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_decoupled_terms_survive_keras_file_and_still_add_losses(tmp_path, head):
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(4).normal(size=(16, 6)).astype(np.float32)
    y = np.arange(16) % K
    model = attach_decoupled_terms(
        decoupled_model(head), uniformity_weight=0.5, feature_norm_weight=0.2, target_norm=3.0
    )
    model.compile(keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "decoupled.keras")
    loaded = keras.models.load_model(tmp_path / "decoupled.keras")

    regularizer = loaded.get_layer("classifier").kernel.regularizer
    assert isinstance(regularizer, UniformityRegularizer)
    assert regularizer.get_config() == UniformityRegularizer(0.5).get_config()
    penalties = [layer for layer in loaded.layers if isinstance(layer, FeatureNormPenalty)]
    assert [(p.weight, p.target_norm, p.kind) for p in penalties] == [(0.2, 3.0, "hinge")]

    loaded(x)  # the feature-norm layer records its loss on the call
    kernel = loaded.get_layer("classifier").kernel.numpy()
    features = keras.Model(loaded.inputs, loaded.get_layer("features").output)(x)
    expected = [0.5 * float(hyperspherical_energy(kernel)),
                0.2 * float(feature_norm_penalty(features, 3.0))]
    norms = np.linalg.norm(np.asarray(features), axis=1)
    np.testing.assert_allclose(expected[1], 0.2 * np.mean(np.maximum(3.0 - norms, 0)), rtol=1e-5)
    np.testing.assert_allclose(sorted(float(v) for v in loaded.losses), sorted(expected), rtol=1e-5)
    model(x)
    np.testing.assert_allclose(sorted(float(v) for v in loaded.losses),
                               sorted(float(v) for v in model.losses), rtol=1e-5)
    # The loaded model trains with both terms: one more epoch matches the original's.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert_same_weights(loaded.weights, model.weights, atol=1e-5)
