"""ImageNet ResNet-50 and ResNeXt-50 (32x4d), laid out as torchvision's (stride on the 3x3 conv).

Convolutions have no bias, padding is explicit and symmetric (as in PyTorch), so parameter
counts match torchvision exactly: 25,557,032 and 25,028,904 with a 1000-class linear head.
"""

import functools

import keras

from car_tf.models.registry import register_model

_BN = {"momentum": 0.9, "epsilon": 1e-5}


@keras.saving.register_keras_serializable(package="car_tf")
class GroupedConv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D with ``groups`` > 1 that stays exportable on the TensorFlow backend.

    Keras runs a grouped convolution on TensorFlow inside an XLA-compiled function, which tf2onnx
    cannot convert (it writes an invalid ONNX file). Here the forward pass is TensorFlow's native
    Conv2D op, which infers the groups from the kernel shape on CPU and GPU and converts to an ONNX
    Conv with ``group``; only the gradient, which TensorFlow's CPU kernels lack for groups, runs
    under XLA. Weights and config are those of keras.layers.Conv2D, without a bias: Grappler
    fuses Conv2D + BiasAdd into a CPU kernel that rejects groups (use BatchNormalization after).
    """

    def __init__(self, *args, use_bias=False, **kwargs):
        if use_bias:
            raise ValueError(
                "GroupedConv2D cannot take use_bias=True; pass use_bias=False and follow it with "
                "BatchNormalization."
            )
        super().__init__(*args, use_bias=False, **kwargs)

    def convolution_op(self, inputs, kernel):
        if keras.backend.backend() != "tensorflow":
            return super().convolution_op(inputs, kernel)
        import tensorflow as tf

        options = {
            "strides": tuple(self.strides),
            "padding": self.padding.upper(),
            "dilations": tuple(self.dilation_rate),
            "data_format": "NHWC" if self.data_format == "channels_last" else "NCHW",
        }

        gradient_of = _grouped_conv_gradient(**options)

        @tf.custom_gradient
        def convolve(x, w):
            return tf.nn.convolution(x, w, **options), lambda upstream: gradient_of(x, w, upstream)

        return convolve(inputs, tf.convert_to_tensor(kernel, dtype=inputs.dtype))


@functools.lru_cache(maxsize=None)
def _grouped_conv_gradient(**options):
    """An XLA-compiled function giving a grouped convolution's input and kernel gradients."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def gradient_of(x, w, upstream):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = tf.nn.convolution(x, w, **options)
        return tape.gradient(y, [x, w], output_gradients=upstream)

    return gradient_of


def _conv_bn(x, filters, kernel_size, strides, name, groups=1, relu=True):
    if kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    conv = GroupedConv2D if groups > 1 else keras.layers.Conv2D
    x = conv(
        filters, kernel_size, strides=strides, groups=groups, use_bias=False,
        kernel_initializer="he_normal", name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(**_BN, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _bottleneck(x, planes, strides, groups, width_per_group, name):
    width = planes * width_per_group // 64 * groups
    out_channels = planes * 4
    y = _conv_bn(x, width, 1, 1, f"{name}_1")
    y = _conv_bn(y, width, 3, strides, f"{name}_2", groups=groups)
    y = _conv_bn(y, out_channels, 1, 1, f"{name}_3", relu=False)
    if strides != 1 or x.shape[-1] != out_channels:
        x = _conv_bn(x, out_channels, 1, strides, f"{name}_shortcut", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def bottleneck_resnet(x, blocks_per_stage, groups=1, width_per_group=64):
    """ResNet / ResNeXt with bottleneck blocks; returns the 2048-d "features" embedding."""
    x = _conv_bn(x, 64, 7, 2, "stem")
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, blocks in enumerate(blocks_per_stage):
        planes = 64 * 2**stage
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _bottleneck(
                x, planes, strides, groups, width_per_group, f"stage{stage + 1}_block{block + 1}"
            )
    return keras.layers.GlobalAveragePooling2D(name="features")(x)


@register_model("resnet50")
def resnet50(x):
    """ResNet-50: bottleneck blocks 3-4-6-3."""
    return bottleneck_resnet(x, (3, 4, 6, 3))


@register_model("resnext50_32x4d")
def resnext50_32x4d(x):
    """ResNeXt-50 32x4d: bottleneck blocks 3-4-6-3 with 32 groups of width 4 in the 3x3 conv."""
    return bottleneck_resnet(x, (3, 4, 6, 3), groups=32, width_per_group=4)
