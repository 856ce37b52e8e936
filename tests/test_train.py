"""The training CLI: shipped recipes parse, tiny runs train, resume exactly, and fail clearly."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from car_tf import train as train_cli
from car_tf.models import create_model, list_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
COUNTS = {"a": 36, "b": 16, "c": 8}  # what --imbalance_factor=4.5 keeps of 36 images a class


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 3-class long-tailed image-folder data set of 16x16 PNGs: train/ and test/ trees."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    colours = {"a": (220, 40, 40), "b": (40, 200, 40), "c": (40, 40, 220)}
    for split, counts in (("train", {c: 36 for c in COUNTS}), ("test", {c: 8 for c in COUNTS})):
        for name, count in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.normal(0, 30, size=(16, 16, 3))
                image = np.clip(np.array(colours[name]) + noise, 0, 255).astype(np.uint8)
                tf.io.write_file(str(folder / f"{i:03d}.png"), tf.io.encode_png(image))
    return root


def parse(argv):
    """The train CLI's flags parsed from ``argv`` alone (every other flag at its default)."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", *argv])
    return flags.FLAGS


def tiny_args(data_dir, model_dir, *extra):
    return [
        "--dataset=folder",
        f"--data_dir={data_dir}",
        "--imbalance_factor=4.5",
        "--data_recipe=cifar",
        "--image_size=16",
        f"--model_dir={model_dir}",
        "--batch_size=12",
        "--epochs=3",
        "--warmup_epochs=0",
        "--lr=0.05",
        "--lr_decay_epochs=2",
        "--deterministic",
        "--noverbose",
        *extra,
    ]


@pytest.mark.parametrize("flagfile", sorted((ROOT / "launch").glob("*.flags")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_and_validates(flagfile, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = parse([f"--flagfile={flagfile}", "--model_dir=/tmp/unused"])
    assert config.model in list_models()
    assert all(0 < int(e) < config.epochs for e in config.lr_decay_epochs) or config.lr_schedule != "step"
    assert config.warmup_epochs < config.epochs
    counts = np.linspace(500, 5, 10).astype(int)
    with tf.distribute.get_strategy().scope():
        loss = train_cli.build_loss(config, counts)
    assert isinstance(loss, keras.losses.Loss)


@pytest.mark.slow
def test_tiny_car_run_resumes_to_the_same_weights(tiny_folder, tmp_path, monkeypatch):
    reference = train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, tmp_path / "ref", "--method=car")))
    assert reference["top1"] > 1 / 3  # beats chance on a separable toy problem

    calls = {"n": 0}
    original = train_cli.NaNGuard.on_train_batch_end

    def killed_mid_epoch(self, batch, logs=None):
        original(self, batch, logs)
        calls["n"] += 1
        if self.epoch == 1 and batch == 1:
            raise KeyboardInterrupt("killed mid-epoch")

    monkeypatch.setattr(train_cli.NaNGuard, "on_train_batch_end", killed_mid_epoch)
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=car")))
    monkeypatch.setattr(train_cli.NaNGuard, "on_train_batch_end", original)
    assert json.loads((run / "checkpoints" / "last.json").read_text()) == {"epochs_done": 1}
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=car")))

    ref_model = keras.saving.load_model(tmp_path / "ref" / "model.keras")
    resumed = keras.saving.load_model(run / "model.keras")
    for got, want in zip(resumed.weights, ref_model.weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    info = json.loads((run / "run.json").read_text())
    assert info["train_counts"] == list(COUNTS.values())
    assert (run / "report.json").exists() and (run / "metrics" / "epoch_003.json").exists()
    assert "car_spectral_norm" in (run / "history.csv").read_text()


def test_missing_data_path_is_one_clear_sentence(tmp_path):
    config = parse(tiny_args(tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises((ValueError, FileNotFoundError), match="does not exist"):
        train_cli.train_and_evaluate(config)


def test_checkpoint_for_another_class_count_is_refused(tiny_folder, tmp_path):
    wrong = create_model("resnet32", 5, input_shape=(16, 16, 3))
    path = tmp_path / "five.weights.h5"
    wrong.save_weights(str(path))
    config = parse(tiny_args(tiny_folder, tmp_path / "run", f"--pretrained={path}"))
    with pytest.raises(ValueError, match="5 classes"):
        train_cli.train_and_evaluate(config)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_loopback_end_with_identical_weights(tiny_folder, tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    run = tmp_path / "mw"
    processes = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "CUDA_VISIBLE_DEVICES": "",
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        args = tiny_args(tiny_folder, run, "--method=car", "--strategy=multi_worker", "--epochs=2")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "car_tf.train", *args],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    # Trainable weights and CAR's state are synchronised; BatchNorm moving statistics are each
    # worker's own (as without SyncBatchNorm anywhere), so they are left out.
    chief = keras.saving.load_model(run / "model.keras")
    worker = keras.saving.load_model(run / "workers" / "1" / "model.keras")
    for a, b in zip(chief.trainable_weights, worker.trainable_weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    checkpoints = [run / "checkpoints", run / "workers" / "1" / "checkpoints"]
    chief_state, worker_state = (h5py.File(c / "last.weights.h5")["car_state"]["vars"] for c in checkpoints)
    assert len(chief_state) > 0
    for name in chief_state:
        np.testing.assert_allclose(chief_state[name][()], worker_state[name][()], atol=1e-6)
    assert chief_state["0"][()].sum() > 0  # the EMA confusion matrix was updated


def test_nan_loss_stops_with_one_sentence(tmp_path):
    guard = train_cli.NaNGuard(tmp_path / "checkpoints")
    guard.on_epoch_begin(3)
    guard.on_train_batch_end(0, {"loss": 0.7})
    with pytest.raises(FloatingPointError, match=r"became nan at epoch 3, step 5; lower --lr"):
        guard.on_train_batch_end(5, {"loss": float("nan")})
