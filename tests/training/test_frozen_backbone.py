"""--frozen_backbone: the head trains on cached features, and the run is an ordinary run."""

import json

import keras
import numpy as np
import pytest

from car_tf import train as train_cli
from car_tf.evaluation.predictors import load_predictor
from car_tf.data import sources
from car_tf.models import create_model, feature_cache

from train_helpers import parse, tiny_args
from test_run_directory import snapshot


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(folder))
    return folder / "features"


def _frozen(data_dir, run, *extra):
    return parse(tiny_args(data_dir, run, "--frozen_backbone", "--lr_schedule=constant", *extra))


def test_a_frozen_run_trains_the_head_and_saves_the_whole_network(tiny_folder, tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "car"
    report = train_cli.train_and_evaluate(_frozen(tiny_folder, run, "--method=car"))
    assert sorted(p.name.split("-")[0] for p in cache_dir.glob("*.npz")) == ["test", "train"]
    # model.keras is images -> logits and scores the test images as the head scored their features.
    predictor = load_predictor(run)
    assert predictor.model.input_shape == (None, 16, 16, 3)
    test_images = sorted((tiny_folder / "test").rglob("*.png"))
    images = np.stack([keras.utils.img_to_array(keras.utils.load_img(p)) for p in test_images])
    predicted = predictor.predict(images).argmax(-1)
    labels = np.array(["abc".index(p.parent.name) for p in test_images])
    assert np.isclose(np.mean(predicted == labels), report["top1"])
    assert json.loads((run / "run.json").read_text())["image_size"] == 16
    # A second method on the same weights and data extracts nothing.
    monkeypatch.setattr(feature_cache, "extract", lambda *a, **k: pytest.fail("extracted again"))
    train_cli.train_and_evaluate(_frozen(tiny_folder, tmp_path / "ce", "--method=ce"))


def test_a_frozen_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_folder, tmp_path, cache_dir):
    whole = tmp_path / "whole"
    train_cli.train_and_evaluate(_frozen(tiny_folder, whole, "--method=car"))
    parts = tmp_path / "parts"
    train_cli.train_and_evaluate(_frozen(tiny_folder, parts, "--method=car", "--epochs=1"))
    train_cli.train_and_evaluate(_frozen(tiny_folder, parts, "--method=car"))  # extends 1 -> 3 epochs
    for a, b in zip(keras.saving.load_model(whole / "model.keras").weights,
                    keras.saving.load_model(parts / "model.keras").weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), atol=1e-6)


@pytest.mark.parametrize("extra, named", [
    (["--randaugment"], "--randaugment"),
    (["--freeze_backbone_epochs=1"], "--freeze_backbone_epochs"),
    (["--method=concutmix"], "concutmix"),
])
def test_what_cached_features_cannot_do_is_refused_before_writing(tiny_folder, tmp_path, cache_dir, extra, named):
    run = tmp_path / "run"
    run.mkdir()
    before = snapshot(run)
    with pytest.raises(ValueError, match=named) as error:
        train_cli.train_and_evaluate(_frozen(tiny_folder, run, *extra))
    assert "--frozen_backbone" in str(error.value) and snapshot(run) == before


def test_unfreeze_from_trains_only_the_layers_from_it_on(tiny_folder, tmp_path):
    run = tmp_path / "partial"
    names = [layer.name for layer in create_model("resnet32", 3, input_shape=(16, 16, 3)).layers]
    batch_norms = [n for n in names if "bn" in n]
    pick = names[names.index(batch_norms[-2]) - 1]  # the layer before the second-last batch norm
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, f"--unfreeze_from={pick}", "--epochs=1")))
    model = keras.saving.load_model(run / "model.keras")
    moving_means = {n: keras.ops.convert_to_numpy(model.get_layer(n).moving_mean) for n in batch_norms}
    frozen = batch_norms[:-2]
    assert all(not moving_means[n].any() for n in frozen)  # inference mode: still their initial zeros
    assert all(moving_means[n].any() for n in batch_norms[-2:])
    with pytest.raises(ValueError, match="--unfreeze_from=nope names no backbone layer"):
        train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, tmp_path / "x", "--unfreeze_from=nope")))


def test_lora_under_a_method_that_rebuilds_the_model_is_refused_before_writing(tiny_folder, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="decoupled clones the model.*drop --lora_rank"):
        train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=decoupled", "--lora_rank=4")))
    assert not run.exists()
