"""Keras callback that runs the per-class evaluation at the end of every epoch."""

import json
import pathlib

import keras
import numpy as np

from car_tf import backend
from car_tf.data.longtail import FEW_BELOW, GROUPS, MANY_ABOVE, check_group_thresholds
from car_tf.evaluation import report as report_writers
from car_tf.evaluation.metrics import confusion_matrix, per_class_report
from car_tf.evaluation.predictors import KerasPredictor, predict_dataset

# Report entries copied into Keras ``logs`` as "val_<name>" (None values, i.e. empty groups, are skipped).
LOGGED_METRICS = (
    "top1",
    "top5",
    "mean_class_accuracy",
    "many",
    "medium",
    "few",
    "worst_class_accuracy",
    "worst_10pct_mean",
    "harmonic_mean_recall",
    "geometric_mean_recall",
    "macro_f1",
    "weighted_spectral_norm",
    "ece",
)
# Beyond this many classes the TensorBoard confusion image shows only the worst classes' rows.
FULL_CONFUSION_MAX_CLASSES = 50
WORST_CONFUSION_ROWS = 30
# TensorBoard run (folder under log_dir/tb) and tags of the per-class images.
TENSORBOARD_RUN = "per_class"
CONFUSION_TAG = "confusion_matrix"
ACCURACY_TAG = "accuracy_vs_train_count"


def logged_values(report):
    """{name: value} of a report that goes into Keras ``logs`` (without the "val_" prefix): the
    LOGGED_METRICS, and "<group>_worst_accuracy", the recall of each group's worst class; None
    values (empty groups) are left out."""
    values = {name: report[name] for name in LOGGED_METRICS}
    for group in GROUPS:
        worst = report["group_worst"][group]
        values[f"{group}_worst_accuracy"] = None if worst is None else worst["accuracy"]
    return {name: value for name, value in values.items() if value is not None}


def confusion_rows(report):
    """True classes whose confusion rows the TensorBoard image shows: all up to 50 classes, else
    the 30 of lowest recall, worst first."""
    if report["num_classes"] <= FULL_CONFUSION_MAX_CLASSES:
        return list(range(report["num_classes"]))
    return [row["class_id"] for row in report_writers.worst_classes(report, WORST_CONFUSION_ROWS)]


class PerClassEvaluation(keras.callbacks.Callback):
    """Evaluates per-class metrics on ``dataset`` after each epoch.

    Adds "val_top1", "val_many", "val_medium", "val_few", "val_worst_class_accuracy",
    "val_harmonic_mean_recall", "val_geometric_mean_recall", "val_macro_f1",
    "val_few_worst_accuracy", ... (``logged_values``) to ``logs`` (so History, TensorBoard and
    ModelCheckpoint see them) and, with ``log_dir``, writes the full
    report to ``log_dir/metrics/epoch_NNN.json`` (NNN counts epochs from 1) and, under the
    TensorFlow backend, two TensorBoard images per epoch to ``log_dir/tb/per_class`` (step = epoch
    from 0, as Keras's scalars):
    "confusion_matrix", P(predicted | true) with one row per true class (beyond 50 classes the 30
    of lowest recall, named), and "accuracy_vs_train_count", per-class recall against training
    images.

    Args:
      dataset: finite, re-iterable batches of (images, labels) in a fixed order (a tf.data.Dataset,
        or car_tf.data.arrays.EvalBatches).
      train_counts: training images per class (many/medium/few groups, frequency weights).
      log_dir: run directory; None writes nothing to disk.
      class_names: optional names of the classes for the JSON report.
      many_threshold, few_threshold: a class is "many" with more than ``many_threshold`` training
        images, "few" with fewer than ``few_threshold`` (defaults 100 and 20).
    """

    def __init__(self, dataset, train_counts, log_dir=None, class_names=None, *,
                 many_threshold=MANY_ABOVE, few_threshold=FEW_BELOW):
        super().__init__()
        check_group_thresholds(many_threshold, few_threshold)  # before the first epoch, not after it
        self.dataset = dataset
        self.train_counts = [int(c) for c in train_counts]
        self.thresholds = {"many_threshold": many_threshold, "few_threshold": few_threshold}
        self.log_dir = pathlib.Path(log_dir) if log_dir is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.last_report = None
        self._predictor = None
        self._predictor_source = None
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if self._predictor_source is not self.model:
            self._predictor = KerasPredictor(self.model)
            self._predictor_source = self.model
        scores, labels = predict_dataset(self._predictor, self.dataset)
        report = per_class_report(scores, labels, self.train_counts, self.class_names, **self.thresholds)
        self.last_report = report
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in logged_values(report).items()})
        if self.log_dir is not None:
            metrics_dir = self.log_dir / "metrics"
            metrics_dir.mkdir(parents=True, exist_ok=True)
            training_logs = {k: float(v) for k, v in (logs or {}).items() if not k.startswith("val_")}
            record = {"epoch": epoch + 1, "train_logs": training_logs, **report}
            (metrics_dir / f"epoch_{epoch + 1:03d}.json").write_text(json.dumps(record, indent=2) + "\n")
            if backend.is_tensorflow():  # TensorBoard's images are written with tf.summary
                confusion = confusion_matrix(np.argmax(scores, axis=-1), labels, len(self.train_counts))
                self._write_images(epoch, report, confusion)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_images(self, epoch, report, confusion):
        rows = confusion_rows(report)
        title = "P(predicted | true)"
        if len(rows) < report["num_classes"]:
            title += f", the {len(rows)} classes of lowest recall"
        names = [row["name"] for row in report["per_class"]]
        images = {
            CONFUSION_TAG: report_writers.confusion_figure(confusion, names, rows, title),
            ACCURACY_TAG: report_writers.accuracy_vs_count_figure(report),
        }
        # keras.callbacks.TensorBoard writes scalars from the logs only; images need tf.summary.
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir / "tb" / TENSORBOARD_RUN))
        with self._writer.as_default():
            for tag, figure in images.items():
                tf.summary.image(tag, report_writers.figure_pixels(figure)[None], step=epoch)
        self._writer.flush()
