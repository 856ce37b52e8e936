"""DLSA's cascade, classifiers, routed model, feature cache and CLI on tiny synthetic data."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf.dlsa import cascade
from car_tf.dlsa.classifiers import ClassifierTrainingConfig
from car_tf.dlsa.fit import DLSAConfig, fit_dlsa
from car_tf.dlsa.flow_training import FlowTrainingConfig
from car_tf.dlsa.routed_classifier import DLSARoutedClassifier
from car_tf.losses.logit_adjusted import logit_adjusted_cross_entropy

NUM_CLASSES, DIM = 5, 6
COUNTS = [150, 80, 40, 20, 10]
TRAIN_COUNTS = [1500, 300, 60, 30, 10]  # many, many, medium, medium, few
TINY = DLSAConfig(
    depth=2,
    num_components=12,
    prior_stddev=1.0,
    flow=FlowTrainingConfig(epochs=5, batch_size=128),
    classifier=ClassifierTrainingConfig(epochs=10, batch_size=32),
)


def _blobs(rng, counts, centers):
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    return (centers[labels] + rng.normal(size=(labels.size, DIM))).astype("float32"), labels


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(NUM_CLASSES, DIM)) * 2.5
    train = _blobs(rng, COUNTS, centers)
    test = _blobs(rng, [40] * NUM_CLASSES, centers)
    return train, test


@pytest.fixture(scope="module")
def fitted(data):
    (x, y), _ = data
    return fit_dlsa(x, y, NUM_CLASSES, TINY)


def test_likelihood_threshold_keeps_the_stated_fraction():
    log_probs = np.random.default_rng(1).normal(size=1000)
    threshold = cascade.likelihood_threshold(log_probs, 0.3)
    assert np.sum(log_probs >= threshold) == 300
    assert cascade.likelihood_threshold(log_probs, 0.0) == np.inf
    with pytest.raises(ValueError, match="keep_fraction"):
        cascade.likelihood_threshold(log_probs, 1.5)


def test_cluster_prior_is_the_class_histogram_of_each_cluster():
    clusters = np.array([0, 0, 0, 2, 2])
    labels = np.array([1, 1, 0, 2, 1])
    prior = cascade.cluster_class_prior(clusters, labels, 3, 3)
    np.testing.assert_allclose(prior[0], [1 / 3, 2 / 3, 0])
    np.testing.assert_allclose(prior[1], [1 / 5, 3 / 5, 1 / 5])  # empty: overall frequencies
    np.testing.assert_allclose(prior[2], [0, 0.5, 0.5])


def test_each_stage_takes_the_stated_share_of_its_training_samples(fitted, data):
    (x, y), _ = data
    stage = fitted.fit_routing
    remaining = len(fitted.fit_indices)
    for s in range(TINY.depth):
        taken = int(np.sum(stage == s))
        assert taken == round(TINY.keep_fraction * remaining)
        remaining -= taken
    assert np.sum(stage == TINY.depth) == remaining


def test_test_routing_follows_the_thresholds(fitted, data):
    _, (x_test, _) = data
    routing = cascade.route(fitted.stages, x_test)
    passed_earlier = np.zeros(len(x_test), bool)
    for s, stage in enumerate(fitted.stages):
        log_prob = np.asarray(stage.flow.log_prob(x_test))
        takes = ~passed_earlier & (log_prob >= stage.threshold)
        np.testing.assert_array_equal(routing.stage == s, takes)
        passed_earlier |= takes
    np.testing.assert_array_equal(routing.stage == TINY.depth, ~passed_earlier)
    np.testing.assert_array_equal(np.asarray(fitted.model.route(x_test)), routing.stage)


def test_routing_statistics_sum_to_the_totals(fitted, data):
    _, (x_test, y_test) = data
    stage = np.asarray(fitted.model.route(x_test))
    rows = cascade.routing_statistics(stage, y_test, TRAIN_COUNTS, TINY.depth)
    assert [r["classifier"] for r in rows] == ["filtered", "filtered", "final"]
    assert sum(r["total"] for r in rows) == len(y_test)
    for row in rows:
        assert row["many"] + row["medium"] + row["few"] == row["total"]
    assert sum(r["many"] for r in rows) == 80 and sum(r["few"] for r in rows) == 40


def test_routed_classifier_beats_chance_and_matches_its_stages(fitted, data):
    _, (x_test, y_test) = data
    logits = np.asarray(fitted.model(x_test))
    assert np.mean(logits.argmax(axis=1) == y_test) > 0.6  # chance: 0.2
    routing = cascade.route(fitted.stages, x_test)
    s = TINY.depth
    idx, side = cascade.stage_side_inputs(fitted.stages, routing, s)
    final = np.asarray(fitted.model.final_classifier([x_test[idx], side]))
    np.testing.assert_allclose(logits[idx], final, rtol=1e-5, atol=1e-5)
    idx, side = cascade.stage_side_inputs(fitted.stages, routing, 0)
    first = np.asarray(fitted.model.stage_classifiers[0]([x_test[idx], side]))
    np.testing.assert_allclose(logits[idx], first, rtol=1e-5, atol=1e-5)


def test_routed_classifier_saves_and_loads(fitted, data, tmp_path):
    _, (x_test, _) = data
    expected = np.asarray(fitted.model(x_test))
    fitted.model.save(tmp_path / "head.keras")
    loaded = keras.saving.load_model(tmp_path / "head.keras")
    np.testing.assert_allclose(np.asarray(loaded(x_test)), expected, atol=1e-6)
    assert isinstance(loaded, DLSARoutedClassifier) and loaded.depth == TINY.depth


@pytest.mark.slow
def test_routed_classifier_exports_to_saved_model_and_onnx(fitted, data, tmp_path):
    import onnxruntime

    _, (x_test, _) = data
    expected = np.asarray(fitted.model(x_test))
    fitted.model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(reloaded.serve(tf.constant(x_test)).numpy(), expected, atol=1e-5)
    onnx_file = tmp_path / "head.onnx"
    command = [
        sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(tmp_path / "saved"),
        "--output", str(onnx_file), "--opset", "17",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Unsupported ops" not in done.stderr, done.stderr[-3000:]
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, len(x_test)):
        got = session.run(None, {name: x_test[:batch]})[0]
        np.testing.assert_allclose(got, expected[:batch], atol=1e-5)


def test_balanced_softmax_loss_adds_log_counts():
    logits = np.array([[1.0, 0.0, -1.0]], np.float32)
    log_counts = np.log(np.array([100.0, 10.0, 1.0], np.float32))
    adjusted = logits[0] + log_counts
    expected = -(adjusted[2] - np.logaddexp.reduce(adjusted))
    np.testing.assert_allclose(float(np.mean(logit_adjusted_cross_entropy(np.array([2]), logits, log_counts))), expected, rtol=1e-5)


def _tiny_model(num_classes=3):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="classifier")(x))


def _write_image_tree(root, rng, per_class, num_classes=3):
    for split, count in (("train", per_class), ("test", 6)):
        for c in range(num_classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                base = np.full((8, 8, 3), 40 + 80 * c, np.float32)
                image = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
                (folder / f"{i:03d}.png").write_bytes(tf.io.encode_png(image).numpy())


@pytest.mark.slow
def test_cli_writes_a_run_directory_the_harness_reads(tmp_path):
    rng = np.random.default_rng(3)
    data_dir, run = tmp_path / "data", tmp_path / "run"
    _write_image_tree(data_dir, rng, 40)
    run.mkdir()
    model = _tiny_model()
    model.save(run / "model.keras")
    (run / "flags.txt").write_text(
        f"--dataset=folder\n--data_dir={data_dir}\n--imbalance_factor=5\n--data_recipe=cifar\n--epochs=3\n"
    )
    info = {
        "model": "tiny", "num_classes": 3, "class_names": ["class0", "class1", "class2"],
        "train_counts": [40, 17, 8], "image_size": 8, "dataset": "folder", "method": "ce",
    }
    (run / "run.json").write_text(json.dumps(info))
    command = [
        sys.executable, "-m", "car_tf.dlsa", f"--model_dir={run}", "--num_components=6",
        "--prior_stddev=1", "--flow_epochs=2", "--flow_batch_size=32", "--classifier_epochs=3",
        "--noprogress",
    ]
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": "", "CAR_TF_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = run / "dlsa"
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["method"] == "ce+dlsa" and run_info["train_counts"] == [40, 17, 8]
    stats = json.loads((out / "routing_stats.json").read_text())
    test_rows = stats["splits"]["test"]
    assert sum(r["total"] for r in test_rows) == 18
    assert sum(r["medium"] for r in test_rows) == 6 and sum(r["few"] for r in test_rows) == 12
    from car_tf.evaluation.predictors import load_predictor

    images = np.stack([np.full((8, 8, 3), 40 + 80 * c, np.float32) for c in range(3)])
    scores = load_predictor(out).predict(images)
    assert scores.shape == (3, 3)
    assert json.loads((out / "report.json").read_text())["num_samples"] == 18
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "features").glob("*.npz"))
    assert cached == ["test", "train"]  # the shared feature cache (car_tf.models.feature_cache)
