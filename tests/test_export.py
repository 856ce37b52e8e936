"""Export to SavedModel and ONNX, parity checks, serve_onnx, and evaluating all three forms alike."""

import json
import subprocess
import sys
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from car_tf.evaluate import evaluate
from car_tf.predictors import OnnxPredictor, SavedModelPredictor, inference_model, load_predictor
from export.__main__ import export_run
from export.onnx_export import check_opset, convert_to_onnx
from export.parity import ExportParityError, check_parity
from export.saved_model import deployable_model, float32_copy, is_float32

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "frog", "ship"]
TRAIN_COUNTS = [150, 60, 30, 10]
TEST_PER_CLASS = 25


def _tiny_model(num_classes=len(CLASSES), size=32):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Normalization(mean=[125.0, 123.0, 114.0], variance=[3900.0, 3800.0, 4400.0])(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs)


def _read(folder, count):
    files = sorted(folder.glob("*.jpg"))[:count]
    return files, np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def _split(root, counts):
    files, images, labels = [], [], []
    for label, (name, count) in enumerate(zip(CLASSES, counts)):
        f, x = _read(root / name, count)
        files += f
        images.append(x)
        labels += [label] * count
    return files, np.concatenate(images), np.array(labels, np.int32)


@pytest.fixture(scope="module")
def run_dir(cifar10_dir, tmp_path_factory):
    """A run directory holding a tiny CNN trained a few epochs on 250 real CIFAR-10 images."""
    keras.utils.set_random_seed(0)
    _, images, labels = _split(cifar10_dir / "train", TRAIN_COUNTS)
    model = _tiny_model()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images.astype(np.float32), labels, batch_size=25, epochs=10, verbose=0)
    run = tmp_path_factory.mktemp("run")
    model.save(run / "model.keras")
    info = {"model": "tiny_cnn", "num_classes": 4, "class_names": CLASSES, "train_counts": TRAIN_COUNTS,
            "image_size": 32, "dataset": "cifar10", "recipe": "cifar", "method": "ce"}
    (run / "run.json").write_text(json.dumps(info))
    (run / "flags.txt").write_text(f"--dataset=cifar10\n--data_dir={cifar10_dir}\n--epochs=10\n")
    return run


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A run directory with an untrained tiny CNN and no data: fast, for the serving tests."""
    keras.utils.set_random_seed(1)
    run = tmp_path_factory.mktemp("untrained_run")
    _tiny_model().save(run / "model.keras")
    info = {"num_classes": 4, "class_names": CLASSES, "train_counts": TRAIN_COUNTS, "image_size": 32}
    (run / "run.json").write_text(json.dumps(info))
    return run


@pytest.fixture(scope="module")
def test_split(cifar10_dir):
    return _split(cifar10_dir / "test", [TEST_PER_CLASS] * len(CLASSES))


@pytest.mark.slow
def test_export_both_and_evaluate_three_forms_alike(run_dir, test_split, tmp_path):
    summary = export_run(run_dir, "both")
    assert summary["parity_images"] == 32  # real test images read through the run's flags.txt
    for name, key in (("saved_model", "max_abs_diff_probabilities"), ("onnx", "max_abs_diff_logits")):
        assert set(summary[name][key]) == {1, 32} and max(summary[name][key].values()) <= 1e-4
    export_dir = run_dir / "export"
    assert json.loads((export_dir / "export.json").read_text())["onnx"]["opset"] == 17

    files, images, labels = test_split
    dataset = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels)).batch(32)
    reports = {}
    for form, path in (("keras", run_dir), ("saved_model", export_dir / "saved_model"),
                       ("onnx", export_dir / "model.onnx")):
        predictor = load_predictor(path)
        assert predictor.num_classes == 4 and predictor.class_names == CLASSES
        reports[form] = evaluate(predictor, dataset, TRAIN_COUNTS, CLASSES, tmp_path / form)
    accuracies = {form: [r["accuracy"] for r in rep["per_class"]] for form, rep in reports.items()}
    assert accuracies["saved_model"] == accuracies["keras"] == accuracies["onnx"]
    assert reports["keras"]["top1"] > 0.4  # chance is 0.25
    assert isinstance(load_predictor(export_dir / "saved_model"), SavedModelPredictor)

    # serve_onnx classifies the JPEG files with onnxruntime + PIL, never importing TensorFlow.
    picks = [str(files[i]) for i in (0, 30, 60, 99)]
    script = (
        "import json, sys\n"
        "from export.serve_onnx import OnnxClassifier\n"
        f"result = OnnxClassifier({str(export_dir / 'model.onnx')!r}).classify({picks!r}, top_k=2)\n"
        "assert 'tensorflow' not in sys.modules, 'serve_onnx imported TensorFlow'\n"
        "print(json.dumps(result))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    served = json.loads(out.stdout.strip().splitlines()[-1])
    expected = OnnxPredictor(export_dir / "model.onnx").predict(images[[0, 30, 60, 99]]).argmax(-1)
    assert [top[0][0] for top in served] == [CLASSES[c] for c in expected]


def test_serving_signature_takes_uint8_of_any_size(untrained_run, tmp_path):
    summary = export_run(untrained_run, "saved_model", output_dir=tmp_path)
    assert summary["recipe"] == "cifar" and max(summary["saved_model"]["max_abs_diff_probabilities"].values()) < 1e-5
    serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3)).astype(np.uint8)
    model = keras.saving.load_model(untrained_run / "model.keras")
    for batch in (images[:1], images[:7]):
        out = serve(images=tf.constant(batch))
        np.testing.assert_allclose(out["probabilities"].numpy(),
                                   tf.nn.softmax(model(batch.astype(np.float32))).numpy(), atol=1e-5)
        names = [[n.decode() for n in row] for row in out["top_k_names"].numpy()]
        assert names == [[CLASSES[c] for c in row] for row in out["top_k_classes"].numpy()]
        assert out["top_k_classes"].shape == (len(batch), 4)  # top_k capped at K
    bigger = tf.image.resize(images[:3], (48, 40)).numpy().round().astype(np.uint8)
    assert serve(images=tf.constant(bigger))["probabilities"].shape == (3, 4)


def test_mixed_precision_model_exports_from_a_float32_copy(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = _tiny_model()
    finally:
        keras.config.set_dtype_policy("float32")
    assert not is_float32(mixed)
    copy = float32_copy(mixed)
    assert is_float32(copy) and copy.get_layer("classifier").compute_dtype == "float32"
    for a, b in zip(mixed.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_allclose(copy(images.astype(np.float32)), mixed(images.astype(np.float32)), atol=0.05)
    convert_to_onnx(copy, tmp_path / "m.onnx", 32, opset=18)
    differences = check_parity(lambda x: copy(x.astype(np.float32)), OnnxPredictor(tmp_path / "m.onnx").predict,
                               images, what="ONNX")
    assert max(differences.values()) <= 1e-4


def test_training_wrapper_exports_its_classifier():
    class Wrapper(keras.Model):
        def __init__(self, classifier):
            super().__init__()
            self.classifier = classifier
            self.projection = keras.layers.Dense(8)

        def call(self, images):
            return self.projection(self.classifier.get_layer("features").output)

    inner = _tiny_model()
    wrapper = Wrapper(inner)
    assert inference_model(wrapper) is inner and deployable_model(wrapper) is inner
    assert inference_model(inner) is inner


def test_user_errors_are_clear(untrained_run, tmp_path):
    with pytest.raises(ValueError, match="between 13 and 18"):
        check_opset(19)
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(untrained_run, "tflite")
    with pytest.raises(ValueError, match="run.json does not exist"):
        export_run(tmp_path, "onnx")
    images = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ExportParityError, match="batch size 1"):
        check_parity(lambda x: np.zeros((len(x), 2)), lambda x: np.full((len(x), 2), 1e-3), images, what="ONNX")


@pytest.mark.slow
def test_export_cli_writes_onnx(run_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "export", f"--model_dir={run_dir}", "--format=onnx", "--opset=18",
         f"--output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "model.onnx").is_file() and "max |diff| vs Keras" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "export", f"--model_dir={tmp_path}", "--format=onnx"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "run.json does not exist" in bad.stderr
