"""Fine-tuning from the Keras ecosystem's published backbones (with random weights, saved locally)."""

import json

import h5py
import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from car_tf.training import optimizers
from car_tf import train as train_cli
from car_tf.models import create_model, ecosystem, features_model

from train_helpers import parse, tiny_args


def small_resnet_preset(folder, image_size=32):
    """A keras-hub ResNet preset folder (backbone + image converter) with random weights."""
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(None, None, 3),
    )
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(image_size, image_size),
        scale=[1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)],
        offset=[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
    )
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


def small_vit_preset(folder, image_size=32):
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    converter = keras_hub.layers.ViTImageConverter(image_size=(image_size, image_size), scale=1 / 127.5, offset=-1.0)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def cifar_images(cifar10_dir):
    """Eight real CIFAR-10 test images, float32 pixels [8, 32, 32, 3]."""
    files = sorted((cifar10_dir / "test").rglob("*.jpg"))[::1250][:8]
    return np.stack([tf.io.decode_jpeg(tf.io.read_file(str(f))).numpy() for f in files]).astype("float32")


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_keras_hub_preset_features_match_the_ecosystem_model(family, cifar_images, tmp_path):
    preset = (small_resnet_preset if family == "resnet" else small_vit_preset)(tmp_path / family)
    model = create_model("keras_hub", 7, weights=str(preset), input_shape=(32, 32, 3))
    features = np.asarray(features_model(model)(cifar_images)[0])

    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    converter = keras_hub.layers.ImageConverter.from_preset(str(preset))
    output = backbone(converter(cifar_images))
    expected = keras.ops.mean(output, axis=(1, 2)) if family == "resnet" else output[:, 0]
    np.testing.assert_allclose(features, np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert model.output_shape == (None, 7)  # a new head, sized to the data


def test_keras_applications_resnet50_features_match_with_caffe_preprocessing(cifar_images, tmp_path):
    images = np.asarray(tf.image.resize(cifar_images, (64, 64)))
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg")
    path = tmp_path / "resnet50_notop.weights.h5"
    reference.save_weights(str(path))
    model = create_model("keras_resnet50", 4, weights=str(path), input_shape=(64, 64, 3))
    features = np.asarray(features_model(model)(images)[0])
    expected = reference(keras.applications.resnet50.preprocess_input(images.copy()))
    np.testing.assert_allclose(features, np.asarray(expected), rtol=1e-5, atol=1e-5)
    reloaded = keras.saving.load_model(_saved(model, tmp_path))
    np.testing.assert_allclose(np.asarray(reloaded(images)), np.asarray(model(images)), rtol=1e-5, atol=1e-5)


def _saved(model, folder):
    path = folder / "model.keras"
    model.save(str(path))
    return path


def test_published_weights_on_the_wrong_model_are_one_sentence(tmp_path):
    preset = small_resnet_preset(tmp_path / "p")
    with pytest.raises(ValueError, match="pass --model=keras_hub"):
        create_model("resnet50", 3, weights=str(preset))
    with pytest.raises(ValueError, match="pass --model=keras_resnet50"):
        create_model("resnet32", 3, weights="imagenet")
    with pytest.raises(ValueError, match="needs a keras-hub preset"):
        create_model("keras_hub", 3, weights=None)
    with pytest.raises(ValueError, match=r"takes 32x32 images .*--image_size=32"):
        create_model("keras_hub", 3, weights=str(small_vit_preset(tmp_path / "v")), input_shape=(64, 64, 3))


def test_offline_downloads_name_the_file_and_the_folder(monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", no_network)
    with pytest.raises(ValueError, match=r"resnet_50_imagenet could not be downloaded .*kagglehub/models/keras/resnetv1"):
        create_model("keras_hub", 3, weights="resnet_50_imagenet")

    def fetch_failure(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- unreachable")

    monkeypatch.setattr(keras.utils, "get_file", fetch_failure)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", fetch_failure)
    with pytest.raises(ValueError, match=rf"put {ecosystem.RESNET50_NOTOP_FILE} in .*/models/"):
        create_model("keras_resnet50", 3, weights="imagenet", input_shape=(64, 64, 3))


def test_backbone_multiplier_and_freeze_against_plain_sgd():
    """Head steps as plain SGD; backbone steps 0 while frozen, then multiplier x plain SGD's."""
    def build():
        inputs = keras.Input((3,))
        features = keras.layers.Dense(4, name="features")(inputs)
        return keras.Model(inputs, keras.layers.Dense(2, name="classifier")(features))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    model = build()
    start = [w.numpy() for w in model.weights]
    optimizer = optimizers.FineTuningSGD(
        0.1, backbone_variables=optimizers.backbone_variable_paths(model), backbone_lr_multiplier=0.25,
        freeze_steps=2, weight_decay=0.01,
    )
    for step in range(4):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        before = [w.numpy() for w in model.weights]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        # The step plain SGD (decoupled decay included) would take from the same point:
        probe = [keras.Variable(b) for b in before]
        keras.optimizers.SGD(0.1, weight_decay=0.01).apply_gradients(zip(grads, probe))
        full = [p.numpy() - b for p, b in zip(probe, before)]
        taken = [w.numpy() - b for w, b in zip(model.weights, before)]
        backbone_scale = 0.0 if step < 2 else 0.25
        for name, got, want in zip(["fk", "fb", "ck", "cb"], taken, full):
            scale = backbone_scale if name.startswith("f") else 1.0
            np.testing.assert_allclose(got, scale * want, rtol=1e-5, atol=1e-7, err_msg=f"{name} step {step}")
    assert not np.allclose(model.weights[0].numpy(), start[0])
    config = optimizer.get_config()
    assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).get_config() == config


@pytest.mark.slow
@pytest.mark.parametrize("method", [["--method=car"], ["--method=concutmix", "--ccm_top_k=2"], ["--method=decoupled"]])
def test_tiny_fine_tuning_run_freezes_unfreezes_and_evaluates(method, tiny_folder, tmp_path):
    preset = small_resnet_preset(tmp_path / "preset", image_size=16)
    run = tmp_path / "run"
    args = tiny_args(
        tiny_folder, run, "--model=keras_hub", f"--pretrained={preset}", "--freeze_backbone_epochs=1",
        "--backbone_lr_multiplier=0.1", "--epochs=2", *method,
    )
    report = train_cli.train_and_evaluate(parse(args))
    assert 0.0 <= report["top1"] <= 1.0 and len(report["per_class"]) == 3

    model = create_model("keras_hub", 3, weights=str(preset), input_shape=(16, 16, 3),
                         head="cosine" if "decoupled" in method[0] else "linear")
    backbone = next(layer for layer in model.layers if isinstance(layer, keras_hub.models.Backbone))
    initial = [w.numpy() for w in backbone.trainable_weights]
    after = {}
    for epoch in (1, 2):
        with h5py.File(run / "checkpoints" / f"epoch_000{epoch}.weights.h5", "r") as f:
            stored = []
            f.visititems(lambda name, obj: stored.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
        after[epoch] = stored
    # Every backbone kernel is found unchanged in the epoch-1 checkpoint and changed by epoch 2.
    def found(weights, stored):
        return sum(any(v.shape == w.shape and np.array_equal(v, w) for _, v in stored) for w in weights)

    kernels = [w for w in initial if w.ndim == 4]
    assert found(kernels, after[1]) == len(kernels)
    assert found(kernels, after[2]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["pretrained"] == str(preset) and info["pixel_normalization"]["channel_order"] == "rgb"
    np.testing.assert_allclose(
        info["pixel_normalization"]["std"], [0.229, 0.224, 0.225], rtol=1e-6
    )
    if method == ["--method=car"]:  # the exported files apply the same preprocessing (parity-checked)
        from export.__main__ import export_run

        summary = export_run(run, "both")
        assert max(summary["onnx"]["max_abs_diff_logits"].values()) <= 1e-4 and summary["parity_images"] > 0
