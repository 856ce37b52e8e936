"""CAR's sparse EMA: its penalty against the dense one, and its cost where no dense EMA fits.

    python -m benchmarks.bench_sparse_ema [--classes=1000,8142] [--entries=8,32,128] [--steps=600]
        [--scale_classes=8142,100000] [--scale_entries=32] [--rounds=3]

Prints two markdown tables, measured in this one run:
1. along one training run of a linear head with the dense CAR at each of ``--classes``, the sparse
   EMAs of ``--entries`` entries per class are fed the same logits and labels every step; the
   table gives each one's sigma against the dense sigma (relative error at five steps) and
   the cosine between its penalty's gradient with respect to the batch's logits and the dense
   penalty's (the push the model gets; lowest and median over the second half of the run);
2. at each of ``--scale_classes`` (100,000 classes: a dense EMA alone would take 37 GiB), seconds
   per step of CE and of CAR with the sparse EMA (median of interleaved rounds) and each one's
   peak resident memory in a fresh process.
"""

import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from benchmarks.linear_head import (  # noqa: E402
    fitted, linear_head_setup, longtail_counts, peak_rss_mib, seconds_per_step,
)

flags.DEFINE_list("classes", ["1000", "8142"], "K of the error table (both EMAs must fit).")
flags.DEFINE_list("entries", ["8", "32", "128"], "Entries per class of the sparse EMAs compared.")
flags.DEFINE_integer("steps", 600, "Training steps of the error table.")
flags.DEFINE_list("scale_classes", ["8142", "100000"], "K of the cost table (empty: no table).")
flags.DEFINE_integer("scale_entries", 32, "Entries per class of the sparse EMA in the cost table.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds of the cost table.")
flags.DEFINE_integer("timed_steps", 10, "Timed steps per configuration and round.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_string("child", None, "Internal: 'ce:K' or 'car:K' measures one peak memory.")
FLAGS = flags.FLAGS


def error_rows(k, entries):
    """(reported steps, [(m, sigma errors at those steps, lowest and median gradient cosine)])
    along one dense-CAR training run."""
    import keras
    import numpy as np
    import tensorflow as tf

    import car_tf

    build, x, y = linear_head_setup(k, np.random.default_rng(0), FLAGS.batch_size)
    counts = longtail_counts(k)
    model = build()
    dense = car_tf.CARLoss(counts)
    car_tf.attach_car_state(model, dense)
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    sparse = []
    for m in entries:
        loss = car_tf.CARLoss(counts, sparse_ema_entries=m)
        car_tf.attach_car_state(keras.Sequential([keras.Input((1,)), keras.layers.Dense(k)]), loss)
        sparse.append(loss)

    @tf.function
    def step(x, y):
        with tf.GradientTape(persistent=True) as tape:
            logits = model(x, training=True)
            sigmas = [loss.penalty(logits, y) for loss in (dense, *sparse)]
            value = tf.reduce_mean(dense.base.call(y, logits)) + dense.spec_lambda * sigmas[0]
        optimizer.apply(tape.gradient(value, model.trainable_variables), model.trainable_variables)
        pushes = [tf.reshape(tape.gradient(sigma, logits), (-1,)) for sigma in sigmas]
        cosines = [tf.reduce_sum(pushes[0] * p) / (tf.norm(pushes[0]) * tf.norm(p) + 1e-30) for p in pushes[1:]]
        return [sigma / sigmas[0] - 1.0 for sigma in sigmas[1:]], cosines

    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat()
    report = sorted({1, 10, FLAGS.steps // 6, FLAGS.steps // 2, FLAGS.steps})
    errors, cosines = [], []
    for xb, yb in batches.take(FLAGS.steps):
        error, cosine = step(xb, yb)
        errors.append([float(e) for e in error])
        cosines.append([float(c) for c in cosine])
    rows = []
    for index, m in enumerate(entries):
        late = [c[index] for c in cosines[FLAGS.steps // 2:]]
        rows.append((m, [errors[t - 1][index] for t in report], min(late), statistics.median(late)))
    return report, rows


def scale_setup(method, k):
    import numpy as np

    import car_tf
    from car_tf.losses import get_base_loss

    build, x, y = linear_head_setup(k, np.random.default_rng(0), FLAGS.batch_size, batches=8)
    counts = longtail_counts(k)
    if method == "car":
        loss = car_tf.CARLoss(counts, sparse_ema_entries=FLAGS.scale_entries)
    else:
        loss = get_base_loss("ce", counts)
    return fitted(build, x, y, loss, FLAGS.batch_size)


def child_memory(method, k):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sparse_ema", f"--child={method}:{k}",
         f"--scale_entries={FLAGS.scale_entries}", f"--batch_size={FLAGS.batch_size}"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.child:
        method, k = FLAGS.child.split(":")
        model, data, run = scale_setup(method, int(k))
        model.fit(data, steps_per_epoch=3, **run)
        print(json.dumps(peak_rss_mib()))
        return
    scale = [int(k) for k in FLAGS.scale_classes]
    memory = {(method, k): child_memory(method, k) for k in scale for method in ("ce", "car")}
    import keras  # only now: a child forked from a process holding TensorFlow inherits its peak
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
          f"batch {FLAGS.batch_size}, linear head on 512-d features, SGD 0.01 with momentum 0.9\n")
    entries = [int(m) for m in FLAGS.entries]
    for k in (int(c) for c in FLAGS.classes):
        report, rows = error_rows(k, entries)
        steps = " | ".join(f"sigma error, step {t}" for t in report)
        print(f"| K | entries per class | {steps} | gradient cosine, lowest | gradient cosine, median |")
        print("| --- | --- | " + "--- | " * len(report) + "--- | --- |")
        for m, errors, lowest, median in rows:
            values = " | ".join(f"{e:+.1e}" for e in errors)
            print(f"| {k} | {m} | {values} | {lowest:.3f} | {median:.3f} |")
        print()
    if not scale:
        return
    setups = {(method, k): scale_setup(method, k) for k in scale for method in ("ce", "car")}
    times = {key: [] for key in setups}
    for _ in range(FLAGS.rounds):
        for key, setup in setups.items():
            times[key].append(seconds_per_step(setup, FLAGS.timed_steps))
    print("| K | entries per class | CE s/step | CAR s/step | CAR / CE | CE peak MiB | CAR peak MiB "
          "| CAR extra MiB | one dense K x K float32 MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in scale:
        ce, car = (statistics.median(times[method, k]) for method in ("ce", "car"))
        ce_mib, car_mib = memory["ce", k], memory["car", k]
        print(f"| {k} | {FLAGS.scale_entries} | {ce:.3f} | {car:.3f} | {car / ce:.2f} | {ce_mib:.0f} "
              f"| {car_mib:.0f} | {car_mib - ce_mib:.0f} | {4 * k * k / 2**20:.0f} |")


if __name__ == "__main__":
    app.run(main)
