"""How fast the pretrained track extracts features, against what this CPU can do for the network.

    python -m benchmarks.bench_feature_extraction [--sizes=96,128,160] [--rounds=5]

For EfficientNet-Lite0 at each image size: images per second of the frozen backbone over batches
of 64 (the feature cache's batch), as car_tf runs it (a tf.function) and compiled with XLA
(jit_compile=True); the multiply-adds per image counted from the layers' shapes (2 FLOPs each);
and a float32 matrix product's rate on this machine (2048 x 2048 x 2048), the dense-compute
ceiling. Rounds are interleaved and medians taken. Prints a markdown table.
"""

import time

import numpy as np
from absl import app, flags

flags.DEFINE_list("sizes", ["96", "128", "160"], "Image sides to measure.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds; the table gives medians.")
flags.DEFINE_integer("batches", 4, "Batches of 64 timed per round and variant.")
FLAGS = flags.FLAGS
BATCH = 64


def conv_flops(model):
    """FLOPs of one image through the model's convolutions and dense layers (2 per multiply-add)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            height, width, out_channels = layer.output.shape[1:]
            kernel = layer.kernel.shape
            per_output = kernel[0] * kernel[1] * (kernel[2] if isinstance(layer, keras.layers.Conv2D) else 1)
            total += 2 * height * width * out_channels * per_output
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.kernel.shape))
    return total


def matmul_gflops(tf, size=2048, repeats=5):
    a = tf.random.normal([size, size])
    product = tf.function(lambda x: tf.matmul(x, x))
    product(a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        product(a).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main(argv):
    del argv
    import tensorflow as tf

    from car_tf.models import create_model, features_model

    variants, flops = {}, {}
    for size in map(int, FLAGS.sizes):
        extractor = features_model(create_model("efficientnet_lite0", 10, input_shape=(size, size, 3),
                                                weights="imagenet"), with_logits=False)
        flops[size] = conv_flops(extractor)
        images = tf.random.uniform([BATCH, size, size, 3], 0, 255)
        for jit in (False, True):
            call = tf.function(lambda x, m=extractor: m(x, training=False), jit_compile=jit)
            call(images).numpy()  # trace and compile outside the timing
            variants[(size, jit)] = (call, images)
    times = {key: [] for key in variants}
    rates = []
    for _ in range(FLAGS.rounds):
        rates.append(matmul_gflops(tf))
        for key, (call, images) in variants.items():
            start = time.perf_counter()
            for _ in range(FLAGS.batches):
                call(images).numpy()
            times[key].append((time.perf_counter() - start) / (FLAGS.batches * BATCH))
    peak = float(np.median(rates))
    print(f"float32 matmul 2048^3: {peak:.0f} GFLOP/s (median of {FLAGS.rounds})\n")
    print("| image side | GFLOPs / image | tf.function img/s | XLA img/s | GFLOP/s of the faster | share of matmul rate |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in map(int, FLAGS.sizes):
        plain, xla = (1 / np.median(times[(size, jit)]) for jit in (False, True))
        achieved = max(plain, xla) * flops[size] / 1e9
        print(f"| {size} | {flops[size] / 1e9:.3f} | {plain:.0f} | {xla:.0f} | {achieved:.1f} | "
              f"{100 * achieved / peak:.0f} % |")


if __name__ == "__main__":
    app.run(main)
