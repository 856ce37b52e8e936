"""What a new user runs into: no silent wrong answer, no lost run, no trace.

Each test is one thing a user does that once gave a wrong answer without a word, dropped data
without a word, or ended in a stack trace; it now gives the right answer or one sentence.
"""

import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

import car_tf
from car_tf import evaluate as evaluate_cli
from car_tf import train as train_cli
from car_tf.data import flags as data_flags
from car_tf.data import loading, sources
from car_tf.data.sources import LabeledData

from train_helpers import COLOURS, ROOT, parse, write_class_folders


def run(module, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def last_line(text):
    return text.strip().splitlines()[-1]


def write_list(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def data_values(*argv):
    """The DataConfig of the data flags alone, parsed from ``argv``."""
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["prog", *argv])
    return data_flags.data_config(values)


def bomb_png(path, side=20000):
    """A PNG whose header claims side x side pixels (over PIL's decompression-bomb limit) and that
    otherwise looks complete: it ends with IEND, so only its size gives it away."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


# --- 1. split lists whose folders are not classes --------------------------------------------------


def test_split_list_in_shard_folders_keeps_its_label_numbers(tmp_path):
    # Images sharded over s0/ s1/ s2/: the first image of each label happens to lie in a different
    # shard in each list, which once named the classes after shards and relabelled the test set.
    train = write_list(tmp_path / "train.txt", ["s0/a0.png 0", "s1/a1.png 1", "s2/a2.png 2",
                                                "s1/b0.png 0", "s2/b1.png 1", "s0/b2.png 2"])
    test = write_list(tmp_path / "test.txt", ["s1/t0.png 0", "s2/t1.png 1", "s0/t2.png 2", "s2/u0.png 0"])
    kwargs = dict(data_dir=tmp_path, train_list=train, test_list=test)
    training = sources.load_dataset("list", "train", **kwargs)
    testing = sources.load_dataset("list", "test", **kwargs)
    assert training.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert testing.labels.tolist() == [0, 1, 2, 0]
    assert training.class_names == testing.class_names == ["0", "1", "2"]


# --- 2. evaluate matches the model's classes to the data's by name ---------------------------------


def _colour_run(run_dir, class_names):
    """A run directory whose model tells the three colours of train_helpers apart perfectly: output
    j is the mean of the colour channel of class_names[j] ("a" red, "b" green, "c" blue)."""
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(len(class_names), use_bias=False)
    model = keras.Model(inputs, dense(pooled))
    kernel = np.zeros((3, len(class_names)), np.float32)
    for j, name in enumerate(class_names):
        kernel[int(np.argmax(COLOURS[name])), j] = 1.0
    dense.kernel.assign(kernel)
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    (run_dir / "run.json").write_text(json.dumps({"class_names": class_names, "recipe": "cifar",
                                                  "train_counts": [4] * len(class_names)}))
    return run_dir


def test_evaluate_on_data_listing_the_models_classes_in_another_order_matches_them_by_name(tmp_path):
    run_dir = _colour_run(tmp_path / "run", ["c", "a", "b"])  # the data's folders sort as a, b, c
    write_class_folders(tmp_path / "data" / "train", {"a": 4, "b": 4, "c": 4})
    write_class_folders(tmp_path / "data" / "test", {"a": 5, "b": 5, "c": 5}, seed=1)
    out = run("car_tf.evaluate", f"--model={run_dir}", "--dataset=folder", f"--data_dir={tmp_path / 'data'}",
              f"--output_dir={tmp_path / 'eval'}")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["top1"] == 1.0  # matched by position it was 0
    assert [row["name"] for row in report["per_class"]] == ["c", "a", "b"]


class _Named:
    def __init__(self, class_names, num_classes=3):
        self.class_names, self.num_classes = class_names, num_classes


def _split(names, labels):
    return LabeledData(labels=labels, class_names=names, paths=[f"/x/{i}.png" for i in range(len(labels))])


def test_evaluate_on_renamed_class_folders_is_refused_naming_the_classes():
    data = _split(["a", "b", "kitten"], [0, 1, 2])
    with pytest.raises(ValueError) as error:
        evaluate_cli.match_model_classes(_Named(["a", "b", "cat"]), "runs/x", data, data)
    assert str(error.value) == (
        "The data's classes differ from those runs/x was trained on: the model's class(es) 'cat' are not "
        "in the data and the data's class(es) 'kitten' are not in the model; evaluate on data with the "
        "model's classes (matched by class name).")


def test_evaluate_with_a_model_that_records_no_class_names_matches_by_position_and_says_so(caplog):
    data = _split(["x", "y", "z"], [2, 0, 1])
    with caplog.at_level("INFO", logger="absl"):
        train, test = evaluate_cli.match_model_classes(_Named(None), "model.onnx", data, data)
    assert test is data and train is data
    assert "model.onnx records no class names" in caplog.text and "by position" in caplog.text


# --- 3. every entry of a class folder is read or named ----------------------------------------------


def _unreadable_entry(folder, kind):
    """An entry of a class folder that TensorFlow cannot read; returns its path and the reason named."""
    pixels = np.full((8, 8, 3), 90, np.uint8)
    if kind == "webp":
        Image.fromarray(pixels).save(folder / "photo.webp")
        return folder / "photo.webp", "is a WebP image, which TensorFlow does not decode"
    if kind == "tif":
        Image.fromarray(pixels).save(folder / "scan.tif")
        return folder / "scan.tif", "is a TIFF image, which TensorFlow does not decode"
    if kind == "text":
        (folder / "notes.txt").write_text("where these came from")
        return folder / "notes.txt", "is not a JPEG, PNG, GIF or BMP image"
    if kind == "subfolder":
        (folder / "more").mkdir()
        Image.fromarray(pixels).save(folder / "more" / "0.png")
        return folder / "more", "is a folder, not an image file"
    os.symlink(folder / "gone.png", folder / "link.png")  # a dangling link
    return folder / "link.png", f"is a symbolic link to {folder / 'gone.png'}, which does not exist"


@pytest.mark.parametrize("kind", ["webp", "tif", "text", "subfolder", "dangling_link"])
def test_class_folder_entry_that_is_no_readable_image_is_named_or_skipped(tmp_path, kind):
    write_class_folders(tmp_path / "train", {"a": 3, "b": 3})
    write_class_folders(tmp_path / "test", {"a": 2, "b": 2}, seed=1)
    (tmp_path / "train" / "a" / ".DS_Store").write_text("hidden files are left out")
    path, reason = _unreadable_entry(tmp_path / "train" / "a", kind)
    argv = ["--dataset=folder", f"--data_dir={tmp_path}", "--data_recipe=cifar"]
    with pytest.raises(ValueError) as error:
        loading.load_datasets(data_values(*argv))
    assert str(error.value).startswith(f"The training image {path} {reason}")
    assert "\n" not in str(error.value) and "--skip_corrupt" in str(error.value)
    train, _, _, _ = loading.load_datasets(data_values(*argv, "--skip_corrupt"))
    assert train.counts().tolist() == [3, 3]
    assert len(train.skipped) == 1 and train.skipped[0].startswith(f"{path}: {reason}")


# --- 4. serve_onnx decodes as evaluate does, and names what it cannot classify ----------------------


@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
def test_serve_onnx_reads_a_16_bit_png_as_evaluate_does(tmp_path, recipe):
    from car_tf.data.pipelines import eval_dataset
    from export.serve_onnx import load_image

    rng = np.random.default_rng(0)
    gray = tmp_path / "gray16.png"
    gray.write_bytes(tf.io.encode_png(rng.integers(0, 65536, (12, 10, 1)).astype(np.uint16)).numpy())
    colour = tmp_path / "rgb16.png"
    colour.write_bytes(tf.io.encode_png(rng.integers(0, 65536, (9, 14, 3)).astype(np.uint16)).numpy())
    files = [str(gray), str(colour)]
    data = LabeledData(labels=[0, 0], class_names=["x"], paths=files)
    (expected, _), = eval_dataset(data, recipe=recipe, image_size=8, batch_size=2)
    served = np.stack([load_image(path, 8, recipe) for path in files])
    assert served[0].max() < 250  # PIL alone clipped the 16-bit gray image to white
    np.testing.assert_allclose(served, expected.numpy(), atol=2e-3)


def _mean_colour_onnx(path, class_names=("red", "green", "blue"), size=8):
    """A tiny ONNX classifier with serve_onnx's metadata: logits = the mean of each colour channel."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "eye"], ["logits"])],
        "mean_colour",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, len(class_names)])],
        [helper.make_tensor("eye", TensorProto.FLOAT, [3, 3], np.eye(3, dtype=np.float32).ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"image_size": str(size), "recipe": "cifar",
                                   "class_names": json.dumps(list(class_names))})
    onnx.save(model, path)
    return path


def _red_png(path):
    Image.fromarray(np.tile(np.array([200, 30, 30], np.uint8), (8, 8, 1))).save(path)
    return str(path)


def test_serve_onnx_refuses_top_k_below_one_and_caps_it_at_the_class_count(tmp_path):
    model, image = _mean_colour_onnx(tmp_path / "model.onnx"), _red_png(tmp_path / "red.png")
    for bad in ("0", "-1"):
        out = run("export.serve_onnx", f"--model={model}", f"--top_k={bad}", image)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
        assert out.stderr.strip() == (
            f"serve_onnx: --top_k={bad} must be at least 1: the number of classes to print per image.")
    out = run("export.serve_onnx", f"--model={model}", "--top_k=10", image)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "serve_onnx: --top_k=10 is more than the model's 3 classes; printing all of them."
    assert out.stdout.startswith(f"{image}: red ") and out.stdout.count(",") == 2


def test_serve_onnx_names_an_image_over_the_decompression_bomb_limit_and_classifies_the_rest(tmp_path):
    model, image = _mean_colour_onnx(tmp_path / "model.onnx"), _red_png(tmp_path / "red.png")
    bomb = bomb_png(tmp_path / "bomb.png")
    out = run("export.serve_onnx", f"--model={model}", "--top_k=1", str(bomb), image)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stdout.strip() == f"{image}: red 1.000"
    problem = out.stderr.strip().splitlines()
    assert len(problem) == 1 and problem[0].startswith(f"serve_onnx: {bomb} is over PIL's decompression-bomb limit (")
    assert problem[0].endswith("; replace the file or leave it out.")


# --- 5. settings that train the wrong way, labels that are silently floored -----------------------


@pytest.mark.parametrize("flag, message", [
    ("--lr=-0.1", "--lr=-0.1 must be above 0"),
    ("--lr=0", "--lr=0.0 must be above 0"),
    ("--momentum=1", "--momentum=1.0 must lie in [0, 1)"),
    ("--momentum=-0.5", "--momentum=-0.5 must lie in [0, 1)"),
    ("--weight_decay=-1e-4", "--weight_decay=-0.0001 must not be negative"),
    ("--lr_decay_factor=0", "--lr_decay_factor=0.0 must be above 0"),
    ("--lr_decay_epochs=abc", "--lr_decay_epochs=abc must be whole epoch numbers separated by commas"),
])
def test_training_with_a_learning_rate_setting_that_trains_the_wrong_way_is_refused(tmp_path, flag, message):
    run_dir = tmp_path / "run"
    values = parse(["--dataset=folder", f"--data_dir={tmp_path}", f"--model_dir={run_dir}", flag])
    with pytest.raises(ValueError) as error:
        train_cli.train_and_evaluate(values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not run_dir.exists()


def test_car_loss_given_fractional_labels_stops_in_one_sentence():
    counts = [40, 20, 10, 5]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=16).astype(np.float32)
    y[3] = 1.5
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    loss = car_tf.CARLoss(counts, base="ce")
    model.compile(keras.optimizers.SGD(0.1), loss=loss)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[car_tf.CARCallback(loss)])
    assert "CARLoss got a hard label that is not a whole number (such as 1.5)" in str(error.value)
    y[3] = 1.0  # whole numbers as floats are class ids
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[car_tf.CARCallback(loss)])


# --- 6. hostile tarballs ----------------------------------------------------------------------------


def _hostile_tarball(path, kind):
    """A CIFAR-style tarball with one good image and one member tarfile's data filter refuses."""
    good = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data=None, **attributes):
            info = tarfile.TarInfo(name)
            for key, value in attributes.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
                tar.addfile(info, tarfile.io.BytesIO(data))
            else:
                tar.addfile(info)

        add("cifar10/train/a/0.png", good)
        member = {
            "parent_path": ("../evil.png", dict(data=good)),
            "absolute_path": ("/tmp/car_tf_evil.png", dict(data=good)),
            "symlink_out": ("cifar10/train/a/link.png", dict(type=tarfile.SYMTYPE, linkname="../../../../etc/passwd")),
            "absolute_symlink": ("cifar10/train/a/link.png", dict(type=tarfile.SYMTYPE, linkname="/etc/passwd")),
            "hardlink_out": ("cifar10/train/a/hard.png", dict(type=tarfile.LNKTYPE, linkname="../../etc/passwd")),
            "link_to_directory": ("cifar10/train/b", dict(type=tarfile.SYMTYPE, linkname="/etc")),
        }[kind]
        attributes = dict(member[1])
        add(member[0], attributes.pop("data", None), **attributes)
    return member[0]


@pytest.mark.parametrize("kind", ["parent_path", "absolute_path", "symlink_out", "absolute_symlink",
                                  "hardlink_out", "link_to_directory"])
def test_hostile_tarball_as_data_is_refused_in_one_sentence_and_leaves_nothing(tmp_path, monkeypatch, kind):
    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    tarball = data / "cifar10.tar.gz"
    member = _hostile_tarball(tarball, kind)
    with pytest.raises(ValueError) as error:
        sources.load_dataset("cifar10", "train", data_dir=tarball)
    message = str(error.value)
    assert message.startswith(f"Tarball {tarball} holds member {member!r}, which ")
    assert message.endswith("; nothing was unpacked: repack it with plain files and folders only.")
    assert "\n" not in message
    assert sorted(os.listdir(data)) == ["cifar10.tar.gz"]  # no staging folder, no half-unpacked tree
    assert not (tmp_path / "car_tf_evil.png").exists() and not (tmp_path / "evil.png").exists()


# --- 7. a decompression bomb among the training images ---------------------------------------------


def test_training_image_over_the_decompression_bomb_limit_is_named_or_skipped(tmp_path):
    write_class_folders(tmp_path / "train", {"a": 3, "b": 3})
    write_class_folders(tmp_path / "test", {"a": 2, "b": 2}, seed=1)
    bomb = bomb_png(tmp_path / "train" / "b" / "huge.png")
    argv = ["--dataset=folder", f"--data_dir={tmp_path}", "--data_recipe=auto"]
    with pytest.raises(ValueError) as error:
        loading.load_datasets(data_values(*argv))
    assert str(error.value).startswith(
        f"The training image {bomb} is 20000 x 20000 pixels, over PIL's decompression-bomb limit of ")
    train, _, recipe, image_size = loading.load_datasets(data_values(*argv, "--skip_corrupt"))
    assert train.counts().tolist() == [3, 3] and len(train.skipped) == 1
    assert (recipe, image_size) == ("cifar", 16)


# --- 8. split-list paths outside --data_dir ---------------------------------------------------------


@pytest.mark.parametrize("outside", ["../outside/secret.jpg", "ABSOLUTE"])
def test_split_list_path_outside_data_dir_is_refused(tmp_path, outside):
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.jpg"
    secret.write_bytes(tf.io.encode_jpeg(np.zeros((4, 4, 3), np.uint8)).numpy())
    root = tmp_path / "data"
    root.mkdir()
    outside = str(secret) if outside == "ABSOLUTE" else outside
    train = write_list(tmp_path / "train.txt", ["a/x.jpg 0", f"{outside} 0", "b/y.jpg 1"])
    with pytest.raises(ValueError) as error:
        sources.load_dataset("list", "train", data_dir=root, train_list=train, test_list=train)
    assert str(error.value) == (
        f"{train}, line 2: path {outside!r} leaves --data_dir ({root}); list only paths relative to "
        "--data_dir, inside it.")


# --- 9. a mistyped method ----------------------------------------------------------------------------


def test_unknown_method_exits_2_in_one_sentence(tmp_path):
    out = run("car_tf.train", "--method=carr", f"--model_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert last_line(out.stderr).startswith("car_tf.train: flag --method=carr: value should be one of <ce|")
    assert last_line(out.stderr).endswith("(--helpfull lists every flag and its values).")
    assert not (tmp_path / "run").exists()


# --- 10. the run directory: what --overwrite deletes, one process at a time, checksums, advice -----
#
# A tiny finished run is trained once (2 epochs) and copied where a test changes it.

import shutil  # noqa: E402  (this section's own imports)
import socket  # noqa: E402

import h5py  # noqa: E402

from car_tf.training import checkpointing, run_directory  # noqa: E402

from train_helpers import tiny_args  # noqa: E402


def _files(folder):
    """{relative path: bytes} of every file below ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train(*argv):
    return train_cli.train_and_evaluate(parse(list(argv)))


@pytest.fixture(scope="module")
def finished_tiny_run(tiny_folder, tmp_path_factory):
    """A finished 2-epoch CE run of the tiny image folder."""
    run_dir = tmp_path_factory.mktemp("probe_runs") / "finished"
    _train(*tiny_args(tiny_folder, run_dir, "--epochs=2"))
    return run_dir


def _h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.mark.slow
def test_overwrite_with_a_mistyped_data_dir_is_refused_before_deleting_the_run(finished_tiny_run, tmp_path):
    run_dir = shutil.copytree(finished_tiny_run, tmp_path / "run")
    before = _files(run_dir)
    with pytest.raises((ValueError, OSError), match="does not exist"):
        _train(*tiny_args(tmp_path / "mistyped", run_dir, "--epochs=2", "--overwrite"))
    assert _files(run_dir) == before  # the finished run is still there


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["thesis_with_a_flags_txt", "run_with_the_users_notes"])
def test_overwrite_of_a_folder_holding_files_car_tf_did_not_write_is_refused_naming_them(
        finished_tiny_run, tiny_folder, tmp_path, folder):
    if folder == "thesis_with_a_flags_txt":
        run_dir = tmp_path / "thesis"
        (run_dir / "src").mkdir(parents=True)
        (run_dir / "flags.txt").write_text("--lr=0.1\n")
        (run_dir / "thesis.tex").write_text("\\chapter{Results}")
        (run_dir / "src" / "main.py").write_text("print('mine')")
        named = ["src/", "thesis.tex"]
    else:
        run_dir = shutil.copytree(finished_tiny_run, tmp_path / "run")
        (run_dir / "notes.txt").write_text("lr 0.05 looked best")
        (run_dir / "checkpoints" / "keep_me.txt").write_text("the good one")
        named = ["checkpoints/keep_me.txt", "notes.txt"]
    before = _files(run_dir)
    with pytest.raises(run_directory.RunConflict) as refusal:
        _train(*tiny_args(tiny_folder, run_dir, "--epochs=1", "--overwrite"))
    message = str(refusal.value)
    assert message.startswith(f"--overwrite deletes only the files car_tf writes, but {run_dir} also holds others "
                              f"({', '.join(named)}); ")
    assert "\n" not in message
    assert _files(run_dir) == before


def test_second_training_in_a_run_directory_being_trained_is_refused_naming_the_process(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(["sleep", "120"])  # stands for the first training, still running
    try:
        lock = json.dumps({"pid": holder.pid, "host": socket.gethostname()})
        (run_dir / "train.lock").write_text(lock)
        with pytest.raises(run_directory.RunConflict) as refusal:
            _train(*tiny_args(tiny_folder, run_dir, "--epochs=1"))
    finally:
        holder.kill()
        holder.wait()
    message = str(refusal.value)
    assert message.startswith(f"{run_dir} is being trained by process {holder.pid} on {socket.gethostname()}")
    assert "\n" not in message and "--model_dir" in message
    assert _files(run_dir) == {"train.lock": lock.encode()}  # nothing else written


@pytest.mark.slow
def test_rerun_after_a_killed_training_takes_over_its_lock_with_a_warning(finished_tiny_run, tiny_folder, tmp_path,
                                                                          caplog, capsys):
    run_dir = shutil.copytree(finished_tiny_run, tmp_path / "run")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that ran and ended: its lock was left behind
    (run_dir / "train.lock").write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
    with caplog.at_level("WARNING"):
        _train(*tiny_args(tiny_folder, run_dir, "--epochs=2"))
    assert "already finished its 2 epochs" in capsys.readouterr().out
    assert f"Taking over the lock of {run_dir} from process {dead_pid}" in caplog.text
    assert not (run_dir / "train.lock").exists()


@pytest.mark.slow
def test_resuming_from_a_checkpoint_zeroed_in_its_middle_falls_back_to_the_one_before_with_a_warning(
        finished_tiny_run, tiny_folder, tmp_path, caplog):
    run_dir = shutil.copytree(finished_tiny_run, tmp_path / "run")
    newest = checkpointing.checkpoint_path(run_dir / "checkpoints", 2)
    uninterrupted = _h5_arrays(newest)
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 1024] = bytes(1024)
    newest.write_bytes(bytes(data))
    assert _h5_arrays(newest).keys() == uninterrupted.keys()  # HDF5 still reads it: only the bytes tell
    with caplog.at_level("INFO"):
        _train(*tiny_args(tiny_folder, run_dir, "--epochs=3"))  # a longer run resumes from the checkpoint
    assert f"Checkpoint {newest} is damaged" in caplog.text
    with (run_dir / "history.csv").open() as f:
        assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == ["0", "1", "2"]
    # Epoch 2 was trained again from epoch 1's checkpoint, to the weights of the uninterrupted run.
    retrained = _h5_arrays(newest)
    for name, array in uninterrupted.items():
        np.testing.assert_allclose(retrained[name], array, atol=1e-6, err_msg=name)


def test_resuming_checkpoints_written_before_checksums_loads_them_without_a_warning(tmp_path, caplog):
    # Compatibility, not a probed failure: a run's checkpoints from before checksums still resume.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.layers[0].kernel.assign(np.full((3, 2), 7.0, "float32"))
    checkpointing.save(model, tmp_path, 1)
    checkpointing.checksum_path(checkpointing.checkpoint_path(tmp_path, 1)).unlink()
    model.layers[0].kernel.assign(np.zeros((3, 2), "float32"))
    with caplog.at_level("WARNING"):
        assert checkpointing.restore(model, tmp_path) == 1
    assert caplog.text == ""
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), np.full((3, 2), 7.0))


@pytest.mark.slow
def test_following_the_nan_advice_to_the_letter_starts_the_run_over(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    diverging = tiny_args(tiny_folder, run_dir, "--epochs=1", "--lr=1e12")
    with pytest.raises(FloatingPointError) as stop:
        _train(*diverging)
    advice = str(stop.value)
    assert "lower --lr" in advice and f"rerun with the lower --lr and --overwrite to replace {run_dir}" in advice
    assert "resume" not in advice  # a run's --lr cannot change when it resumes
    report = _train(*diverging, "--lr=0.05", "--overwrite")  # the later --lr wins
    assert np.isfinite(report["top1"])
    assert "--lr=0.05" in (run_dir / "flags.txt").read_text().splitlines()


@pytest.mark.slow
def test_validation_fraction_holding_out_no_image_is_refused_before_writing_and_the_corrected_rerun_trains(
        tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as refusal:
        _train(*tiny_args(tiny_folder, run_dir, "--epochs=1", "--validation_fraction=0.01"))
    assert str(refusal.value).startswith("--validation_fraction=0.01 holds out no image")
    assert "raise it, e.g. to 0.1" in str(refusal.value)
    assert not run_dir.exists()
    _train(*tiny_args(tiny_folder, run_dir, "--epochs=1", "--validation_fraction=0.1"))
    assert run_directory.read_run_info(run_dir)["evaluated_on"] == "validation"


# --- --skip_corrupt in full, car_tf's sentences through compiled steps, CAR's weights and ties -----
#
# A JPEG corrupt in its middle (intact header and end marker) passes the cheap check of a few bytes
# at each end; --skip_corrupt decodes every file in full before the first step. A check of car_tf's
# that stops a compiled step is printed as its own sentence on every backend.

from car_tf import backend as car_backend  # noqa: E402  (this section's own imports)
from car_tf import cli  # noqa: E402
from car_tf.evaluation import metrics  # noqa: E402
from car_tf.evaluation import report as report_module  # noqa: E402

from train_helpers import tiny_args as _tiny_args  # noqa: E402
from train_helpers import write_tiny_folder  # noqa: E402


def _jpeg_corrupt_in_its_middle(path, seed=0):
    """A 48 x 48 JPEG with a second start-of-image marker in the middle of its scan: its header and
    end marker are intact, so only a full decode finds it broken."""
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    data = bytearray(tf.io.encode_jpeg(pixels).numpy())
    middle = len(data) // 2
    data[middle : middle + 2] = b"\xff\xd8"
    path.write_bytes(bytes(data))
    assert sources.image_file_problem(str(path)) is None  # the cheap check cannot tell
    return path


def _evaluate(*argv):
    """``python -m car_tf.evaluate`` in this process, on flags of its own: (report, output dir)."""
    values = flags.FlagValues()
    evaluate_cli.define_flags(values)
    values(["evaluate", *argv])
    return evaluate_cli.evaluate_from_flags(values)


@pytest.mark.slow
def test_training_with_skip_corrupt_leaves_jpegs_corrupt_in_their_middle_out_of_training_test_and_run_json(tmp_path):
    data = write_tiny_folder(tmp_path / "data", train_per_class=12, test_per_class=4)
    bad_train = _jpeg_corrupt_in_its_middle(data / "train" / "c" / "zz_broken.jpg")
    bad_test = _jpeg_corrupt_in_its_middle(data / "test" / "b" / "zz_broken.jpg", seed=1)

    def argv(run_dir, *extra):  # every image as it is: no long-tailed subset
        return [a for a in _tiny_args(data, run_dir, "--epochs=1", *extra) if not a.startswith("--imbalance_factor")]

    # Without --skip_corrupt the stream names the first such file, in one sentence.
    with pytest.raises(tf.errors.InvalidArgumentError) as stop:
        train_cli.train_and_evaluate(parse(argv(tmp_path / "strict")))
    assert cli.sentence(stop.value) == (f"image file {bad_train} cannot be read or decoded; replace or delete "
                                        "it, or pass --skip_corrupt to leave unreadable images out.")
    # With it, both files are left out before the first step: of training, of the test, of the counts.
    run_dir = tmp_path / "run"
    train_cli.train_and_evaluate(parse(argv(run_dir, "--skip_corrupt")))
    assert json.loads((run_dir / "run.json").read_text())["train_counts"] == [12, 12, 12]  # was 13 for c
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["num_samples"] == 12
    assert saved["skipped_test_images"] == [f"{bad_test}: is a corrupt JPEG file (it cannot be decoded)"]


def test_evaluate_with_skip_corrupt_leaves_a_test_jpeg_corrupt_in_its_middle_out(tmp_path):
    run_dir = _colour_run(tmp_path / "run", ["a", "b", "c"])
    write_class_folders(tmp_path / "data" / "train", {"a": 2, "b": 2, "c": 2})
    write_class_folders(tmp_path / "data" / "test", {"a": 3, "b": 3, "c": 3}, seed=1)
    bad = _jpeg_corrupt_in_its_middle(tmp_path / "data" / "test" / "a" / "zz_broken.jpg")
    report, output_dir = _evaluate(f"--model={run_dir}", "--dataset=folder", f"--data_dir={tmp_path / 'data'}",
                                   "--skip_corrupt", f"--output_dir={tmp_path / 'eval'}")
    assert report["num_samples"] == 9 and report["top1"] == 1.0
    saved = json.loads((output_dir / "report.json").read_text())
    assert saved["skipped_test_images"] == [f"{bad}: is a corrupt JPEG file (it cannot be decoded)"]


def test_skip_corrupt_under_jax_or_pytorch_finds_a_jpeg_corrupt_in_its_middle_with_their_decoder(
        tmp_path, monkeypatch):
    write_class_folders(tmp_path, {"a": 3, "b": 3})
    bad = _jpeg_corrupt_in_its_middle(tmp_path / "b" / "zz_broken.jpg")
    monkeypatch.setattr(car_backend, "is_tensorflow", lambda: False)  # PIL decodes into memory there
    data = sources.check_images(sources.read_image_folder(tmp_path), "training", skip_corrupt=True)
    assert data.counts().tolist() == [3, 3]
    assert data.skipped == (f"{bad}: is a corrupt JPEG file (it cannot be decoded)",)


SEMANTICS_RUNS = ROOT / "tests" / "backends" / "car_semantics_runs.py"


_OUT_OF_RANGE_TRAIN = '''
import runpy, sys
import numpy as np
import car_tf.data.streams as streams

original = streams.training_stream


def shifted(*args, **kwargs):  # every training label shifted out of [0, 3), as a broken data source
    stream = original(*args, **kwargs)
    if hasattr(stream, "map"):  # tf.data
        return stream.map(lambda x, y: (x, y + 7))
    return ((x, np.asarray(y) + 7) for x, y in stream)


streams.training_stream = shifted
sys.argv = ["car_tf.train", *sys.argv[1:]]
runpy.run_module("car_tf.train", run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.parametrize("keras_backend", ["tensorflow", "jax", "torch"])
def test_training_car_on_labels_out_of_range_prints_one_sentence(tmp_path, keras_backend):
    write_class_folders(tmp_path / "data" / "train", {"a": 4, "b": 4, "c": 4})
    write_class_folders(tmp_path / "data" / "test", {"a": 2, "b": 2, "c": 2}, seed=1)
    script = tmp_path / "train_out_of_range.py"
    script.write_text(_OUT_OF_RANGE_TRAIN)
    env = {**os.environ, "KERAS_BACKEND": keras_backend, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(script), "--dataset=folder", f"--data_dir={tmp_path / 'data'}", "--data_recipe=cifar",
         "--image_size=16", f"--model_dir={tmp_path / 'run'}", "--batch_size=6", "--epochs=1",
         "--warmup_epochs=0", "--method=car", "--noverbose"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert last_line(out.stderr) == ("car_tf.train: a label lies outside [0, 3); check the data set's labels "
                                     "and the number of classes.")
    assert "Traceback" not in out.stderr and "Graph execution error" not in out.stderr


def test_car_under_pytorch_with_nan_logits_or_an_infinite_lambda_reaches_the_nan_guard(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run([sys.executable, str(SEMANTICS_RUNS), "nonfinite", str(tmp_path / "torch.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, losses in json.loads((tmp_path / "torch.json").read_text()).items():
        assert isinstance(losses, list), f"{name}: {losses}"  # was torch._C._LinAlgError from the SVD
        assert not np.isfinite(losses[-1]), name  # what the trainer's NaN guard stops with its sentence


def test_evaluate_of_a_keras_file_whose_layer_names_os_system_is_refused_in_one_sentence(tmp_path):
    import zipfile

    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    model.save(tmp_path / "good.keras")
    with zipfile.ZipFile(tmp_path / "good.keras") as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    marker = tmp_path / "ran"
    config["config"]["layers"][-1].update(module="os", class_name="system", registered_name=None,
                                          config={"command": f"touch {marker}"})
    files["config.json"] = json.dumps(config).encode()
    hostile = tmp_path / "model.keras"
    with zipfile.ZipFile(hostile, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    write_class_folders(tmp_path / "data" / "train", {"a": 2, "b": 2, "c": 2})
    write_class_folders(tmp_path / "data" / "test", {"a": 2, "b": 2, "c": 2}, seed=1)
    with pytest.raises(ValueError) as refusal:
        _evaluate(f"--model={hostile}", "--dataset=folder", f"--data_dir={tmp_path / 'data'}")
    message = str(refusal.value)
    assert message.startswith(f"{hostile} is not a model car_tf can load safely: ")
    assert "it names class os.system" in message and "\n" not in message and cli.is_user_error(refusal.value)
    assert not marker.exists()


def test_car_with_zero_sample_weight_padding_moves_neither_the_batch_confusion_nor_the_ema():
    counts = [40, 20, 8, 4]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 6)).astype(np.float32), rng.integers(0, 4, 12)
    padding_x, padding_y = 5.0 * rng.normal(size=(4, 6)).astype(np.float32), rng.integers(0, 4, 4)

    def ema_after_one_step(x, y, sample_weight=None, **settings):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
        model.layers[0].set_weights([np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4), np.zeros(4, np.float32)])
        loss = car_tf.CARLoss(counts, spec_lambda=0.5, **settings)
        model.compile(keras.optimizers.SGD(0.1), loss=loss)
        model.fit(x, y, sample_weight=sample_weight, batch_size=len(x), epochs=1, verbose=0,
                  callbacks=[car_tf.CARCallback(loss)])
        return model.car_state.ema_matrix().numpy(), float(model.car_state.last_sigma.numpy())

    for settings in ({}, {"spectral_method": "power", "sparse_ema_entries": 2}):
        alone = ema_after_one_step(x, y, **settings)
        padded = ema_after_one_step(np.concatenate([x, padding_x]), np.concatenate([y, padding_y]),
                                    np.r_[np.ones(12), np.zeros(4)].astype(np.float32), **settings)
        np.testing.assert_allclose(padded[0], alone[0], rtol=1e-6, atol=1e-8)
        assert padded[1] == pytest.approx(alone[1], rel=1e-6)


def test_report_of_a_model_whose_logits_overflowed_gives_a_finite_ece_and_says_why():
    # Float16 features that overflow under --mixed_precision=mixed_float16 reach the float32
    # classifier as inf, so its logits are +-inf or NaN (inf - inf); the softmax of +inf was NaN.
    logits = np.array([[4.0, 1.0, 0.0], [np.inf, 0.0, -np.inf], [np.inf, np.inf, 1.0], [np.nan, 0.0, 1.0],
                       [0.0, 3.0, 1.0], [-np.inf, 0.0, 2.0]], np.float32)
    report = metrics.per_class_report(logits, [0, 0, 1, 2, 1, 2], [30, 10, 3])
    assert np.isfinite(report["ece"])
    probs = metrics.to_probabilities(logits)
    np.testing.assert_allclose(probs[1:4], [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])
    note = ("4 of 6 samples have non-finite logits (3 infinite, 1 NaN), as where float16 activations "
            "overflow under --mixed_precision=mixed_float16")
    assert any(n.startswith(note) for n in report["notes"])
    assert f"note: {note}" in report_module.format_table(report)


@pytest.mark.parametrize("module, args, message", [
    ("car_tf.compare", ["--methods=nope"], "names no known method"),
    ("car_tf.compare", ["--method_flags=x"], "--method_flags=x must read METHOD:--flag=value"),
    ("car_tf.search", ["--seeds=a"], "--seeds=a must be whole numbers"),
    ("car_tf.search", ["--vary=lr"], "--vary=lr must name a train flag and its values"),
])
def test_a_comparison_or_search_refused_for_its_own_flags_creates_no_output_directory(tmp_path, module, args,
                                                                                     message):
    where = tmp_path / "runs"
    done = run(module, *args, f"--output_dir={where}")
    assert done.returncode == 2 and message in last_line(done.stderr), done.stderr[-2000:]
    assert not where.exists()
