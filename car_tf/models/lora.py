"""LoRA (Hu et al., ICLR 2022) on a car_tf model's backbone, with Keras's built-in adapters.

``create_model(name, K, lora_rank=r)`` (``--lora_rank=r``) calls ``enable_lora(model, r)``:

- car_tf's ViTs (vit_s16, vit_b16): every Dense and EinsumDense layer of the encoder (each
  attention's query, key, value and output projections, both MLP layers) gets Keras's adapter
  ``layer.enable_lora(r)``; the ViT's patch embedding, tokens, layer norms and the biases of the
  adapted layers stay frozen.
- keras-hub backbones (``--model=keras_hub``): ``backbone.enable_lora(r)``, keras-hub's own
  choice of layers (the attention's query and value projections), the rest frozen as keras-hub
  freezes it; the biases of the adapted layers are frozen too.

Only the adapters and the head (the layers after "features") train. A layer with kernel W of
shape (..., d_out) computes with W + (alpha / r) A B, A of shape (..., r) and B of shape
(r, d_out), alpha = r (Keras's default), B starting at zero so that the adapted network starts as
the pretrained one. An adapted layer adds r * (prod(W.shape[:-1]) + d_out) trainable numbers:
r * (d_in + d_out) for a Dense layer (``trainable_parameter_count`` counts them).

Saving: Keras writes an adapted layer's kernel merged (W + (alpha / r) A B) and zeroes the adapters
when it loads one, so a model.keras, or a weights file, loads anywhere as the merged network. For
checkpoints that would lose the adapters (training would restart them at zero product, where A
and B receive no gradient), so ``enable_lora`` also records each adapted layer's W, A and B beside
it in every weights file (``_AdapterRecord``): a LoRA model built by car_tf restores them exactly;
any other loader ignores the record. ``merged_copy`` gives the plain network (no adapters) that
export writes.
"""

import keras
import numpy as np
from keras import ops

ADAPTED_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)
_RECORD = "_car_tf_lora_record"  # the attribute of an adapted layer holding its _AdapterRecord


def backbone_layers(model):
    """The top-level layers of a car_tf model up to and including "features"."""
    names = [layer.name for layer in model.layers]
    if "features" not in names:
        raise ValueError(
            f"model {model.name!r} has no layer named 'features'; build it with car_tf.models.create_model."
        )
    return model.layers[: names.index("features") + 1]


def nested_layers(layer):
    """``layer`` and every layer inside it, depth first, each once.

    Sub-models are walked through their ``layers``; other layers through the layers their
    attributes hold (alone or in lists, tuples and dicts), as Keras tracks them.
    """
    seen, order = set(), []

    def visit(item):
        if isinstance(item, (list, tuple)):
            for value in item:
                visit(value)
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, keras.layers.Layer) and not isinstance(item, _AdapterRecord) and id(item) not in seen:
            seen.add(id(item))
            order.append(item)
            if isinstance(item, keras.Model):
                visit(item.layers)
            else:
                visit(list(vars(item).values()))

    visit(layer)
    return order


def adapted_layers(model):
    """The layers of ``model`` (nested ones included) whose LoRA adapters are on."""
    return [layer for layer in nested_layers(model) if getattr(layer, "lora_enabled", False)]


def _is_keras_hub_backbone(layer):
    return isinstance(layer, keras.Model) and callable(getattr(layer, "default_lora_layer_names", None))


def enable_lora(model, rank):
    """Puts LoRA adapters of rank ``rank`` on the backbone of the car_tf ``model``; returns it.

    See the module docstring for which layers; everything else up to "features" is frozen, the
    head stays trainable. ``rank`` 0 leaves the model as it is. Raises ValueError for a backbone
    with no layer LoRA can adapt (car_tf's CNNs, keras.applications' ResNet-50, a keras-hub CNN).
    """
    if int(rank) != rank or rank < 0:
        raise ValueError(f"lora_rank={rank} must be a whole number >= 0 (0 turns LoRA off; 8 is usual).")
    rank = int(rank)
    if not rank:
        return model
    backbone = backbone_layers(model)
    if adapted_layers(model):
        raise ValueError(f"model {model.name!r} already has LoRA adapters; enable them once.")
    hub = [layer for layer in backbone if _is_keras_hub_backbone(layer)]
    candidates = [] if hub else [
        layer for top in backbone for layer in nested_layers(top) if isinstance(layer, ADAPTED_LAYERS)
    ]
    if not hub and not candidates:
        raise ValueError(
            f"lora_rank={rank} adapts Dense and EinsumDense layers, and the backbone of {model.name} has none; "
            "use a ViT (vit_s16, vit_b16) or a keras-hub transformer preset, or lora_rank=0."
        )
    for layer in backbone:
        layer.trainable = False
    for layer in hub:
        layer.enable_lora(rank)  # keras-hub's own: freezes the backbone, adapts query and value
    for layer in candidates:
        layer.trainable = True
        layer.enable_lora(rank)
    adapted = adapted_layers(model)
    if not adapted:
        names = ", ".join(hub[0].default_lora_layer_names())
        raise ValueError(
            f"lora_rank={rank} adapts the layers keras-hub names {names}, and the keras-hub backbone "
            f"{hub[0].name} has none (a CNN); use a transformer preset such as a ViT, or lora_rank=0."
        )
    for layer in adapted:
        if getattr(layer, "bias", None) is not None:
            layer.bias.trainable = False
        object.__setattr__(layer, _RECORD, _AdapterRecord(layer))  # untracked: in no config, no layer list
    return model


def trainable_parameter_count(model):
    """Trainable numbers of ``model``: with LoRA, the adapters' and the head's."""
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def lora_parameter_count(layer):
    """r * (prod(kernel.shape[:-1]) + kernel.shape[-1]): what adapting ``layer`` at rank r adds."""
    kernel = _kernel_variable(layer)
    return int(layer.lora_rank * (np.prod(kernel.shape[:-1]) + kernel.shape[-1]))


def _kernel_variable(layer):
    """The stored (frozen) kernel of an adapted layer; ``layer.kernel`` is the merged value."""
    return next(v for v in layer.weights if v.name == "kernel")


def merged_kernel(layer):
    """W + (lora_alpha / lora_rank) A B in float32, the kernel an adapted layer computes with."""
    kernel = ops.cast(_kernel_variable(layer), "float32")
    scale = layer.lora_alpha / layer.lora_rank
    return ops.add(kernel, scale * ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b))


def _without_lora(config):
    if isinstance(config, dict):
        return {k: _without_lora(v) for k, v in config.items() if k not in ("lora_rank", "lora_alpha")}
    if isinstance(config, list):
        return [_without_lora(v) for v in config]
    return config


def merged_copy(model):
    """The plain network of a LoRA model: each adapted kernel W replaced by W + (alpha / r) A B,
    no adapters left (a model without adapters is returned as it is).

    The copy is rebuilt from the model's config without LoRA and given the model's weights, the
    adapters folded into their kernels; it computes what the LoRA model computes (to float32
    rounding) and exports as any car_tf network.
    """
    adapted = adapted_layers(model)
    if not adapted:
        return model
    merged = {id(_kernel_variable(layer)): merged_kernel(layer) for layer in adapted}
    adapters = {id(v) for layer in adapted for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    sources = [v for v in model.weights if id(v) not in adapters]
    copy = model.__class__.from_config(_without_lora(model.get_config()))
    if adapted_layers(copy) or len(copy.weights) != len(sources):
        raise ValueError(f"model {model.name!r} does not rebuild without its LoRA adapters; it cannot be merged.")
    for target, source in zip(copy.weights, sources):
        if tuple(target.shape) != tuple(source.shape) or target.name != source.name:
            raise ValueError(
                f"model {model.name!r} rebuilt without LoRA orders its weights differently ({target.path} against "
                f"{source.path}); it cannot be merged."
            )
        target.assign(ops.cast(merged.get(id(source), source), target.dtype))
    return copy


class _AdapterRecord(keras.layers.Layer):
    """What a weights file needs to restore an adapted layer exactly: its W, A and B.

    Attached to the layer outside Keras's tracking, so it is in no config and no layer list, but
    Keras's weights files (checkpoints, model.keras) visit it and keep its three arrays beside the
    layer's own (merged kernel, bias). It loads after the layer, over what Keras restored. A file
    without the record (Keras's own format: a merged kernel, no adapters) leaves the merged kernel
    and starts fresh adapters on it (A at Keras's he_uniform start, B zero), as enabling LoRA does.
    """

    def __init__(self, layer):
        super().__init__(name=f"{layer.name}_lora_record", trainable=False)
        parts = (_kernel_variable(layer), layer.lora_kernel_a, layer.lora_kernel_b)
        # Held in a closure: an attribute holding the layer would let Keras's file walk loop back into it.
        object.__setattr__(self, "_parts", lambda: parts)

    def save_own_variables(self, store):
        for index, variable in enumerate(self._parts()):
            store[str(index)] = variable

    def load_own_variables(self, store):
        parts = self._parts()
        if len(store.keys()) == len(parts):
            for index, variable in enumerate(parts):
                variable.assign(store[str(index)])
            return
        _, a, _ = parts
        a.assign(keras.initializers.HeUniform()(a.shape, dtype=a.dtype))
