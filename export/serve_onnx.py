"""Classify image files with an exported model.onnx using onnxruntime, PIL and NumPy only.

    python -m export.serve_onnx --model=RUN/export/model.onnx [--top_k=5] IMAGE [IMAGE ...]

Never imports TensorFlow, so it runs where only onnxruntime is installed. The image size, class
names and evaluation recipe come from the file's metadata (written by ``python -m export``).
"""

import json
import pathlib
import sys

import numpy as np
import onnxruntime
from PIL import Image


# car_tf.data.augment.EVAL_CROP_FRACTION, repeated here so that TensorFlow is never imported.
IMAGENET_CROP_FRACTION = 0.875


def load_image(path, image_size, recipe="cifar"):
    """RGB file -> float32 [S, S, 3] in [0, 255] as car_tf's evaluation pipeline prepares it.

    "cifar": bilinear resize to S x S. "imagenet": shorter side to round(S / 0.875), central crop.
    """
    image = Image.open(path).convert("RGB")
    width, height = image.size
    if recipe == "cifar":
        new_width = new_height = image_size
    else:
        scale = round(image_size / IMAGENET_CROP_FRACTION) / min(width, height)
        new_width, new_height = round(width * scale), round(height * scale)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BILINEAR)
    left, top = (new_width - image_size) // 2, (new_height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.float32)


class OnnxClassifier:
    """An onnxruntime session plus the preprocessing and class names stored in the file."""

    def __init__(self, model_path):
        if not pathlib.Path(model_path).is_file():
            raise ValueError(f"ONNX file {model_path} does not exist; export one with python -m export.")
        self.session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.image_size = int(metadata.get("image_size", model_input.shape[1]))
        self.recipe = metadata.get("recipe", "cifar")
        num_classes = self.session.get_outputs()[0].shape[-1]
        self.class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else [
            str(i) for i in range(num_classes)
        ]

    def probabilities(self, image_paths):
        """Softmax probabilities [N, K] for the image files."""
        batch = np.stack([load_image(p, self.image_size, self.recipe) for p in image_paths])
        logits = self.session.run(None, {self.input_name: batch})[0].astype(np.float64)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return exp / exp.sum(axis=-1, keepdims=True)

    def classify(self, image_paths, top_k=5):
        """Per image, the ``top_k`` (class name, probability) pairs, most likely first."""
        probs = self.probabilities(image_paths)
        order = np.argsort(-probs, axis=-1)[:, :top_k]
        return [[(self.class_names[c], float(p[c])) for c in row] for p, row in zip(probs, order)]


def main(argv):
    from absl import flags

    images = argv[1:]
    if not images:
        sys.exit("pass one or more image files after the flags.")
    try:
        classifier = OnnxClassifier(flags.FLAGS.model)
        results = classifier.classify(images, flags.FLAGS.top_k)
    except (ValueError, OSError) as error:
        sys.exit(f"serve_onnx failed: {error}")
    for path, result in zip(images, results):
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in result))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", None, "Path to model.onnx written by python -m export.", required=True)
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
    app.run(main)
