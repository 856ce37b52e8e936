"""The pixel normalisation that opens every car_tf model, so exported models take raw pixels."""

import keras

# Per-channel statistics of pixels scaled to [0, 1]. The CIFAR values are those of the released
# LDAM / BCL / ConCutMix code; the ImageNet values are the usual torchvision ones;
# "efficientnet_lite" is the (x - 127) / 128 of EfficientNet-Lite's TensorFlow release.
CHANNEL_STATS = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "efficientnet_lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}


@keras.saving.register_keras_serializable(package="car_tf")
class PixelNormalization(keras.layers.Layer):
    """Maps raw RGB pixels to ``(pixels * scale - mean) / std`` per channel (channels last).

    ``mean`` and ``std`` are in RGB order; ``channel_order="bgr"`` then reverses the channels, as
    Caffe-trained weights (keras.applications' ResNet-50) expect.
    """

    def __init__(self, mean, std, scale=1.0 / 255.0, channel_order="rgb", **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = float(scale)
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"PixelNormalization got channel_order={channel_order!r}; pass 'rgb' or 'bgr'.")
        self.channel_order = channel_order
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"PixelNormalization got {len(self.mean)} means but {len(self.std)} stds; "
                "pass one mean and one std per channel."
            )
        if min(self.std) <= 0:
            raise ValueError(f"PixelNormalization got std {self.std}; every std must be positive.")

    def build(self, input_shape):
        if input_shape[-1] != len(self.mean):
            raise ValueError(
                f"PixelNormalization has statistics for {len(self.mean)} channels but the input "
                f"has {input_shape[-1]}; feed channels-last images with {len(self.mean)} channels."
            )

    def call(self, inputs):
        # One multiply-add: x * (scale / std) - mean / std.
        gain = keras.ops.convert_to_tensor(
            [self.scale / s for s in self.std], dtype=self.compute_dtype
        )
        offset = keras.ops.convert_to_tensor(
            [m / s for m, s in zip(self.mean, self.std)], dtype=self.compute_dtype
        )
        normalized = inputs * gain - offset
        if self.channel_order == "bgr":
            return keras.ops.take(normalized, [2, 1, 0], axis=-1)  # a gather: every exporter has one
        return normalized

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "mean": self.mean,
            "std": self.std,
            "scale": self.scale,
            "channel_order": self.channel_order,
        }
