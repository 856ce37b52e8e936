"""One ``predict`` over every form a trained model takes: run directory, .keras, SavedModel, .onnx.

Every predictor takes images [B, H, W, 3] (uint8, or float in [0, 255]) and returns float32 scores
[B, K] -- logits, or probabilities for an exported serving SavedModel (``outputs`` says which).
Attributes: ``num_classes``, ``image_size`` ((H, W), or None where any size is accepted),
``class_names`` (None where the model does not carry them), ``outputs``.
"""

import importlib
import json
import pathlib

import numpy as np

from car_tf.training import run_directory
from car_tf.training.run_directory import RUN_FILE

RUN_MODEL_FILE = "model.keras"
# Modules whose import registers the serialisable layers any car_tf model.keras can hold; the
# registered methods add theirs (serializable_modules).
CORE_SERIALIZABLE_MODULES = (
    "car_tf",
    "car_tf.models",
    "car_tf.dlsa",
)


def serializable_modules():
    """The modules to import before loading a model.keras: car_tf's own, then those of every
    registered method (car_tf.training.methods, its Method.serializable_modules)."""
    from car_tf.training.methods import serializable_modules as methods_modules

    return tuple(dict.fromkeys([*CORE_SERIALIZABLE_MODULES, *methods_modules()]))


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model path that does not exist or holds no model car_tf can read."""


def read_run_info(run_dir):
    """The run.json of a run directory as a dict; a folder without one is refused in one sentence."""
    info = run_directory.read_run_info(run_dir)
    if info is None:
        raise ModelNotFoundError(f"{pathlib.Path(run_dir) / RUN_FILE} does not exist; pass a run directory "
                                 "written by car_tf.train.")
    return info


def find_run_info(path, levels=2):
    """run.json of ``path`` or of a parent up to ``levels`` above it (an export inside a run), else None."""
    path = pathlib.Path(path).resolve()
    candidates = [path] + list(path.parents)[:levels]
    found = (run_directory.read_run_info(folder) for folder in candidates)
    return next((info for info in found if info is not None), None)


def load_keras_model(path):
    """keras.saving.load_model(path, compile=False) with car_tf's layers registered first."""
    import keras

    for module in serializable_modules():
        importlib.import_module(module)
    return keras.saving.load_model(path, compile=False)


def _check_images(images, image_size):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images have shape {images.shape}; pass a batch [B, H, W, 3] of RGB images.")
    if image_size is not None and tuple(images.shape[1:3]) != tuple(image_size):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]} but the model expects "
            f"{image_size[0]}x{image_size[1]}; resize them (e.g. --image_size={image_size[0]})."
        )
    return images


class KerasPredictor:
    """Predicts with an in-memory Keras model (its ``classifier`` sub-model if it is a wrapper)."""

    outputs = "logits"

    def __init__(self, model, class_names=None):
        from car_tf.backend import compiled_inference
        from car_tf.models.registry import inference_model

        self.model = inference_model(model)
        shape = self.model.input_shape
        # A head trained on cached backbone features (README, "The pretrained track") takes [B, D].
        self.takes_features = len(shape) == 2
        height, width = (None, None) if self.takes_features else shape[1:3]
        self.image_size = (height, width) if height and width else None
        self.num_classes = int(self.model.output_shape[-1])
        self.class_names = list(class_names) if class_names is not None else None
        self._call = compiled_inference(self.model)

    def predict(self, images):
        if not self.takes_features:
            images = _check_images(images, self.image_size)
        return self._call(np.asarray(images, np.float32)).astype(np.float32)


class SavedModelPredictor:
    """Predicts through a SavedModel's ``serving_default`` signature.

    Two kinds are understood: car_tf's serving export (uint8 images of any size -> a dict with
    "probabilities") and a plain classifier export (float32 [None, H, W, 3] -> logits).
    """

    def __init__(self, path, class_names=None):
        import tensorflow as tf

        self._tf = tf
        loaded = tf.saved_model.load(str(path))
        if "serving_default" not in loaded.signatures:
            raise ModelNotFoundError(f"SavedModel {path} has no serving_default signature; re-export it.")
        self._loaded = loaded  # keeps the signature's variables alive
        self._signature = loaded.signatures["serving_default"]
        (self._input_name, spec), = self._signature.structured_input_signature[1].items()
        self._input_dtype = spec.dtype
        outputs = self._signature.structured_outputs
        self.outputs = "probabilities" if "probabilities" in outputs else "logits"
        self._output_name = self.outputs if self.outputs in outputs else next(iter(outputs))
        self.num_classes = int(outputs[self._output_name].shape[-1])
        height, width = spec.shape[1:3]
        self.image_size = (height, width) if height and width else None
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is None and hasattr(loaded, "class_names"):
            self.class_names = [n.decode() for n in loaded.class_names.numpy()]

    def predict(self, images):
        images = _check_images(images, self.image_size)
        if self._input_dtype == self._tf.uint8:
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        else:
            images = images.astype(self._input_dtype.as_numpy_dtype)
        result = self._signature(**{self._input_name: self._tf.constant(images)})
        return result[self._output_name].numpy().astype(np.float32)


class OnnxPredictor:
    """Predicts with onnxruntime; class names come from the file's "class_names" metadata if present."""

    outputs = "logits"

    def __init__(self, path, class_names=None):
        import onnxruntime

        try:
            self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own types (InvalidProtobuf, Fail, ...)
            raise ModelNotFoundError(
                f"{path} is not a valid ONNX model ({type(error).__name__}); export it again with "
                "python -m export --format=onnx."
            ) from error
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        height, width = model_input.shape[1:3]
        self.image_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        self.num_classes = int(self._session.get_outputs()[0].shape[-1])
        metadata = self._session.get_modelmeta().custom_metadata_map
        if class_names is None and "class_names" in metadata:
            class_names = json.loads(metadata["class_names"])
        self.class_names = list(class_names) if class_names is not None else None

    def predict(self, images):
        images = _check_images(images, self.image_size)
        return self._session.run(None, {self._input_name: images.astype(np.float32)})[0]


def load_predictor(path):
    """A predictor for a run directory, a .keras file, a SavedModel directory or an .onnx file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {path} does not exist; pass a run directory, a .keras file, "
            "a SavedModel directory or an .onnx file."
        )
    run_info = find_run_info(path) or {}
    class_names = run_info.get("class_names")
    if path.is_dir() and (path / RUN_FILE).is_file():
        model_file = path / RUN_MODEL_FILE
        if not model_file.is_file():
            raise ModelNotFoundError(f"run directory {path} has no {RUN_MODEL_FILE}; train it to the end first.")
        path = model_file
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return SavedModelPredictor(path, class_names)
    if path.suffix == ".keras":
        return KerasPredictor(load_keras_model(path), class_names)
    if path.suffix == ".onnx":
        return OnnxPredictor(path, class_names)
    raise ModelNotFoundError(
        f"{path} is not a run directory, .keras file, SavedModel directory or .onnx file; "
        "pass one of those."
    )


def predict_dataset(predictor, dataset, progress=False):
    """Runs ``predictor`` over a dataset of (images, labels); returns (scores [N, K], labels [N]).

    Soft labels [B, K] are reduced to their argmax class.
    """
    from tqdm import tqdm

    from car_tf.losses.cross_entropy import class_ids

    scores, labels = [], []
    for images, batch_labels in tqdm(dataset, desc="evaluating", unit="batch", disable=not progress):
        scores.append(predictor.predict(np.asarray(images)))
        labels.append(class_ids(batch_labels))
    if not scores:
        raise ValueError("the evaluation data set is empty; check the data flags or the split list.")
    return np.concatenate(scores), np.concatenate(labels).astype(np.int64)
