"""Accuracy of every method on CIFAR-10-LT (IF 100) with one seed and one schedule, as a table.

    python -m benchmarks.bench_accuracy --data_dir=../shared/data/cifar10-jpg.tar.gz \
        --epochs=8 --output_dir=runs/bench_accuracy [--methods=ce,ldam_drw,...,ce_dlsa]

Each method trains ResNet-32 with the same seed, data order and schedule (SGD 0.9, lr 0.1, 1
warm-up epoch, x0.1 decays at 75 % and 90 % of the epochs); DLSA rows (``<base>_dlsa``) run
``python -m car_tf.dlsa`` with its defaults on the base method's finished run, which must come
earlier in --methods. The script then prints overall,
many / medium / few and worst-class test accuracy, worst-class train accuracy and the spectral
norm of the final test confusion matrix (plain and CAR-weighted). Finished runs are reused, so an
interrupted benchmark resumes where it stopped.
"""

import json
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from car_tf import train as train_cli
from car_tf.compare import METHOD_FLAGS

# DLSA on a trained run: row name -> base method.
DLSA_ROWS = {"ce_dlsa": "ce", "car_dlsa": "car"}
flags.DEFINE_list("methods", [*METHOD_FLAGS, "ce_dlsa"], "Methods to run, in order.")
flags.DEFINE_string("output_dir", "runs/bench_accuracy", "Where the runs go.")
flags.DEFINE_list("extra", [], "Extra train flags for every method, e.g. --extra=--spec_lambda=0.5.")
FLAGS = flags.FLAGS


def run_method(name, common, output_dir):
    """Trains one method (unless output_dir/name already has a report); returns (report, seconds)."""
    run_dir = pathlib.Path(output_dir) / name
    if (run_dir / "report.json").exists():
        return json.loads((run_dir / "report.json").read_text()), None
    argv = [*common, *METHOD_FLAGS[name], f"--model_dir={run_dir}"]
    FLAGS.unparse_flags()
    FLAGS(["train", *argv])
    start = time.time()
    report = train_cli.train_and_evaluate(FLAGS)
    return report, time.time() - start


def run_dlsa(name, output_dir):
    """DLSA on the finished run of DLSA_ROWS[name] (unless done); returns (report, seconds)."""
    base_dir, run_dir = pathlib.Path(output_dir) / DLSA_ROWS[name], pathlib.Path(output_dir) / name
    if (run_dir / "report.json").exists():
        return json.loads((run_dir / "report.json").read_text()), None
    if not (base_dir / "report.json").exists():
        raise SystemExit(f"{name} needs the finished {DLSA_ROWS[name]} run; list it before {name}.")
    start = time.time()
    command = [sys.executable, "-m", "car_tf.dlsa", f"--model_dir={base_dir}"]
    subprocess.run([*command, f"--output_dir={run_dir}", "--noprogress"], check=True)
    return json.loads((run_dir / "report.json").read_text()), time.time() - start


def percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def main(argv):
    del argv
    epochs = FLAGS.epochs
    common = [
        "--dataset=cifar10",
        f"--data_dir={FLAGS.data_dir}",
        "--imbalance_factor=100",
        f"--epochs={epochs}",
        "--warmup_epochs=1",
        f"--lr_decay_epochs={round(0.75 * epochs)},{round(0.9 * epochs)}",
        "--eval_on_train",
        "--noverbose",
        f"--seed={FLAGS.seed}",
        f"--ccm_l_d_warm={max(1, epochs // 2)}",
        "--ccm_top_k=3",
        "--ccm_omega=0.0078431373",
        *FLAGS.extra,
    ]
    # Read before the first run: each run re-parses the shared flags from its own argument list.
    methods, output_dir, rows = FLAGS.methods, FLAGS.output_dir, []
    unknown = sorted(set(methods) - set(METHOD_FLAGS) - set(DLSA_ROWS))
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {[*METHOD_FLAGS, *DLSA_ROWS]}.")
    for name in methods:
        if name in DLSA_ROWS:
            report, seconds = run_dlsa(name, output_dir)
        else:
            report, seconds = run_method(name, common, output_dir)
        rows.append((name, report, seconds))
    print(f"CIFAR-10-LT IF 100, ResNet-32, {epochs} epochs, batch 128, seed {FLAGS.seed}\n")
    print("| method | top-1 | many | medium | few | worst class (test) | worst class (train) "
          "| sigma(C) | sigma(C diag w) | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r, seconds in rows:
        minutes = "-" if seconds is None else f"{seconds / 60:.1f}"
        print(f"| {name} | {percent(r['top1'])} | {percent(r['many'])} | {percent(r['medium'])} "
              f"| {percent(r['few'])} | {percent(r['worst_class_accuracy'])} "
              f"| {percent(r.get('train', {}).get('worst_class_accuracy'))} "
              f"| {r['spectral_norm']:.3f} | {r['weighted_spectral_norm']:.3f} | {minutes} |")


if __name__ == "__main__":
    app.run(main)
