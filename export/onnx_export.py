"""ONNX export through tf2onnx from a SavedModel of the plain float32 classifier."""

import json
import pathlib
import tempfile

import numpy as np
import onnx
import tf2onnx

from car_tf.evaluation.predictors import OnnxPredictor
from export.parity import check_parity
from export.saved_model import export_plain_saved_model

DEFAULT_OPSET = 17
MIN_OPSET = 13
MAX_OPSET = 18  # the highest opset tf2onnx 1.17 supports
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def check_opset(opset):
    """Raises ValueError unless MIN_OPSET <= opset <= MAX_OPSET."""
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ValueError(
            f"ONNX opset {opset} is not supported; pass --opset between {MIN_OPSET} and {MAX_OPSET} "
            f"(tf2onnx 1.17 writes at most {MAX_OPSET})."
        )
    return int(opset)


def convert_to_onnx(model, path, image_size, opset=DEFAULT_OPSET, class_names=None, recipe="cifar"):
    """Writes ``model`` (float32 [None, S, S, 3] pixels in [0, 255] -> logits) as ONNX to ``path``.

    The Keras model goes through a SavedModel first (as deployers do); class names and the image
    size are stored in the file's metadata ("class_names" as JSON, "image_size", and the evaluation
    "recipe" that serve_onnx applies to raw images).
    """
    opset = check_opset(opset)
    with tempfile.TemporaryDirectory(prefix="car_tf_onnx_") as scratch:
        saved = export_plain_saved_model(model, pathlib.Path(scratch) / "saved_model")
        # tf2onnx's own SavedModel loader freezes variables and captured constants into the graph.
        graph_def, inputs, outputs = tf2onnx.tf_loader.from_saved_model(
            str(saved), None, None, signatures=["serving_default"]
        )
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def,
        input_names=inputs,
        output_names=outputs,
        opset=opset,
        shape_override={inputs[0]: [None, image_size, image_size, 3]},
        tensors_to_rename={inputs[0]: INPUT_NAME, outputs[0]: OUTPUT_NAME},
    )
    metadata = {"image_size": str(image_size), "recipe": recipe}
    if class_names is not None:
        metadata["class_names"] = json.dumps([str(n) for n in class_names])
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_onnx(model, path, images, opset=DEFAULT_OPSET, class_names=None, atol=1e-4, recipe="cifar",
                reference=None):
    """Converts to ONNX, then checks onnxruntime against Keras on ``images`` at batch sizes 1 and 32.

    ``model`` must be the float32 deployable model; ``images`` uint8 [n, S, S, 3]; ``reference``
    the Keras model to compare with (default ``model``; the LoRA model ``model`` was merged from,
    say). Returns the max absolute logit difference per batch size; raises ExportParityError above
    ``atol``.
    """
    reference = model if reference is None else reference
    image_size = int(images.shape[1])
    convert_to_onnx(model, path, image_size, opset, class_names, recipe)
    predictor = OnnxPredictor(path)
    return check_parity(
        lambda x: reference(x.astype(np.float32), training=False),
        predictor.predict,
        images,
        what=f"ONNX file {path}",
        atol=atol,
    )
