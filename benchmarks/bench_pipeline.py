"""Throughput of the CIFAR training pipeline with and without the ConCutMix stage, in one run.

    python -m benchmarks.bench_pipeline [--batch_size=256] [--batches=30] [--rounds=9]

Data: CIFAR-10-LT (IF 100, 12,406 images) from ../shared/data/cifar10-jpg.tar.gz, unpacked to a
temporary folder, both as JPEG files decoded per step and decoded once into memory; synthetic
uint8 arrays of the same size where the tarball is absent. The plain pipeline is
car_tf.data.train_dataset (recipe "cifar": pad-4 crop + flip); the ConCutMix pipeline adds
concutmix_stage on top (class-balanced partners with the same crop + flip, CutMix, two more
crop + flip views of every image), with the crop + flip run per image (per_image(pad_crop_flip))
or batch-wide (batch_pad_crop_flip). Each round times every pipeline in turn (a fresh iterator,
``warmup`` batches, then ``batches`` timed batches, drawn as a training loop draws them, without
copying them anywhere); the table gives the median over rounds of images/s (stream images, i.e.
batch_size per batch) and the ratios of the medians with / without the stage. Interleaving the
pipelines within each round spreads any background load over all of them.
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.cifar_data import cifar10_lt  # noqa: E402
from car_tf.concutmix import concutmix_stage  # noqa: E402
from car_tf.data.augment import batch_pad_crop_flip, per_image  # noqa: E402
from car_tf.data import steps_per_epoch, train_dataset  # noqa: E402
from car_tf.data.augment import pad_crop_flip  # noqa: E402

flags.DEFINE_integer("batch_size", 256, "Batch size (ConCutMix's released CIFAR batch).")
flags.DEFINE_integer("batches", 30, "Timed batches per pipeline and round.")
flags.DEFINE_integer("warmup", 5, "Batches drawn before timing (tracing, buffers).")
flags.DEFINE_integer("rounds", 9, "Rounds; the table reports the median round.")
FLAGS = flags.FLAGS


def images_per_second(dataset, batch_size):
    iterator = iter(dataset)
    for _ in range(FLAGS.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)
    return FLAGS.batches * batch_size / (time.perf_counter() - start)


def pipelines(data):
    batch = FLAGS.batch_size
    epochs = 1 + (FLAGS.warmup + FLAGS.batches) // steps_per_epoch(data, batch)

    def stream():
        return train_dataset(
            data, recipe="cifar", image_size=32, batch_size=batch, seed=0, epochs=epochs
        )

    def staged(crop_flip):
        return concutmix_stage(
            stream(),
            data,
            num_classes=data.num_classes,
            seed=0,
            view_augment=crop_flip,
            partner_augment=crop_flip,
            steps_per_epoch=steps_per_epoch(data, batch),
            image_size=32,
        ).prefetch(tf.data.AUTOTUNE)

    return stream(), staged(per_image(pad_crop_flip)), staged(batch_pad_crop_flip)


def main(_):
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, data in cifar10_lt(workdir).items():
            datasets = pipelines(data)
            rounds = [
                [images_per_second(ds, FLAGS.batch_size) for ds in datasets]
                for _ in range(FLAGS.rounds)
            ]
            rows.append((name, *np.median(rounds, axis=0)))
    print(
        f"\nCIFAR-10-LT pipeline, batch {FLAGS.batch_size}, median of {FLAGS.rounds} rounds of "
        f"{FLAGS.batches} timed batches, {os.cpu_count()} CPU cores; images/s (ratio to plain)\n"
    )
    print("| source | plain | + ConCutMix, per-image crop-flip | + ConCutMix, batch crop-flip |")
    print("| --- | --- | --- | --- |")
    for name, plain, per_image_speed, batch_speed in rows:
        print(
            f"| {name} | {plain:.0f} | {per_image_speed:.0f} ({per_image_speed / plain:.2f}) "
            f"| {batch_speed:.0f} ({batch_speed / plain:.2f}) |"
        )


if __name__ == "__main__":
    app.run(main)
