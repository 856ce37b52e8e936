"""The feature cache of frozen backbones: values, reuse keyed by weights and data, safe writes."""

import keras
import numpy as np
import pytest

from car_tf.data.sources import LabeledData
from car_tf.models import create_model, feature_cache, features_model


def _data(count=10, seed=0):
    rng = np.random.default_rng(seed)
    return LabeledData(labels=np.arange(count) % 3, class_names=["a", "b", "c"],
                       images=rng.integers(0, 256, size=(count, 16, 16, 3), dtype=np.uint8))


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return create_model("resnet32", 3, input_shape=(16, 16, 3))


def _features(model, data, folder, **options):
    return feature_cache.cached_features(model, data, recipe="cifar", image_size=16, split="train",
                                         progress=False, cache_folder=folder, **options)


def test_cached_features_are_the_models_features_and_are_reused(tmp_path, monkeypatch):
    data, model = _data(), _model()
    features, labels = _features(model, data, tmp_path)
    expected = features_model(model, with_logits=False)(data.images.astype("float32"), training=False)
    np.testing.assert_allclose(features, keras.ops.convert_to_numpy(expected), atol=1e-5)
    np.testing.assert_array_equal(labels, data.labels)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # Another model object with the same weights (a second seed or method of the run) reads the file.
    monkeypatch.setattr(feature_cache, "extract", lambda *a, **k: pytest.fail("extracted again"))
    again, _ = _features(_model(), data, tmp_path)
    np.testing.assert_array_equal(again, features)


def test_other_weights_or_other_images_get_their_own_file(tmp_path):
    data = _data()
    _features(_model(0), data, tmp_path)
    _features(_model(1), data, tmp_path)  # other weights
    _features(_model(0), _data(seed=1), tmp_path)  # other images
    _features(_model(0), data.subset([0, 1, 2, 3]), tmp_path)  # fewer images
    assert len(list(tmp_path.glob("train-*.npz"))) == 4


def test_a_write_killed_midway_leaves_no_cache_that_looks_complete(tmp_path):
    data, model = _data(), _model()
    features, _ = _features(model, data, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:200])  # a torn file (the rename makes this one impossible)
    (tmp_path / f"{path.stem}.tmp-99999.npz").write_bytes(b"half")  # a killed writer's leftover
    again, _ = _features(model, data, tmp_path)  # warns, extracts again, replaces the file
    np.testing.assert_allclose(again, features, atol=1e-6)
    assert feature_cache.load_feature_cache(path).features.shape == features.shape


def test_head_model_trains_the_networks_own_head(tmp_path):
    model = _model()
    head = feature_cache.head_model(model)
    assert head.get_layer("features") is not None and head.input_shape == (None, 64)
    head.get_layer("classifier").kernel.assign(np.full((64, 3), 0.25, "float32"))
    images = _data().images.astype("float32")
    features = features_model(model, with_logits=False)(images, training=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images, training=False)),
                               keras.ops.convert_to_numpy(head(features)), atol=1e-5)
    with pytest.raises(ValueError, match="no layer named 'features'"):
        feature_cache.head_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
