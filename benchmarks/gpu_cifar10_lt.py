"""The CIFAR-10-LT IF 100 recipes on one GPU under JAX, sized to a time budget: an accuracy table
beside the published numbers, and the GPU step times of CE and CAR.

Made for a machine with one NVIDIA GPU, Python 3.12 and JAX with CUDA, but no TensorFlow, no Keras
and no network. Carry beside the repository, in one folder (about 30 MB):

    wheels/               Keras and the small packages it and car_tf need, downloaded elsewhere with
        pip download --only-binary=:all: --no-deps --python-version 3.12 \\
            --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels \\
            keras==3.15.1 namex optree rich markdown-it-py mdurl pygments packaging pillow tqdm
    cifar10-jpg.tar.gz    the CIFAR-10 JPEG tree (train/<class>/*.jpg, test/<class>/*.jpg)

then run, from the repository root:

    python3 benchmarks/gpu_cifar10_lt.py --carry=CARRY --output_dir=OUT --budget_s=570

It installs the wheels into CARRY/site (nothing else on the machine changes), unpacks the tarball,
times CE and CAR steps of ResNet-32 at batch 128 on the real stream, and sizes the run: the
epochs (at most 200) for which the five recipes (CE, LDAM-DRW, logit adjustment, CAR, CAR on logit
adjustment) fit in what is left of the budget even if the GPU ran them one after another. The
schedule is the 200-epoch recipe scaled to that length (warm-up and the two decays at the same
fractions) and the cut is printed. The five then train side by side, one process each
(``python -m car_tf.train``, KERAS_BACKEND=jax), each one stopped at the deadline if it has not
finished. The table (top-1, many / medium / few, worst class, worst-class training accuracy, the
published top-1) and the step times are printed and written to OUTPUT_DIR/gpu_table.md; the runs'
directories are in OUTPUT_DIR/runs.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "launch" / "cifar10_lt.flags"
METHODS = ("ce", "ldam_drw", "logit_adjusted", "car", "car_logit_adjusted")
# Published top-1 of ResNet-32 on CIFAR-10-LT IF 100 after 200 epochs (README, "Accuracy").
PUBLISHED = {"ce": 70.36, "ldam_drw": 77.03, "logit_adjusted": 77.89}
FULL_EPOCHS, WARMUP, DECAYS = 200, 5, (160, 180)
RESERVE_S = 45  # the table, and stopping the runs cleanly

flags.DEFINE_string("carry", None, "Folder holding wheels/ and cifar10-jpg.tar.gz (see the docstring).")
flags.DEFINE_string("output_dir", "gpu_run", "Where the runs and gpu_table.md go.")
flags.DEFINE_integer("budget_s", 570, "Seconds the whole command may take, start-up included.")
flags.DEFINE_integer("max_epochs", FULL_EPOCHS, "Most epochs to train (1 for a check on CPU).")
flags.DEFINE_list("methods", list(METHODS), f"Recipes to train, some of {', '.join(METHODS)}.")
flags.register_validator("methods", lambda names: bool(names) and set(names) <= set(METHODS),
                         f"--methods must name some of {', '.join(METHODS)}.")
flags.DEFINE_integer("timing_steps", 30, "Timed training steps per loss (after a compiled warm-up epoch).")
flags.DEFINE_float("imbalance_factor", 100.0, "Imbalance factor of the long-tailed training subset.")
FLAGS = flags.FLAGS


def install_wheels(carry):
    """Makes Keras importable: from CARRY/wheels into CARRY/site (once); returns the site folder."""
    site = carry / "site"
    wheels = sorted((carry / "wheels").glob("*.whl"))
    if wheels and not (site / "keras").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--target", str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    return site


def scaled_schedule(epochs):
    """Train flags of the 200-epoch recipe scaled to ``epochs``: warm-up and decays at the same fractions."""
    warmup = max(1, round(WARMUP * epochs / FULL_EPOCHS)) if epochs > 1 else 0
    decays = sorted({max(1, round(d * epochs / FULL_EPOCHS)) for d in DECAYS})
    return [f"--epochs={epochs}", f"--warmup_epochs={warmup}", f"--lr_decay_epochs={','.join(map(str, decays))}"]


def step_times(train, test, steps):
    """Seconds per training step of ResNet-32 with CE and with CAR on CE (median of two timed
    epochs of ``steps`` steps on the real stream), the first epoch's (compilation), and one
    evaluation of the test split."""
    import keras
    import numpy as np

    import car_tf
    from car_tf.models import create_model
    from car_tf.data import arrays
    from car_tf.evaluation.predictors import KerasPredictor, predict_dataset

    times, counts = {}, train.counts()
    for name in ("ce", "car"):
        keras.utils.set_random_seed(0)
        model = create_model("resnet32", len(counts), input_shape=(32, 32, 3))
        loss = car_tf.CARLoss(counts) if name == "car" else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
        stamps = []
        timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: stamps.append(time.perf_counter()))
        stream = arrays.train_batches(train, image_size=32, batch_size=128, seed=0, epochs=10**6)
        start = time.perf_counter()
        callbacks = [car_tf.CARCallback(loss)] if name == "car" else []
        model.fit(stream, steps_per_epoch=steps, epochs=3, verbose=0, callbacks=[*callbacks, timer])
        epochs = np.diff([start, *stamps])
        times[name] = {"step_s": float(np.median(epochs[1:])) / steps, "first_epoch_s": float(epochs[0])}
    predictor, batches = KerasPredictor(model), arrays.EvalBatches(test, image_size=32, batch_size=128)
    predict_dataset(predictor, batches)  # compiles
    start = time.perf_counter()
    predict_dataset(predictor, batches)
    times["eval_s"] = time.perf_counter() - start
    return times


def launch(method, epochs, tree, output_dir, env):
    from car_tf.training.methods import compare_variants  # not car_tf.compare: it defines train's flags here

    run_dir = output_dir / "runs" / method
    command = [sys.executable, "-m", "car_tf.train", f"--flagfile={RECIPE}", f"--data_dir={tree}",
               f"--imbalance_factor={FLAGS.imbalance_factor}", *scaled_schedule(epochs), *compare_variants()[method].flags,
               "--eval_on_train",
               "--noverbose", f"--model_dir={run_dir}"]
    log = open(output_dir / f"{method}.log", "w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def row(method, run_dir, epochs):
    """A markdown row of one run's results (its last finished epoch if it was stopped)."""
    def percent(value):
        return "-" if value is None else f"{100 * value:.2f}"

    published = PUBLISHED.get(method)
    published = "-" if published is None else f"{published:.2f}"
    report_path = run_dir / "report.json"
    if report_path.exists():
        report, done = json.loads(report_path.read_text()), epochs
        train_worst = percent(report.get("train", {}).get("worst_class_accuracy"))
    else:
        records = sorted((run_dir / "metrics").glob("epoch_*.json"))
        if not records:
            return f"| {method} | 0/{epochs} | - | - | - | - | - | - | {published} |"
        report, done, train_worst = json.loads(records[-1].read_text()), len(records), "-"
    cells = [percent(report[k]) for k in ("top1", "many", "medium", "few", "worst_class_accuracy")]
    return f"| {method} | {done}/{epochs} | " + " | ".join(cells) + f" | {train_worst} | {published} |"


def main(argv):
    del argv
    started = time.time()
    deadline = started + FLAGS.budget_s
    carry = pathlib.Path(FLAGS.carry or ROOT).resolve()
    output_dir = pathlib.Path(FLAGS.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.05"  # the timing here; the runs share the rest
    site = install_wheels(carry)
    sys.path.insert(0, str(ROOT))
    import jax

    from car_tf.data import sources

    tree = sources.unpack_tarball(carry / "cifar10-jpg.tar.gz")
    train = sources.load_dataset("cifar10", "train", data_dir=tree, imbalance_factor=FLAGS.imbalance_factor)
    test = sources.load_dataset("cifar10", "test", data_dir=tree)
    steps = train.size // 128
    device = jax.devices()[0].device_kind
    times = step_times(train, test, min(FLAGS.timing_steps, steps))
    print(f"Device: {device}. Step time at batch 128: CE {1000 * times['ce']['step_s']:.2f} ms, "
          f"CAR {1000 * times['car']['step_s']:.2f} ms ({times['car']['step_s'] / times['ce']['step_s']:.2f}x); "
          f"first epoch with compilation {times['car']['first_epoch_s']:.0f} s.", flush=True)

    # Size the run as if the GPU served the five one after another (side by side is faster).
    startup = max(times[m]["first_epoch_s"] for m in ("ce", "car")) + 30  # imports, data, compilation
    methods = FLAGS.methods
    per_epoch = sum(steps * times["car" if m.startswith("car") else "ce"]["step_s"] + times["eval_s"] for m in methods)
    available = deadline - time.time() - RESERVE_S - startup
    epochs = max(1, min(FLAGS.max_epochs, int(available / per_epoch)))
    cut = "" if epochs == FULL_EPOCHS else f" (cut from {FULL_EPOCHS} to fit {FLAGS.budget_s} s)"
    print(f"Training {', '.join(methods)} side by side for {epochs} epochs{cut}: "
          f"{' '.join(scaled_schedule(epochs))}.", flush=True)

    path = [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]  # the caller's after
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join(path),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.85 / len(methods):.3f}"}  # the GPU's memory, shared
    processes = {m: launch(m, epochs, tree, output_dir, env) for m in methods}
    while any(p.poll() is None for p in processes.values()) and time.time() < deadline - RESERVE_S:
        time.sleep(2)
    stopped = [m for m, p in processes.items() if p.poll() is None]
    for method in stopped:
        processes[method].kill()
    train_minutes = (time.time() - started) / 60
    lines = [
        f"CIFAR-10-LT IF 100, ResNet-32, batch 128, {epochs} epochs{cut}, on one {device} "
        f"(JAX backend, {len(methods)} runs side by side); test accuracy in percent.",
        "",
        "| method | epochs | top-1 | many | medium | few | worst class | worst class, train | published top-1 (200 epochs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(row(m, output_dir / "runs" / m, epochs) for m in methods),
        "",
        f"GPU step time at batch 128 (median of {min(FLAGS.timing_steps, steps)} steps): CE "
        f"{1000 * times['ce']['step_s']:.2f} ms, CAR {1000 * times['car']['step_s']:.2f} ms, CAR / CE "
        f"{times['car']['step_s'] / times['ce']['step_s']:.2f}. Whole command: {train_minutes:.1f} minutes.",
    ]
    if stopped:
        lines.append(f"Stopped at the deadline before finishing: {', '.join(stopped)} (their last finished epoch is shown).")
    failed = [m for m, p in processes.items() if m not in stopped and p.returncode]
    if failed:
        lines.append(f"Failed: {', '.join(failed)}; see {output_dir}/<method>.log.")
    text = "\n".join(lines) + "\n"
    (output_dir / "gpu_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
