"""Vision Transformers ViT-S/16 and ViT-B/16 (Dosovitskiy et al. 2021), pre-norm, CLS pooling.

``patch_size`` is an option so small images work: the CAR paper trains ViT-Small from scratch on
32x32 CIFAR images, e.g. ``create_model("vit_s16", 100, input_shape=(32, 32, 3), patch_size=4)``.
The "features" embedding is the CLS token after the final LayerNorm.

``create_model("vit_b16", K, lora_rank=r)`` (``--lora_rank=r``) fine-tunes with LoRA: adapters on
every Dense and EinsumDense layer of the encoder (the attention projections, both MLP layers), the
rest frozen (car_tf.models.lora).
"""

import keras

from car_tf.models.registry import register_model


@keras.saving.register_keras_serializable(package="car_tf")
class ClassTokenPositionEmbedding(keras.layers.Layer):
    """Prepends a learned CLS token to [B, N, D] tokens and adds learned position embeddings."""

    def build(self, input_shape):
        num_tokens, dim = input_shape[1], input_shape[2]
        self.class_token = self.add_weight(
            name="class_token", shape=(1, 1, dim), initializer="zeros"
        )
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(1, num_tokens + 1, dim),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )

    def call(self, inputs):
        batch = keras.ops.shape(inputs)[0]
        class_token = keras.ops.broadcast_to(
            keras.ops.cast(self.class_token, inputs.dtype), (batch, 1, inputs.shape[-1])
        )
        tokens = keras.ops.concatenate([class_token, inputs], axis=1)
        return tokens + keras.ops.cast(self.position_embedding, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] + 1, input_shape[2])


@keras.saving.register_keras_serializable(package="car_tf")
def gelu_erf(x):
    """Exact GELU written with erf: TensorFlow's own exact GELU uses erfc, which tf2onnx lacks."""
    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


def _encoder_block(x, num_heads, mlp_dim, name):
    dim = x.shape[-1]
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
    y = keras.layers.MultiHeadAttention(num_heads, dim // num_heads, name=f"{name}_attention")(y, y)
    x = keras.layers.Add(name=f"{name}_add1")([x, y])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
    y = keras.layers.Dense(mlp_dim, activation=gelu_erf, name=f"{name}_mlp1")(y)
    y = keras.layers.Dense(dim, name=f"{name}_mlp2")(y)
    return keras.layers.Add(name=f"{name}_add2")([x, y])


def vision_transformer(x, *, patch_size, dim, depth, num_heads, mlp_dim):
    """ViT encoder on [B, H, W, C] images; returns the "features" CLS embedding [B, dim]."""
    height, width = x.shape[1], x.shape[2]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of patch_size={patch_size}; "
            "pick a patch size that divides both sides."
        )
    x = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_embedding")(x)
    num_patches = (height // patch_size) * (width // patch_size)
    x = keras.layers.Reshape((num_patches, dim), name="tokens")(x)
    x = ClassTokenPositionEmbedding(name="token_embedding")(x)
    for block in range(depth):
        x = _encoder_block(x, num_heads, mlp_dim, f"block{block + 1}")
    # LayerNorm acts per token, so normalising only the CLS token equals slicing after the norm.
    return keras.layers.LayerNormalization(epsilon=1e-6, name="features")(x[:, 0])


@register_model("vit_s16")
def vit_s16(x, patch_size=16):
    """ViT-Small: dim 384, depth 12, 6 heads, MLP 1536."""
    return vision_transformer(
        x, patch_size=patch_size, dim=384, depth=12, num_heads=6, mlp_dim=1536
    )


@register_model("vit_b16")
def vit_b16(x, patch_size=16):
    """ViT-Base: dim 768, depth 12, 12 heads, MLP 3072."""
    return vision_transformer(
        x, patch_size=patch_size, dim=768, depth=12, num_heads=12, mlp_dim=3072
    )
