"""CAR's sample-weight, soft-label and non-finite semantics under whichever Keras backend
KERAS_BACKEND names, for test_car_semantics.py (and tests/test_probes.py).

    KERAS_BACKEND=torch python tests/backends/car_semantics_runs.py padding OUT.json

Each command writes its results to OUT (JSON); the tests run it in a fresh process per backend
and compare what the backends wrote.
"""

import json
import pathlib
import sys

import keras
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import car_tf  # noqa: E402

COUNTS = [40, 20, 8, 4, 2]
K = len(COUNTS)
# The dense EMA (SVD and power iteration) and the sparse one of 2 entries per class.
STATES = {"svd": {"spectral_method": "svd"}, "power": {"spectral_method": "power"},
          "sparse2": {"spectral_method": "power", "sparse_ema_entries": 2}}


def linear_model(seed=0, inputs=6):
    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(K)])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(scale=0.7, size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def samples(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, K, n).astype("int32")


def car_state_after_fit(x, y, sample_weight, settings, epochs=1):
    """(EMA, last sigma, losses) after fitting a fixed linear model on (x, y) in one batch per epoch."""
    model = linear_model()
    loss = car_tf.CARLoss(COUNTS, spec_lambda=0.5, beta=0.6, **settings)
    model.compile(keras.optimizers.SGD(0.1), loss=loss)
    history = model.fit(x, y, sample_weight=sample_weight, batch_size=len(x), epochs=epochs, shuffle=False,
                        verbose=0, callbacks=[car_tf.CARCallback(loss)])
    state = model.car_state
    return {"ema": keras.ops.convert_to_numpy(state.ema_matrix()).tolist(),
            "sigma": float(keras.ops.convert_to_numpy(state.last_sigma)),
            "loss": [float(v) for v in history.history["loss"]]}


def padding(out):
    """One CAR step on 12 samples, alone and padded with 6 samples of weight 0 (other labels and
    inputs); and 12 samples whose first has weight 2 beside the same batch with that sample twice."""
    x, y = samples(12, seed=1)
    pad_x, pad_y = samples(6, seed=2)
    pad_x = 5.0 * pad_x  # confident, so that counting them would show
    padded_x, padded_y = np.concatenate([x, pad_x]), np.concatenate([y, pad_y])
    zero = np.concatenate([np.ones(12), np.zeros(6)]).astype("float32")
    double = np.ones(12, "float32")
    double[0] = 2.0
    twice_x, twice_y = np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])
    results = {}
    for name, settings in STATES.items():
        results[name] = {
            "alone": car_state_after_fit(x, y, None, settings),
            "padded": car_state_after_fit(padded_x, padded_y, zero, settings),
            "weight_two": car_state_after_fit(x, y, double, settings),
            "twice": car_state_after_fit(twice_x, twice_y, None, settings),
        }
    pathlib.Path(out).write_text(json.dumps(results))


def soft_ties(out):
    """CAR's loss over 3 steps on label-smoothed soft labels (the light classes tie), and on soft
    labels without ties, for each state; and the classes each row counts toward."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 6)).astype("float32")
    labels = rng.integers(0, K, 16)
    smoothed = (0.9 * np.eye(K)[labels] + 0.1 / K).astype("float32")  # four light classes tie
    untied = rng.dirichlet(np.ones(K), 16).astype("float32")
    results = {}
    for name, settings in STATES.items():
        for kind, target in (("smoothed", smoothed), ("untied", untied)):
            model = linear_model()
            loss = car_tf.CARLoss(COUNTS, spec_lambda=0.5, beta=0.6, **settings)
            model.compile(keras.optimizers.SGD(0.1), loss=loss)
            history = model.fit(x, target, batch_size=16, epochs=3, shuffle=False, verbose=0,
                                callbacks=[car_tf.CARCallback(loss)])
            results[f"{name}_{kind}"] = {"loss": [float(v) for v in history.history["loss"]],
                                         "sigma": [float(v) for v in history.history["car_spectral_norm"]]}
    ids, _ = car_tf.car.confusion.label_memberships(smoothed, K)
    results["smoothed_ids"] = keras.ops.convert_to_numpy(ids).tolist()
    results["labels"] = labels.tolist()
    pathlib.Path(out).write_text(json.dumps(results))


def nonfinite(out):
    """The training losses of CAR given NaN logits, or an infinite lambda, with SVD and power
    iteration: NaN (which the trainer's NaN guard stops), or the error raised instead."""
    results = {}
    for method in ("svd", "power"):
        for case in ("nan_logits", "infinite_lambda"):
            x, y = samples(16, seed=4)
            if case == "nan_logits":
                x[3, 0] = np.nan
            model = linear_model()
            loss = car_tf.CARLoss(COUNTS, spectral_method=method,
                                  spec_lambda=np.inf if case == "infinite_lambda" else 0.3)
            model.compile(keras.optimizers.SGD(0.1), loss=loss)
            try:
                history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                                    callbacks=[car_tf.CARCallback(loss)])
                results[f"{method}_{case}"] = [float(v) for v in history.history["loss"]]
            except Exception as error:  # what the user saw instead of the NaN guard's sentence
                results[f"{method}_{case}"] = f"{type(error).__name__}: {str(error)[:300]}"
    pathlib.Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    command, out = sys.argv[1:3]
    globals()[command](out)
