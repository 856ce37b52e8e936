"""Training-step time of CAR against plain CE, and the penalty's cost at large K, in one run.

    python -m benchmarks.bench_car_step [--steps=20] [--skip_svd_8142]

Prints two markdown tables:
1. seconds per training step (model.fit, same model, batch and data) for CE and CAR:
   ResNet-32 on 32x32 inputs with K = 100, and a linear head on fixed 512-d features with
   K = 1000 and 8142 (CAR with SVD and with warm-started power iteration);
2. seconds per penalty evaluation (sigma_max of a K x K confusion-like matrix with its
   singular vectors) with a full SVD and with the power iteration, at K = 100, 1000, 8142.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import car_tf  # noqa: E402
from car_tf import spectral  # noqa: E402
from car_tf.losses.registry import get_base_loss  # noqa: E402
from car_tf.models import create_model  # noqa: E402

flags.DEFINE_integer("steps", 20, "Timed training steps per configuration.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("penalty_repeats", 5, "Timed penalty evaluations per configuration.")
flags.DEFINE_bool("skip_svd_8142", False, "Skip the (minutes-long) full SVD at K = 8142.")
FLAGS = flags.FLAGS


def longtail_counts(k, n_max=1000, imbalance=100):
    return np.maximum(np.floor(n_max * imbalance ** (-np.arange(k) / (k - 1))), 1).astype(int)


def step_time(build_model, x, y, loss):
    model = build_model()
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss=loss, jit_compile=False)
    callbacks = [car_tf.CARCallback(loss)] if isinstance(loss, car_tf.CARLoss) else []
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat()
    fit = dict(epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    model.fit(data, steps_per_epoch=3, **fit)  # trace and warm up
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=FLAGS.steps, **fit)
    return (time.perf_counter() - start) / FLAGS.steps


def training_rows():
    rows = []
    rng = np.random.default_rng(0)
    b = FLAGS.batch_size
    k = 100
    x = rng.uniform(0, 255, size=(b * 4, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, k, size=b * 4).astype(np.int32)
    counts = longtail_counts(k, 500)
    build = lambda: create_model("resnet32", k)  # noqa: E731
    ce = step_time(build, x, y, get_base_loss("ce", counts))
    car = step_time(build, x, y, car_tf.CARLoss(counts, spectral_method="svd"))
    rows.append(("ResNet-32, 32x32", k, ce, "svd", car))
    for k in (1000, 8142):
        x = rng.normal(size=(b * 4, 512)).astype(np.float32)
        y = rng.integers(0, k, size=b * 4).astype(np.int32)
        counts = longtail_counts(k)
        build = lambda k=k: keras.Sequential([keras.Input((512,)), keras.layers.Dense(k)])  # noqa: E731
        ce = step_time(build, x, y, get_base_loss("ce", counts))
        for method in ("svd", "power"):
            if method == "svd" and k > 1024:
                continue  # minutes per step: the penalty table below measures it
            car = step_time(build, x, y, car_tf.CARLoss(counts, spectral_method=method))
            rows.append(("linear head on 512-d features", k, ce, method, car))
    return rows


def penalty_time(a, method, v):
    a = tf.constant(a)

    @tf.function
    def evaluate(a, v):
        if method == "svd":
            u, v = spectral.top_singular_vectors_svd(a)
        else:
            u, v = spectral.power_iteration(a, v, 4)
        return spectral.spectral_norm(a, u, v), v

    evaluate.get_concrete_function(a, v)  # trace without running (an SVD at K = 8142 takes minutes)
    repeats = 1 if (method == "svd" and a.shape[0] > 1024) else FLAGS.penalty_repeats
    start = time.perf_counter()
    for _ in range(repeats):
        sigma, v = evaluate(a, v)
    return (time.perf_counter() - start) / repeats, float(sigma)


def penalty_rows():
    rows = []
    rng = np.random.default_rng(1)
    for k in (100, 1000, 8142):
        a = (rng.dirichlet(np.full(k, 0.3), size=k).T * 0.1).astype(np.float32)
        np.fill_diagonal(a, 0.0)
        v = tf.fill([k], k**-0.5)
        power, _ = penalty_time(a, "power", v)
        if k == 8142 and FLAGS.skip_svd_8142:
            rows.append((k, None, power))
            continue
        svd, _ = penalty_time(a, "svd", v)
        rows.append((k, svd, power))
    return rows


def main(argv):
    del argv
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, batch {FLAGS.batch_size}\n")
    print("| model | K | CE s/step | CAR method | CAR s/step | CAR / CE |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, k, ce, method, car in training_rows():
        print(f"| {name} | {k} | {ce:.4f} | {method} | {car:.4f} | {car / ce:.3f} |")
    print("\n| K | SVD penalty s | power penalty s (4 warm rounds) | SVD / power |")
    print("| --- | --- | --- | --- |")
    for k, svd, power in penalty_rows():
        svd_text = f"{svd:.4f}" if svd is not None else "skipped"
        ratio = f"{svd / power:.0f}x" if svd is not None else "-"
        print(f"| {k} | {svd_text} | {power:.4f} | {ratio} |")


if __name__ == "__main__":
    app.run(main)
