"""Choose hyper-parameters on a validation split carved from the training data, then confirm on test.

    python -m car_tf.search --flagfile=launch/cifar10_lt_seeded.flags --method=car \
        --vary=spec_lambda=0.5 --vary=spec_beta=0.5 --vary=spec_r0=0.5 \
        --vary=spec_count_weights=true --confirm_seeds=0,1,2 --output_dir=../runs/cifar10_lt_search

Every other flag is a ``car_tf.train`` flag and applies to every run. The candidates are the
configuration those flags give ("as_given") and each value of each --vary flag, one flag at a time
(a full grid multiplies in size). Every candidate trains with --validation_fraction (0.2 unless
given) of each class's training images held out, the same images for every run and seed, and is
scored on them; the test split is never read. The best by --select_on is chosen. With
--confirm_seeds, the chosen candidate and --baseline then train on the whole training split and
are scored on the test split seed by seed, with paired differences, as ``car_tf.compare`` does.

Runs live in OUTPUT_DIR/validation/<candidate>/seed_<s> and OUTPUT_DIR/test/<name>/seed_<s>;
OUTPUT_DIR/search.json names the chosen candidate and its train flags.
Rerunning the command resumes an interrupted run and reads finished ones back; search.md and
test/comparison.md are written from whatever has finished.
"""

import dataclasses
import json
import sys

import numpy as np
from absl import flags

from car_tf import cli, compare, flags_from_config
from car_tf.method import setting

NOT_VARIED = ("model_dir", "seed", "validation_fraction", "overwrite")
DEFAULT_FRACTION = 0.2
CRITERIA = {
    "mean_class": "mean per-class accuracy (what top-1 is on a class-balanced test split)",
    "worst3": "mean accuracy of the three worst classes",
}
COLUMNS = (("mean_class", "mean per-class"), ("worst", "worst class"), ("worst3", "3 worst classes (mean)"),
           ("many", "many"), ("medium", "medium"), ("few", "few"), ("top1", "top-1 (as imbalanced as training)"))



@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """This command's own flags (every other flag is train's and applies to every run)."""

    vary: tuple[str, ...] = setting(
        (), repeated=True, help="A train flag and the values to try, e.g. spec_lambda=0.1,0.5; repeat for more flags.")
    seeds: tuple[str, ...] = setting(("0",), help="Seeds of the validation runs; every candidate runs with each.")
    select_on: str = setting("mean_class", choices=tuple(CRITERIA), help="What the chosen candidate is best at, "
                             "on the validation split: " + "; ".join(f"{k}: {v}" for k, v in CRITERIA.items()) + ".")
    baseline: str = setting("ce", choices=tuple(compare.METHOD_FLAGS),
                            help="Method the chosen candidate is compared with on the test split.")
    confirm_seeds: tuple[str, ...] = setting((), help="Seeds of the test-split runs of the chosen candidate and "
                                             "the baseline (empty: stop after choosing).")
    output_dir: str | None = setting(None, help="Directory of the runs, search.md and test/comparison.md.")


# The flags train does not see: this command's own, and the held-out share it sets per run.
OWN_FLAGS = (*flags_from_config.flag_names(SearchConfig), "validation_fraction")
FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS):
    return flags_from_config.define_flags(SearchConfig, flag_values=flag_values,
                                          module_name=flags_from_config.calling_module())


def candidates(vary, flag_values):
    """[(label, train flags)]: the configuration as given, then each --vary value, one flag at a time.

    A value equal to the given configuration's is left out (it is "as_given").
    """
    found = {"as_given": []}
    for item in vary:
        name, _, values = item.partition("=")
        if not values or name not in flag_values or name in NOT_VARIED + OWN_FLAGS:
            raise ValueError(f"--vary={item} must name a train flag and its values, e.g. "
                             "--vary=spec_lambda=0.1,0.5.")
        for value in values.split(","):
            try:
                parsed = flag_values[name].parser.parse(value)
            except ValueError:
                raise ValueError(f"--vary={item}: {value!r} is not a value of --{name}.") from None
            if parsed != flag_values[name].value:
                found[f"{name}={value}"] = [f"--{name}={value}"]
    return list(found.items())


def chosen(runs, labels, criterion):
    """The label with the highest mean of ``criterion`` over its finished seeds (ties: the earlier)."""
    scores = [(np.mean([s[criterion] for s in runs[label].values()]), -i, label)
              for i, label in enumerate(labels) if runs.get(label)]
    return max(scores)[2] if scores else None


def search_table(runs, labels, seeds, best, criterion, fraction):
    """search.md: the candidates' validation scores and the one chosen."""
    lines = ["| candidate | seeds | " + " | ".join(title for _, title in COLUMNS) + " |",
             "| --- | --- |" + " --- |" * len(COLUMNS)]
    for label in labels:
        done = runs.get(label, {})
        cells = [compare.spread([s[key] for s in done.values()]) for key, _ in COLUMNS]
        mark = " (chosen)" if label == best else ""
        lines.append(f"| {label}{mark} | {len(done)}/{len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", f"Validation split: {fraction:g} of each class's training images, held out from training "
              "(the same images for every run); accuracy in percent, mean ± sample standard deviation over "
              f"seeds. Chosen by {CRITERIA[criterion]}: {best or '-'}."]
    return "\n".join(lines) + "\n"


def validation_fraction(argv):
    """The share held out: --validation_fraction from this command line, else DEFAULT_FRACTION."""
    given = any(a.startswith("--validation_fraction") for a in argv)
    if FLAGS.validation_fraction is not None and not given:
        raise ValueError("--validation_fraction is set in a flagfile; give it on this command line instead, "
                         "since the test-split runs must train without it.")
    return FLAGS.validation_fraction if given else DEFAULT_FRACTION


def main(argv):
    del argv
    config = flags_from_config.section_from_flags(SearchConfig, FLAGS)
    fraction = validation_fraction(sys.argv[1:])
    found = candidates(config.vary, FLAGS)
    labels = [label for label, _ in found]
    seeds = compare.checked_seeds(config.seeds)
    confirm_seeds = compare.checked_seeds(config.confirm_seeds, "confirm_seeds") if config.confirm_seeds else []
    output_dir = compare.checked_output_dir(config.output_dir, FLAGS)  # made once the rest is checked
    runner = compare.Runner(output_dir, compare.train_arguments(sys.argv[1:], OWN_FLAGS))

    for seed in seeds:
        for label, extra in found:
            runner.train(label, seed, [f"--validation_fraction={fraction}", *extra], group="validation")
    runs = compare.finished_runs(output_dir / "validation", labels, seeds)
    best = chosen(runs, labels, config.select_on)
    text = search_table(runs, labels, seeds, best, config.select_on, fraction)
    (output_dir / "search.md").write_text(text)
    choice = {"chosen": best, "flags": dict(found).get(best), "criterion": config.select_on}
    (output_dir / "search.json").write_text(json.dumps(choice, indent=1) + "\n")
    print(text)
    if not confirm_seeds:
        return
    names, pairs = [config.baseline, best], [(best, config.baseline)]
    for seed in confirm_seeds:
        runner.train(config.baseline, seed, compare.METHOD_FLAGS[config.baseline], group="test")
        runner.train(best, seed, dict(found)[best], group="test")
        compare.write_comparison(output_dir / "test", names, confirm_seeds, runner.timings_of("test"), pairs)


if __name__ == "__main__":
    define_flags()
    cli.run(main, "car_tf.search", backends=cli.TRAINING_BACKENDS)
