"""Writers for a ``car_tf.evaluation.metrics.per_class_report`` dict: JSON, CSV, PNG plots and a text table."""

import csv
import json
import pathlib

import numpy as np
from absl import logging

# Confusion heatmaps are drawn only up to this many classes; beyond it they are unreadable.
MAX_HEATMAP_CLASSES = 100
CSV_COLUMNS = (
    "class_id", "name", "group", "train_count", "test_count", "accuracy", "precision", "f1", "worst_in_group",
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(report, path):
    """Writes the report as indented JSON."""
    pathlib.Path(path).write_text(json.dumps(report, indent=2) + "\n")


def write_per_class_csv(report, path):
    """One row per class: id, name, group, train count, test count, accuracy (recall), precision,
    F1 (each empty where undefined: no test sample, never predicted) and worst_in_group (1 for the
    class of lowest accuracy in its many / medium / few group, else empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        for row in report["per_class"]:
            cells = {k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS}
            cells["worst_in_group"] = 1 if row.get("worst_in_group") else ""
            writer.writerow(cells)


def accuracy_vs_count_figure(report, title="Per-class accuracy vs training images"):
    """Scatter of per-class accuracy against training count on a log x axis, one colour per group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, colour in (("many", "tab:blue"), ("medium", "tab:orange"), ("few", "tab:red")):
        rows = [r for r in report["per_class"] if r["group"] == group and r["accuracy"] is not None]
        if rows:
            ax.scatter(
                [max(r["train_count"], 1) for r in rows],
                [r["accuracy"] for r in rows],
                s=12,
                color=colour,
                label=f"{group} ({len(rows)})",
            )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy (recall)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_accuracy_vs_count(report, path, title="Per-class accuracy vs training images"):
    """Writes ``accuracy_vs_count_figure`` as a PNG."""
    _save(accuracy_vs_count_figure(report, title), path)


def worst_classes(report, count):
    """The ``count`` per-class rows of lowest accuracy (classes without test samples left out)."""
    ranked = sorted(
        (r for r in report["per_class"] if r["accuracy"] is not None), key=lambda r: r["accuracy"]
    )
    return ranked[:count]


def confusion_figure(confusion, class_names, rows=None, title="P(predicted | true)"):
    """Heatmap of the confusion normalised per true class: row j is P(predicted | true j).

    ``confusion`` is the count matrix of car_tf.evaluation.metrics (rows predicted, columns true); the figure
    shows its transpose, one row per true class. ``rows``: the true classes to show, in order
    (e.g. the worst ones); all by default. Class names label every axis of at most 30 classes.
    """
    plt = _pyplot()
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = (confusion / np.maximum(confusion.sum(axis=0), 1.0)[None, :]).T
    rows = np.arange(len(class_names)) if rows is None else np.asarray(rows, dtype=np.int64)
    rates = rates[rows]
    num_columns = len(class_names)
    width = min(4 + 0.25 * num_columns, 24)
    height = min(3 + 0.25 * len(rows), 24)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(rates, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    if num_columns <= 30:
        ax.set_xticks(np.arange(num_columns), class_names, rotation=90)
    if len(rows) <= 30:
        ax.set_yticks(np.arange(len(rows)), [class_names[j] for j in rows])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_confusion(confusion, class_names, path):
    """Writes ``confusion_figure`` of all classes as a PNG."""
    _save(confusion_figure(confusion, class_names), path)


def figure_pixels(figure):
    """The rendered figure as an RGB uint8 array [H, W, 3]; closes the figure."""
    figure.canvas.draw()
    pixels = np.array(figure.canvas.buffer_rgba())[..., :3]
    _pyplot().close(figure)
    return pixels


def _save(figure, path):
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)


def plot_reliability(report, path):
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration."""
    plt = _pyplot()
    bins = report["reliability"]
    num_bins = len(bins["count"])
    centres = (np.arange(num_bins) + 0.5) / num_bins
    filled = np.asarray(bins["count"]) > 0
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centres[filled], np.asarray(bins["accuracy"])[filled], width=1.0 / num_bins,
           edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {report['ece']:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def _percent(value):
    return "   -" if value is None else f"{100 * value:5.2f}"


def _group_thresholds(report):
    if "many_threshold" not in report:  # a report written before the thresholds were recorded
        return ""
    return f"; many > {report['many_threshold']}, few < {report['few_threshold']} training images"


def format_table(report, worst=5):
    """A compact text summary: headline metrics, the recall means, macro-F1 and each group's worst
    class, a note where a class of zero recall makes the means 0, then the ``worst`` lowest-accuracy
    classes. Reports written before some of these entries existed print without them."""
    sizes = report["group_sizes"]
    lines = [
        f"{report.get('evaluated_on', 'test')} split: samples {report['num_samples']}  classes {report['num_classes']} "
        f"(many {sizes['many']} / medium {sizes['medium']} / few {sizes['few']}{_group_thresholds(report)})",
        f"{'top-1':>10} {'top-5':>7} {'many':>7} {'medium':>7} {'few':>7} {'worst':>7} {'worst10%':>9}",
        f"{_percent(report['top1']):>10} {_percent(report['top5']):>7} {_percent(report['many']):>7} "
        f"{_percent(report['medium']):>7} {_percent(report['few']):>7} "
        f"{_percent(report['worst_class_accuracy']):>7} {_percent(report['worst_10pct_mean']):>9}",
        f"spectral norm {report['spectral_norm']:.4f}  weighted {report['weighted_spectral_norm']:.4f}"
        f"  ECE {report['ece']:.4f}",
    ]
    if "harmonic_mean_recall" in report:
        lines.append(
            f"recall means: harmonic {_percent(report['harmonic_mean_recall']).strip()}  "
            f"geometric {_percent(report['geometric_mean_recall']).strip()}  "
            f"macro-F1 {_percent(report['macro_f1']).strip()}"
        )
    if "group_worst" in report:
        lines.append("worst per group: " + " / ".join(
            f"{group} " + ("-" if row is None else f"{row['name']} {_percent(row['accuracy']).strip()}")
            for group, row in report["group_worst"].items()
        ))
    lines += [f"note: {note}" for note in report.get("notes", ())]
    ranked = worst_classes(report, worst)
    if ranked:
        lines.append("worst classes: " + ", ".join(
            f"{r['name']} {_percent(r['accuracy']).strip()} (train {r['train_count']})" for r in ranked
        ))
    return "\n".join(lines)


def write_report(report, output_dir, confusion=None, prefix=""):
    """Writes report.json, per_class.csv and the PNGs into ``output_dir``; returns the paths.

    ``confusion`` (the count matrix) adds a heatmap when K <= 100. ``prefix`` names a second split
    in the same folder (e.g. "train_"). Without matplotlib (a minimal serving or GPU machine) the
    PNGs are left out with a warning; the JSON and CSV carry every number.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / f"{prefix}report.json",
        "csv": output_dir / f"{prefix}per_class.csv",
        "accuracy_plot": output_dir / f"{prefix}accuracy_vs_count.png",
        "reliability_plot": output_dir / f"{prefix}reliability.png",
    }
    write_json(report, paths["json"])
    write_per_class_csv(report, paths["csv"])
    try:
        _pyplot()
    except ImportError:
        logging.warning("matplotlib is not installed: the report's PNG plots are left out.")
        return {key: paths[key] for key in ("json", "csv")}
    plot_accuracy_vs_count(report, paths["accuracy_plot"])
    plot_reliability(report, paths["reliability_plot"])
    if confusion is not None and report["num_classes"] <= MAX_HEATMAP_CLASSES:
        paths["confusion_plot"] = output_dir / f"{prefix}confusion.png"
        plot_confusion(confusion, [r["name"] for r in report["per_class"]], paths["confusion_plot"])
    return paths
