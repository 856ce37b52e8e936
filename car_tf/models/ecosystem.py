"""Backbones with published weights from the Keras ecosystem, behind ``create_model``.

- ``create_model("keras_hub", K, weights=PRESET)``: the backbone of a keras-hub preset (a preset
  name such as "resnet_50_imagenet" or "vit_base_patch16_224_imagenet", or a local preset folder
  holding config.json), with the pixel scaling of the preset's image converter.
- ``create_model("keras_resnet50", K, weights="imagenet")``: keras.applications' ResNet-50 with
  its "caffe" preprocessing (BGR, ImageNet means subtracted); ``weights`` may also be the path of
  its .h5 weights file, or None for random weights.

The backbones are the ecosystem's own models, nested in car_tf's functional model between its
PixelNormalization and the "features" layer, so published weights load without conversion. The
classifier head is new and sized to the data. ``lora_rank=r`` (``--lora_rank=r``) calls keras-hub's
``backbone.enable_lora(r)`` (adapters on the attention's query and value layers, the backbone
frozen; car_tf.models.lora).
"""

import os
import pathlib

import keras

from car_tf.models.preprocessing import PixelNormalization

KERAS_HUB = "keras_hub"
KERAS_RESNET50 = "keras_resnet50"
# keras.applications.resnet50's "caffe" preprocessing: BGR order, ImageNet means subtracted
# from pixels in [0, 255], no scaling.
CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)
RESNET50_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _import_keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise ValueError(
            "keras-hub presets need the keras-hub package; install it with "
            "`pip install keras-hub` (requirements.txt lists it)."
        ) from None
    return keras_hub


def is_keras_hub_preset(weights):
    """True for a local keras-hub preset folder or the name of a built-in keras-hub preset."""
    if weights is None:
        return False
    weights = str(weights)
    if (pathlib.Path(weights) / "config.json").is_file():
        return True
    if weights.startswith(("kaggle://", "hf://")):
        return True
    if os.sep in weights or weights.endswith((".h5", ".keras")):
        return False
    return weights in _import_keras_hub().models.Backbone.presets


def keras_hub_backbone(images, preset):
    """(features, normalization config) of a keras-hub preset's backbone on raw pixels ``images``."""
    keras_hub = _import_keras_hub()
    try:
        backbone = keras_hub.models.Backbone.from_preset(preset)
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except (OSError, ConnectionError) as error:
        raise ValueError(_offline_preset_message(keras_hub, preset, error)) from None
    except Exception as error:  # keras-hub wraps download failures in its own exception types
        if "connect" in str(error).lower() or "resolve" in str(error).lower():
            raise ValueError(_offline_preset_message(keras_hub, preset, error)) from None
        raise
    expected = getattr(backbone, "image_shape", None)
    if expected and None not in expected[:2] and tuple(expected) != tuple(images.shape[1:]):
        raise ValueError(
            f"keras-hub preset {preset} takes {expected[0]}x{expected[1]} images but the model was "
            f"asked for {images.shape[1]}x{images.shape[2]}; pass --image_size={expected[0]}."
        )
    normalization = _converter_normalization(converter)
    x = PixelNormalization(**normalization, name="pixel_normalization")(images)
    x = backbone(x)
    if len(x.shape) == 4:  # a feature map (ResNet): global average pooling
        return keras.layers.GlobalAveragePooling2D(name="features")(x), normalization
    return keras.layers.Identity(name="features")(x[:, 0]), normalization  # a ViT's class token


def _converter_normalization(converter):
    """PixelNormalization arguments equal to the converter's pixels * scale + offset."""
    def per_channel(value, default):
        value = default if value is None else value
        return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3

    scale = per_channel(converter.scale, 1.0)
    offset = per_channel(converter.offset, 0.0)
    unit = 1.0 / 255.0  # PixelNormalization computes (pixels * unit - mean) / std
    std = [unit / s for s in scale]
    return {"mean": [-o * d for o, d in zip(offset, std)], "std": std, "scale": unit}


def _offline_preset_message(keras_hub, preset, error):
    handle = keras_hub.models.Backbone.presets.get(str(preset), {}).get("kaggle_handle", "")
    cache = os.environ.get("KAGGLEHUB_CACHE", "~/.cache/kagglehub")
    where = ""
    if handle.startswith("kaggle://"):
        where = f" (keras-hub keeps it in {cache}/models/{handle.removeprefix('kaggle://')})"
    return (
        f"keras-hub preset {preset} could not be downloaded ({type(error).__name__}); on a machine "
        f"with network run keras_hub.models.Backbone.from_preset({str(preset)!r}) to fetch it"
        f"{where}, copy that folder here and pass its path as --pretrained."
    )


def keras_resnet50_backbone(images, weights):
    """(features, normalization config) of keras.applications.ResNet50 on raw pixels ``images``."""
    normalization = {
        "mean": [m / 255.0 for m in CAFFE_MEANS_BGR[::-1]],  # RGB order, reversed after scaling
        "std": [1.0 / 255.0] * 3,
        "channel_order": "bgr",
    }
    x = PixelNormalization(**normalization, name="pixel_normalization")(images)
    if weights not in (None, "imagenet") and not pathlib.Path(weights).is_file():
        raise ValueError(
            f"weights file {weights} does not exist; pass 'imagenet' or the path of "
            f"keras.applications' {RESNET50_NOTOP_FILE}."
        )
    try:
        backbone = keras.applications.ResNet50(
            include_top=False, weights=weights, input_shape=tuple(images.shape[1:]), pooling="avg"
        )
    except Exception as error:  # keras.utils.get_file raises plain Exception when offline
        if weights != "imagenet" or "fetch failure" not in str(error).lower():
            raise
        home = os.environ.get("KERAS_HOME", "~/.keras")
        raise ValueError(
            f"keras.applications' ResNet-50 ImageNet weights could not be downloaded; put "
            f"{RESNET50_NOTOP_FILE} in {home}/models/ or pass its path as --pretrained."
        ) from None
    return keras.layers.Identity(name="features")(backbone(x)), normalization
