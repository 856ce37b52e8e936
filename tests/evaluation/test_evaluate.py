"""Evaluation harness: callback, predictors' errors, report writers, evaluate()."""

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from car_tf import evaluate as evaluate_module
from car_tf.evaluation import evaluate as evaluation_library
from car_tf.evaluation.callback import PerClassEvaluation
from car_tf.evaluation.metrics import per_class_report
from car_tf.evaluation.predictors import KerasPredictor, ModelNotFoundError, load_predictor, predict_dataset
from car_tf.evaluation.report import format_table

NUM_CLASSES = 4
TRAIN_COUNTS = [150, 60, 25, 8]
CLASS_NAMES = ["red", "green", "blue", "grey"]


def _colour_images(labels, rng, size=16):
    """Flat-colour images, one colour per class, plus noise: separable after a few steps."""
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]], np.float32)
    images = colours[labels][:, None, None, :] + rng.normal(0, 25, (len(labels), size, size, 3))
    return np.clip(images, 0, 255).astype(np.float32)


def _data(counts, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), counts).astype(np.int32)
    return _colour_images(labels, rng), labels


def _model(size=16, num_classes=NUM_CLASSES):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs)


def _dataset(images, labels, batch_size=32):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


def test_callback_logs_and_writes_epoch_reports(tmp_path):
    keras.utils.set_random_seed(0)
    train_images, train_labels = _data(TRAIN_COUNTS, 0)
    test_images, test_labels = _data([20] * NUM_CLASSES, 1)
    model = _model()
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = PerClassEvaluation(_dataset(test_images, test_labels), TRAIN_COUNTS, tmp_path, CLASS_NAMES)
    history = model.fit(_dataset(train_images, train_labels).shuffle(300, seed=0), epochs=3,
                        callbacks=[callback], verbose=0, shuffle=False)
    for key in ("val_top1", "val_many", "val_medium", "val_few", "val_worst_class_accuracy",
                "val_harmonic_mean_recall", "val_geometric_mean_recall", "val_macro_f1", "val_many_worst_accuracy",
                "val_medium_worst_accuracy", "val_few_worst_accuracy"):
        assert len(history.history[key]) == 3, key
    assert history.history["val_top1"][-1] > 0.5  # chance is 0.25
    written = sorted(p.name for p in (tmp_path / "metrics").iterdir())
    assert written == ["epoch_001.json", "epoch_002.json", "epoch_003.json"]
    record = json.loads((tmp_path / "metrics" / "epoch_003.json").read_text())
    expected = per_class_report(model.predict(test_images, verbose=0), test_labels, TRAIN_COUNTS, CLASS_NAMES)
    assert record["epoch"] == 3 and "loss" in record["train_logs"]
    assert record["top1"] == pytest.approx(expected["top1"])
    assert record["worst_class_accuracy"] == pytest.approx(history.history["val_worst_class_accuracy"][-1])
    assert [r["name"] for r in record["per_class"]] == CLASS_NAMES
    assert record["macro_f1"] == pytest.approx(history.history["val_macro_f1"][-1])
    assert record["harmonic_mean_recall"] == pytest.approx(expected["harmonic_mean_recall"])
    assert record["group_worst"]["few"]["name"] == "grey"  # the only few class
    assert history.history["val_few_worst_accuracy"][-1] == pytest.approx(record["per_class"][3]["accuracy"])


def test_callback_groups_follow_its_thresholds(tmp_path):
    test_images, test_labels = _data([5] * NUM_CLASSES, 7)
    model = _model()
    callback = PerClassEvaluation(_dataset(test_images, test_labels), TRAIN_COUNTS, tmp_path, CLASS_NAMES,
                                  many_threshold=50, few_threshold=10)
    callback.set_model(model)
    logs = {}
    callback.on_epoch_end(0, logs)
    record = json.loads((tmp_path / "metrics" / "epoch_001.json").read_text())
    assert (record["many_threshold"], record["few_threshold"]) == (50, 10)
    assert record["group_sizes"] == {"many": 2, "medium": 1, "few": 1}  # 150, 60 | 25 | 8
    assert logs["val_many"] == pytest.approx(np.mean([r["accuracy"] for r in record["per_class"][:2]]))
    with pytest.raises(ValueError, match="--few_threshold=30 and --many_threshold=10"):
        PerClassEvaluation(_dataset(test_images, test_labels), TRAIN_COUNTS, many_threshold=10, few_threshold=30)


def test_evaluate_writes_all_outputs_and_train_gap(tmp_path):
    keras.utils.set_random_seed(1)
    model = _model()
    train_images, train_labels = _data(TRAIN_COUNTS, 2)
    test_images, test_labels = _data([10] * NUM_CLASSES, 3)
    report = evaluation_library.evaluate(
        KerasPredictor(model), _dataset(test_images, test_labels), TRAIN_COUNTS, CLASS_NAMES, tmp_path,
        train_dataset=_dataset(train_images, train_labels),
    )
    for name in ("report.json", "per_class.csv", "accuracy_vs_count.png", "reliability.png", "confusion.png",
                 "train_report.json", "train_per_class.csv"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["worst_class_gap"] == pytest.approx(
        saved["train"]["worst_class_accuracy"] - saved["worst_class_accuracy"])
    with open(tmp_path / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == CLASS_NAMES and rows[3]["group"] == "few"
    expected = per_class_report(model.predict(test_images, verbose=0), test_labels, TRAIN_COUNTS)
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([r["accuracy"] for r in expected["per_class"]])
    assert [float(r["f1"]) for r in rows] == pytest.approx([r["f1"] for r in expected["per_class"]])
    worst_ids = sorted(row["class_id"] for row in expected["group_worst"].values())
    assert [j for j, r in enumerate(rows) if r["worst_in_group"] == "1"] == worst_ids  # one per group
    assert [row["class_id"] for row in saved["group_worst"].values()] == worst_ids
    for key in ("harmonic_mean_recall", "geometric_mean_recall", "macro_f1"):
        assert saved[key] == pytest.approx(expected[key]) and key in saved["train"]
    table = format_table(report)
    assert "top-1" in table and "worst classes" in table
    assert "macro-F1" in table and "worst per group: many red" in table
    # A Keras model also gets the decoupled loss's per-group quantities, checked against NumPy.
    kernel = model.get_layer("classifier").kernel.numpy()
    few_norm = np.linalg.norm(kernel[:, 3])
    assert saved["decoupled"]["few"]["classifier_norm"] == pytest.approx(few_norm, rel=1e-5)
    features = keras.Model(model.inputs, model.get_layer("features").output).predict(test_images, verbose=0)
    many = np.isin(test_labels, [0])
    assert saved["decoupled"]["many"]["feature_norm"] == pytest.approx(
        np.linalg.norm(features[many], axis=1).mean(), rel=1e-4)


def test_predict_dataset_keeps_order_and_reduces_soft_labels():
    model = _model()
    images, labels = _data([3] * NUM_CLASSES, 4)
    soft = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    scores, got = predict_dataset(KerasPredictor(model), _dataset(images, soft, batch_size=5))
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(scores, model.predict(images, verbose=0), atol=1e-5)


def test_load_predictor_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as error:
        load_predictor(tmp_path / "missing.keras")
    assert isinstance(error.value, ValueError)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a run directory"):
        load_predictor(tmp_path / "notes.txt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="has no model.keras"):
        load_predictor(run)


def test_wrong_image_size_and_class_count_are_clear(tmp_path):
    path = tmp_path / "model.keras"
    _model(num_classes=3).save(path)
    predictor = load_predictor(path)
    assert predictor.image_size == (16, 16) and predictor.num_classes == 3
    with pytest.raises(ValueError, match="images are 20x20 but the model expects 16x16"):
        predictor.predict(np.zeros((2, 20, 20, 3), np.uint8))
    images, labels = _data([2] * NUM_CLASSES, 5)
    with pytest.raises(ValueError, match="model has 3 classes but the data has 4"):
        evaluation_library.evaluate(predictor, _dataset(images, labels), TRAIN_COUNTS, CLASS_NAMES, tmp_path)


def test_parse_train_counts(tmp_path):
    assert evaluate_module.parse_train_counts("[5, 3, 1]") == [5, 3, 1]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train_counts": [7, 2]}))
    assert evaluate_module.parse_train_counts(str(path)) == [7, 2]
    with pytest.raises(ValueError, match="neither a JSON list nor a file"):
        evaluate_module.parse_train_counts("counts.json")
    with pytest.raises(ValueError, match="non-negative integers"):
        evaluate_module.parse_train_counts("[1.5, 2]")


@pytest.mark.slow
def test_cli_on_an_image_folder(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    rng = np.random.default_rng(6)
    for split, counts in (("train", [6] * NUM_CLASSES), ("test", [4] * NUM_CLASSES)):
        images, labels = _data(counts, int(rng.integers(100)))
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "data" / split / f"class{label}"  # sorted folder names = label order
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.png")
    broken = tmp_path / "data" / "test" / "class1" / "zz_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))  # skipped and listed in report.json
    _model().save(tmp_path / "model.keras")
    command = [sys.executable, "-m", "car_tf.evaluate", f"--model={tmp_path / 'model.keras'}",
               "--dataset=folder", f"--data_dir={tmp_path / 'data'}", "--skip_corrupt", "--on_train",
               "--train_counts=[30, 12, 5, 3]",
               f"--output_dir={tmp_path / 'out'}"]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "top-1" in out.stdout and "gap to test" in out.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["train_count"] for r in report["per_class"]] == [30, 12, 5, 3]
    assert report["num_samples"] == 16 and "worst_class_gap" in report
    assert report["skipped_test_images"] == [f"{broken}: is a truncated or corrupt PNG file"]
    wrong = subprocess.run(command + ["--image_size=24"],
                           cwd=root, capture_output=True, text=True)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "images are 24x24 but the model expects 16x16" in wrong.stderr.strip().splitlines()[-1]


def _evaluate_cli(*argv):
    """``python -m car_tf.evaluate`` in this process, on flags of its own: (report, output dir)."""
    from absl import flags

    values = flags.FlagValues()
    evaluate_module.define_flags(values)
    values(["evaluate", *argv])
    return evaluate_module.evaluate_from_flags(values)


def test_evaluate_uses_the_thresholds_in_run_json(tmp_path):
    from train_helpers import write_class_folders

    for split in ("train", "test"):
        write_class_folders(tmp_path / "data" / split, {"a": 2, "b": 2, "c": 2}, seed=len(split))
    run = tmp_path / "run"
    run.mkdir()
    _model(num_classes=3).save(run / "model.keras")
    info = {"class_names": ["a", "b", "c"], "train_counts": [30, 8, 3], "recipe": "cifar"}
    data = ["--dataset=folder", f"--data_dir={tmp_path / 'data'}"]

    def groups(run_info, *argv):
        (run / "run.json").write_text(json.dumps(run_info))
        report, output_dir = _evaluate_cli(f"--model={run}", *data, *argv)
        saved = json.loads((output_dir / "report.json").read_text())
        assert saved["group_sizes"] == report["group_sizes"] and output_dir == run / "eval"
        return (report["many_threshold"], report["few_threshold"]), [r["group"] for r in saved["per_class"]]

    # The run's thresholds (many > 10, few < 4), not the defaults (which would make 30 medium, 8 few).
    assert groups({**info, "many_threshold": 10, "few_threshold": 4}) == ((10, 4), ["many", "medium", "few"])
    # A flag given on the command line wins over run.json; the other threshold stays the run's.
    assert groups({**info, "many_threshold": 10, "few_threshold": 4}, "--few_threshold=9") == (
        (10, 9), ["many", "few", "few"])
    # A run written before the thresholds were recorded: the flags' defaults, 100 and 20.
    assert groups(info) == ((100, 20), ["medium", "few", "few"])
    with pytest.raises(ValueError, match="--few_threshold=40 and --many_threshold=10 must satisfy"):
        groups({**info, "many_threshold": 10, "few_threshold": 4}, "--few_threshold=40")


def test_thresholds_are_data_settings_and_train_flags(tmp_path):
    from train_helpers import parse, tiny_args

    from car_tf import train as train_cli
    from car_tf.data.config import DataConfig

    config = train_cli.config_from_flags(parse(tiny_args(tmp_path, tmp_path / "run", "--many_threshold=30",
                                                         "--few_threshold=10")))
    assert config.data.group_thresholds() == {"many_threshold": 30, "few_threshold": 10}
    recorded = config.flag_values()
    assert recorded["many_threshold"] == "--many_threshold=30" and recorded["few_threshold"] == "--few_threshold=10"
    default = train_cli.config_from_flags(parse(tiny_args(tmp_path, tmp_path / "run")))
    assert default.data.group_thresholds() == {"many_threshold": 100, "few_threshold": 20}
    for many, few in ((10, 20), (5, -1)):
        with pytest.raises(ValueError, match=rf"^--few_threshold={few} and --many_threshold={many} must satisfy "
                                             r"0 <= few_threshold <= many_threshold"):
            DataConfig(many_threshold=many, few_threshold=few)


@pytest.mark.slow
def test_a_trained_run_records_its_thresholds_and_evaluate_reuses_them(tiny_folder, tmp_path):
    from car_tf.training import config as run_config
    from car_tf.training import trainer

    config = run_config.TrainConfig(
        run=run_config.RunConfig(model_dir=str(tmp_path / "run"), deterministic=True, verbose=False),
        data=run_config.DataConfig(dataset="folder", data_dir=str(tiny_folder), imbalance_factor=4.5,
                                   data_recipe="cifar", image_size=16, many_threshold=30, few_threshold=10),
        optimizer=run_config.OptimizerConfig(epochs=1, batch_size=12, lr=0.05, warmup_epochs=0, lr_decay_epochs=(2,)),
    )
    trained = trainer.train(config)  # counts 36 / 16 / 8: many / medium / few (defaults: medium / few / few)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["many_threshold"], info["few_threshold"]) == (30, 10)
    assert [r["group"] for r in trained["per_class"]] == ["many", "medium", "few"]
    epoch = json.loads((tmp_path / "run" / "metrics" / "epoch_001.json").read_text())
    assert epoch["group_sizes"] == {"many": 1, "medium": 1, "few": 1}
    report, _ = _evaluate_cli(f"--model={tmp_path / 'run'}", "--dataset=folder", f"--data_dir={tiny_folder}",
                              "--imbalance_factor=4.5", f"--output_dir={tmp_path / 'eval'}")
    assert [r["group"] for r in report["per_class"]] == ["many", "medium", "few"]
    assert report["top1"] == pytest.approx(trained["top1"]) and report["macro_f1"] == pytest.approx(trained["macro_f1"])
