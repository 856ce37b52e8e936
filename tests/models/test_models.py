"""car_tf.models: registry, backbones, heads, normalisation, weights loading, features_model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf.models import (
    CHANNEL_STATS,
    CosineClassifier,
    PixelNormalization,
    create_model,
    features_model,
    list_models,
    load_model_weights,
    register_model,
)
from car_tf.models.resnet import GroupedConv2D
from car_tf.models.resnet_cifar import ZeroPadShortcut
from car_tf.models.vit import ClassTokenPositionEmbedding, gelu_erf, vision_transformer
from keras_roundtrip import assert_mixed_precision, assert_serialization_roundtrip

RNG = np.random.default_rng(0)


def pixels(*shape):
    return RNG.uniform(0, 255, size=shape).astype("float32")


def test_registry_lists_every_backbone():
    assert list_models() == [
        "efficientnet_lite0", "keras_hub", "keras_resnet50", "resnet32", "resnet50", "resnext50_32x4d",
        "vit_b16", "vit_s16",
    ]


def test_unknown_name_and_bad_arguments_raise_one_clear_sentence():
    with pytest.raises(ValueError, match="unknown model 'resnet18'; pass one of efficientnet_lite0, keras_hub, keras_resnet50, resnet32, resnet5"):
        create_model("resnet18", 10)
    with pytest.raises(ValueError, match="does not take option.*patch_size"):
        create_model("resnet32", 10, patch_size=4)
    with pytest.raises(ValueError, match="unknown classifier head 'arc'"):
        create_model("resnet32", 10, head="arc")
    with pytest.raises(ValueError, match=r"input_shape must be \(height, width, 3\)"):
        create_model("resnet32", 10, input_shape=(32, 32, 1))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model("resnet32", 0)
    with pytest.raises(ValueError, match="not a multiple of patch_size=16"):
        create_model("vit_s16", 10, input_shape=(40, 40, 3))
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet32")(lambda x: x)


@pytest.mark.parametrize(
    "name, trainable_params, feature_dim, normalization",
    [
        ("resnet50", 25_557_032, 2048, "imagenet"),
        ("resnext50_32x4d", 25_028_904, 2048, "imagenet"),
        ("vit_s16", 22_050_664, 384, "imagenet"),
        ("vit_b16", 86_567_656, 768, "imagenet"),
        ("efficientnet_lite0", 4_652_008, 1280, "efficientnet_lite"),
    ],
)
def test_imagenet_backbones_have_published_sizes_and_the_shared_layout(
    name, trainable_params, feature_dim, normalization
):
    model = create_model(name, 1000)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == trainable_params
    assert model.input_shape == (None, 224, 224, 3)
    assert (model.layers[1].mean, model.layers[1].std) == CHANNEL_STATS[normalization]
    assert model.get_layer("features").output.shape == (None, feature_dim)
    assert model.get_layer("classifier").kernel.shape == (feature_dim, 1000)
    if name != "vit_b16":  # same code as vit_s16, four times the cost
        assert_features_model_agrees(model, pixels(1, 224, 224, 3))


def assert_features_model_agrees(model, images):
    logits = model(images).numpy()
    features, feature_logits = features_model(model)(images)
    assert logits.shape == (len(images), model.output.shape[-1]) and np.all(np.isfinite(logits))
    assert features.shape == (len(images), model.get_layer("features").output.shape[-1])
    np.testing.assert_allclose(feature_logits, logits, rtol=1e-5, atol=1e-5)
    from_features = model.get_layer("classifier")(features)
    np.testing.assert_allclose(from_features, logits, rtol=1e-5, atol=1e-5)


def test_resnet32_layout_size_and_features_model():
    model = create_model("resnet32", 10, head="cosine", dropout=0.2)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 464_154 - 10  # no bias
    assert model.input_shape == (None, 32, 32, 3)
    assert (model.layers[1].mean, model.layers[1].std) == CHANNEL_STATS["cifar"]
    assert model.get_layer("features").output.shape == (None, 64)
    classifier = model.get_layer("classifier")
    assert isinstance(classifier, CosineClassifier) and classifier.kernel.shape == (64, 10)
    assert_features_model_agrees(model, pixels(3, 32, 32, 3))


def test_vit_takes_small_images_with_a_small_patch():
    model = create_model("vit_s16", 7, input_shape=(32, 32, 3), patch_size=8)
    assert model.get_layer("token_embedding").position_embedding.shape == (1, 17, 384)
    assert_features_model_agrees(model, pixels(2, 32, 32, 3))


def test_features_model_needs_a_features_layer():
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="no layer named 'features'"):
        features_model(keras.Model(inputs, keras.layers.Dense(2)(inputs)))


def numpy_cosine_logits(x, kernel, scale):
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    kernel = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    return scale * x @ kernel


def test_cosine_classifier_matches_numpy_and_finite_differences():
    layer = CosineClassifier(5, scale=16.0, dtype="float64")
    x = RNG.normal(size=(4, 6))
    logits = layer(x).numpy()
    assert layer.kernel.shape == (6, 5) and layer.scale == 16.0
    expected = numpy_cosine_logits(x, layer.kernel.numpy(), 16.0)
    np.testing.assert_allclose(logits, expected, rtol=1e-12)
    assert np.all(np.abs(logits) <= 16.0 + 1e-9)

    weights = RNG.normal(size=(4, 5))  # a fixed linear read-out of the logits
    x_tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tensor)
        objective = tf.reduce_sum(layer(x_tensor) * weights)
    grad_x, grad_kernel = tape.gradient(objective, [x_tensor, layer.kernel.value])

    def objective_numpy(x_value, kernel_value):
        return np.sum(numpy_cosine_logits(x_value, kernel_value, 16.0) * weights)

    kernel = layer.kernel.numpy()
    for analytic, value, perturb in [
        (grad_x, x, lambda v: objective_numpy(v, kernel)),
        (grad_kernel, kernel, lambda v: objective_numpy(x, v)),
    ]:
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[index] = 1e-6
            numeric[index] = (perturb(value + step) - perturb(value - step)) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_pixel_normalization_matches_numpy_eagerly_and_in_dataset_map():
    mean, std = CHANNEL_STATS["cifar"]
    layer = PixelNormalization(mean, std)
    images = pixels(2, 4, 4, 3)
    expected = (images / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(layer(images), expected, rtol=1e-5, atol=1e-5)
    mapped = next(iter(tf.data.Dataset.from_tensors(images).map(layer)))
    np.testing.assert_allclose(mapped, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="statistics for 3 channels but the input has 1"):
        PixelNormalization(mean, std)(pixels(1, 2, 2, 1))


def test_zero_pad_shortcut_matches_numpy():
    x = RNG.normal(size=(2, 5, 5, 4)).astype("float32")
    got = ZeroPadShortcut(8)(x).numpy()
    expected = np.pad(x[:, ::2, ::2, :], [(0, 0), (0, 0), (0, 0), (2, 2)])
    np.testing.assert_array_equal(got, expected)
    assert ZeroPadShortcut(8).compute_output_shape((None, 5, 5, 4)) == (None, 3, 3, 8)


def test_class_token_and_position_embedding():
    layer = ClassTokenPositionEmbedding()
    tokens = RNG.normal(size=(2, 3, 4)).astype("float32")
    out = layer(tokens).numpy()
    position = layer.position_embedding.numpy()[0]
    np.testing.assert_allclose(out[:, 1:], tokens + position[1:], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(position[0], (2, 4)), rtol=1e-6)


def test_gelu_erf_is_exact_gelu():
    x = np.linspace(-5, 5, 41).astype("float32")
    np.testing.assert_allclose(gelu_erf(x), keras.ops.gelu(x, approximate=False), atol=1e-6)


def test_grouped_conv_matches_keras_conv_and_exports_to_onnx():
    import onnxruntime
    import tf2onnx

    reference = keras.layers.Conv2D(8, 3, strides=2, groups=4, use_bias=False)
    grouped = GroupedConv2D(8, 3, strides=2, groups=4)
    x = tf.constant(RNG.normal(size=(2, 7, 7, 8)).astype("float32"))
    reference.build(x.shape)
    grouped.build(x.shape)
    grouped.set_weights(reference.get_weights())

    @tf.function
    def outputs_and_gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            objective = tf.reduce_sum(tf.sin(y))
        return [y, *tape.gradient(objective, [x, layer.kernel.value])]

    for want, got in zip(outputs_and_gradients(reference), outputs_and_gradients(grouped)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    serve = tf.function(grouped.__call__, input_signature=[tf.TensorSpec((None, 7, 7, 8))])
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=17)
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    for batch in (1, 3):
        images = RNG.normal(size=(batch, 7, 7, 8)).astype("float32")
        onnx_out = session.run(None, {session.get_inputs()[0].name: images})[0]
        np.testing.assert_allclose(onnx_out, grouped(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="use_bias=False"):
        GroupedConv2D(8, 3, groups=4, use_bias=True)


@pytest.mark.parametrize(
    "layer, inputs",
    [
        (PixelNormalization(*CHANNEL_STATS["imagenet"]), pixels(2, 4, 4, 3)),
        (CosineClassifier(3, scale=10.0), RNG.normal(size=(2, 6)).astype("float32")),
        (ZeroPadShortcut(6), RNG.normal(size=(2, 4, 4, 2)).astype("float32")),
        (ClassTokenPositionEmbedding(), RNG.normal(size=(2, 3, 4)).astype("float32")),
        (GroupedConv2D(4, 3, groups=2), RNG.normal(size=(2, 5, 5, 4)).astype("float32")),
        (keras.layers.Dense(4, activation=gelu_erf), RNG.normal(size=(2, 3)).astype("float32")),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, keras.layers.Layer) else "",
)
def test_layers_round_trip_and_follow_mixed_precision(layer, inputs):
    assert_serialization_roundtrip(layer, inputs)
    assert_mixed_precision(layer, inputs)


def test_resnet32_round_trips_and_keeps_float32_logits_under_mixed_precision():
    images = pixels(2, 32, 32, 3)
    model = create_model("resnet32", 5, head="cosine", dropout=0.1)
    assert_serialization_roundtrip(model, images, atol=1e-5)
    assert_mixed_precision(lambda: create_model("resnet32", 5), images)


def tiny_vit(image_size=8):
    images = keras.Input((image_size, image_size, 3))
    features = vision_transformer(images, patch_size=4, dim=8, depth=2, num_heads=2, mlp_dim=16)
    return keras.Model(images, keras.layers.Dense(3, name="classifier", dtype="float32")(features))


def test_vision_transformer_round_trips_and_follows_mixed_precision():
    images = pixels(2, 8, 8, 3)
    assert_serialization_roundtrip(tiny_vit(), images, atol=1e-5)
    assert_mixed_precision(tiny_vit, images)


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_load_and_mismatches_name_the_fix(tmp_path):
    model = create_model("resnet32", 10, head="cosine")
    path = tmp_path / "resnet32.weights.h5"
    model.save_weights(path)
    model.save(tmp_path / "resnet32.keras")
    images = pixels(2, 32, 32, 3)
    reloaded = create_model("resnet32", 10, head="cosine", weights=path)
    np.testing.assert_allclose(reloaded(images), model(images), rtol=1e-6)

    other = create_model("resnet32", 100, head="cosine")
    for checkpoint in (path, tmp_path / "resnet32.keras"):
        with pytest.raises(ValueError, match=(
            rf"checkpoint .*{checkpoint.name} has 10 classes but the model has 100; "
            r"pass --num_classes=10 or a checkpoint trained on 100 classes\."
        )):
            load_model_weights(other, checkpoint)

    unrelated = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    unrelated.save_weights(tmp_path / "unrelated.weights.h5")
    with pytest.raises(ValueError, match="does not fit model 'resnet32' with input shape"):
        load_model_weights(model, tmp_path / "unrelated.weights.h5")
    with pytest.raises(ValueError, match="does not exist"):
        load_model_weights(model, tmp_path / "missing.weights.h5")
    with pytest.raises(ValueError, match="neither .weights.h5 nor .keras"):
        load_model_weights(model, __file__)


@pytest.mark.slow
def test_tiny_resnet32_learns_a_separable_toy_problem():
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    num_classes = 4
    colours = rng.uniform(40, 215, size=(num_classes, 3))

    def sample(n):
        labels = rng.integers(0, num_classes, size=n)
        images = colours[labels][:, None, None, :] + rng.normal(0, 30, size=(n, 8, 8, 3))
        return np.clip(images, 0, 255).astype("float32"), labels.astype("int32")

    model = create_model("resnet32", num_classes, input_shape=(8, 8, 3))
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        run_eagerly=True,  # tracing the train step costs more than these few steps
    )
    model.fit(*sample(256), batch_size=16, epochs=1, verbose=0)
    accuracy = model.evaluate(*sample(256), verbose=0, return_dict=True)["accuracy"]
    assert accuracy > 0.5, f"accuracy {accuracy} after 16 steps; chance is 0.25"
