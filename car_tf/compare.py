"""Compare methods over seeds on the same data and schedule: mean, spread and paired differences.

    python -m car_tf.compare --flagfile=launch/cifar10_lt_seeded.flags --methods=ce,car \
        --seeds=0,1,2 --output_dir=../runs/cifar10_lt_seeded

Every other flag is a ``car_tf.train`` flag and applies to every run. Each (method, seed) trains
with ``python -m car_tf.train`` in OUTPUT_DIR/<method>/seed_<s>, one after the other, seeds in the
outer loop so that paired differences accumulate early. Rerunning the command resumes an
interrupted run from its checkpoint and reads finished ones back (train refuses, in one sentence,
a run directory whose flags differ), so a set can be completed later. The table (mean +- standard
deviation over the finished seeds of top-1, many / medium / few, worst class and the mean of the
three worst classes) and the paired differences (a CAR variant minus its base, seed by seed) are
printed and written to OUTPUT_DIR/comparison.md from whatever runs have finished, with two figures
(car_tf.comparison_figures). A method "<method>_<stage>" runs a post-hoc stage on that method's
run: dlsa (python -m car_tf.dlsa, flags from --dlsa_flags) or crt, tau_norm, posthoc_la
(python -m car_tf.rebalance); --method_flags gives one method train flags of its own.

The methods and their pairs come from the method registry (car_tf.training.methods): a method
registered through $CAR_TF_METHODS is a row here too, and the runs this command starts inherit
the variable.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
from absl import flags

from car_tf import cli, flags_from_config
from car_tf.comparison_figures import write_figures
from car_tf import train  # noqa: F401  (defines train's flags, so they are checked here too)
from car_tf.training import methods as registered
from car_tf.method import setting

# Row name -> the train flags that select it, and a row -> the row it is paired with (its paired
# difference's baseline), both from the method registry (car_tf.training.methods.compare_variants):
# each base loss, then each method's rows (car, car_<base> for CAR on that base loss, ...).
VARIANTS = registered.compare_variants()
METHOD_FLAGS = {name: list(variant.flags) for name, variant in VARIANTS.items()}
PAIRED_BASE = {name: variant.paired_with for name, variant in VARIANTS.items() if variant.paired_with}
# Post-hoc stages on a trained method's run, "<method>_<stage>": DLSA and classifier re-balancing
# (car_tf.rebalance); the pairs carry over (car_dlsa - ce_dlsa, ...).
POSTHOC_COMMANDS = {
    "dlsa": ["car_tf.dlsa"],
    **{stage: ["car_tf.rebalance", f"--method={stage}"] for stage in ("crt", "tau_norm", "posthoc_la")},
}
POSTHOC = {f"{m}_{stage}": (m, stage) for m, v in VARIANTS.items() if v.posthoc for stage in POSTHOC_COMMANDS}
PAIRED_BASE.update({f"{m}_{stage}": f"{b}_{stage}" for m, b in list(PAIRED_BASE.items()) for stage in POSTHOC_COMMANDS})


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """This command's own flags (every other flag is train's and applies to every run)."""

    methods: tuple[str, ...] = setting(("ce", "car"), help=f"Methods to compare: {', '.join(METHOD_FLAGS)}.")
    seeds: tuple[str, ...] = setting(("0", "1", "2"), help="Seeds; every method runs with each.")
    output_dir: str | None = setting(None, help="Directory of the runs (OUTPUT_DIR/<method>/seed_<s>) and "
                                                "comparison.md.")
    method_flags: tuple[str, ...] = setting(
        (), repeated=True, help="METHOD:--flag=value[,--flag=value...]: train flags of that method alone, e.g. "
        "the settings car_tf.search chose for it (car:--spec_lambda=1.0); repeat for other methods.")
    dlsa_flags: tuple[str, ...] = setting(
        (), help="Flags of python -m car_tf.dlsa for the <method>_dlsa rows, e.g. --flow_epochs=10,--classifier_epochs=30.")


OWN_FLAGS = tuple(flags_from_config.flag_names(CompareConfig))

FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS):
    """This command's own flags, CompareConfig's fields (train's come with ``car_tf.train``)."""
    return flags_from_config.define_flags(CompareConfig, flag_values=flag_values,
                                          module_name=flags_from_config.calling_module())


def per_method_flags(items, methods):
    """{method: [train flags]} from --method_flags items "METHOD:--a=1,--b=2", METHOD one of ``methods``
    or the trained method under one of their post-hoc rows; ValueError names a bad item."""
    trained = [*methods, *(POSTHOC[m][0] for m in methods if m in POSTHOC)]
    extra = {}
    for item in items:
        method, _, values = item.partition(":")
        given = [v for v in values.split(",") if v]
        if method not in trained or not given or not all(v.startswith("--") for v in given):
            raise ValueError(f"--method_flags={item} must read METHOD:--flag=value[,--flag=value] with METHOD "
                             f"one of --methods or the methods under their post-hoc rows ({', '.join(trained)}).")
        extra.setdefault(method, []).extend(given)
    return extra


def checked_choice(methods, seeds):
    """(methods, int seeds) after checking them; ValueError names what is wrong."""
    unknown = [m for m in methods if m not in METHOD_FLAGS and m not in POSTHOC]
    if unknown or not methods:
        raise ValueError(f"--methods={','.join(methods)} names no known method {unknown or ''}; "
                         f"choose from {', '.join([*METHOD_FLAGS, *POSTHOC])}.")
    return list(methods), checked_seeds(seeds)


def checked_seeds(seeds, name="seeds"):
    """The seeds as distinct ints; ValueError names what is wrong with --``name``."""
    try:
        seeds = [int(s) for s in seeds]
    except ValueError:
        raise ValueError(f"--{name}={','.join(seeds)} must be whole numbers, e.g. --{name}=0,1,2.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--{name}={','.join(map(str, seeds))} must list distinct seeds, e.g. 0,1,2.")
    return seeds


def train_arguments(argv, own_flags=OWN_FLAGS):
    """The command line's train flags: ``argv`` without the command's own flags ``own_flags``."""
    own = tuple(f"--{name}" for name in own_flags)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in own:
            skip = True  # "--methods ce,car": the value follows
        elif not arg.startswith(tuple(f"{o}=" for o in own)):
            kept.append(arg)
    return kept


def run_directory(output_dir, method, seed):
    return pathlib.Path(output_dir) / method / f"seed_{seed}"


def train_run(arguments, run_dir, what):
    """Trains (or resumes, or reads back) one run in a fresh process; returns its wall seconds.

    ``arguments`` are train flags; ``what`` names the run in the message if training stops.
    """
    command = [sys.executable, "-m", "car_tf.train", *arguments, f"--model_dir={run_dir}"]
    start = time.time()
    status = subprocess.run(command).returncode
    if status:
        raise ValueError(
            f"training {what} stopped (exit status {status}, its message is above); fix that and "
            "rerun this command, finished runs are kept."
        )
    return time.time() - start


def posthoc_run(stage, base_dir, run_dir, seed, what, extra=()):
    """Runs a post-hoc stage (POSTHOC_COMMANDS, with flags ``extra``) on a finished run in a fresh
    process, unless done."""
    if (run_dir / "report.json").exists():
        return 0.0
    command = [sys.executable, "-m", *POSTHOC_COMMANDS[stage], f"--model_dir={base_dir}", f"--output_dir={run_dir}",
               f"--seed={seed}", "--noprogress", *extra]
    start = time.time()
    if subprocess.run(command).returncode:
        raise ValueError(f"{stage} on {what} stopped (its message is above); fix that and rerun this command, "
                         "finished runs are kept.")
    return time.time() - start


def run_summary(report):
    """The figures compared, in percent, from a run's report.json."""
    accuracies = sorted(r["accuracy"] for r in report["per_class"] if r["accuracy"] is not None)
    groups = {g: None if report[g] is None else 100 * report[g] for g in ("many", "medium", "few")}
    return {
        "top1": 100 * report["top1"],
        **groups,
        "worst": 100 * report["worst_class_accuracy"],
        "worst3": 100 * float(np.mean(accuracies[:3])),
        "mean_class": 100 * report["mean_class_accuracy"],
    }


def finished_runs(output_dir, methods, seeds):
    """{method: {seed: summary}} of the runs with a report."""
    runs = {}
    for method in methods:
        for seed in seeds:
            path = run_directory(output_dir, method, seed) / "report.json"
            if path.exists():
                runs.setdefault(method, {})[seed] = run_summary(json.loads(path.read_text()))
    return runs


def spread(values, signed=False):
    """'mean +- std' (sample standard deviation) of the values, or '-' where there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{np.mean(values):{sign}.2f} ± {np.std(values, ddof=1):.2f}"


COLUMNS = (("top1", "top-1"), ("many", "many"), ("medium", "medium"), ("few", "few"),
           ("worst", "worst class"), ("worst3", "3 worst classes (mean)"))
PAIRED_COLUMNS = (("top1", "top-1"), ("worst", "worst class"), ("worst3", "3 worst classes"))


def paired(methods):
    """[(CAR variant, its base)] of the pairs both of whose methods are among ``methods``."""
    return [(m, PAIRED_BASE[m]) for m in methods if PAIRED_BASE.get(m) in methods]


def comparison_table(runs, methods, seeds, pairs=None):
    """The markdown tables: per method over its seeds, then each (method, base) of ``pairs``
    (default: every CAR variant and its base among ``methods``) as method minus base."""
    lines = ["| method | seeds | " + " | ".join(title for _, title in COLUMNS) + " |",
             "| --- | --- |" + " --- |" * len(COLUMNS)]
    for method in methods:
        done = runs.get(method, {})
        cells = [spread([s[key] for s in done.values()]) for key, _ in COLUMNS]
        lines.append(f"| {method} | {len(done)}/{len(seeds)} | " + " | ".join(cells) + " |")
    if pairs is None:
        pairs = paired(methods)
    if pairs:
        lines += ["", "Paired differences, seed by seed (percentage points; positive: CAR is better):", "",
                  "| difference | seeds | " + " | ".join(t for _, t in PAIRED_COLUMNS) + " | worst class per seed |",
                  "| --- | --- |" + " --- |" * (len(PAIRED_COLUMNS) + 1)]
        for method, base in pairs:
            common = [s for s in seeds if s in runs.get(method, {}) and s in runs.get(base, {})]
            diffs = {key: [runs[method][s][key] - runs[base][s][key] for s in common] for key, _ in PAIRED_COLUMNS}
            per_seed = ", ".join(f"seed {s}: {d:+.2f}" for s, d in zip(common, diffs["worst"])) or "-"
            cells = [spread(diffs[key], signed=True) for key, _ in PAIRED_COLUMNS]
            lines.append(f"| {method} - {base} | {len(common)} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines)


def write_comparison(output_dir, methods, seeds, timings, pairs=None):
    """Prints the tables and writes OUTPUT_DIR/comparison.md; returns the text."""
    runs = finished_runs(output_dir, methods, seeds)
    minutes = sum(timings.values()) / 60
    text = (comparison_table(runs, methods, seeds, pairs)
            + f"\n\nTest-set accuracy in percent; mean ± sample standard deviation over seeds. "
            f"Training wall time of these runs: {minutes:.1f} minutes.\n")
    if len(seeds) == 1:
        text += ("One seed: a difference here cannot be told from seed-to-seed variation; run "
                 "several seeds (--seeds=0,1,2) before choosing a method.\n")
    (pathlib.Path(output_dir) / "comparison.md").write_text(text)
    print(text)
    return text


def checked_output_dir(output_dir, flag_values):
    """``output_dir``, that of a command that names each run's directory and seed itself (it refuses
    train's --model_dir and --seed among ``flag_values``)."""
    if not output_dir:
        raise ValueError("--output_dir is required: name the directory that holds the runs.")
    for name in ("model_dir", "seed"):
        if flag_values[name].present:
            raise ValueError(f"--{name} is set per run by this command; use --output_dir and --seeds instead.")
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


class Runner:
    """Trains runs under OUTPUT_DIR, one at a time, keeping their training wall time (not the time
    to read a finished run back) in OUTPUT_DIR/timings.json, keyed by run directory."""

    def __init__(self, output_dir, arguments, method_flags=None, dlsa_flags=()):
        self.output_dir, self.arguments = output_dir, arguments
        self.method_flags = method_flags or {}
        self.dlsa_flags = list(dlsa_flags)
        self.timings_path = output_dir / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    def train(self, label, seed, extra, group="", prefix=""):
        """Trains run ``label`` / seed ``seed`` in OUTPUT_DIR/``group`` with the train flags ``extra``."""
        run_dir = run_directory(self.output_dir / group, label, seed)
        print(f"{prefix}{label}, seed {seed}: {run_dir}", flush=True)
        finished = (run_dir / "report.json").exists()
        what = f"{label} with seed {seed}" + (f" ({group})" if group else "")
        extra = [*extra, *self.method_flags.get(label, [])]
        seconds = train_run([*self.arguments, *extra, f"--seed={seed}"], run_dir, what)
        self._record(run_dir, 0.0 if finished else seconds)

    def posthoc(self, label, seed, prefix=""):
        """Runs the post-hoc stage of ``label`` ("<method>_<stage>") on the method's run of seed
        ``seed``, training that first."""
        base, stage = POSTHOC[label]
        self.train(base, seed, METHOD_FLAGS[base], prefix=prefix)
        run_dir = run_directory(self.output_dir, label, seed)
        print(f"{prefix}{label}, seed {seed}: {run_dir}", flush=True)
        extra = self.dlsa_flags if stage == "dlsa" else []
        seconds = posthoc_run(stage, run_directory(self.output_dir, base, seed), run_dir, seed,
                              f"{base} with seed {seed}", extra)
        self._record(run_dir, seconds)

    def _record(self, run_dir, seconds):
        if seconds:
            key = run_dir.relative_to(self.output_dir).as_posix()
            self.timings[key] = self.timings.get(key, 0.0) + seconds
        self.timings_path.write_text(json.dumps(self.timings, indent=1))

    def timings_of(self, group):
        return {k: v for k, v in self.timings.items() if k.startswith(f"{group}/")}


def main(argv):
    del argv
    config = flags_from_config.section_from_flags(CompareConfig, FLAGS)
    methods, seeds = checked_choice(config.methods, config.seeds)
    method_flags = per_method_flags(config.method_flags, methods)
    output_dir = checked_output_dir(config.output_dir, FLAGS)  # made once the rest is checked
    runner = Runner(output_dir, train_arguments(sys.argv[1:]), method_flags, config.dlsa_flags)
    total = len(methods) * len(seeds)
    for index, (seed, method) in enumerate((s, m) for s in seeds for m in methods):
        prefix = f"[{index + 1}/{total}] "
        if method in POSTHOC:
            runner.posthoc(method, seed, prefix=prefix)
        else:
            runner.train(method, seed, METHOD_FLAGS[method], prefix=prefix)
        write_comparison(output_dir, methods, seeds, runner.timings)
    write_figures(output_dir, methods, seeds, finished_runs(output_dir, methods, seeds), paired(methods))


if __name__ == "__main__":
    define_flags()
    cli.run(main, "car_tf.compare", backends=cli.TRAINING_BACKENDS)
