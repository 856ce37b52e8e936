"""Tiny runs of the training CLI for tests: a 3-class image folder and its command line."""

import pathlib

import numpy as np
import tensorflow as tf
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
COUNTS = {"a": 36, "b": 16, "c": 8}  # what --imbalance_factor=4.5 keeps of 36 images a class
COLOURS = {"a": (220, 40, 40), "b": (40, 200, 40), "c": (40, 40, 220)}


def write_class_folders(root, counts, seed=0):
    """Class folders of noisy 16x16 PNGs in each class's colour, ``counts[name]`` images each."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            noise = rng.normal(0, 30, size=(16, 16, 3))
            image = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
            tf.io.write_file(str(folder / f"{i:03d}.png"), tf.io.encode_png(image))
    return root


def write_tiny_folder(root, train_per_class=36, test_per_class=8):
    """A 3-class image-folder data set of 16x16 PNGs (train/ and test/ trees) under ``root``."""
    write_class_folders(root / "train", {name: train_per_class for name in COLOURS})
    write_class_folders(root / "test", {name: test_per_class for name in COLOURS}, seed=1)
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
