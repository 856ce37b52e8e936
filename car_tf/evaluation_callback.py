"""Keras callback that runs the per-class evaluation at the end of every epoch."""

import json
import pathlib

import keras

from car_tf.metrics import per_class_report
from car_tf.predictors import KerasPredictor, predict_dataset

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
    "weighted_spectral_norm",
    "ece",
)


class PerClassEvaluation(keras.callbacks.Callback):
    """Evaluates per-class metrics on ``dataset`` after each epoch.

    Adds "val_top1", "val_many", "val_medium", "val_few", "val_worst_class_accuracy", ... to ``logs``
    (so History, TensorBoard and ModelCheckpoint see them) and, with ``log_dir``, writes the full
    report to ``log_dir/metrics/epoch_NNN.json`` (NNN counts epochs from 1).

    Args:
      dataset: finite tf.data.Dataset of (images, labels) in a fixed order.
      train_counts: training images per class (many/medium/few groups, frequency weights).
      log_dir: run directory; None writes nothing to disk.
      class_names: optional names of the classes for the JSON report.
    """

    def __init__(self, dataset, train_counts, log_dir=None, class_names=None):
        super().__init__()
        self.dataset = dataset
        self.train_counts = [int(c) for c in train_counts]
        self.log_dir = pathlib.Path(log_dir) if log_dir is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.last_report = None
        self._predictor = None
        self._predictor_source = None

    def on_epoch_end(self, epoch, logs=None):
        if self._predictor_source is not self.model:
            self._predictor = KerasPredictor(self.model)
            self._predictor_source = self.model
        scores, labels = predict_dataset(self._predictor, self.dataset)
        report = per_class_report(scores, labels, self.train_counts, self.class_names)
        self.last_report = report
        if logs is not None:
            for name in LOGGED_METRICS:
                if report[name] is not None:
                    logs[f"val_{name}"] = report[name]
        if self.log_dir is not None:
            metrics_dir = self.log_dir / "metrics"
            metrics_dir.mkdir(parents=True, exist_ok=True)
            training_logs = {k: float(v) for k, v in (logs or {}).items() if not k.startswith("val_")}
            record = {"epoch": epoch + 1, "train_logs": training_logs, **report}
            (metrics_dir / f"epoch_{epoch + 1:03d}.json").write_text(json.dumps(record, indent=2) + "\n")
