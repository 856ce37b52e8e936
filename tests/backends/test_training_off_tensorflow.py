"""Training under KERAS_BACKEND=jax and torch where TensorFlow cannot be imported: every method, the
command line, a resumed run, and the parts that need TensorFlow saying so in one sentence."""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from test_backends import ROOT, RUNS

TRAIN_FLAGS = ["--dataset=folder", "--imbalance_factor=4.5", "--data_recipe=cifar", "--image_size=16",
               "--batch_size=12", "--warmup_epochs=0", "--lr=0.05", "--lr_decay_epochs=2", "--noverbose"]


def train(env, *args):
    return subprocess.run([sys.executable, "-m", "car_tf.train", *TRAIN_FLAGS, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_methods_train_without_tensorflow(off_tensorflow, tiny_folder, tmp_path):
    out = tmp_path / "methods.json"
    done = subprocess.run([sys.executable, str(RUNS), "train_methods", str(out), str(tiny_folder)],
                          env=off_tensorflow[1], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results.pop("tensorflow_imported") is False
    assert set(results) == {"ldam_drw", "logit_adjusted", "decoupled", "car_ce", "car_ldam_drw"}  # and test_gpu_script
    for name, result in results.items():
        first, last = result["losses"]
        assert np.isfinite(last) and last < first, name  # the second epoch fits better than the first
        assert 0 <= result["top1"] <= 1 and (tmp_path / name / "per_class.csv").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(off_tensorflow, tiny_folder, tmp_path):
    backend, env = off_tensorflow
    common = [f"--data_dir={tiny_folder}", "--method=car", "--epochs=2"]
    straight = train(env, *common, f"--model_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The state of a run killed after its first epoch: a copy of the uninterrupted run (--model_dir
    # may differ on a resume) with the later checkpoint and results gone.
    run = tmp_path / "killed"
    shutil.copytree(tmp_path / "straight", run)
    for name in ("checkpoints/epoch_0002.weights.h5", "model.keras", "report.json", "metrics/epoch_002.json"):
        (run / name).unlink()
    resumed = train(env, *common, f"--model_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stderr and len((run / "history.csv").read_text().splitlines()) == 3
    expected = arrays_of(tmp_path / "straight" / "checkpoints" / "epoch_0002.weights.h5")
    got = arrays_of(run / "checkpoints" / "epoch_0002.weights.h5")
    assert set(got) == set(expected) and any(k.startswith("car_state") for k in got)  # CAR's EMA
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    info = json.loads((run / "run.json").read_text())
    assert info["keras_backend"] == backend


def arrays_of(path):
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return found


def test_concutmix_under_jax_is_one_sentence_and_writes_nothing(jax_without_tensorflow, tiny_folder, tmp_path):
    done = train(jax_without_tensorflow, f"--data_dir={tiny_folder}", "--method=concutmix", "--epochs=1",
                 f"--model_dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "car_tf.train: concutmix mixes its batches in a tf.data stage and rectifies labels in a "
        "TensorFlow train step, so it cannot train under KERAS_BACKEND=jax; unset KERAS_BACKEND to use TensorFlow.")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["car_tf.evaluate", "export"])
def test_commands_that_need_tensorflow_refuse_jax_in_one_sentence(jax_without_tensorflow, command, tmp_path):
    done = subprocess.run([sys.executable, "-m", command, f"--model={tmp_path / 'run'}"],
                          env=jax_without_tensorflow, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{command}: this command runs under KERAS_BACKEND=tensorflow, but KERAS_BACKEND is 'jax'" in done.stderr


def test_a_module_that_needs_tensorflow_says_so_where_it_is_missing(jax_without_tensorflow):
    done = subprocess.run([sys.executable, "-c", "import car_tf.dlsa.flow"], env=jax_without_tensorflow,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: car_tf.dlsa.flow needs TensorFlow, which cannot be imported here (TensorFlow is not "
        "installed here); install tensorflow==2.21.0, or under KERAS_BACKEND=jax or torch use the parts "
        "README's 'Keras backends' lists.")
