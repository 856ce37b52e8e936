"""Per-class evaluation of a trained model in any of its forms.

    python -m car_tf.evaluate --model=RUN_DIR|model.keras|SAVED_MODEL_DIR|model.onnx \
        --dataset=cifar10 --data_dir=... [--train_counts=JSON] [--on_train] [--output_dir=DIR]

Writes report.json, per_class.csv, accuracy_vs_count.png, reliability.png and (K <= 100)
confusion.png into --output_dir (default: MODEL/eval for a run directory, else next to the file),
and prints a compact table. --on_train adds the train split (train_*.csv/png) and the worst-class
train vs test gap to report.json. The many / medium / few groups are those of the run
(--many_threshold / --few_threshold recorded in its run.json) unless the flags are given.
"""

import dataclasses
import json
import pathlib
import re

import numpy as np
from absl import flags, logging

from car_tf import flags_from_config
from car_tf.data import flags as data_flags
from car_tf.data.loading import load_datasets
from car_tf.data.longtail import check_group_thresholds
from car_tf.evaluation.evaluate import default_output_dir, evaluate
from car_tf.evaluation.predictors import RUN_FILE, RUN_MODEL_FILE, ModelNotFoundError, find_run_info, load_predictor
from car_tf.evaluation.report import format_table
from car_tf.method import setting


def parse_train_counts(value):
    """Training counts from a JSON list, or from a JSON file holding a list or {"train_counts": [...]}."""
    text = value.strip()
    if not text.startswith("["):
        path = pathlib.Path(text)
        if not path.is_file():
            raise ValueError(f"--train_counts={value} is neither a JSON list nor a file; pass e.g. [500, 50, 5].")
        text = path.read_text()
    try:
        counts = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--train_counts is not valid JSON ({error}); pass e.g. [500, 50, 5].") from None
    if isinstance(counts, dict):
        counts = counts.get("train_counts")
    if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError("train counts must be a JSON list of non-negative integers, e.g. [500, 50, 5].")
    return counts


def group_thresholds(flag_values, run_info):
    """{"many_threshold", "few_threshold"}: a flag given on the command line, else the run's value
    from its run.json (so the groups are those the run reported), else the flag's default."""
    thresholds = {}
    for name in data_flags.GROUP_FLAGS:
        if flag_values[name].present or run_info.get(name) is None:
            thresholds[name] = int(flag_values[name].value)
        else:
            thresholds[name] = int(run_info[name])
    check_group_thresholds(**thresholds)
    return thresholds


def evaluate_from_flags(flag_values=flags.FLAGS):
    """Evaluates the model the flags name and writes its report; returns (report, output_dir)."""
    from car_tf.data.pipelines import eval_dataset

    command = flags_from_config.section_from_flags(EvaluateCommand, flag_values)
    predictor = load_model_safely(command.model)
    run_info = find_run_info(command.model) or {}
    data = data_flags.data_config(flag_values)
    if not flag_values["image_size"].present and predictor.image_size is not None:
        data = dataclasses.replace(data, image_size=int(predictor.image_size[0]))
    if data.data_recipe == "auto" and run_info.get("recipe"):
        data = dataclasses.replace(data, data_recipe=run_info["recipe"])  # evaluate as the model was trained
    train, test, recipe, image_size = load_datasets(data)
    train, test = match_model_classes(predictor, command.model, train, test)
    if command.train_counts:
        train_counts = parse_train_counts(command.train_counts)
    else:
        train_counts = run_info.get("train_counts") or [int(c) for c in train.counts()]

    def dataset(data):
        return eval_dataset(data, recipe=recipe, image_size=image_size, batch_size=command.batch_size)

    thresholds = group_thresholds(flag_values, run_info)
    output_dir = pathlib.Path(command.output_dir or default_output_dir(command.model))
    report = evaluate(
        predictor,
        dataset(test),
        train_counts,
        test.class_names,
        output_dir,
        train_dataset=dataset(train) if command.on_train else None,
        progress=True,
        skipped_test=test.skipped,
        **thresholds,
    )
    return report, output_dir


def load_model_safely(model):
    """``load_predictor(model)``; a .keras file Keras cannot rebuild from its config (a layer that
    names ``os.system``, a class no module registers) is refused in one sentence naming it."""
    path = pathlib.Path(model)
    if path.is_dir() and (path / RUN_FILE).is_file():
        path = path / RUN_MODEL_FILE
    try:
        return load_predictor(model)
    except (ModelNotFoundError, OSError):  # a missing or unreadable path: named as it is
        raise
    except Exception as error:  # Keras's TypeError, ValueError, KeyError ... from deserializing
        if path.suffix != ".keras":
            raise
        raise ValueError(
            f"{path} is not a model car_tf can load safely: Keras cannot rebuild it from its config "
            f"({_keras_reason(error)}); evaluate a .keras file that car_tf.train or Keras saved, "
            "from a source you trust."
        ) from error


def _keras_reason(error):
    """What Keras could not rebuild, in a few words, from its error."""
    text = str(error)
    located = re.search(r"Could not locate (class|function) '([^']+)'", text)
    if located:
        module = re.search(r"Full object config: \{'module': '([^']+)'", text)
        name = f"{module.group(1)}.{located.group(2)}" if module else located.group(2)
        return f"it names {located.group(1)} {name}, which is neither Keras's nor car_tf's"
    line = next((l.strip() for l in text.splitlines() if l.strip()), type(error).__name__)
    return line if len(line) <= 200 else line[:200] + " ..."


def match_model_classes(predictor, model, *splits):
    """The data ``splits`` relabelled to the model's class order, their classes matched by name.

    The model's names are those it records (its run's run.json, or the export's metadata); data
    whose class names differ from them is refused in one sentence naming the differing classes.
    A model that records none is matched by position (output i is the data's class i), said in
    one log line.
    """
    if not predictor.class_names:
        logging.info(
            "%s records no class names (no run.json beside it), so its %d outputs are matched to the "
            "data's classes by position: output i is the data's class i (%s).",
            model, predictor.num_classes, ", ".join(splits[0].class_names[:5]) + (", ..." if len(splits[0].class_names) > 5 else ""),
        )
        return splits
    names = [str(n) for n in predictor.class_names]
    data_names = splits[0].class_names
    if sorted(names) != sorted(data_names):
        lacking = [n for n in names if n not in set(data_names)]
        extra = [n for n in data_names if n not in set(names)]
        parts = [f"the model's class(es) {_listed(lacking)} are not in the data"] if lacking else []
        parts += [f"the data's class(es) {_listed(extra)} are not in the model"] if extra else []
        if not parts:
            parts = ["a class name appears twice on one side"]
        raise ValueError(
            f"The data's classes differ from those {model} was trained on: {' and '.join(parts)}; "
            "evaluate on data with the model's classes (matched by class name)."
        )
    if names != data_names:
        logging.info("The data's classes are listed in another order than the model's; they are matched by name.")
    order = np.asarray([names.index(n) for n in data_names], np.int64)  # data class -> model output
    return tuple(dataclasses.replace(data, labels=order[data.labels], class_names=names) for data in splits)


def _listed(names, limit=10):
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def main(argv):
    del argv
    report, output_dir = evaluate_from_flags(flags.FLAGS)
    print(format_table(report))
    if "train" in report:
        print(f"train worst-class {100 * report['train']['worst_class_accuracy']:.2f}  "
              f"gap to test {100 * report['worst_class_gap']:.2f} points")
    print(f"wrote {output_dir}")


@dataclasses.dataclass(frozen=True)
class EvaluateCommand:
    """This command's own flags, one per field (the data and group flags are DataConfig's)."""

    model: str = setting(help="Run directory, .keras file, SavedModel directory or .onnx file.")
    train_counts: str | None = setting(None, help="Training images per class as a JSON list or a JSON file; "
                                       "default run.json's, else counted from the training split.")
    on_train: bool = setting(False, help="Also evaluate the training split and report the worst-class gap.")
    output_dir: str | None = setting(None, help="Where to write the report; default MODEL/eval.")
    batch_size: int = setting(128, lower_bound=1, help="Evaluation batch size.")


def define_flags(flag_values=flags.FLAGS):
    names = flags_from_config.define_flags(EvaluateCommand, flag_values=flag_values,
                                           module_name=flags_from_config.calling_module())
    data_flags.define_data_flags(flag_values)
    data_flags.define_group_flags(flag_values)
    return names


if __name__ == "__main__":
    from car_tf import cli

    define_flags()
    cli.run(main, "car_tf.evaluate")
