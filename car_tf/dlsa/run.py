"""DLSA on a trained run: features -> cascade -> a run directory the evaluation harness reads.

The output directory holds

    run.json            the base run's keys, with "method" = "<base method>+dlsa", plus "dlsa"
                        (the configuration) and "base_run"
    model.keras         image -> routed logits: the base model up to its "features" layer, then
                        ``DLSARoutedClassifier`` (load with ``car_tf.evaluation.predictors.load_predictor`` or
                        ``keras.saving.load_model`` after ``import car_tf.dlsa``)
    dlsa_head.keras     the routed stack alone: features [B, D] -> logits
    routing_stats.json  per split (fit, validation, test) and stage: images of each many / medium /
                        few group it takes, plus the thresholds and keep fraction
    history.json        per-epoch losses of every flow and classifier, and each classifier's kept epoch
    report.json, per_class.csv, *.png   the per-class test report (car_tf.evaluation.report)

The frozen features come from the shared feature cache (car_tf.models.feature_cache), so DLSA
on a run whose backbone was frozen, or a second DLSA on the same run, extracts nothing.
"""

import dataclasses
import json
import pathlib

import keras
import numpy as np

import car_tf.models  # noqa: F401  (registers the backbones' layers before loading a model)
from car_tf.evaluation import metrics, report
from car_tf.dlsa import cascade
from car_tf.dlsa.fit import fit_dlsa
from car_tf.models.feature_cache import cached_features
from car_tf.models.registry import features_model, inference_model


def _write_json(path, value):
    pathlib.Path(path).write_text(json.dumps(value, indent=1))


def image_to_logits_model(base_model, routed):
    """Functional model: the base model's inputs -> "features" layer -> routed stack."""
    extractor = features_model(base_model, with_logits=False)
    return keras.Model(extractor.inputs, routed(extractor.outputs[0]), name="dlsa_model")


def run_dlsa(base_model_path, run_info, train, test, output_dir, config, *, recipe, image_size, progress=True):
    """Reads or extracts the features, fits DLSA, writes the output run directory; returns the test report.

    Args:
        base_model_path: the base run's model.keras.
        run_info: the base run's run.json as a dict (num_classes, class_names, train_counts, ...).
        train, test: the training and test splits (car_tf.data.sources.LabeledData).
        output_dir: where the run directory is written.
        config: ``car_tf.dlsa.fit.DLSAConfig``.
        recipe, image_size: the base run's, for the unaugmented evaluation stream.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base_model_path = pathlib.Path(base_model_path).resolve()
    base = inference_model(keras.saving.load_model(base_model_path, compile=False))
    num_classes = int(run_info["num_classes"])
    class_names = list(run_info.get("class_names") or [str(c) for c in range(num_classes)])
    train_counts = np.asarray(run_info["train_counts"], np.int64)
    common = dict(recipe=recipe, image_size=image_size, progress=progress)
    train_x, train_y = cached_features(base, train, split="train", **common)
    test_x, test_y = cached_features(base, test, split="test", **common)

    result = fit_dlsa(train_x, train_y, num_classes, config, progress=progress)
    test_stage = np.asarray(result.model.route(test_x))
    test_logits = np.asarray(result.model.predict(test_x, batch_size=1024, verbose=0))

    image_to_logits_model(base, result.model).save(output_dir / "model.keras")
    result.model.save(output_dir / "dlsa_head.keras")
    info = dict(run_info)
    info.update(
        method=f"{run_info.get('method', 'unknown')}+dlsa",
        base_run=str(base_model_path.parent),
        dlsa=dataclasses.asdict(config),
    )
    _write_json(output_dir / "run.json", info)
    depth = config.depth
    splits = {
        "fit": (result.fit_routing, train_y[result.fit_indices]),
        "validation": (result.validation_routing, train_y[result.validation_indices]),
        "test": (test_stage, test_y),
    }
    _write_json(
        output_dir / "routing_stats.json",
        {
            "depth": depth,
            "keep_fraction": config.keep_fraction,
            "thresholds": [stage.threshold for stage in result.stages],
            "splits": {
                name: cascade.routing_statistics(stage, labels, train_counts, depth)
                for name, (stage, labels) in splits.items()
            },
        },
    )
    _write_json(output_dir / "history.json", result.histories)
    test_report = metrics.per_class_report(test_logits, test_y, train_counts, class_names)
    confusion = metrics.confusion_matrix(test_logits.argmax(axis=-1), test_y, num_classes)
    report.write_report(test_report, output_dir, confusion=confusion)
    return test_report
