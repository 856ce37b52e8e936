"""``python -m export --model_dir=RUN --format=saved_model|onnx|both [--opset=17] [--output_dir=RUN/export]``.

Writes RUN/export/saved_model (serving signature: uint8 images of any size -> probabilities,
top_k_classes, top_k_names) and/or RUN/export/model.onnx (float32 [None, S, S, 3] -> logits),
checks each against the Keras model on real images at batch sizes 1 and 32, and writes
export.json with the measured differences. A LoRA model (--lora_rank) is exported as the plain
network, its adapters merged into their kernels (car_tf.models.lora.merged_copy), and checked
against the model with its adapters.
"""

import dataclasses
import json
import pathlib
import typing

import numpy as np

from car_tf.method import setting

FORMATS = ("saved_model", "onnx", "both")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """This command's flags, one per field; ``export_run``'s defaults are these fields'."""

    model_dir: str = setting(help="Run directory with run.json and model.keras.")
    format: typing.Literal[FORMATS] = setting("both", help="What to export.")
    opset: int = setting(17, help="ONNX opset (13 to 18; tf2onnx 1.17 supports at most 18).")
    output_dir: str | None = setting(None, help="Where to write the exports; default MODEL_DIR/export.")
    parity_images: str | None = setting(
        None, help="Folder of image files for the parity checks; default: the run's test split.")
    recipe: typing.Literal["cifar", "imagenet"] | None = setting(
        None, help="Evaluation preprocessing baked into serving (cifar: resize; imagenet: resize the shorter "
        "side and centre-crop 0.875); default run.json recipe, else by image size.")
    top_k: int = setting(5, lower_bound=1, help="Classes returned by the serving signature.")
    atol: float = setting(1e-4, lower_bound=0.0, help="Largest allowed max-abs difference from the Keras model, "
                          "times max(1, largest |Keras output|).")


def export_run(model_dir, export_format=ExportConfig.format, output_dir=None, opset=ExportConfig.opset,
               parity_image_dir=None, recipe=None, top_k=ExportConfig.top_k, atol=ExportConfig.atol):
    """Exports the run in ``model_dir``; returns the summary also written to ``output_dir/export.json``."""
    import tensorflow as tf

    from car_tf.evaluation.predictors import RUN_MODEL_FILE, SavedModelPredictor, load_keras_model, read_run_info
    from export.onnx_export import check_opset, export_onnx
    from export.parity import check_parity, parity_images
    from export.saved_model import serving_recipe, deployable_model, export_serving_saved_model, parity_reference

    if export_format not in FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; pass one of {', '.join(FORMATS)}.")
    if export_format != "saved_model":
        check_opset(opset)
    model_dir = pathlib.Path(model_dir)
    run_info = read_run_info(model_dir)
    model_file = model_dir / RUN_MODEL_FILE
    if not model_file.is_file():
        raise ValueError(f"{model_file} does not exist; finish training the run (or point at another run).")
    trained = load_keras_model(model_file)
    model = deployable_model(trained)  # LoRA adapters merged: a plain network
    reference = parity_reference(trained, model)  # what the exports are checked against
    image_size = int(run_info.get("image_size") or model.input_shape[1])
    class_names = run_info.get("class_names") or [str(i) for i in range(model.output_shape[-1])]
    recipe = recipe or serving_recipe(image_size, run_info)
    output_dir = pathlib.Path(output_dir) if output_dir else model_dir / "export"
    output_dir.mkdir(parents=True, exist_ok=True)
    images = parity_images(model_dir, image_size, recipe, parity_image_dir)

    def keras_logits(x):
        return reference(x.astype(np.float32), training=False)

    summary = {"model_dir": str(model_dir), "image_size": image_size, "recipe": recipe,
               "parity_images": int(len(images))}
    if export_format in ("saved_model", "both"):
        path = export_serving_saved_model(model, output_dir / "saved_model", image_size, class_names,
                                          top_k, recipe)
        serving = SavedModelPredictor(path)
        differences = check_parity(lambda x: tf.nn.softmax(keras_logits(x)).numpy(), serving.predict,
                                   images, what=f"SavedModel {path}", atol=atol)
        summary["saved_model"] = {"path": str(path), "max_abs_diff_probabilities": differences}
    if export_format in ("onnx", "both"):
        path = output_dir / "model.onnx"
        differences = export_onnx(model, path, images, opset, class_names, atol, recipe, reference=reference)
        summary["onnx"] = {"path": str(path), "opset": int(opset), "max_abs_diff_logits": differences}
    (output_dir / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv):
    from absl import flags

    from car_tf import flags_from_config

    del argv
    c = flags_from_config.section_from_flags(ExportConfig, flags.FLAGS)
    summary = export_run(c.model_dir, c.format, c.output_dir, c.opset, c.parity_images, c.recipe, c.top_k, c.atol)
    for name in ("saved_model", "onnx"):
        if name in summary:
            entry = summary[name]
            diffs = next(v for k, v in entry.items() if k.startswith("max_abs_diff"))
            worst = max(diffs.values())
            print(f"{name:>11}: {entry['path']}  (max |diff| vs Keras {worst:.2e} at batch sizes "
                  f"{', '.join(map(str, diffs))})")


def define_flags(flag_values=None):
    from absl import flags

    from car_tf import flags_from_config

    return flags_from_config.define_flags(ExportConfig, flag_values=flags.FLAGS if flag_values is None else flag_values,
                                          module_name=flags_from_config.calling_module())


if __name__ == "__main__":
    from car_tf import cli

    cli.refuse_other_backends("export")  # before export.parity, which imports TensorFlow
    from export.parity import ExportParityError

    define_flags()
    cli.run(main, "export", extra_errors=(ExportParityError,))
