"""car_tf.compare: the seeded comparison's table, its paired differences, and a resumable set."""

import json
import subprocess
import sys

import pytest

from car_tf import comparison_figures, compare
from train_helpers import ROOT, tiny_args


def report(top1, many, medium, accuracies):
    return {"top1": top1, "many": many, "medium": medium, "few": None,
            "mean_class_accuracy": sum(accuracies) / len(accuracies),
            "worst_class_accuracy": min(accuracies),
            "per_class": [{"accuracy": a, "train_count": 100 // (i + 1)} for i, a in enumerate(accuracies)]}


def write_report(tmp_path, method, seed, *args):
    run = compare.run_directory(tmp_path, method, seed)
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(report(*args)))


def test_table_gives_mean_spread_and_paired_differences(tmp_path):
    write_report(tmp_path, "ce", 0, 0.50, 0.6, 0.1, [0.9, 0.0, 0.3, 0.6])
    write_report(tmp_path, "ce", 1, 0.54, 0.6, 0.2, [0.9, 0.1, 0.2, 0.7])
    write_report(tmp_path, "car", 0, 0.52, 0.6, 0.3, [0.8, 0.2, 0.3, 0.6])
    runs = compare.finished_runs(tmp_path, ["ce", "car"], [0, 1, 2])
    assert runs["ce"][1] == pytest.approx(
        {"top1": 54, "many": 60, "medium": 20, "few": None, "worst": 10, "worst3": 100 * (0.1 + 0.2 + 0.7) / 3,
         "mean_class": 100 * 1.9 / 4})
    table = compare.comparison_table(runs, ["ce", "car"], [0, 1, 2])
    # top-1 of ce over seeds 0 and 1: mean 52, sample standard deviation 2.83.
    assert "| ce | 2/3 | 52.00 ± 2.83 | 60.00 ± 0.00 | 15.00 ± 7.07 | - | 5.00 ± 7.07 | 31.67 ± 2.36 |" in table
    assert "| car | 1/3 | 52.00 | 60.00 | 30.00 | - | 20.00 | 36.67 |" in table
    # Only seed 0 has both: CAR minus CE is +2 top-1, +20 worst class, +6.67 on the three worst.
    assert "| car - ce | 1 | +2.00 | +20.00 | +6.67 | seed 0: +20.00 |" in table


def test_own_flags_are_taken_out_of_the_train_command_line():
    argv = ["--flagfile=f.flags", "--methods=ce,car", "--seeds", "0,1", "--output_dir=out", "--lr=0.2"]
    assert compare.train_arguments(argv) == ["--flagfile=f.flags", "--lr=0.2"]


@pytest.mark.parametrize("methods, seeds, message", [
    (["ce", "cat"], ["0"], "names no known method"),
    (["ce"], ["a"], "must be whole numbers"),
    (["ce"], ["1", "1"], "must list distinct seeds"),
])
def test_bad_choices_are_one_sentence(methods, seeds, message):
    with pytest.raises(ValueError, match=message):
        compare.checked_choice(methods, seeds)


def test_method_flags_go_to_their_method_alone():
    found = compare.per_method_flags(["car:--spec_lambda=1.0,--lr=0.2", "ce:--lr=0.3"], ["ce", "car"])
    assert found == {"car": ["--spec_lambda=1.0", "--lr=0.2"], "ce": ["--lr=0.3"]}
    assert compare.per_method_flags(["car:--lr=0.5"], ["car_dlsa"]) == {"car": ["--lr=0.5"]}  # the run DLSA reads
    for bad in ("cat:--lr=1", "car:lr=1", "car:"):
        with pytest.raises(ValueError, match="must read METHOD:--flag=value"):
            compare.per_method_flags([bad], ["ce", "car"])


def test_figures_are_drawn_from_the_finished_runs(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.1)):
        write_report(tmp_path, "ce", seed, 0.50, 0.6, 0.1, [0.9, 0.0 + shift, 0.3, 0.6])
        write_report(tmp_path, "car", seed, 0.52, 0.6, 0.3, [0.8, 0.2 + shift, 0.3, 0.6])
    methods, seeds = ["ce", "car"], [0, 1]
    paths = comparison_figures.write_figures(
        tmp_path, methods, seeds, compare.finished_runs(tmp_path, methods, seeds), compare.paired(methods))
    assert [p.name for p in paths] == ["accuracy_vs_count.png", "paired_differences.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    counts, accuracy = comparison_figures.per_class(tmp_path, "car", seeds)
    assert counts.tolist() == [100, 50, 33, 25] and accuracy.shape == (2, 4)


def run_compare(*args):
    return subprocess.run([sys.executable, "-m", "car_tf.compare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_set_trains_prints_its_table_and_reads_finished_runs_back(tiny_folder, tmp_path):
    train_flags = [a for a in tiny_args(tiny_folder, "unused", "--epochs=1") if not a.startswith("--model_dir")]
    out = tmp_path / "set"
    first = run_compare(*train_flags, "--methods=ce,car", "--seeds=0", f"--output_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| car - ce | 1 |" in first.stdout and "One seed" in first.stdout
    assert (out / "car" / "seed_0" / "report.json").exists()
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"ce/seed_0", "car/seed_0"}
    # Rerun: both runs are finished, nothing trains, the table is the same.
    again = run_compare(*train_flags, "--methods=ce,car", "--seeds=0", f"--output_dir={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "timings.json").read_text()) == timings
    assert (out / "comparison.md").read_text().split("\n\n")[0] in again.stdout
    # DLSA rows on the finished runs, a method's own flags, and the figures.
    dlsa = ["--dlsa_flags=--num_components=6,--prior_stddev=1,--flow_epochs=2,--flow_batch_size=32,"
            "--classifier_epochs=3"]
    more = run_compare(*train_flags, "--methods=ce,car,ce_dlsa,car_dlsa,logit_adjusted", "--seeds=0",
                       "--method_flags=logit_adjusted:--la_tau=0.5", *dlsa, f"--output_dir={out}")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "| car_dlsa - ce_dlsa | 1 |" in more.stdout
    assert "--la_tau=0.5" in (out / "logit_adjusted" / "seed_0" / "flags.txt").read_text()
    assert json.loads((out / "car_dlsa" / "seed_0" / "run.json").read_text())["method"] == "car+dlsa"
    assert (out / "accuracy_vs_count.png").exists() and (out / "paired_differences.png").exists()
    # Other train flags for the same runs are refused by train, and compare says which run stopped.
    changed = run_compare(*train_flags, "--lr=0.5", "--methods=ce", "--seeds=0", f"--output_dir={out}")
    assert changed.returncode == 2
    assert "training ce with seed 0 stopped" in changed.stderr and "--lr" in changed.stderr
