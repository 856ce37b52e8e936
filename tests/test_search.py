"""car_tf.search: candidates, the choice on the validation split, and a search that confirms on test."""

import json
import subprocess
import sys

import pytest

from car_tf import search
from train_helpers import ROOT, parse, tiny_args


def summary(mean_class, worst3):
    return {"mean_class": mean_class, "worst3": worst3}


def test_candidates_vary_one_flag_at_a_time_and_skip_the_given_value():
    values = parse(["--spec_lambda=0.3"])
    found = search.candidates(["spec_lambda=0.3,0.5", "spec_count_weights=true,false"], values)
    assert found == [("as_given", []), ("spec_lambda=0.5", ["--spec_lambda=0.5"]),
                     ("spec_count_weights=true", ["--spec_count_weights=true"])]


@pytest.mark.parametrize("vary, message", [
    ("spec_lambda", "must name a train flag and its values"),
    ("no_such_flag=1", "must name a train flag and its values"),
    ("seed=1,2", "must name a train flag and its values"),
    ("spec_lambda=high", "'high' is not a value of --spec_lambda"),
])
def test_bad_vary_is_one_sentence(vary, message):
    with pytest.raises(ValueError, match=message):
        search.candidates([vary], parse([]))


def test_the_choice_is_the_best_mean_over_seeds_and_ties_keep_the_earlier():
    runs = {"as_given": {0: summary(50, 10), 1: summary(52, 14)},
            "spec_beta=0.5": {0: summary(53, 8), 1: summary(49, 9)},  # mean 51: equal to as_given
            "spec_lambda=0.5": {0: summary(48, 20)}}
    labels = list(runs)
    assert search.chosen(runs, labels, "mean_class") == "as_given"
    assert search.chosen(runs, labels, "worst3") == "spec_lambda=0.5"
    assert search.chosen({}, labels, "worst3") is None
    table = search.search_table(
        {k: {s: {**v, "worst": 0, "many": None, "medium": 1, "few": 2, "top1": 3} for s, v in r.items()}
         for k, r in runs.items()}, labels, [0, 1], "as_given", "mean_class", 0.2)
    assert "| as_given (chosen) | 2/2 | 51.00 ± 1.41 | 0.00 ± 0.00 | 12.00 ± 2.83 |" in table
    assert "| spec_lambda=0.5 | 1/2 | 48.00 |" in table


def test_a_validation_fraction_from_a_flagfile_is_refused(tmp_path):
    flagfile = tmp_path / "f.flags"
    flagfile.write_text("--validation_fraction=0.1\n")
    parse([f"--flagfile={flagfile}"])
    with pytest.raises(ValueError, match="give it on this command line instead"):
        search.validation_fraction([f"--flagfile={flagfile}"])
    parse([])
    assert search.validation_fraction([]) == search.DEFAULT_FRACTION


@pytest.mark.slow
def test_a_search_chooses_on_validation_and_confirms_on_test(tiny_folder, tmp_path):
    train_flags = [a for a in tiny_args(tiny_folder, "unused", "--epochs=1") if not a.startswith("--model_dir")]
    out = tmp_path / "search"
    command = [sys.executable, "-m", "car_tf.search", *train_flags, "--method=car", "--vary=spec_lambda=1.0",
               "--validation_fraction=0.25", "--confirm_seeds=0", f"--output_dir={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("as_given", "spec_lambda=1.0"):
        report = json.loads((out / "validation" / label / "seed_0" / "report.json").read_text())
        # 0.25 of the 36 / 16 / 8 long-tailed training images of each class: 9 + 4 + 2.
        assert report["evaluated_on"] == "validation" and report["num_samples"] == 15
        assert json.loads((out / "validation" / label / "seed_0" / "run.json").read_text())["train_counts"] == [27, 12, 6]
    flagged = (out / "validation" / "spec_lambda=1.0" / "seed_0" / "flags.txt").read_text()
    assert "--spec_lambda=1.0" in flagged and "--validation_fraction=0.25" in flagged
    text = (out / "search.md").read_text()
    best = next(line for line in text.splitlines() if "(chosen)" in line).split()[1]
    assert best in ("as_given", "spec_lambda=1.0") and text in done.stdout
    test_report = json.loads((out / "test" / best / "seed_0" / "report.json").read_text())
    assert test_report["evaluated_on"] == "test" and test_report["num_samples"] == 24
    assert "validation_fraction" not in (out / "test" / "ce" / "seed_0" / "flags.txt").read_text()
    assert f"| {best} - ce | 1 |" in (out / "test" / "comparison.md").read_text()
