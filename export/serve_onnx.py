"""Classify image files with an exported model.onnx using onnxruntime, PIL and NumPy only.

    python -m export.serve_onnx --model=RUN/export/model.onnx [--top_k=5] IMAGE [IMAGE ...]

Never imports TensorFlow, so it runs where only onnxruntime is installed. The image size, class
names and evaluation recipe come from the file's metadata (written by ``python -m export``).
Images are prepared exactly as ``car_tf.evaluate`` prepares them: the same formats (JPEG, PNG,
GIF, BMP: what TensorFlow decodes), the same decoding (libjpeg through PIL; a 16-bit image keeps
its high byte, as TensorFlow's decoder does), and the same bilinear resizing as
``tf.image.resize``, re-implemented in NumPy. Unreadable files (missing, not an image, another
format, truncated, over PIL's decompression-bomb limit) are named, one line each, and the readable
ones are still classified.
"""

import json
import pathlib
import sys

import numpy as np

# car_tf.data.augment.EVAL_CROP_FRACTION, repeated here so that TensorFlow is never imported.
IMAGENET_CROP_FRACTION = 0.875
# The formats car_tf.data.pipelines.decode_image (TensorFlow) reads; PIL reads more, which
# training and car_tf.evaluate could not have seen, so those are refused by name.
FORMATS = ("JPEG", "PNG", "GIF", "BMP")
# PIL's modes for 16-bit grayscale: convert("RGB") would clip them at 255 (an all-white image).
SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _bilinear_weights(in_size, out_size):
    """[out, in] float32 weights of tf.image.resize(method="bilinear", antialias=False)."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centres)
    lerp = centres - floor
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(centres), in_size - 1).astype(np.int64)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lower), np.float32(1) - lerp)
    np.add.at(weights, (rows, upper), lerp)
    return weights


def _antialiased_weights(in_size, out_size):
    """[out, in] float32 weights of tf.image.resize(method="bilinear", antialias=True).

    TensorFlow's scale_and_translate with a triangle kernel widened by the downscaling factor,
    each row normalised to sum to one.
    """
    scale = np.float32(out_size) / np.float32(in_size)
    kernel_scale = max(np.float32(1) / scale, np.float32(1))
    samples = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) / scale
    sources = np.arange(in_size, dtype=np.float32) + np.float32(0.5)
    distance = (sources[None, :] - samples[:, None]) / kernel_scale
    weights = np.maximum(np.float32(0), np.float32(1) - np.abs(distance)).astype(np.float32)
    return weights / weights.sum(axis=1, keepdims=True)


def resize(image, height, width, antialias=False):
    """float32 [H, W, 3] -> [height, width, 3], as tf.image.resize(..., "bilinear", antialias)."""
    weights = _antialiased_weights if antialias else _bilinear_weights
    rows = weights(image.shape[0], height)
    columns = weights(image.shape[1], width)
    across = np.einsum("ow,hwc->hoc", columns, image)  # width first, then height, as TensorFlow
    return np.einsum("ph,hoc->poc", rows, across).astype(np.float32)


def load_image(path, image_size, recipe="cifar"):
    """Image file -> float32 [S, S, 3] in [0, 255], as car_tf.data.pipelines.eval_dataset makes it.

    "cifar": bilinear resize to S x S (none when already that size). "imagenet": shorter side to
    round(S / 0.875) with antialiasing, central S x S crop. Raises OSError for an unreadable file.
    """
    image = decode_image(path).astype(np.float32)
    height, width = image.shape[:2]
    if recipe == "cifar":
        if (height, width) == (image_size, image_size):
            return image
        return resize(image, image_size, image_size)
    shape = np.array([height, width], np.float32)
    short_side = np.round(np.float32(image_size) / np.float32(IMAGENET_CROP_FRACTION))
    new_height, new_width = np.round(shape * short_side / shape.min()).astype(int)
    resized = resize(image, new_height, new_width, antialias=True)
    top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
    return resized[top : top + image_size, left : left + image_size]


def decode_image(path):
    """Image file -> uint8 [H, W, 3], the pixels car_tf.data.pipelines.decode_image gives.

    Raises ValueError for a format TensorFlow does not decode, PIL's errors for an unreadable
    file (``unreadable_reason`` words them).
    """
    from PIL import Image

    with Image.open(path) as opened:
        if opened.format not in FORMATS:
            raise ValueError(
                f"is a {opened.format} image, which car_tf.evaluate and training do not decode "
                "(convert it to PNG or JPEG)"
            )
        if opened.mode in SIXTEEN_BIT_GRAY:  # TensorFlow keeps the high byte of each 16-bit value
            gray = np.right_shift(np.asarray(opened, dtype=np.uint32), 8)
            return np.repeat(np.minimum(gray, 255).astype(np.uint8)[..., None], 3, axis=-1)
        return np.asarray(opened.convert("RGB"), dtype=np.uint8)


class OnnxClassifier:
    """An onnxruntime session plus the preprocessing and class names stored in the file."""

    def __init__(self, model_path):
        import onnxruntime

        if not pathlib.Path(model_path).is_file():
            raise ValueError(f"ONNX file {model_path} does not exist; export one with python -m export.")
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise ValueError(
                f"{model_path} is not a valid ONNX model ({type(error).__name__}); export it again with "
                "python -m export --format=onnx."
            ) from error
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.image_size = int(metadata.get("image_size", model_input.shape[1]))
        self.recipe = metadata.get("recipe", "cifar")
        num_classes = self.session.get_outputs()[0].shape[-1]
        self.class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else [
            str(i) for i in range(num_classes)
        ]

    def load(self, path):
        """The file as the model's input [S, S, 3] float32 (errors as ``decode_image``)."""
        return load_image(path, self.image_size, self.recipe)

    def probabilities(self, image_paths):
        """Softmax probabilities [N, K] for the image files (all must be readable)."""
        return self.probabilities_of(np.stack([self.load(p) for p in image_paths]))

    def probabilities_of(self, batch):
        """Softmax probabilities [N, K] for a batch of prepared images (``load``)."""
        logits = self.session.run(None, {self.input_name: batch})[0].astype(np.float64)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return exp / exp.sum(axis=-1, keepdims=True)

    def classify(self, image_paths, top_k=5):
        """Per image, the ``top_k`` (class name, probability) pairs, most likely first."""
        return self.top(self.probabilities(image_paths), top_k)

    def top(self, probs, top_k):
        """Per row of ``probs``, the ``top_k`` (class name, probability) pairs, most likely first."""
        if top_k < 1:
            raise ValueError(f"--top_k={top_k} must be at least 1: the number of classes to print per image.")
        order = np.argsort(-probs, axis=-1)[:, :top_k]
        return [[(self.class_names[c], float(p[c])) for c in row] for p, row in zip(probs, order)]


def problem_of(error):
    """Why an image file could not be prepared, in a few words, from the error ``load`` raised."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(error, FileNotFoundError):
        return "does not exist"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(error, UnidentifiedImageError):
        return "is not an image file"
    if isinstance(error, Image.DecompressionBombError):
        return f"is over PIL's decompression-bomb limit ({str(error).rstrip('.')}); shrink it"
    if isinstance(error, ValueError):  # decode_image's own refusal, already worded
        return str(error)
    if isinstance(error, OSError):
        return f"cannot be decoded ({error})"
    return f"cannot be decoded ({type(error).__name__}: {error})"


def unreadable_reason(path):
    """None if the image file can be prepared as car_tf.evaluate prepares it, else why not."""
    try:
        decode_image(path)  # decodes every pixel: a truncated file fails here
    except Exception as error:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        return problem_of(error)
    return None


def main(argv):
    from absl import flags

    images = argv[1:]
    if not images:
        raise ValueError("no image files given; pass one or more image files after the flags.")
    top_k = flags.FLAGS.top_k
    if top_k < 1:
        raise ValueError(f"--top_k={top_k} must be at least 1: the number of classes to print per image.")
    classifier = OnnxClassifier(flags.FLAGS.model)
    if top_k > len(classifier.class_names):
        print(f"serve_onnx: --top_k={top_k} is more than the model's {len(classifier.class_names)} classes; "
              "printing all of them.", file=sys.stderr)
        top_k = len(classifier.class_names)
    prepared, problems = {}, {}
    for path in images:
        try:
            prepared[path] = classifier.load(path)
        except Exception as error:  # each unreadable file is named below; the others are classified
            if flags.FLAGS.debug:
                raise
            problems[path] = problem_of(error)
    readable = [path for path in images if path in prepared]
    results = {}
    if readable:
        probs = classifier.probabilities_of(np.stack([prepared[path] for path in readable]))
        results = dict(zip(readable, classifier.top(probs, top_k)))
    for path in images:
        if path in problems:
            print(f"serve_onnx: {path} {problems[path]}; replace the file or leave it out.", file=sys.stderr)
        else:
            print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in results[path]))
    if len(readable) < len(images):
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", None, "Path to model.onnx written by python -m export.", required=True)
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
    flags.DEFINE_bool("debug", False, "On an error, show the full stack trace instead of one sentence.")

    def guarded(argv):
        # The same boundary as car_tf.cli.run, kept here because importing car_tf loads TensorFlow.
        try:
            main(argv)
        except (ValueError, OSError) as error:
            if flags.FLAGS.debug:
                raise
            print(f"serve_onnx: {error}", file=sys.stderr)
            sys.exit(2)

    def parse_flags(argv):
        # A bad flag is a user error too: one sentence and exit code 2 (absl alone exits 1).
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            print(f"serve_onnx: {' '.join(str(error).split()).rstrip('.')} (--helpfull lists the flags).",
                  file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=parse_flags)
