"""A user's own data through the command lines: read as it is, refused or skipped in one sentence."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from car_tf import cli
from car_tf import train as train_cli

from train_helpers import ROOT, parse, write_class_folders

UNEVEN = {"a": 30, "b": 12, "c": 5}

def train_args(data_dir, model_dir, *extra):
    return [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--batch_size=8", "--epochs=1",
            "--warmup_epochs=0", "--lr=0.05", "--lr_decay_epochs=1", *extra]


def last_line(stderr):
    return stderr.strip().splitlines()[-1]


def run(module, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def run_in_terminal(module, *args):
    """(exit code, everything printed) of a command whose stdout and stderr are a terminal."""
    import pty

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=600), b"".join(chunks).decode(errors="replace")


# --- the command-line boundary -----------------------------------------------------------------


def test_errors_become_one_sentence():
    from car_tf.data import pipelines
    from car_tf.data.sources import LabeledData

    data = LabeledData(labels=[0], class_names=["a"], paths=[str(ROOT / "README.md")])
    with pytest.raises(tf.errors.InvalidArgumentError) as error:  # the pipeline's own guard
        list(pipelines.eval_dataset(data, recipe="cifar", image_size=8, batch_size=1))
    assert cli.sentence(error.value) == (
        f"image file {ROOT / 'README.md'} cannot be read or decoded; replace or delete it, "
        "or pass --skip_corrupt to leave unreadable images out."
    )
    memory = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor\n\t [[node x]]")
    assert cli.sentence(memory) == (
        "out of memory (OOM when allocating tensor); lower --batch_size or --image_size."
    )
    other = tf.errors.InternalError(None, None, "Something broke\n details")
    assert cli.sentence(other).endswith("InternalError: Something broke; rerun with --debug for the full trace.")
    assert cli.sentence(PermissionError(13, "Permission denied", "/x/run")) == (
        "/x/run: Permission denied; check the path and its permissions."
    )
    assert cli.sentence(ValueError("first line.\nsecond line")) == "first line."
    assert cli.is_user_error(memory) and cli.is_user_error(FloatingPointError())
    assert not cli.is_user_error(RuntimeError("a bug")) and not cli.is_user_error(KeyError("k"))


def test_test_folder_without_a_class_is_refused_before_training(tmp_path):
    write_class_folders(tmp_path / "data" / "train", UNEVEN)
    write_class_folders(tmp_path / "data" / "test", {"a": 2, "c": 2})
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"has no images of training class\(es\) 'b'; give both splits"):
        train_cli.train_and_evaluate(parse(["--dataset=folder", *train_args(tmp_path / "data", run_dir)]))
    assert not (run_dir / "run.json").exists()


def test_list_without_test_list_is_one_sentence(tmp_path):
    (tmp_path / "train.txt").write_text("a/0.png 0\n")
    config = parse(["--dataset=list", f"--train_list={tmp_path / 'train.txt'}",
                    *train_args(tmp_path, tmp_path / "run")])
    with pytest.raises(ValueError, match=r"^Dataset 'list' needs both --train_list and --test_list"):
        train_cli.train_and_evaluate(config)


# --- end to end, as a new user runs it ---------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_folder(tmp_path_factory):
    """train/ 30 / 12 / 5 PNGs plus a truncated JPEG and a text file named .jpg; test/ 4 each plus
    one unreadable file."""
    root = tmp_path_factory.mktemp("uneven")
    write_class_folders(root / "train", UNEVEN)
    write_class_folders(root / "test", {name: 4 for name in UNEVEN}, seed=1)
    jpeg = tf.io.encode_jpeg(tf.fill([40, 40, 3], tf.constant(90, tf.uint8))).numpy()
    (root / "train" / "a" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "train" / "b" / "notes.jpg").write_text("not a picture")
    (root / "test" / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return root


@pytest.mark.slow
def test_unreadable_images_stop_before_training_in_one_sentence(uneven_folder, tmp_path):
    out = run("car_tf.train", "--dataset=folder", *train_args(uneven_folder, tmp_path / "run"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert last_line(out.stderr) == (
        f"car_tf.train: The training image {uneven_folder / 'train' / 'a' / 'truncated.jpg'} is a "
        "truncated or corrupt JPEG file (and 1 more unreadable training images); replace or remove it "
        "(or fix its line in the list), or pass --skip_corrupt to leave unreadable images out."
    )
    assert not (tmp_path / "run" / "run.json").exists()
    debug = run("car_tf.train", "--dataset=folder", "--debug", *train_args(uneven_folder, tmp_path / "run"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_uneven_folder_trains_on_exactly_its_counts(uneven_folder, tmp_path):
    run_dir = tmp_path / "run"
    out = run("car_tf.train", "--dataset=folder", *train_args(uneven_folder, run_dir, "--skip_corrupt", "--epochs=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["train_counts"] == [30, 12, 5] and info["class_names"] == ["a", "b", "c"]
    assert (info["recipe"], info["image_size"]) == ("cifar", 16)  # --data_recipe=auto on 16x16 images
    assert "the cifar recipe at 16 pixels is used" in out.stderr
    assert "Skipping 2 unreadable training image(s)" in out.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert [c["name"] for c in report["per_class"]] == ["a", "b", "c"]
    assert [c["train_count"] for c in report["per_class"]] == [30, 12, 5]
    assert report["num_samples"] == 12
    assert report["skipped_test_images"] == [
        f"{uneven_folder / 'test' / 'c' / 'broken.png'}: is a truncated or corrupt PNG file"
    ]
    # A pipe gets one line per epoch, no progress bar.
    epoch_lines = [line for line in out.stdout.splitlines() if " - loss: " in line]
    assert len(epoch_lines) == 2 and "\r" not in out.stdout and "━" not in out.stdout


@pytest.mark.slow
def test_terminal_gets_a_progress_bar(uneven_folder, tmp_path):
    code, printed = run_in_terminal("car_tf.train", "--dataset=folder", "--skip_corrupt",
                                    *train_args(uneven_folder, tmp_path / "run"))
    assert code == 0, printed[-3000:]
    assert "━" in printed  # Keras's bar, redrawn within the epoch


@pytest.mark.slow
def test_other_commands_answer_user_errors_in_one_sentence(uneven_folder, tmp_path):
    invalid = tmp_path / "model.onnx"
    invalid.write_bytes(b"not a model")
    out = run("car_tf.evaluate", f"--model={invalid}", "--dataset=folder", f"--data_dir={uneven_folder}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert last_line(out.stderr) == (
        f"car_tf.evaluate: {invalid} is not a valid ONNX model (InvalidProtobuf); export it again with "
        "python -m export --format=onnx."
    )
    out = run("car_tf.dlsa", f"--model_dir={tmp_path / 'nowhere'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert last_line(out.stderr) == (
        f"car_tf.dlsa: {tmp_path / 'nowhere' / 'run.json'} does not exist; pass a run directory "
        "written by car_tf.train."
    )


def test_a_validation_split_is_carved_from_training_and_the_test_split_is_not_read(uneven_folder, tmp_path):
    import shutil

    from car_tf.data.loading import load_datasets
    from car_tf.data.config import DataConfig

    shutil.copytree(uneven_folder / "train", tmp_path / "train")  # no test/ at all
    config = DataConfig(dataset="folder", data_dir=str(tmp_path), skip_corrupt=True, validation_fraction=0.2)
    train, validation, _, _ = load_datasets(config)
    # round(0.2 * n) of each class: 6 of 30, 2 of 12, 1 of 5; the rest trains.
    assert validation.counts().tolist() == [6, 2, 1] and train.counts().tolist() == [24, 10, 4]
    assert not set(train.paths) & set(validation.paths)
    assert validation.skipped == () and len(train.skipped) == 2  # the unreadable files are training's
    again = load_datasets(config)[1]
    assert again.paths.tolist() == validation.paths.tolist()  # the same images every time


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_a_validation_fraction_outside_zero_to_one_is_refused(fraction):
    from car_tf.data.config import DataConfig

    with pytest.raises(ValueError, match="must lie strictly between 0 and 1"):
        DataConfig(validation_fraction=fraction)
