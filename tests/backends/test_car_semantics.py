"""CAR's semantics that must not depend on the Keras backend: sample weights (padding), soft labels
with tied classes, non-finite input. Each check runs car_semantics_runs.py in a fresh process per
backend (a process has one backend) and compares what the backends wrote.

CARLoss's docstring states the rules: a sample of weight 0 counts as if it were not in the batch
(it moves neither the batch confusion nor the EMA) and one of weight 2 as two copies of it; of soft
labels' classes of equal mass the lowest class ids are counted; a NaN anywhere gives a NaN loss.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

RUNS = pathlib.Path(__file__).with_name("car_semantics_runs.py")
ROOT = RUNS.parents[2]
BACKENDS = ["tensorflow", "jax", "torch"]
STATES = ["svd", "power", "sparse2"]


def run_under(backend, command, out):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(RUNS), command, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(pathlib.Path(out).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{command: {backend: results}}, each run once per module."""
    folder = tmp_path_factory.mktemp("car_semantics")
    cache = {}

    def get(command, backend):
        if (command, backend) not in cache:
            cache[command, backend] = run_under(backend, command, folder / f"{command}_{backend}.json")
        return cache[command, backend]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_padding_moves_neither_the_batch_confusion_nor_the_ema(backend, runs):
    results = runs("padding", backend)
    reference = runs("padding", "tensorflow")
    for state in STATES:
        alone, padded = results[state]["alone"], results[state]["padded"]
        np.testing.assert_allclose(padded["ema"], alone["ema"], rtol=1e-6, atol=1e-7, err_msg=state)
        assert padded["sigma"] == pytest.approx(alone["sigma"], rel=1e-6), state
        # A weight of 2 counts the sample twice.
        twice, weight_two = results[state]["twice"], results[state]["weight_two"]
        np.testing.assert_allclose(weight_two["ema"], twice["ema"], rtol=1e-6, atol=1e-7, err_msg=state)
        assert weight_two["sigma"] == pytest.approx(twice["sigma"], rel=1e-6), state
        # The same on every backend.
        np.testing.assert_allclose(padded["ema"], reference[state]["padded"]["ema"], rtol=1e-5, atol=1e-7)
        assert padded["loss"] == pytest.approx(reference[state]["padded"]["loss"], rel=1e-5), state


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_soft_labels_with_tied_light_classes_give_the_same_loss_as_under_tensorflow(backend, runs):
    results, reference = runs("soft_ties", backend), runs("soft_ties", "tensorflow")
    # Label smoothing's four light classes tie: the heavy class and the lowest other id are counted.
    for label, ids in zip(reference["labels"], results["smoothed_ids"]):
        assert ids == sorted([label, 1 if label == 0 else 0]), (label, ids)
    assert results["smoothed_ids"] == reference["smoothed_ids"]
    for name, history in reference.items():
        if name in ("smoothed_ids", "labels"):
            continue
        np.testing.assert_allclose(results[name]["loss"], history["loss"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(results[name]["sigma"], history["sigma"], rtol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_or_an_infinite_lambda_give_a_nan_loss_on_every_backend(backend, runs):
    results = runs("nonfinite", backend)
    for name, losses in results.items():
        assert isinstance(losses, list), f"{name}: {losses}"  # not an error from the SVD
        assert not np.isfinite(losses[-1]), name
