"""Per-class evaluation as a library: score a predictor on data sets and write the report.

``evaluate`` writes report.json, per_class.csv, accuracy_vs_count.png, reliability.png and
(K <= 100) confusion.png; ``python -m car_tf.evaluate`` is its command line (README, "Evaluate
and export").
"""

import pathlib

from car_tf.data.longtail import FEW_BELOW, MANY_ABOVE
from car_tf.evaluation.metrics import confusion_matrix, per_class_report
from car_tf.evaluation.predictors import predict_dataset
from car_tf.evaluation.report import write_report

HEADLINE = ("top1", "top5", "many", "medium", "few", "worst_class_accuracy", "worst_class", "worst_10pct_mean",
            "harmonic_mean_recall", "geometric_mean_recall", "macro_f1", "group_worst")


def evaluate_split(predictor, dataset, train_counts, class_names, progress=False, *,
                   many_threshold=MANY_ABOVE, few_threshold=FEW_BELOW):
    """(report dict, confusion counts) of ``predictor`` on a dataset of (images, labels); the
    thresholds set the many / few groups (car_tf.evaluation.metrics.per_class_report)."""
    scores, labels = predict_dataset(predictor, dataset, progress=progress)
    if scores.shape[1] != len(train_counts):
        raise ValueError(
            f"the model predicts {scores.shape[1]} classes but the data has {len(train_counts)}; "
            "evaluate on the data set the model was trained on."
        )
    report = per_class_report(scores, labels, train_counts, class_names,
                              many_threshold=many_threshold, few_threshold=few_threshold)
    return report, confusion_matrix(scores.argmax(-1), labels, len(train_counts))


def evaluate(predictor, test_dataset, train_counts, class_names, output_dir, train_dataset=None,
             progress=False, skipped_test=(), *, many_threshold=MANY_ABOVE, few_threshold=FEW_BELOW):
    """Evaluates the test split (and the train split if given), writes every output; returns report.json's dict.

    skipped_test: unreadable test files left out of ``test_dataset``, listed in report.json.
    many_threshold, few_threshold: a class is "many" with more than ``many_threshold`` training
      images, "few" with fewer than ``few_threshold``; recorded in report.json.
    """
    thresholds = {"many_threshold": many_threshold, "few_threshold": few_threshold}
    if predictor.num_classes != len(class_names):
        raise ValueError(
            f"the model has {predictor.num_classes} classes but the data has {len(class_names)}; "
            "evaluate on the data set the model was trained on."
        )
    if len(train_counts) != len(class_names):
        raise ValueError(
            f"{len(train_counts)} training counts for {len(class_names)} classes; "
            "pass one count per class in --train_counts."
        )
    report, confusion = evaluate_split(predictor, test_dataset, train_counts, class_names, progress, **thresholds)
    if train_dataset is not None:
        train_report, train_confusion = evaluate_split(predictor, train_dataset, train_counts, class_names,
                                                       progress, **thresholds)
        write_report(train_report, output_dir, train_confusion, prefix="train_")
        report["train"] = {k: train_report[k] for k in HEADLINE}
        report["worst_class_gap"] = train_report["worst_class_accuracy"] - report["worst_class_accuracy"]
        report["worst_class_ratio"] = (
            report["worst_class_accuracy"] / train_report["worst_class_accuracy"]
            if train_report["worst_class_accuracy"] > 0 else None
        )
    decoupled = decoupled_report(predictor, test_dataset, train_counts)
    if decoupled is not None:
        report["decoupled"] = decoupled
    if skipped_test:
        report["skipped_test_images"] = list(skipped_test)
    write_report(report, output_dir, confusion)
    return report


def decoupled_report(predictor, dataset, train_counts):
    """Classifier norm, feature norm and target cosine per group (the decoupled loss's analysis).

    Only a Keras model exposes its "features" and "classifier" layers; for SavedModel and ONNX
    files this returns None.
    """
    from car_tf.decoupled.diagnostics import decoupled_quantities

    model = getattr(predictor, "model", None)
    names = {layer.name for layer in getattr(model, "layers", ())}
    if not {"features", "classifier"} <= names:
        return None
    return decoupled_quantities(model, dataset, train_counts)


def default_output_dir(model_path):
    """MODEL/eval for a run or SavedModel directory, else eval_<file stem> beside the file."""
    path = pathlib.Path(model_path)
    return path / "eval" if path.is_dir() else path.parent / f"eval_{path.stem}"
