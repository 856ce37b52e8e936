"""car_tf.rebalance: cRT, tau-normalisation and post-hoc logit adjustment on a finished run."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from car_tf import rebalance
from car_tf.evaluation.predictors import load_predictor

from train_helpers import ROOT, parse, tiny_args


def test_tau_normalisation_rescales_each_class_vector_by_its_norm_to_the_tau():
    kernel = np.random.default_rng(0).normal(size=(5, 4))
    norms = np.sqrt((kernel**2).sum(axis=0))
    np.testing.assert_allclose(rebalance.tau_normalized(kernel, 0.0), kernel)
    np.testing.assert_allclose(np.linalg.norm(rebalance.tau_normalized(kernel, 1.0), axis=0), np.ones(4))
    np.testing.assert_allclose(rebalance.tau_normalized(kernel, 0.5), kernel / norms**0.5)


def test_posthoc_adjustment_subtracts_tau_log_prior_through_the_bias():
    rng = np.random.default_rng(1)
    features, kernel, bias = rng.normal(size=(50, 3)), rng.normal(size=(3, 4)), rng.normal(size=4)
    counts = np.array([500, 50, 10, 2])
    logits = features @ kernel + bias
    adjusted = features @ kernel + rebalance.adjusted_bias(bias, counts, 0.75)
    np.testing.assert_allclose(adjusted, logits - 0.75 * np.log(counts / counts.sum()), atol=1e-5)


@pytest.mark.slow
def test_each_method_writes_a_run_the_harness_reads(tiny_folder, tmp_path, monkeypatch):
    from car_tf import train as train_cli

    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAR_TF_CACHE_DIR": str(tmp_path / "cache")}
    monkeypatch.setenv("CAR_TF_CACHE_DIR", env["CAR_TF_CACHE_DIR"])
    run = tmp_path / "ce"
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=ce", "--frozen_backbone",
                                                 "--lr_schedule=constant")))
    base = json.loads((run / "report.json").read_text())
    for method in rebalance.METHODS:
        out = tmp_path / method
        done = subprocess.run([sys.executable, "-m", "car_tf.rebalance", f"--model_dir={run}", f"--method={method}",
                               f"--output_dir={out}", "--crt_epochs=2", "--noprogress"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        record = json.loads((out / "rebalance.json").read_text())
        info = json.loads((out / "run.json").read_text())
        assert info["method"] == f"ce+{method}" and record["method"] == method
        if method != "crt":  # tau chosen on validation scores, recorded beside the choice
            assert f"{record['tau']:g}" in record["validation_mean_class_accuracy"]
        report = json.loads((out / "report.json").read_text())
        assert report["num_samples"] == base["num_samples"]
        # model.keras is images -> logits and gives the report's accuracy on the test images.
        test_images = sorted((tiny_folder / "test").rglob("*.png"))
        images = np.stack([keras.utils.img_to_array(keras.utils.load_img(p)) for p in test_images])
        labels = np.array(["abc".index(p.parent.name) for p in test_images])
        predicted = load_predictor(out).predict(images).argmax(-1)
        assert np.isclose(np.mean(predicted == labels), report["top1"])
    cosine = tmp_path / "decoupled"
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, cosine, "--method=decoupled", "--frozen_backbone",
                                                 "--lr_schedule=constant", "--epochs=1")))
    refused = subprocess.run([sys.executable, "-m", "car_tf.rebalance", f"--model_dir={cosine}",
                              "--method=tau_norm", "--noprogress"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "not a linear layer with a bias" in refused.stderr
    assert not (cosine / "tau_norm").exists()
