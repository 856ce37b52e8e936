"""The library core under the JAX and PyTorch backends beside TensorFlow.

A process has one Keras backend, so each check runs backend_runs.py in a fresh process with
KERAS_BACKEND set and compares what it wrote with NumPy references, with the TensorFlow run, or
loads it here under TensorFlow.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import car_tf
import car_tf.models  # noqa: F401  (registers the layers a saved model names)
from car.test_math import (np_batch_confusion, np_confusion_with_fixed_gate, np_frequency_weights, np_softmax,
                           np_sparse_ema, numeric_gradient)
from backend_env import OFF_TENSORFLOW

RUNS = pathlib.Path(__file__).with_name("backend_runs.py")
ROOT = RUNS.parents[2]
BACKENDS = ["tensorflow", *OFF_TENSORFLOW]
COUNTS = [40, 20, 8, 4]


def run_under(backend, command, out, extra_env=None):
    """Runs ``backend_runs.py command out`` with KERAS_BACKEND=backend; returns the JSON it wrote."""
    env = {**os.environ, "KERAS_BACKEND": backend, **(extra_env or {})}
    done = subprocess.run([sys.executable, str(RUNS), command, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(pathlib.Path(out).read_text()) if str(out).endswith(".json") else None


def car_reference(results, lam=0.5, beta=0.6, first_batch=False):
    """(loss, weights after the SGD step) of each of the two steps, in float64.

    The gate sigmoid(f_i - f_j) carries no gradient (released code); with ``first_batch`` the first
    step's EMA is the batch confusion under stop-gradient, otherwise the EMA starts from zero.
    """
    w = np.array(results["w0"], np.float64)
    weights = np_frequency_weights(COUNTS, 0.2)
    k = len(COUNTS)
    ema, out = np.zeros((k, k)), []
    for step, (x, y) in enumerate(results["batches"]):
        x, y = np.array(x, np.float64), np.array(y)
        fixed = x @ w
        frozen = first_batch and step == 0

        def objective(wv, x=x, y=y, fixed=fixed, frozen=frozen):
            probs = np_softmax(x @ wv)
            ce = -np.log(probs[np.arange(len(y)), y]).mean()
            if frozen:
                return ce + lam * np.linalg.norm(np_batch_confusion(fixed, y) * weights[None, :], 2)
            current = np_confusion_with_fixed_gate(fixed, probs, y)
            return ce + lam * np.linalg.norm((beta * ema + (1 - beta) * current) * weights[None, :], 2)

        value, gradient = objective(w), numeric_gradient(objective, w, 1e-6)
        ema = np_batch_confusion(fixed, y) if frozen else beta * ema + (1 - beta) * np_batch_confusion(fixed, y)
        w = w - gradient  # SGD with learning rate 1
        out.append((value, w))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_car_steps_match_numpy(backend, tmp_path):
    results = run_under(backend, "first_steps", tmp_path / "steps.json")
    for name in ("svd_zeros", "power_zeros", "svd_first_batch", "power_zeros_sparse4"):
        reference = car_reference(results, first_batch=name.endswith("first_batch"))
        for step, ((value, weights), got) in enumerate(zip(reference, results[name])):
            assert got["loss"] == pytest.approx(value, rel=1e-5), (name, step)
            np.testing.assert_allclose(got["w"], weights, rtol=1e-5, atol=2e-5, err_msg=f"{name} step {step}")
    # A sparse EMA of 2 entries per class follows the truncated recurrence from the logits it saw.
    batches = []
    for (_, labels), step in zip(results["batches"], results["power_zeros_sparse2"]):
        c = np_batch_confusion(np.array(step["logits"]), np.array(labels))
        batches.append((c, np.bincount(labels, minlength=c.shape[0]) > 0))
        want = np_sparse_ema(batches, 0.6, "zeros", 2)
        # float32: the dropped mass is a column's sum less its kept entries, to 1e-7 of the column
        np.testing.assert_allclose(step["ema"], want, rtol=1e-5, atol=1e-7 * want.max())


@pytest.fixture(scope="module")
def tensorflow_losses(tmp_path_factory):
    return run_under("tensorflow", "losses", tmp_path_factory.mktemp("losses") / "tf.json")


@pytest.mark.slow
@pytest.mark.parametrize("backend", OFF_TENSORFLOW)
def test_every_base_loss_alone_and_under_car_trains_as_under_tensorflow(backend, tensorflow_losses, tmp_path):
    results = run_under(backend, "losses", tmp_path / f"{backend}.json")
    assert set(results) == set(tensorflow_losses) and "car_ldam_drw" in results
    for name, history in tensorflow_losses.items():
        for key, values in history.items():  # loss, val_loss, car_spectral_norm, car_penalty
            np.testing.assert_allclose(results[name][key], values, rtol=2e-5, err_msg=f"{name} {key}")
    assert tensorflow_losses["car_ce"]["car_spectral_norm"][0] > 0


def test_import_and_training_work_without_tensorflow(off_tensorflow, tmp_path):
    """car_tf's core imports and trains with TensorFlow made impossible to import."""
    script = tmp_path / "no_tf.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import keras, numpy as np\n"
        "import car_tf, car_tf.losses, car_tf.models, car_tf.decoupled, car_tf.evaluation.metrics\n"
        "model = car_tf.models.create_model('resnet32', 3, input_shape=(32, 32, 3))\n"
        "loss = car_tf.CARLoss([30, 10, 3], base='logit_adjusted')\n"
        "model.compile(keras.optimizers.SGD(0.1), loss=loss)\n"
        "x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype('float32')\n"
        "y = np.array([0, 0, 0, 0, 1, 1, 2, 0])\n"
        "model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[car_tf.CARCallback(loss)])\n"
        "report = car_tf.evaluation.metrics.per_class_report(np.asarray(model.predict(x, verbose=0)), y, [30, 10, 3])\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('sigma', float(keras.ops.convert_to_numpy(model.car_state.last_sigma)), 'top1', report['top1'])\n"
    )
    done = subprocess.run([sys.executable, str(script)], env=off_tensorflow[1],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[1]) > 0


@pytest.mark.parametrize("backend", OFF_TENSORFLOW)
def test_out_of_range_label_stops_a_step_with_the_sentence(backend, tmp_path):
    messages = run_under(backend, "label_check", tmp_path / "labels.json")
    for name in ("ce", "car"):
        assert "a label lies outside [0, 4); check the data set's labels" in messages[name], name


def test_data_parallel_on_two_devices_matches_one(tmp_path):
    results = run_under("jax", "data_parallel", tmp_path / "dp.json",
                        {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"})
    assert results["devices"] == 2
    one, two = results["1"], results["2"]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    for a, b in zip(two["weights"], one["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["ema"], one["ema"], rtol=1e-5, atol=1e-7)
    assert np.sum(one["ema"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", OFF_TENSORFLOW)
def test_backbones_build_and_run(backend, tmp_path):
    from backend_runs import efficientnet_images

    results = run_under(backend, "backbones", tmp_path / "backbones.json")
    features = np.array(results.pop("efficientnet_lite0_features"))
    assert results == {name: {"shape": [2, 3], "finite": True} for name in (
        "resnet32", "resnet50", "resnext50_32x4d", "vit_s16", "vit_b16", "efficientnet_lite0")}
    # ImageNet weights fix the network, so the forward pass must be TensorFlow's (this process).
    images = efficientnet_images()
    model = car_tf.models.create_model("efficientnet_lite0", 3, input_shape=images.shape[1:], weights="imagenet")
    want = np.asarray(car_tf.models.features_model(model, with_logits=False)(images, training=False))
    assert features.shape == want.shape == (2, 1280)
    assert np.max(np.abs(features - want)) / np.max(np.abs(want)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", OFF_TENSORFLOW)
def test_keras_file_trained_off_tensorflow_loads_and_exports_under_tensorflow(backend, tmp_path):
    import tensorflow as tf

    from export.onnx_export import export_onnx
    from export.parity import check_parity
    from export.saved_model import export_plain_saved_model

    path = tmp_path / f"{backend}_model.keras"
    run_under(backend, "save", path)
    saved = np.load(f"{path}.npz")
    model = keras.models.load_model(path)
    assert isinstance(model.car_state, car_tf.CARState)
    state = {f"state/{v.path}": v.numpy() for v in model.car_state.weights}
    assert set(state) == {k for k in saved.files if k.startswith("state/")}
    for key, value in state.items():
        np.testing.assert_allclose(value, saved[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert state["state/car_state/initialized"] == 1.0
    np.testing.assert_allclose(model.predict(saved["images"], verbose=0), saved["predictions"],
                               rtol=1e-5, atol=1e-4)  # float32 logits in the thousands
    images = saved["images"].astype(np.uint8)
    served = tf.saved_model.load(str(export_plain_saved_model(model, tmp_path / "saved_model")))
    check_parity(lambda x: model(x.astype(np.float32), training=False),
                 lambda x: served.serve(tf.constant(x, tf.float32)), images, what="SavedModel")
    export_onnx(model, tmp_path / "model.onnx", images)  # raises ExportParityError beyond 1e-4 (relative)


@pytest.mark.parametrize("backend", OFF_TENSORFLOW)
def test_readme_example_runs(backend, tmp_path):
    from test_readme import readme_example

    script = tmp_path / "example.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + readme_example("car-keras"))
    done = subprocess.run([sys.executable, str(script)], env={**os.environ, "KERAS_BACKEND": backend},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sigmas = json.loads(done.stdout.split("]")[0] + "]")
    assert len(sigmas) == 3 and all(s > 0 for s in sigmas)
