"""Serving SavedModel export: uint8 images of any size in, probabilities and top-k classes out."""

import keras

from car_tf.backend import import_tensorflow
from car_tf.data.augment import resize_center_crop, resize_to
from car_tf.data.loading import SMALL_IMAGE_MAX, recipe_for
from car_tf.data.pipelines import RECIPES
from car_tf.models.registry import inference_model
from car_tf.models.lora import merged_copy

tf = import_tensorflow(__name__)

LOW_PRECISION = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def serving_recipe(image_size, run_info=None):
    """The run's evaluation recipe: run.json "recipe", else from its "dataset", else by image size."""
    run_info = run_info or {}
    recipe = run_info.get("recipe")
    if not recipe and run_info.get("dataset"):
        recipe = recipe_for(run_info["dataset"])
    recipe = recipe or ("cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet")  # as --data_recipe=auto
    if recipe not in RECIPES:
        raise ValueError(f"unknown evaluation recipe {recipe!r}; use one of {', '.join(RECIPES)}.")
    return recipe


def eval_preprocess(image, image_size, recipe):
    """One float32 image [H, W, 3] -> [S, S, 3] exactly as car_tf.data.pipelines.eval_dataset does."""
    if recipe == "cifar":
        return resize_to(image, image_size)
    return resize_center_crop(image, image_size)


def _all_layers(layer):
    yield layer
    for child in getattr(layer, "layers", []):
        yield from _all_layers(child)


def is_float32(model):
    """True when every layer, nested ones included, computes in float32."""
    return all(layer.dtype_policy.compute_dtype == "float32" for layer in _all_layers(model))


def _float32_config(config):
    """``config`` with every low-precision dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {k: _float32_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_config(v) for v in config]
    return "float32" if config in LOW_PRECISION else config


def float32_copy(model):
    """``model`` itself if it is float32, else a float32 rebuild from its config carrying its weights."""
    if is_float32(model):
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = model.__class__.from_config(_float32_config(model.get_config()))
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def deployable_model(model):
    """The float32 image -> logits network of a trained model (training wrappers removed, LoRA
    adapters merged into their kernels: car_tf.models.lora.merged_copy)."""
    return float32_copy(merged_copy(inference_model(model)))


def parity_reference(model, deployable):
    """What the export of ``deployable = deployable_model(model)`` is checked against: the trained
    network itself where it computes in float32 (LoRA adapters unmerged, so the check covers the
    merge), else ``deployable``."""
    trained = inference_model(model)
    return trained if is_float32(trained) else deployable


def serving_preprocess(images, image_size, recipe):
    """uint8 [B, H, W, 3] of any size -> float32 [B, S, S, 3] in [0, 255] by ``eval_preprocess``."""
    images = tf.cast(images, tf.float32)
    return tf.map_fn(
        lambda image: tf.ensure_shape(eval_preprocess(image, image_size, recipe), [image_size, image_size, 3]),
        images,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )


class ServingModule(tf.Module):
    """Holds the model and the serving function; ``class_names`` is also kept as a variable for loaders."""

    def __init__(self, model, image_size, class_names, top_k=5, recipe="cifar"):
        super().__init__()
        if len(class_names) != model.output_shape[-1]:
            raise ValueError(
                f"{len(class_names)} class names for a model with {model.output_shape[-1]} outputs; "
                "fix class_names in run.json."
            )
        self.model = model
        self.image_size = int(image_size)
        self.recipe = recipe
        self.top_k = min(int(top_k), len(class_names))
        self._names = [str(n) for n in class_names]
        # Export is TensorFlow only: a tf.Variable on this tf.Module is saved in the SavedModel.
        self.class_names = tf.Variable(self._names, trainable=False, name="class_names")

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        pixels = serving_preprocess(images, self.image_size, self.recipe)
        probabilities = tf.nn.softmax(tf.cast(self.model(pixels, training=False), tf.float32), axis=-1)
        _, top_classes = tf.math.top_k(probabilities, k=self.top_k)
        names = tf.constant(self._names)
        return {
            "probabilities": probabilities,
            "top_k_classes": top_classes,
            "top_k_names": tf.gather(names, top_classes),
        }


def export_serving_saved_model(model, path, image_size, class_names, top_k=5, recipe="cifar"):
    """Writes the serving SavedModel (signature "serving_default") of ``model`` to ``path``."""
    module = ServingModule(deployable_model(model), image_size, class_names, top_k, recipe)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def export_plain_saved_model(model, path):
    """Writes the float32 classifier (float32 [None, H, W, 3] -> logits) with Keras's exporter."""
    deployable_model(model).export(str(path), format="tf_saved_model", verbose=False)
    return path
