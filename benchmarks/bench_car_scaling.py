"""CAR's cost as K grows: step time against plain CE, extra peak memory, SVD against power iteration.

    python -m benchmarks.bench_car_scaling [--rounds=3] [--steps=20] [--classes=1000,8142,21843]
        [--jit_compile]

Prints three markdown tables, all measured in this one run:
1. seconds per training step (model.fit, same model, batch 128 and data) of CE and of CAR with its
   default spectral method, as the median of ``--rounds`` interleaved rounds (CE, CAR, CE, CAR,
   ...): ResNet-32 on 32x32 inputs at K = 100 and a linear head on 512-d features carrying their
   class at each of ``--classes``, with CAR's power-iteration passes per step;
2. peak resident memory (ru_maxrss) of 5 training steps of the linear head, each in a fresh
   process, and CAR's extra over CE in units of one K x K float32 matrix (the EMA itself);
3. the penalty's sigma_max on a confusion-like K x K matrix by a full SVD and by the
   block power iteration (from a cold start to the tolerance, and one half round), with each one's error
   against a float64 SVD: what the "auto" threshold between the two rests on.
"""

import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from benchmarks.linear_head import (  # noqa: E402
    fitted, linear_head_setup, longtail_counts, peak_rss_mib, seconds_per_step,
)

flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds; the table gives their median.")
flags.DEFINE_integer("steps", 20, "Timed training steps per configuration and round.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_list("classes", ["1000", "8142", "21843"], "Class counts K of the linear head.")
flags.DEFINE_list("penalty_classes", ["100", "300", "1000"], "K of the SVD / power table.")
flags.DEFINE_bool("jit_compile", False, "Compile the train steps with XLA (Keras's default on a GPU).")
flags.DEFINE_string("child", None, "Internal: 'ce:K' or 'car:K' measures one peak memory.")
FLAGS = flags.FLAGS


def fit(build, x, y, loss):
    return fitted(build, x, y, loss, FLAGS.batch_size, FLAGS.jit_compile)


def step_rows():
    import numpy as np

    import car_tf
    from car_tf.losses import get_base_loss
    from car_tf.models import create_model

    rng = np.random.default_rng(0)
    configs = []
    k = 100
    x = rng.uniform(0, 255, size=(FLAGS.batch_size * 4, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, k, size=len(x)).astype(np.int32)
    configs.append(("ResNet-32, 32x32", k, lambda: create_model("resnet32", k), x, y))
    for k in (int(c) for c in FLAGS.classes):
        configs.append(("linear head, 512-d", k, *linear_head_setup(k, rng, FLAGS.batch_size)))
    setups = []
    for name, k, build, x, y in configs:
        counts = longtail_counts(k)
        car = car_tf.CARLoss(counts)
        setups.append((name, k, car.spectral_method, fit(build, x, y, get_base_loss("ce", counts)),
                       fit(build, x, y, car)))
    times = {(name, k): ([], []) for name, k, *_ in setups}
    passes_before = {(name, k): power_passes(car) for name, k, _, _, car in setups}
    for _ in range(FLAGS.rounds):
        for name, k, _, ce, car in setups:
            times[name, k][0].append(seconds_per_step(ce, FLAGS.steps))
            times[name, k][1].append(seconds_per_step(car, FLAGS.steps))
    rows = []
    for name, k, method, _, car in setups:
        passes = (power_passes(car) - passes_before[name, k]) / (FLAGS.rounds * FLAGS.steps)
        ce_time, car_time = (statistics.median(t) for t in times[name, k])
        rows.append((name, k, method, ce_time, car_time, passes))
    return rows


def power_passes(setup):
    return float(setup[0].car_state.power_passes.numpy())


def peak_memory_mib(method, k):
    """Peak RSS of 5 linear-head training steps (run inside a fresh child process)."""
    import numpy as np

    import car_tf
    from car_tf.losses import get_base_loss

    build, x, y = linear_head_setup(k, np.random.default_rng(0), FLAGS.batch_size)
    counts = longtail_counts(k)
    loss = car_tf.CARLoss(counts) if method == "car" else get_base_loss("ce", counts)
    model, data, run = fit(build, x, y, loss)
    model.fit(data, steps_per_epoch=5, **run)
    return peak_rss_mib()


def child_memory(method, k):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_car_scaling", f"--child={method}:{k}",
         f"--jit_compile={FLAGS.jit_compile}"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def penalty_rows():
    import numpy as np
    import tensorflow as tf

    from car_tf.car import spectral

    rows = []
    rng = np.random.default_rng(1)
    for k in (int(c) for c in FLAGS.penalty_classes):
        a_np = (rng.dirichlet(np.full(k, 0.3), size=k).T * 0.1).astype(np.float32)
        np.fill_diagonal(a_np, 0.0)
        exact = np.linalg.norm(a_np.astype(np.float64), 2)
        a = tf.constant(a_np)

        @tf.function
        def svd(a):
            u, v = spectral.top_singular_vectors_svd(a)
            return spectral.spectral_norm(a, u, v)

        @tf.function
        def power(a, u, v, max_passes, tolerance=spectral.POWER_TOLERANCE):
            u, v, av, _, passes = spectral.power_iteration(
                lambda x: tf.matmul(a, x), lambda y: tf.matmul(a, y, transpose_a=True),
                u, v, tf.matmul(a, v), tf.matmul(a, u, transpose_a=True), tolerance, max_passes,
            )
            return spectral.ritz_pair(u, v, av)[2], u, v, passes

        start = spectral.start_basis(k, spectral.POWER_VECTORS)
        results = {}
        for name, fn, args in (
            ("svd", svd, (a,)),
            ("cold", power, (a, start, start, 1000)),
            ("pass", power, (a, start, start, 1, 0.0)),  # exactly one half round
        ):
            fn(*args)  # trace
            t = []
            for _ in range(5):
                begin = time.perf_counter()
                out = fn(*args)
                t.append(time.perf_counter() - begin)
            results[name] = (statistics.median(t), out)
        passes = results["cold"][1][3]
        err = lambda s: abs(float(s) - exact) / exact  # noqa: E731
        rows.append((k, results["svd"][0], err(results["svd"][1]), results["cold"][0], int(passes),
                     err(results["cold"][1][0]), results["pass"][0]))
    return rows


def main(argv):
    del argv
    if FLAGS.child:
        method, k = FLAGS.child.split(":")
        print(json.dumps(peak_memory_mib(method, int(k))))
        return
    memory = [(k, child_memory("ce", k), child_memory("car", k)) for k in map(int, FLAGS.classes)]
    import keras  # only now: a child forked from a process holding TensorFlow inherits its peak
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, batch {FLAGS.batch_size}, "
          f"median of {FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps, "
          f"jit_compile={FLAGS.jit_compile}\n")
    print("| model | K | CE s/step | CAR method | CAR s/step | CAR / CE | power passes / step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, k, method, ce, car, passes in step_rows():
        passes_text = f"{passes:.2f}" if method == "power" else "-"
        print(f"| {name} | {k} | {ce:.4f} | {method} | {car:.4f} | {car / ce:.2f} | {passes_text} |")
    print("\n| K | CE peak MiB | CAR peak MiB | CAR extra MiB | one K x K float32 MiB | extra / K x K |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, ce, car in memory:
        matrix = 4 * k * k / 2**20
        print(f"| {k} | {ce:.0f} | {car:.0f} | {car - ce:.0f} | {matrix:.0f} | {(car - ce) / matrix:.2f} |")
    print("\n| K | full SVD s | SVD rel. error | power, cold start s | passes | power rel. error "
          "| one pass s | SVD / cold power |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, svd, svd_err, cold, passes, cold_err, one_pass in penalty_rows():
        print(f"| {k} | {svd:.4f} | {svd_err:.1e} | {cold:.4f} | {passes} | {cold_err:.1e} | "
              f"{one_pass:.5f} | {svd / cold:.1f}x |")


if __name__ == "__main__":
    app.run(main)
