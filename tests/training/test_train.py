"""The training CLI: shipped recipes parse, tiny runs train, resume exactly, and fail clearly."""

import json
import os
import socket
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf.training import checkpointing, methods, trainer
from car_tf import train as train_cli
from car_tf.training.callbacks import NaNGuard
from car_tf.models import create_model, ecosystem, list_models

from train_helpers import ROOT, parse, tiny_args


@pytest.mark.parametrize("flagfile", sorted((ROOT / "launch").glob("*.flags")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_into_a_configuration(flagfile, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    config = train_cli.config_from_flags(parse([f"--flagfile={flagfile}", "--model_dir=/tmp/unused"]))
    assert config.model.model in list_models()
    if config.model.model == "keras_hub":  # a preset keras-hub knows by name
        assert ecosystem.is_keras_hub_preset(config.model.pretrained), config.model.pretrained
    opt = config.optimizer
    assert all(0 < e < opt.epochs for e in opt.lr_decay_epochs) or opt.lr_schedule != "step"
    assert opt.warmup_epochs < opt.epochs
    active = methods.active_methods(config)
    base = methods.effective_base_loss(config)
    counts = np.linspace(500, 5, 10).astype(int)
    with tf.distribute.get_strategy().scope():
        loss = trainer.build_loss(config, active, base, counts)
    assert isinstance(loss, keras.losses.Loss)
    # The record written to flags.txt parses back into the same configuration.
    record = tmp_path / "flags.txt"
    record.write_text("".join(f"{line}\n" for line in config.flag_values().values()))
    assert train_cli.config_from_flags(parse([f"--flagfile={record}"])) == config


def test_car_flags_reach_the_loss_and_a_dense_run_records_no_sparse_flag(tmp_path):
    def car_loss(*extra):
        config = train_cli.config_from_flags(parse(["--method=car", f"--model_dir={tmp_path}", *extra]))
        with tf.distribute.get_strategy().scope():
            loss = trainer.build_loss(config, methods.active_methods(config), "ce", [50, 20, 9, 4])
        return config, loss

    config, loss = car_loss("--spec_sparse_ema_entries=2", "--power_tolerance=1e-5")
    assert (loss.sparse_ema_entries, loss.power_tolerance) == (2, 1e-5)
    assert config.flag_values()["spec_sparse_ema_entries"] == "--spec_sparse_ema_entries=2"
    config, loss = car_loss()  # runs recorded before the flag existed resume as dense ones
    assert loss.sparse_ema_entries is None and "spec_sparse_ema_entries" not in config.flag_values()


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
    chief_state, worker_state = (
        h5py.File(checkpointing.checkpoint_path(c, 2))["car_state"]["vars"] for c in checkpoints
    )
    assert len(chief_state) > 0
    for name in chief_state:
        np.testing.assert_allclose(chief_state[name][()], worker_state[name][()], atol=1e-6)
    assert chief_state["0"][()].sum() > 0  # the EMA confusion matrix was updated


def test_nan_loss_stops_with_one_sentence(tmp_path):
    guard = NaNGuard(tmp_path / "checkpoints")
    guard.on_epoch_begin(3)
    guard.on_train_batch_end(0, {"loss": 0.7})
    with pytest.raises(FloatingPointError, match=r"became nan at epoch 3, step 5; lower --lr"):
        guard.on_train_batch_end(5, {"loss": float("nan")})


@pytest.mark.slow
def test_trainer_runs_from_a_configuration_without_flags(tiny_folder, tmp_path):
    from car_tf.training import config as run_config

    config = run_config.TrainConfig(
        run=run_config.RunConfig(model_dir=str(tmp_path / "lib"), deterministic=True, verbose=False),
        data=run_config.DataConfig(
            dataset="folder", data_dir=str(tiny_folder), imbalance_factor=4.5, data_recipe="cifar", image_size=16
        ),
        optimizer=run_config.OptimizerConfig(epochs=3, batch_size=12, lr=0.05, warmup_epochs=0, lr_decay_epochs=(2,)),
        loss=run_config.BaseLossConfig(base_loss="ldam_drw"),
        choice=run_config.MethodChoice(method="car"),
    )
    report = trainer.train(config)
    assert report["top1"] > 1 / 3 and [m for m in config.settings] == ["decoupled", "car", "concutmix"]
    info = json.loads((tmp_path / "lib" / "run.json").read_text())
    assert info["methods"] == ["car"] and info["base_loss"] == "ldam_drw"
    assert json.loads((tmp_path / "lib" / "report.json").read_text())["top1"] == report["top1"]
