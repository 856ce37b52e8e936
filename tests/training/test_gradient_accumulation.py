"""--gradient_accumulation_steps=N: N batches of B update the weights as one batch of N * B.

Keras's optimizers add up the N batches' gradients and update once with their *mean* (not their
sum), so for a loss that averages over its batch the update is the one of the pooled batch. The
learning-rate schedule counts batches (car_tf.training.optimizers), so its epochs stay epochs.
What runs once per batch still does: CAR's EMA takes one update per batch (the recurrence of the
CARLoss docstring), batch norm normalises each batch by its own statistics and updates its moving
statistics once per batch. LDAM-DRW's re-weighting is chosen per epoch and is unaffected.
"""

import json

import keras
import numpy as np
import pytest

import car_tf
from backends.backend_runs import COUNTS, tiny_model, toy_data
from car.test_math import (
    np_batch_confusion, np_confusion_with_fixed_gate, np_frequency_weights, np_softmax, numeric_gradient,
)
from car_tf import train as train_cli
from car_tf.losses.registry import callbacks_for_loss, get_base_loss
from car_tf.training import config as run_config
from car_tf.training import optimizers, trainer
from train_helpers import parse, tiny_args

SMALL, N = 32, 2  # micro-batch size and accumulation steps, against one batch of SMALL * N
EPOCHS = 3


def optimizer_for(batch_size, accumulation, steps_per_epoch, model, **options):
    """The optimizer car_tf.train builds: warm-up of 1 epoch, then a decay after epoch 2."""
    settings = {"epochs": EPOCHS, "batch_size": batch_size, "gradient_accumulation_steps": accumulation, "lr": 0.2,
                "momentum": 0.0, "weight_decay": 0.0, "warmup_epochs": 1, "lr_decay_epochs": (2,), **options}
    config = run_config.TrainConfig(run=run_config.RunConfig(model_dir="unused"),
                                    optimizer=run_config.OptimizerConfig(**settings))
    return trainer.build_optimizer(config, steps_per_epoch, model)


def weights_per_epoch(batch_size, accumulation, base="ce", **options):
    """The tiny model's weights after each epoch of a run over 128 samples (no shuffling)."""
    x, y = toy_data(n=128)
    model = tiny_model()
    loss = get_base_loss(base, COUNTS)
    steps = len(x) // batch_size
    model.compile(optimizer_for(batch_size, accumulation, steps, model, **options), loss=loss)
    snapshots = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: snapshots.append(model.get_weights()))
    model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=[*callbacks_for_loss(loss, EPOCHS), record])
    return snapshots, model.optimizer


@pytest.mark.parametrize("options", [
    {},
    # FineTuningSGD: decoupled weight decay, backbone at half the rate and frozen for the first epoch
    {"weight_decay": 1e-3, "backbone_lr_multiplier": 0.5, "freeze_backbone_epochs": 1},
], ids=["sgd", "fine_tuning_sgd"])
def test_two_batches_of_32_update_as_one_batch_of_64(options):
    accumulated, optimizer = weights_per_epoch(SMALL, N, **options)
    pooled, _ = weights_per_epoch(SMALL * N, 1, **options)
    assert optimizer.gradient_accumulation_steps == N and int(optimizer.iterations) == EPOCHS * 2  # updates
    # Every epoch (warm-up, full rate, decayed) ends with the weights of the pooled run.
    for epoch, (got, want) in enumerate(zip(accumulated, pooled)):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f"epoch {epoch}")
    initial = tiny_model().get_weights()
    if options:  # the frozen first epoch left the backbone ("features") where it started
        np.testing.assert_array_equal(accumulated[0][0], initial[0])
        assert not np.array_equal(accumulated[1][0], initial[0])
    assert not np.allclose(accumulated[-1][2], initial[2])


def test_ldam_drw_reweighting_stays_per_epoch():
    """DRW switches to balanced weights at epoch round(0.8 * 3) = 2 in both runs alike."""
    accumulated, _ = weights_per_epoch(SMALL, N, base="ldam_drw")
    pooled, _ = weights_per_epoch(SMALL * N, 1, base="ldam_drw")
    for epoch, (got, want) in enumerate(zip(accumulated, pooled)):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f"epoch {epoch}")


def test_batch_norm_statistics_update_once_per_batch():
    x, y = toy_data(n=SMALL * N)
    model = keras.Sequential([keras.Input((8,)), keras.layers.BatchNormalization(momentum=0.9, name="bn"),
                              keras.layers.Dense(len(COUNTS))])
    model.compile(keras.optimizers.SGD(0.1, **optimizers.accumulation_options(N)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=SMALL, epochs=1, shuffle=False, verbose=0)
    mean, variance = np.zeros(8), np.ones(8)
    for batch in np.split(x.astype(np.float64), N):  # one moving-average step per micro-batch
        mean = 0.9 * mean + 0.1 * batch.mean(0)
        variance = 0.9 * variance + 0.1 * batch.var(0)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), variance, rtol=1e-5, atol=1e-6)
    once = 0.1 * x.astype(np.float64).mean(0)  # what one step on the pooled batch would give
    assert not np.allclose(bn.moving_mean.numpy(), once, atol=1e-3)


def car_accumulation_reference(w, batches, lam, beta, lr):
    """CAR under accumulation in float64: (EMA after each batch, weights after each batch).

    Each batch updates Cbar = beta Cbar + (1 - beta) C_t and is scored against it (the gate
    sigmoid(f_i - f_j) carries no gradient, as released); the weights move once per N batches by
    lr times the mean of the N batches' gradients, all taken at the weights of the last update.
    """
    weights = np_frequency_weights(COUNTS, 0.2)
    k = len(COUNTS)
    ema, pending, emas, ws = np.zeros((k, k)), [], [], []
    for x, y in batches:
        fixed = x @ w

        def objective(wv, x=x, y=y, fixed=fixed, ema=ema):
            probs = np_softmax(x @ wv)
            ce = -np.log(probs[np.arange(len(y)), y]).mean()
            current = np_confusion_with_fixed_gate(fixed, probs, y)
            return ce + lam * np.linalg.norm((beta * ema + (1 - beta) * current) * weights[None, :], 2)

        pending.append(numeric_gradient(objective, w, 1e-6))
        ema = beta * ema + (1 - beta) * np_batch_confusion(fixed, y)
        if len(pending) == N:
            w = w - lr * np.mean(pending, axis=0)
            pending = []
        emas.append(ema)
        ws.append(w)
    return emas, ws


@pytest.mark.parametrize("spectral_method", ["svd", "power"])
def test_car_updates_its_ema_per_batch_and_its_weights_per_n_batches(spectral_method):
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(3, len(COUNTS))).astype("float32")
    batches = [(rng.normal(size=(7, 3)).astype("float32"), rng.integers(0, len(COUNTS), size=7))
               for _ in range(2 * N)]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(len(COUNTS), use_bias=False)])
    model.set_weights([w0])
    loss = car_tf.CARLoss(COUNTS, spec_lambda=0.5, beta=0.6, ema_init="zeros", spectral_method=spectral_method,
                          power_iterations=400, power_tolerance=1e-9)
    car_tf.attach_car_state(model, loss)
    model.compile(keras.optimizers.SGD(0.5, **optimizers.accumulation_options(N)), loss=loss)
    emas, ws = car_accumulation_reference(w0.astype(np.float64), [(x.astype(np.float64), y) for x, y in batches],
                                          lam=0.5, beta=0.6, lr=0.5)
    for step, (x, y) in enumerate(batches):
        model.train_on_batch(x, y)
        ema = keras.ops.convert_to_numpy(model.car_state.ema_matrix())
        np.testing.assert_allclose(ema, emas[step], rtol=1e-5, atol=1e-7, err_msg=f"EMA after batch {step}")
        np.testing.assert_allclose(model.get_weights()[0], ws[step], rtol=1e-5, atol=2e-5,
                                   err_msg=f"weights after batch {step}")
    assert not np.allclose(ws[0], ws[1])  # the second batch closed an update, the first did not
    np.testing.assert_array_equal(ws[0], w0.astype(np.float64))


def test_accumulation_steps_below_one_are_refused():
    with pytest.raises(ValueError, match=r"^--gradient_accumulation_steps=0 must be at least 1 "):
        run_config.OptimizerConfig(gradient_accumulation_steps=0)
    assert optimizers.accumulation_options(1) == {}  # Keras refuses 1; no accumulation is no argument


@pytest.mark.slow
def test_a_run_with_accumulation_records_its_effective_batch(tiny_folder, tmp_path):
    run = tmp_path / "run"
    flags = parse(tiny_args(tiny_folder, run, "--method=car", "--gradient_accumulation_steps=2", "--epochs=2"))
    report = train_cli.train_and_evaluate(flags)
    info = json.loads((run / "run.json").read_text())
    assert info["effective_batch_size"] == 24  # --batch_size=12 x 2
    assert "--gradient_accumulation_steps=2" in (run / "flags.txt").read_text().splitlines()
    assert 0.0 <= report["top1"] <= 1.0
