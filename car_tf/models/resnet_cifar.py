"""CIFAR ResNet-32 (He et al. 2016, section 4.2) as used by LDAM, BCL, ConCutMix and CAR.

3 stages x 5 basic blocks with 16/32/64 channels on 32x32 images, global average pooling to a
64-d embedding. Shortcuts are option A (parameter-free): where a block halves the resolution and
doubles the width, the shortcut subsamples by 2 and zero-pads the new channels, as in the paper
and the released LDAM code, giving about 0.46M parameters with 10 classes.
"""

import keras

from car_tf.models.registry import register_model

# PyTorch BatchNorm defaults (momentum 0.1 there is 0.9 here), as in the released code.
_BN = {"momentum": 0.9, "epsilon": 1e-5}


@keras.saving.register_keras_serializable(package="car_tf")
class ZeroPadShortcut(keras.layers.Layer):
    """Option-A shortcut: keep every ``strides``-th pixel, zero-pad channels up to ``filters``."""

    def __init__(self, filters, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)

    def call(self, inputs):
        x = inputs[:, :: self.strides, :: self.strides, :]
        extra = self.filters - x.shape[-1]
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        def shrink(size):
            return None if size is None else -(-size // self.strides)
        return (batch, shrink(height), shrink(width), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


def _conv3x3(filters, strides, name):
    return keras.layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=name,
    )


def _basic_block(x, filters, strides, name):
    y = _conv3x3(filters, strides, f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(**_BN, name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv3x3(filters, 1, f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(**_BN, name=f"{name}_bn2")(y)
    if strides != 1 or x.shape[-1] != filters:
        x = ZeroPadShortcut(filters, strides, name=f"{name}_shortcut")(x)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def cifar_resnet(x, blocks_per_stage, widths=(16, 32, 64)):
    """CIFAR ResNet with ``6 * blocks_per_stage + 2`` layers; returns the "features" embedding."""
    x = _conv3x3(widths[0], 1, "stem_conv")(x)
    x = keras.layers.BatchNormalization(**_BN, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, strides, f"stage{stage + 1}_block{block + 1}")
    return keras.layers.GlobalAveragePooling2D(name="features")(x)


@register_model("resnet32", input_shape=(32, 32, 3), normalization="cifar")
def resnet32(x):
    """ResNet-32 for 32x32 images: 3 stages x 5 basic blocks, 16/32/64 channels."""
    return cifar_resnet(x, blocks_per_stage=5)
