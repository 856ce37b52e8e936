"""Runs of the library core under whichever Keras backend KERAS_BACKEND names, for test_backends.

    KERAS_BACKEND=jax python tests/backends/backend_runs.py losses OUT.json

Each command writes its results to OUT (JSON, or .npz for ``save``); test_backends.py runs it in
a fresh process per backend (a process has one backend) and compares the results with NumPy
references and with each other.
"""

import json
import pathlib
import sys

import keras
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import car_tf  # noqa: E402
from car_tf.decoupled import attach_decoupled_terms  # noqa: E402
from car_tf.losses.registry import BASE_LOSSES, callbacks_for_loss, get_base_loss  # noqa: E402

COUNTS = [40, 20, 8, 4]
FEATURES = 6


def tiny_model(seed=0, num_classes=len(COUNTS)):
    """Input(8) -> "features" Dense(6) -> "classifier" Dense(K), weights fixed by ``seed``."""
    inputs = keras.Input((8,))
    features = keras.layers.Dense(FEATURES, activation="tanh", name="features")(inputs)
    outputs = keras.layers.Dense(num_classes, name="classifier")(features)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def toy_data(n=96, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(COUNTS), size=n, p=np.array(COUNTS) / sum(COUNTS))
    centres = rng.normal(size=(len(COUNTS), 8))
    return (centres[labels] + rng.normal(scale=0.8, size=(n, 8))).astype("float32"), labels.astype("int32")


def fit_history(base, car, epochs=3):
    """Loss (and CAR's sigma) per epoch of a tiny model trained without shuffling."""
    model = tiny_model()
    loss = get_base_loss(base, COUNTS)
    if base == "decoupled":
        model = attach_decoupled_terms(model)
    callbacks = []
    if car:
        loss = car_tf.CARLoss(COUNTS, base=loss, spectral_method="power" if base == "ldam_drw" else "auto")
        callbacks.append(car_tf.CARCallback(loss))
    callbacks += callbacks_for_loss(loss, epochs)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss=loss)
    x, y = toy_data()
    history = model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks,
                        validation_data=(x[:32], y[:32]))
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def losses(out):
    """Every base loss alone and under CAR."""
    results = {}
    for base in BASE_LOSSES:
        results[base] = fit_history(base, car=False)
        results[f"car_{base}"] = fit_history(base, car=True)
    pathlib.Path(out).write_text(json.dumps(results))


def first_steps(out):
    """Two train_on_batch steps of CAR on a linear model (SGD, lr 1): losses and weights."""
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(3, len(COUNTS))).astype("float32")
    batches = [(rng.normal(size=(7, 3)).astype("float32"), rng.integers(0, len(COUNTS), size=7))
               for _ in range(2)]
    results = {"w0": w0.tolist(), "batches": [(x.tolist(), y.tolist()) for x, y in batches]}
    variants = (("svd", "zeros", None), ("power", "zeros", None), ("svd", "first_batch", None),
                ("power", "zeros", len(COUNTS)), ("power", "zeros", 2))  # sparse EMAs, exact and cut
    for method, ema_init, entries in variants:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(len(COUNTS), use_bias=False)])
        model.set_weights([w0])
        loss = car_tf.CARLoss(COUNTS, spec_lambda=0.5, beta=0.6, ema_init=ema_init, spectral_method=method,
                              power_iterations=400, power_tolerance=1e-9, sparse_ema_entries=entries)
        car_tf.attach_car_state(model, loss)
        model.compile(keras.optimizers.SGD(1.0), loss=loss)
        steps = []
        for x, y in batches:
            logits = keras.ops.convert_to_numpy(model(x)).tolist()
            value = model.train_on_batch(x, y)
            steps.append({"loss": float(value), "w": model.get_weights()[0].tolist(), "logits": logits,
                          "ema": keras.ops.convert_to_numpy(model.car_state.ema_matrix()).tolist()})
        results[f"{method}_{ema_init}" + (f"_sparse{entries}" if entries else "")] = steps
    pathlib.Path(out).write_text(json.dumps(results))


def save(out):
    """A ResNet-32 trained two steps with CAR, saved as OUT (.keras) with OUT.npz beside it."""
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, size=(16, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, len(COUNTS), size=16)
    model = car_tf.models.create_model("resnet32", len(COUNTS), input_shape=(32, 32, 3))
    loss = car_tf.CARLoss(COUNTS, spectral_method="power")
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0, callbacks=[car_tf.CARCallback(loss)])
    model.save(out)
    state = {f"state/{v.path}": np.asarray(v.numpy()) for v in model.car_state.weights}
    np.savez(f"{out}.npz", images=images, predictions=np.asarray(model.predict(images, verbose=0)), **state)


def data_parallel(out):
    """Weights, EMA and losses after 4 CAR steps on 1 and on 2 devices (keras.distribution)."""
    import jax

    x, y = toy_data(n=128)
    results = {}
    for count in (1, 2):
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()[:count]))
        model = tiny_model()
        loss = car_tf.CARLoss(COUNTS, spectral_method="power")
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
        history = model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                            callbacks=[car_tf.CARCallback(loss)])
        results[count] = {
            "loss": [float(v) for v in history.history["loss"]],
            "weights": [w.tolist() for w in model.get_weights()],
            "ema": np.asarray(model.car_state.ema_matrix()).tolist(),
        }
    results["devices"] = len(jax.devices())
    pathlib.Path(out).write_text(json.dumps(results))


def label_check(out):
    """The sentence a user gets for a label outside [0, K) inside fit, for CE and for CAR."""
    x, y = toy_data(n=32)
    y[5] = len(COUNTS)
    messages = {}
    for name in ("ce", "car"):
        model = tiny_model()
        loss = get_base_loss("ce", COUNTS)
        callbacks = []
        if name == "car":
            loss = car_tf.CARLoss(COUNTS, base=loss)
            callbacks = [car_tf.CARCallback(loss)]
        model.compile(keras.optimizers.SGD(0.1), loss=loss)
        try:
            model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
            messages[name] = None
        except Exception as error:  # the backend's own error type wraps the sentence
            messages[name] = str(error)
    pathlib.Path(out).write_text(json.dumps(messages))


def backbones(out):
    """Output shape and finiteness of each built-in backbone's forward pass at 32 x 32, and the
    ImageNet-weighted EfficientNet-Lite0's features of ``efficientnet_images()``."""
    results = {}
    for name in ("resnet32", "resnet50", "resnext50_32x4d", "vit_s16", "vit_b16", "efficientnet_lite0"):
        model = car_tf.models.create_model(name, 3, input_shape=(32, 32, 3))
        logits = keras.ops.convert_to_numpy(model(np.zeros((2, 32, 32, 3), "float32"), training=False))
        results[name] = {"shape": list(logits.shape), "finite": bool(np.isfinite(logits).all())}
    images = efficientnet_images()
    model = car_tf.models.create_model("efficientnet_lite0", 3, input_shape=images.shape[1:], weights="imagenet")
    features = car_tf.models.features_model(model, with_logits=False)(images, training=False)
    results["efficientnet_lite0_features"] = keras.ops.convert_to_numpy(features).tolist()
    pathlib.Path(out).write_text(json.dumps(results))


def efficientnet_images():
    """Two smooth 38 x 38 images: even and odd sizes (38, 19, 10, 5, 3) meet "SAME" padding at stride 2."""
    grid = np.linspace(0.0, 1.0, 38)
    ramp = np.stack([np.outer(grid, 1 - grid), np.outer(1 - grid, grid), np.outer(grid, grid)], axis=-1)
    return (255.0 * np.stack([ramp, ramp[::-1, ::-1]])).astype("float32")



def train_methods(out):
    """Each training method through car_tf.training.trainer on a tiny image folder (argv[3]) for
    2 epochs; its test top-1 and training loss per epoch."""
    from car_tf.training import config as run_config
    from car_tf.training import trainer

    data_dir, results = sys.argv[3], {}
    # (method, base loss) by name; CE and CAR on logit adjustment train through the command line
    # in tests/test_gpu_script.py.
    choices = {"ldam_drw": ("ldam_drw", "ce"), "logit_adjusted": ("logit_adjusted", "ce"),
               "decoupled": ("decoupled", "ce"), "car_ce": ("car", "ce"), "car_ldam_drw": ("car", "ldam_drw")}
    for name, (method, base) in choices.items():
        run_dir = pathlib.Path(out).parent / name
        config = run_config.TrainConfig(
            run=run_config.RunConfig(model_dir=str(run_dir), verbose=False),
            data=run_config.DataConfig(dataset="folder", data_dir=data_dir, imbalance_factor=4.5,
                                       data_recipe="cifar", image_size=16),
            optimizer=run_config.OptimizerConfig(epochs=2, batch_size=12, lr=0.01, warmup_epochs=0,
                                                 lr_decay_epochs=(2,)),
            loss=run_config.BaseLossConfig(base_loss=base),
            choice=run_config.MethodChoice(method=method),
        )
        report = trainer.train(config)
        history = (run_dir / "history.csv").read_text().splitlines()
        loss_column = history[0].split(",").index("loss")
        losses = [float(line.split(",")[loss_column]) for line in history[1:]]
        results[name] = {"top1": report["top1"], "losses": losses}
    results["tensorflow_imported"] = "tensorflow" in sys.modules
    pathlib.Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    command, out = sys.argv[1:3]
    globals()[command](out)
