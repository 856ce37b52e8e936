"""How fast the pretrained track extracts features, against what this CPU can do for the network.

    python -m benchmarks.bench_feature_extraction [--sizes=96,128,160] [--rounds=5]

For EfficientNet-Lite0 at each image size: images per second of the frozen backbone as car_tf runs
it (a tf.function) at several batch sizes, and compiled with XLA (jit_compile=True) at batch 64;
the multiply-adds per image counted from the layers' shapes (2 FLOPs each);
and a float32 matrix product's rate on this machine (2048 x 2048 x 2048), the dense-compute
ceiling. Rounds are interleaved and medians taken. Prints a markdown table.
"""

import time

import numpy as np
from absl import app, flags

flags.DEFINE_list("sizes", ["96", "128", "160"], "Image sides to measure.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds; the table gives medians.")
flags.DEFINE_list("batch_sizes", ["16", "32", "64", "128"], "Batch sizes of the tf.function variant.")
flags.DEFINE_float("seconds", 3.0, "Seconds timed per round and variant.")
FLAGS = flags.FLAGS
XLA_BATCH = 64


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
        plain = tf.function(lambda x, m=extractor: m(x, training=False))
        xla = tf.function(lambda x, m=extractor: m(x, training=False), jit_compile=True)
        runs = [(batch, False, plain) for batch in map(int, FLAGS.batch_sizes)] + [(XLA_BATCH, True, xla)]
        for batch, jit, call in runs:
            images = tf.random.uniform([batch, size, size, 3], 0, 255)
            call(images).numpy()  # trace and compile outside the timing
            variants[(size, batch, jit)] = (call, images)
    rates, speeds = [], {key: [] for key in variants}
    for _ in range(FLAGS.rounds):
        rates.append(matmul_gflops(tf))
        for key, (call, images) in variants.items():
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < FLAGS.seconds:
                call(images).numpy()
                count += len(images)
            speeds[key].append(count / (time.perf_counter() - start))
    peak = float(np.median(rates))
    print(f"float32 matmul 2048^3: {peak:.0f} GFLOP/s (median of {FLAGS.rounds})\n")
    batches = [int(b) for b in FLAGS.batch_sizes]
    print("| image side | GFLOPs / image | " + " | ".join(f"img/s, batch {b}" for b in batches)
          + f" | img/s, XLA batch {XLA_BATCH} | best GFLOP/s | share of matmul rate |")
    print("| --- | --- |" + " --- |" * (len(batches) + 3))
    for size in map(int, FLAGS.sizes):
        plain = [float(np.median(speeds[(size, b, False)])) for b in batches]
        xla = float(np.median(speeds[(size, XLA_BATCH, True)]))
        achieved = max(*plain, xla) * flops[size] / 1e9
        print(f"| {size} | {flops[size] / 1e9:.3f} | " + " | ".join(f"{v:.0f}" for v in plain)
              + f" | {xla:.0f} | {achieved:.1f} | {100 * achieved / peak:.0f} % |")


if __name__ == "__main__":
    app.run(main)
