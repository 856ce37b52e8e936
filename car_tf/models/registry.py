"""Backbones by name (timm style): ``@register_model`` and ``create_model``.

A registered builder takes the normalised image tensor (plus its own keyword options) and returns
the pooled embedding from a layer named "features". ``create_model`` wraps it into the functional
model every car_tf component expects: raw pixels -> PixelNormalization -> backbone -> "features"
-> optional dropout -> "classifier" (float32 logits, also under mixed precision).
"""

import dataclasses
import inspect
import io
import pathlib
import re
import types
import zipfile

import h5py
import keras

from car_tf.models import ecosystem
from car_tf.models.heads import classifier_head
from car_tf.models.lora import enable_lora
from car_tf.models.preprocessing import CHANNEL_STATS, PixelNormalization


@dataclasses.dataclass(frozen=True)
class _Registration:
    builder: callable
    input_shape: tuple
    normalization: str
    packaged_weights: types.MappingProxyType  # weights name -> loader(model)


_MODELS = {}
# Backbones with their own weights and pixel scaling: builder(raw images, weights) -> (features, normalization).
_ECOSYSTEM = {
    ecosystem.KERAS_HUB: ecosystem.keras_hub_backbone,
    ecosystem.KERAS_RESNET50: ecosystem.keras_resnet50_backbone,
}


def register_model(name, *, input_shape=(224, 224, 3), normalization="imagenet", packaged_weights=None):
    """Decorator that registers ``builder(images, **options) -> features`` under ``name``.

    ``input_shape`` is the default image shape and ``normalization`` a key of CHANNEL_STATS.
    ``packaged_weights`` maps names of weights that come with the model (e.g. "imagenet") to a
    ``loader(model)`` that sets them on the built model; ``create_model(name, K, weights=NAME)``
    calls it.
    """
    if normalization not in CHANNEL_STATS:
        raise ValueError(
            f"unknown normalization {normalization!r}; pass one of {', '.join(CHANNEL_STATS)}."
        )

    def decorator(builder):
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered; pick another name.")
        _MODELS[name] = _Registration(
            builder, tuple(input_shape), normalization, types.MappingProxyType(dict(packaged_weights or {}))
        )
        return builder

    return decorator


def list_models():
    """Names of all registered models, sorted (the ecosystem's keras_hub and keras_resnet50 included)."""
    return sorted([*_MODELS, *_ECOSYSTEM])


def create_model(
    name,
    num_classes,
    *,
    input_shape=None,
    head="linear",
    cosine_scale=30.0,
    weights=None,
    dropout=0.0,
    normalization=None,
    lora_rank=0,
    **backbone_options,
):
    """Builds the registered model ``name`` as a functional keras.Model: raw pixels -> logits.

    Args:
      name: a name from ``list_models()``.
      num_classes: number of classes K (the classifier outputs [B, K]).
      input_shape: (H, W, 3); defaults to the model's registered shape.
      head: "linear" (Dense with bias) or "cosine" (CosineClassifier with ``cosine_scale``).
      cosine_scale: the scale s of the cosine head.
      weights: optional path to a ``.weights.h5`` (or ``.keras``) file to load, or the name of
        weights packaged with the model ("imagenet" for "efficientnet_lite0": the backbone's
        weights; the classifier stays new). For "keras_hub", the keras-hub preset (name or local
        folder) whose backbone and weights to use; for "keras_resnet50", "imagenet", the path of
        keras.applications' weights file, or None (see car_tf.models.ecosystem).
      dropout: dropout rate between "features" and "classifier".
      normalization: a key of CHANNEL_STATS ("cifar", "imagenet", ...); defaults to the model's own.
      lora_rank: 0 (default) trains every weight; r > 0 puts LoRA adapters of rank r on the
        backbone's Dense and EinsumDense layers (after ``weights`` are loaded) and freezes the rest
        of the backbone: only the adapters and the head train (car_tf.models.lora; README, "LoRA").
        Refused for a backbone without such layers (the CNNs).
      **backbone_options: options of the backbone builder (e.g. ``patch_size`` for ViT).
    Long because it checks every argument a user passes before building anything.
    """
    if name in _ECOSYSTEM:
        if backbone_options or normalization:
            given = ", ".join([*backbone_options, *(["normalization"] if normalization else [])])
            raise ValueError(
                f"model {name!r} takes its architecture and pixel scaling from its weights; drop {given}."
            )
        model = _ecosystem_model(name, num_classes, input_shape, head, cosine_scale, weights, dropout)
        return enable_lora(model, lora_rank)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; pass one of {', '.join(list_models())}.")
    registration = _MODELS[name]
    packaged = registration.packaged_weights.get(weights) if isinstance(weights, str) else None
    if packaged is None and (weights == "imagenet" or ecosystem.is_keras_hub_preset(weights)):
        family = ecosystem.KERAS_RESNET50 if weights == "imagenet" else ecosystem.KERAS_HUB
        also = [other for other, r in sorted(_MODELS.items()) if weights in r.packaged_weights]
        raise ValueError(
            f"weights {weights!r} are published for the ecosystem's own backbone"
            f"{' or packaged with ' + ', '.join(also) if also else ''}, not for car_tf's "
            f"{name}; pass --model={family} (create_model({family!r}, ...))"
            f"{''.join(' or --model=' + other for other in also)} with them."
        )
    _check_common(num_classes, dropout)
    input_shape = _checked_shape(input_shape or registration.input_shape)
    normalization = normalization or registration.normalization
    if normalization not in CHANNEL_STATS:
        raise ValueError(
            f"unknown normalization {normalization!r}; pass one of {', '.join(CHANNEL_STATS)}."
        )
    accepted = inspect.signature(registration.builder).parameters
    unknown = sorted(set(backbone_options) - set(list(accepted)[1:]))
    if unknown:
        known = ", ".join(list(accepted)[1:]) or "none"
        raise ValueError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"its options are: {known}."
        )

    images = keras.Input(shape=input_shape, dtype="float32", name="images")
    mean, std = CHANNEL_STATS[normalization]
    x = PixelNormalization(mean, std, name="pixel_normalization")(images)
    features = registration.builder(x, **backbone_options)
    model = _with_head(images, features, name, num_classes, head, cosine_scale, dropout)
    if packaged is not None:
        packaged(model)
    elif weights is not None:
        load_model_weights(model, weights)
    return enable_lora(model, lora_rank)


def _check_common(num_classes, dropout):
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}.")


def _checked_shape(input_shape):
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            f"input_shape must be (height, width, 3) for RGB images, got {input_shape!r}."
        )
    return input_shape


def _with_head(images, features, name, num_classes, head, cosine_scale, dropout):
    if dropout:
        features = keras.layers.Dropout(dropout, name="head_dropout")(features)
    logits = classifier_head(head, int(num_classes), cosine_scale)(features)
    return keras.Model(images, logits, name=name)


def _ecosystem_model(name, num_classes, input_shape, head, cosine_scale, weights, dropout):
    """An ecosystem backbone (car_tf.models.ecosystem) under car_tf's head."""
    _check_common(num_classes, dropout)
    if name == ecosystem.KERAS_HUB and not ecosystem.is_keras_hub_preset(weights):
        raise ValueError(
            f"model keras_hub needs a keras-hub preset as its weights (a preset name such as "
            f"resnet_50_imagenet, or a local preset folder), got {weights!r}; pass --pretrained=PRESET."
        )
    images = keras.Input(shape=_checked_shape(input_shape or (224, 224, 3)), dtype="float32", name="images")
    features, _ = _ECOSYSTEM[name](images, weights)
    return _with_head(images, features, name, num_classes, head, cosine_scale, dropout)


def inference_model(model):
    """The image -> logits model inside ``model``: its ``classifier`` sub-model if it has one.

    Training wrappers (ConCutMix's projection head) keep the deployable network as ``classifier``.
    """
    inner = getattr(model, "classifier", None)
    return inner if isinstance(inner, keras.Model) else model


def features_model(model, with_logits=True):
    """A keras.Model on the same inputs returning [features, logits], or the features alone.

    It shares the model's weights; the features are the output of its "features" layer.
    """
    try:
        features = model.get_layer("features")
    except ValueError:
        raise ValueError(
            f"model {model.name!r} has no layer named 'features'; build it with "
            "car_tf.models.create_model or name its pooled embedding layer 'features'."
        ) from None
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    outputs = [features.output, model.outputs[0]] if with_logits else features.output
    return keras.Model(inputs, outputs, name=f"{model.name}_features")


def load_model_weights(model, path):
    """``model.load_weights(path)`` with one clear sentence when the checkpoint does not fit."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(
            f"weights file {path} does not exist; pass the path of a .weights.h5 file."
        )
    if not (path.name.endswith(".weights.h5") or path.suffix == ".keras"):
        raise ValueError(
            f"weights file {path} is neither .weights.h5 nor .keras; save it with "
            "model.save_weights('name.weights.h5')."
        )
    try:
        model.load_weights(path)
    except ValueError as error:
        model_classes = model.get_layer("classifier").kernel.shape[-1]
        checkpoint_classes = _checkpoint_classes(model, path)
        if checkpoint_classes is not None and checkpoint_classes != model_classes:
            raise ValueError(
                f"checkpoint {path} has {checkpoint_classes} classes but the model has "
                f"{model_classes}; pass --num_classes={checkpoint_classes} or a checkpoint "
                f"trained on {model_classes} classes."
            ) from error
        # Keras opens with "A total of N objects could not be loaded"; the detail follows.
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = lines[1 if len(lines) > 1 else 0].split(" Target variable")[0][:300]
        raise ValueError(
            f"checkpoint {path} does not fit model {model.name!r} with input shape "
            f"{tuple(model.input_shape[1:])}; build the model with the options it was trained "
            f"with ({reason})."
        ) from error


def _checkpoint_classes(model, path):
    """Class count stored for the model's classifier in a Keras 3 weights file, or None."""
    # Keras 3 stores the layers of a functional model under layers/<snake_case class name>[_n],
    # numbered among layers of the same class in model.layers order.
    classifier = model.get_layer("classifier")
    class_name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(classifier).__name__).lower()
    earlier = model.layers[: model.layers.index(classifier)]
    index = sum(type(layer) is type(classifier) for layer in earlier)
    group = f"layers/{class_name}" + (f"_{index}" if index else "") + "/vars/0"
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                handle = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        else:
            handle = h5py.File(path, "r")
        with handle:
            return int(handle[group].shape[-1]) if group in handle else None
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
