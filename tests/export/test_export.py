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

from car_tf.evaluation.evaluate import evaluate
from car_tf.evaluation.predictors import OnnxPredictor, SavedModelPredictor, load_predictor
from car_tf.models.registry import inference_model
from export.__main__ import export_run
from export.onnx_export import check_opset, convert_to_onnx
from export.parity import ExportParityError, check_parity
from export.saved_model import deployable_model, float32_copy, is_float32

ROOT = pathlib.Path(__file__).resolve().parents[2]
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
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        f"export: {tmp_path / 'run.json'} does not exist; pass a run directory written by car_tf.train.")


# --- serve_onnx: the same pixels and probabilities as car_tf.evaluate, bad inputs named ---------


def _image_files(folder):
    """A JPEG 37x50, a grayscale JPEG 300x451, an RGBA PNG 20x28 and a PNG already 32x32."""
    rng = np.random.default_rng(3)
    smooth = lambda shape: (np.cumsum(rng.normal(0, 25, shape), axis=1) % 256).astype(np.uint8)
    files = {"small.jpg": smooth((37, 50, 3)), "gray.jpg": smooth((300, 451)),
             "rgba.png": smooth((20, 28, 4)), "exact.png": smooth((32, 32, 3))}
    for name, pixels in files.items():
        Image.fromarray(pixels).save(folder / name)
    return [str(folder / name) for name in files]


@pytest.mark.parametrize("antialias", [False, True])
def test_numpy_resize_is_tensorflows(antialias):
    from export.serve_onnx import resize

    image = np.random.default_rng(0).uniform(0, 255, (37, 50, 3)).astype(np.float32)
    for height, width in ((32, 32), (16, 71), (37, 50), (100, 9)):
        expected = tf.image.resize(image, [height, width], method="bilinear", antialias=antialias).numpy()
        np.testing.assert_allclose(resize(image, height, width, antialias), expected, atol=2e-3)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """The untrained tiny CNN as ONNX, once with each evaluation recipe in its metadata."""
    keras.utils.set_random_seed(2)
    model = _tiny_model()
    folder = tmp_path_factory.mktemp("onnx")
    paths = {recipe: convert_to_onnx(model, folder / f"{recipe}.onnx", 32, class_names=CLASSES, recipe=recipe)
             for recipe in ("cifar", "imagenet")}
    return model, paths


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
def test_serve_onnx_gives_evaluates_probabilities(onnx_files, recipe, tmp_path):
    from car_tf.data.pipelines import eval_dataset
    from car_tf.data.sources import LabeledData
    from export.serve_onnx import OnnxClassifier

    model, paths = onnx_files
    files = _image_files(tmp_path)
    served = OnnxClassifier(paths[recipe]).probabilities(files)
    # What car_tf.evaluate does with the same files: its pipeline, then the model.
    data = LabeledData(labels=np.zeros(len(files)), class_names=["x"], paths=files)
    (images, _), = eval_dataset(data, recipe=recipe, image_size=32, batch_size=len(files))
    for predict in (OnnxPredictor(paths[recipe]).predict, lambda x: model(x, training=False)):
        expected = tf.nn.softmax(np.asarray(predict(images.numpy()), np.float64)).numpy()
        np.testing.assert_allclose(served, expected, atol=1e-4)


@pytest.mark.slow
def test_serve_onnx_names_unreadable_images_and_classifies_the_rest(onnx_files, tmp_path):
    _, paths = onnx_files
    good = _image_files(tmp_path)[0]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tmp_path / "gray.jpg").read_bytes()[:400])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    command = [sys.executable, "-m", "export.serve_onnx", f"--model={paths['cifar']}", "--top_k=2"]
    out = subprocess.run(command + [str(truncated), good, str(text), str(tmp_path / "gone.png")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stdout.startswith(f"{good}: ") and len(out.stdout.splitlines()) == 1
    problems = out.stderr.strip().splitlines()
    assert problems[0].startswith(f"serve_onnx: {truncated} cannot be decoded (")
    assert problems[1:] == [f"serve_onnx: {text} is not an image file; replace the file or leave it out.",
                            f"serve_onnx: {tmp_path / 'gone.png'} does not exist; replace the file or leave it out."]
    invalid = tmp_path / "model.onnx"
    invalid.write_bytes(b"not a model")
    out = subprocess.run([sys.executable, "-m", "export.serve_onnx", f"--model={invalid}", good],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"serve_onnx: {invalid} is not a valid ONNX model (InvalidProtobuf); export it again with "
        "python -m export --format=onnx.")
    debug = subprocess.run([sys.executable, "-m", "export.serve_onnx", f"--model={invalid}", "--debug", good],
                           cwd=ROOT, capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
