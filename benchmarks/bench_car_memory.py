"""Peak host memory of training steps with and without CAR, as K grows (each in a fresh process).

    python -m benchmarks.bench_car_memory [--classes=100,1000,8142]

A linear head on 512-d features, batch 128, 5 training steps; CAR uses the power iteration. The
table gives each process's peak resident memory and CAR's extra over CE next to the size of one
K x K float32 matrix (the EMA state itself).
"""

import json
import os
import resource
import subprocess
import sys

from absl import app, flags

flags.DEFINE_list("classes", ["100", "1000", "8142"], "Class counts K to measure.")
flags.DEFINE_string("child", None, "Internal: 'ce:K' or 'car:K' runs one measurement.")
FLAGS = flags.FLAGS


def measure(method, num_classes):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import car_tf
    from car_tf.losses import get_base_loss

    counts = np.maximum(np.floor(1000 * 100.0 ** (-np.arange(num_classes) / (num_classes - 1))), 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 512)).astype(np.float32)
    y = rng.integers(0, num_classes, size=512).astype(np.int32)
    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(num_classes)])
    if method == "car":
        loss = car_tf.CARLoss(counts.astype(int), spectral_method="power")
        callbacks = [car_tf.CARCallback(loss)]
    else:
        loss, callbacks = get_base_loss("ce", counts), []
    model.compile(keras.optimizers.SGD(0.01), loss=loss, jit_compile=False)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(128).repeat()
    model.fit(data, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def run_child(method, num_classes):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_car_memory", f"--child={method}:{num_classes}"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.child:
        method, num_classes = FLAGS.child.split(":")
        print(json.dumps(measure(method, int(num_classes))))
        return
    print("| K | CE peak MiB | CAR peak MiB | CAR extra MiB | one K x K float32 matrix MiB |")
    print("| --- | --- | --- | --- | --- |")
    for k in (int(c) for c in FLAGS.classes):
        ce, car = run_child("ce", k), run_child("car", k)
        print(f"| {k} | {ce:.0f} | {car:.0f} | {car - ce:.0f} | {4 * k * k / 2**20:.1f} |")


if __name__ == "__main__":
    app.run(main)
