"""Classifier heads: a linear layer with bias, or a cosine classifier with a fixed scale."""

import keras

from car_tf.ops import l2_normalize

HEADS = ("linear", "cosine")


@keras.saving.register_keras_serializable(package="car_tf")
class CosineClassifier(keras.layers.Layer):
    """Logits ``scale * cos(x, w_k)``: L2-normalised features times L2-normalised kernel columns.

    ``kernel`` has shape [D, K] like a Dense kernel, so code reading ``classifier.kernel`` works
    with either head.
    """

    def __init__(
        self,
        units,
        scale=30.0,
        epsilon=1e-12,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(units) < 1:
            raise ValueError(f"CosineClassifier got units={units}; pass at least one class.")
        if float(scale) <= 0:
            raise ValueError(f"CosineClassifier got scale={scale}; pass a positive scale.")
        self.units = int(units)
        self.scale = float(scale)
        self.epsilon = float(epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )

    def call(self, inputs):
        features = l2_normalize(inputs, axis=-1, epsilon=self.epsilon)
        kernel = keras.ops.cast(self.kernel, inputs.dtype)
        kernel = l2_normalize(kernel, axis=0, epsilon=self.epsilon)
        return self.scale * keras.ops.matmul(features, kernel)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "scale": self.scale,
            "epsilon": self.epsilon,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
        }


def classifier_head(head, num_classes, cosine_scale=30.0):
    """The layer named "classifier" for ``head`` ("linear" or "cosine"), always float32."""
    if head == "linear":
        return keras.layers.Dense(num_classes, name="classifier", dtype="float32")
    if head == "cosine":
        return CosineClassifier(num_classes, scale=cosine_scale, name="classifier", dtype="float32")
    raise ValueError(f"unknown classifier head {head!r}; pass one of {', '.join(HEADS)}.")
