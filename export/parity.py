"""Output comparisons between an exported model and its Keras source, and the images they run on."""

import json
import os
import pathlib

import numpy as np
from absl import logging

from car_tf.backend import import_tensorflow
from car_tf.data.pipelines import decode_image
from export.saved_model import eval_preprocess

tf = import_tensorflow(__name__)

PARITY_BATCH_SIZES = (1, 32)
PARITY_TOLERANCE = 1e-4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class ExportParityError(RuntimeError):
    """An exported model whose outputs differ from the Keras model's beyond the tolerance."""


def batch_of(images, batch_size):
    """The first ``batch_size`` images, cycling through ``images`` when there are fewer."""
    return np.take(images, np.arange(batch_size) % len(images), axis=0)


def check_parity(reference, candidate, images, what, batch_sizes=PARITY_BATCH_SIZES, atol=PARITY_TOLERANCE):
    """Max |reference(x) - candidate(x)| per batch size; raises ExportParityError above the tolerance.

    ``reference`` and ``candidate`` map a uint8 batch [B, S, S, 3] to arrays of equal shape. The
    tolerance is ``atol * max(1, max |reference(x)|)``: absolute for outputs of unit scale, relative for
    large logits, whose float32 spacing alone exceeds 1e-4 above about 500.
    """
    differences = {}
    for batch_size in batch_sizes:
        batch = batch_of(images, batch_size)
        expected = np.asarray(reference(batch), dtype=np.float64)
        actual = np.asarray(candidate(batch), dtype=np.float64)
        if expected.shape != actual.shape:
            raise ExportParityError(
                f"{what} returns shape {actual.shape} for batch size {batch_size}, Keras {expected.shape}; "
                "the export is broken, re-export with another --opset or report it."
            )
        differences[batch_size] = float(np.max(np.abs(expected - actual)))
        tolerance = atol * max(1.0, float(np.max(np.abs(expected))))
        if not differences[batch_size] <= tolerance:
            raise ExportParityError(
                f"{what} differs from the Keras model by {differences[batch_size]:.3g} (> {tolerance:.3g}) at "
                f"batch size {batch_size}; the exported file is wrong, do not deploy it (try another --opset)."
            )
    return differences


def _prepare(images, image_size, recipe):
    """Image files or uint8 arrays -> uint8 [n, S, S, 3] through the evaluation resize and crop."""
    prepared = []
    for image in images:
        if isinstance(image, (str, pathlib.Path)):
            image = decode_image(tf.io.read_file(str(image)))
        resized = eval_preprocess(tf.cast(image, tf.float32), image_size, recipe)
        prepared.append(np.clip(np.rint(resized.numpy()), 0, 255).astype(np.uint8))
    return np.stack(prepared)


def _run_test_images(run_dir, count):
    from car_tf.data.sources import DATA_DIR_ENV, load_dataset

    from car_tf.training.run_directory import read_flagfile

    run_info = json.loads((pathlib.Path(run_dir) / "run.json").read_text())
    flags = {name: line.split("=", 1)[1] for name, line in (read_flagfile(run_dir) or {}).items() if "=" in line}
    data_dir = flags.get("data_dir") or os.environ.get(DATA_DIR_ENV)
    if not data_dir or "dataset" not in run_info:
        return None  # without a local data folder the loader would download: never do that here
    data = load_dataset(run_info["dataset"], "test", data_dir=data_dir,
                        train_list=flags.get("train_list"), test_list=flags.get("test_list"))
    picks = np.linspace(0, data.size - 1, min(count, data.size)).astype(int)
    return list(data.paths[picks]) if data.paths is not None else list(data.images[picks])


def parity_images(run_dir, image_size, recipe, image_dir=None, count=32):
    """uint8 [n, S, S, 3] real images for the parity checks.

    From ``image_dir`` (image files, searched recursively) if given, else the run's test split
    (run.json "dataset" with data_dir/train_list/test_list from flags.txt), else -- with a warning --
    uniform noise.
    """
    if image_dir is not None:
        files = sorted(p for p in pathlib.Path(image_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{image_dir} holds no image files; pass a folder of .jpg/.png images.")
        return _prepare(files[:count], image_size, recipe)
    try:
        images = _run_test_images(run_dir, count)
    except (ValueError, OSError) as error:
        logging.warning("Cannot read the run's test images (%s).", error)
        images = None
    if images:
        return _prepare(images, image_size, recipe)
    logging.warning("No real images for the parity check; using noise. Pass --parity_images=DIR to fix.")
    return np.random.default_rng(0).integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
