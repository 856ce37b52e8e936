"""Throughput of the NumPy training stream (JAX / PyTorch backends) against the tf.data one, in one run.

    python -m benchmarks.bench_numpy_stream [--batch_size=128] [--batches=60] [--rounds=9]

Data: CIFAR-10-LT (IF 100, 12,406 images) decoded into memory, from ../shared/data's tarball
(synthetic uint8 arrays where it is absent). Both streams apply the CIFAR
recipe (pad-4 crop + flip) to shuffled full batches: car_tf.data.arrays.train_batches (a
background thread, NumPy per batch) and car_tf.data.train_dataset (tf.data, per image). Each
round times both in turn (a fresh stream, ``warmup`` batches, then ``batches`` timed ones); the
table gives the median images/s over rounds, their ratio, and the time per batch: a training step
that takes longer than it never waits for the NumPy stream.
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.cifar_data import cifar10_lt  # noqa: E402
from car_tf.data import arrays, steps_per_epoch, train_dataset  # noqa: E402

flags.DEFINE_integer("batch_size", 128, "Batch size (the CIFAR recipes').")
flags.DEFINE_integer("batches", 60, "Timed batches per stream and round.")
flags.DEFINE_integer("warmup", 5, "Batches drawn before timing.")
flags.DEFINE_integer("rounds", 9, "Rounds; the table reports the median.")
FLAGS = flags.FLAGS


def images_per_second(make_stream):
    stream = iter(make_stream())
    for _ in range(FLAGS.warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(stream)
    return FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)


def main(_):
    with tempfile.TemporaryDirectory() as workdir:
        sources = cifar10_lt(workdir)
        name, data = list(sources.items())[-1]  # the in-memory copy
        epochs = 1 + (FLAGS.warmup + FLAGS.batches) // steps_per_epoch(data, FLAGS.batch_size)
        options = dict(image_size=32, batch_size=FLAGS.batch_size, seed=0, epochs=epochs)
        streams = {
            "NumPy (arrays.train_batches)": lambda: arrays.train_batches(data, **options),
            "tf.data (train_dataset)": lambda: train_dataset(data, recipe="cifar", **options),
        }
        rounds = [[images_per_second(make) for make in streams.values()] for _ in range(FLAGS.rounds)]
    medians = np.median(rounds, axis=0)
    print(f"\nCIFAR-10-LT ({name}), batch {FLAGS.batch_size}, median of {FLAGS.rounds} rounds of "
          f"{FLAGS.batches} timed batches, {os.cpu_count()} CPU cores\n")
    print("| stream | images/s | ms per batch | ratio to tf.data |")
    print("| --- | --- | --- | --- |")
    for stream, speed in zip(streams, medians):
        print(f"| {stream} | {speed:.0f} | {1000 * FLAGS.batch_size / speed:.2f} | {speed / medians[-1]:.2f} |")


if __name__ == "__main__":
    app.run(main)
