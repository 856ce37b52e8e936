"""The figures ``car_tf.compare`` draws beside its table, from the runs' report.json files.

- ``accuracy_vs_count.png``: each method's per-class test accuracy against the class's training
  images (log scale), the mean over seeds as a line and the lowest to highest seed as a band.
- ``paired_differences.png``: for each CAR variant and its base, the per-seed differences of
  top-1, worst class and mean of the three worst classes (dots), and their mean (a bar).
"""

import json
import pathlib

import numpy as np
from absl import logging

from car_tf.evaluation.report import _pyplot

ACCURACY_FIGURE = "accuracy_vs_count.png"
DIFFERENCES_FIGURE = "paired_differences.png"
PAIRED_KEYS = (("top1", "top-1"), ("worst", "worst class"), ("worst3", "3 worst classes"))


def per_class(output_dir, method, seeds):
    """(train counts [K], accuracies in percent [seeds found, K]) of a method's finished runs."""
    rows = []
    counts = None
    for seed in seeds:
        path = pathlib.Path(output_dir) / method / f"seed_{seed}" / "report.json"
        if path.exists():
            classes = json.loads(path.read_text())["per_class"]
            counts = np.array([c["train_count"] for c in classes])
            rows.append([np.nan if c["accuracy"] is None else 100 * c["accuracy"] for c in classes])
    return counts, np.array(rows)


def plot_accuracy_vs_count(output_dir, methods, seeds, path):
    """Per-class accuracy against training images, one line (mean) and band (range) per method."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for method in methods:
        counts, accuracy = per_class(output_dir, method, seeds)
        if not len(accuracy):
            continue
        order = np.argsort(counts, kind="stable")[::-1]
        x, runs = counts[order], accuracy[:, order]
        label = f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        (line,) = axes.plot(x, np.nanmean(runs, axis=0), marker="o", markersize=3, label=label)
        if len(runs) > 1:
            axes.fill_between(x, np.nanmin(runs, axis=0), np.nanmax(runs, axis=0), color=line.get_color(), alpha=0.15)
    axes.set_xscale("log")
    axes.set_xlabel("training images of the class")
    axes.set_ylabel("test accuracy of the class (%)")
    axes.set_title("Per-class accuracy: mean over seeds, band from lowest to highest seed")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_paired_differences(runs, pairs, path):
    """Per-seed differences (dots) and their mean (bars) of each (method, base) pair; ``runs`` is
    compare's {method: {seed: summary}}."""
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(PAIRED_KEYS), figsize=(4 * len(PAIRED_KEYS), 0.6 * len(pairs) + 2.2),
                                  sharey=True)
    for panel, (key, title) in zip(panels, PAIRED_KEYS):
        for row, (method, base) in enumerate(pairs):
            common = sorted(set(runs.get(method, {})) & set(runs.get(base, {})))
            diffs = [runs[method][s][key] - runs[base][s][key] for s in common]
            if diffs:
                panel.barh(row, np.mean(diffs), color="tab:blue" if np.mean(diffs) >= 0 else "tab:red", alpha=0.35)
                panel.plot(diffs, [row] * len(diffs), "ko", markersize=4)
        panel.axvline(0, color="gray", linewidth=1)
        panel.set_title(f"{title} (points)")
        panel.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(range(len(pairs)), [f"{m} - {b}" for m, b in pairs])
    figure.suptitle("Paired differences per seed (dots) and their mean (bar); right of 0: the first is better")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_figures(output_dir, methods, seeds, runs, pairs):
    """Draws both figures into ``output_dir`` from its finished runs (``runs``: compare's
    {method: {seed: summary}}; ``pairs``: [(method, base)]); returns their paths."""
    try:
        _pyplot()
    except ImportError:
        logging.warning("matplotlib is not installed: the comparison's figures are left out.")
        return []
    output_dir = pathlib.Path(output_dir)
    paths = [output_dir / ACCURACY_FIGURE]
    plot_accuracy_vs_count(output_dir, methods, seeds, paths[0])
    if pairs:
        paths.append(output_dir / DIFFERENCES_FIGURE)
        plot_paired_differences(runs, pairs, paths[1])
    return paths
