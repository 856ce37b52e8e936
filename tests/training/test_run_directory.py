"""The run directory is the run's record: reruns, extensions, refusals, atomic checkpoints."""

import csv
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from car_tf.training import checkpointing, run_directory
from car_tf import train as train_cli
from car_tf.training.callbacks import NaNGuard

from train_helpers import COUNTS, ROOT, parse, tiny_args


def snapshot(folder):
    """{relative path: (bytes, modification time)} of every file below ``folder``."""
    folder = pathlib.Path(folder)
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def final_weights(run):
    return [w.numpy() for w in keras.saving.load_model(run / "model.keras").weights]


@pytest.fixture(scope="module")
def finished_run(tiny_folder, tmp_path_factory):
    """A finished 3-epoch CAR run (its directory, its report)."""
    run = tmp_path_factory.mktemp("runs") / "car"
    report = train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=car")))
    return run, report


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, named",
    [
        (["--method=ce"], "--method car -> ce"),
        (["--epochs=5", "--lr=0.5"], "--lr 0.05 -> 0.5"),
        (["--spec_lambda=1.0"], "--spec_lambda 0.3 -> 1.0"),
        (["--noskip_corrupt", "--skip_corrupt"], "--skip_corrupt false -> true"),
        (["--spec_sparse_ema_entries=2"], "--spec_sparse_ema_entries (unset) -> 2"),
    ],
)
def test_rerun_with_other_flags_is_refused_and_changes_nothing(finished_run, tiny_folder, extra, named):
    run, _ = finished_run
    before = snapshot(run)
    with pytest.raises(run_directory.RunConflict, match="was started with other flags") as refusal:
        train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=car", *extra)))
    message = str(refusal.value)
    assert named in message and "--overwrite" in message and "\n" not in message
    assert snapshot(run) == before


@pytest.mark.slow
def test_rerun_on_other_data_is_refused_before_writing(finished_run, tiny_folder):
    run, _ = finished_run
    before = snapshot(run)
    config = parse(tiny_args(tiny_folder, run, "--method=car", "--imbalance_factor=4.5"))
    config.imbalance_factor = 2.0  # flags.txt says 4.5: another imbalance is another experiment
    with pytest.raises(run_directory.RunConflict, match="imbalance_factor 4.5 -> 2.0"):
        train_cli.train_and_evaluate(config)
    # The same flags over a folder whose classes differ: refused through run.json.
    other = tiny_folder.parent / "other_data"
    if not other.exists():
        for split in ("train", "test"):
            for name in ("a", "b"):
                (other / split / name).mkdir(parents=True)
                for f in sorted((tiny_folder / split / name).iterdir()):
                    (other / split / name / f.name).write_bytes(f.read_bytes())
    with pytest.raises(run_directory.RunConflict, match="trained on other data .*3 classes differ from the 2"):
        train_cli.train_and_evaluate(parse(tiny_args(other, run, "--method=car")))
    assert snapshot(run) == before


@pytest.mark.slow
def test_same_command_on_a_finished_run_reports_without_writing(finished_run, tiny_folder, capsys):
    run, report = finished_run
    before = snapshot(run)
    again = train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=car")))
    assert "already finished its 3 epochs" in capsys.readouterr().out
    assert again["top1"] == report["top1"]
    assert snapshot(run) == before


def test_refusal_on_the_command_line_is_one_sentence(finished_run, tiny_folder):
    run, _ = finished_run
    before = snapshot(run)
    out = subprocess.run(
        [sys.executable, "-m", "car_tf.train", *tiny_args(tiny_folder, run, "--method=ce")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("car_tf.train")]
    assert len(lines) == 1 and "--method car -> ce" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert snapshot(run) == before


@pytest.mark.slow
def test_longer_step_schedule_extends_and_cosine_is_refused(tiny_folder, tmp_path):
    # The learning rate decays after the first epoch: only the extension trains at the decayed rate.
    run = tmp_path / "extend"
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--epochs=1", "--lr_decay_epochs=1")))
    reference = tmp_path / "two"
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, reference, "--epochs=2", "--lr_decay_epochs=1")))
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--epochs=2", "--lr_decay_epochs=1")))
    info = run_directory.read_run_info(run)
    assert info["epochs"] == 2 and info["epochs_extended_from"] == [1]
    assert "--epochs=2" in (run / "flags.txt").read_text().splitlines()
    with (run / "history.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1]
    for got, want in zip(final_weights(run), final_weights(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)

    cosine = tmp_path / "cosine"
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, cosine, "--epochs=2", "--lr_schedule=cosine")))
    before = snapshot(cosine)
    with pytest.raises(run_directory.RunConflict, match="would change the schedule of the 2 epochs"):
        train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, cosine, "--epochs=4", "--lr_schedule=cosine")))
    with pytest.raises(run_directory.RunConflict, match="cannot be shortened"):
        train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, cosine, "--epochs=1", "--lr_schedule=cosine")))
    assert snapshot(cosine) == before


@pytest.mark.slow
def test_overwrite_starts_over_and_spares_foreign_folders(finished_run, tiny_folder, tmp_path):
    run, _ = finished_run
    copy = tmp_path / "copy"
    for path, (data, _) in snapshot(run).items():
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_bytes(data)
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, copy, "--method=ce", "--epochs=1", "--overwrite")))
    assert run_directory.read_run_info(copy)["method"] == "ce"
    assert checkpointing.latest_epoch(copy / "checkpoints") == 1
    assert "--overwrite" not in (copy / "flags.txt").read_text()  # rerunning flags.txt never deletes

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(run_directory.RunConflict, match="not a car_tf run directory"):
        train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, foreign, "--overwrite")))
    assert (foreign / "holiday.jpg").read_bytes() == b"mine"


def tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_checkpoints_keep_the_previous_one_and_fall_back_from_a_damaged_one(tmp_path, caplog):
    model = tiny_model()
    kernels = {}
    for epoch in (1, 2, 3):
        model.layers[0].kernel.assign(np.full((3, 2), float(epoch), "float32"))
        checkpointing.save(model, tmp_path, epoch)
        kernels[epoch] = model.layers[0].kernel.numpy()
    assert [e for e, _ in checkpointing.checkpoints(tmp_path)] == [3, 2]

    newest = checkpointing.checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:200])  # truncated, as by a full disk
    fresh = tiny_model()
    with caplog.at_level("WARNING"):
        assert checkpointing.restore(fresh, tmp_path) == 2
    assert "cannot be read" in caplog.text and newest.name in caplog.text
    np.testing.assert_array_equal(fresh.layers[0].kernel.numpy(), kernels[2])

    checkpointing.checkpoint_path(tmp_path, 2).write_bytes(b"")
    with pytest.raises(checkpointing.DamagedCheckpoints, match="every checkpoint in .* is damaged"):
        checkpointing.restore(tiny_model(), tmp_path)
    assert checkpointing.restore(tiny_model(), tmp_path / "none") == 0


def test_checkpoint_of_another_model_is_one_sentence(tmp_path):
    checkpointing.save(tiny_model(), tmp_path, 1)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5)])
    other.compile(keras.optimizers.SGD(0.1), loss="mse")
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match="does not fit this model") as refusal:
        checkpointing.restore(other, tmp_path)
    assert "\n" not in str(refusal.value) and len(str(refusal.value)) < 300


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def kill_at(monkeypatch, point, epochs_done):
    """Makes the run die at ``point`` of epoch ``epochs_done`` (its second step, or its checkpoint)."""
    save_weights, replace, save = keras.Model.save_weights, checkpointing.os.replace, checkpointing.save
    target = checkpointing.checkpoint_path(".", epochs_done).name

    def save_weights_then_die(self, path, *args, **kwargs):
        save_weights(self, path, *args, **kwargs)
        if pathlib.Path(path).name.endswith(target):
            if point == "mid-write":
                data = pathlib.Path(path).read_bytes()
                pathlib.Path(path).write_bytes(data[: len(data) // 2])
            if point in ("mid-write", "before-rename"):
                raise Killed(point)

    def replace_then_die(src, dst):
        replace(src, dst)
        if point == "after-rename" and pathlib.Path(dst).name == target:
            raise Killed(point)

    def save_then_die(model, directory, epochs):
        save(model, directory, epochs)
        if point == "after-save" and epochs == epochs_done:
            raise Killed(point)

    guard = NaNGuard.on_train_batch_end

    def batch_then_die(self, batch, logs=None):
        guard(self, batch, logs)
        if point == "mid-epoch" and self.epoch == epochs_done - 1 and batch == 1:
            raise Killed(point)

    monkeypatch.setattr(NaNGuard, "on_train_batch_end", batch_then_die)
    monkeypatch.setattr(keras.Model, "save_weights", save_weights_then_die)
    monkeypatch.setattr(checkpointing.os, "replace", replace_then_die)
    monkeypatch.setattr(checkpointing, "save", save_then_die)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mid-epoch", "mid-write", "before-rename", "after-rename", "after-save"])
def test_run_killed_at_each_write_point_resumes_to_the_uninterrupted_weights(
    finished_run, tiny_folder, tmp_path, monkeypatch, point
):
    reference, report = finished_run
    assert report["top1"] > 1 / 3  # beats chance on a separable toy problem
    run = tmp_path / point
    args = tiny_args(tiny_folder, run, "--method=car")
    with monkeypatch.context() as patch:
        kill_at(patch, point, epochs_done=3)  # the third save also deletes the first checkpoint
        with pytest.raises(Killed):
            train_cli.train_and_evaluate(parse(args))
    train_cli.train_and_evaluate(parse(args))
    for got, want in zip(final_weights(run), final_weights(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    with (run / "history.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2]
    assert sorted(p.name for p in (run / "metrics").iterdir()) == [f"epoch_00{e}.json" for e in (1, 2, 3)]
    assert not list((run / "checkpoints").glob("tmp-*"))
    assert run_directory.read_run_info(run)["train_counts"] == list(COUNTS.values())
    assert (run / "report.json").exists() and "car_spectral_norm" in (run / "history.csv").read_text()


@pytest.mark.slow
def test_lambda_warmup_ramps_the_car_penalty(tiny_folder, tmp_path):
    run = tmp_path / "warmup"
    train_cli.train_and_evaluate(parse(tiny_args(tiny_folder, run, "--method=car", "--lambda_warmup_epochs=2")))
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    penalty = [float(r["car_penalty"]) for r in rows]
    sigma = [float(r["car_spectral_norm"]) for r in rows]
    assert penalty[0] == 0.0 and sigma[0] > 0
    np.testing.assert_allclose(penalty[1:], [0.15 * sigma[1], 0.3 * sigma[2]], rtol=1e-5)
