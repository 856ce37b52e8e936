"""Classifier re-balancing on a finished run: a new run directory in minutes.

    python -m car_tf.rebalance --model_dir=runs/ce --method=crt|tau_norm|posthoc_la [--output_dir=...]

- ``crt`` (Kang et al., "Decoupling Representation and Classifier", ICLR 2020): a new linear
  classifier trained from scratch on the run's frozen features with class-balanced sampling (each
  class drawn with probability 1/K, then one of its images).
- ``tau_norm`` (same paper): each class's weight vector w_j becomes w_j / ||w_j||^tau.
- ``posthoc_la`` (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021): predict
  argmax_j f_j(x) - tau log pi_j with the training prior pi; folded into the classifier's bias.

tau is chosen on a validation split carved from the training images (``--validation_fraction``
of each class, the same images as ``car_tf.train --validation_fraction`` holds out), by mean
per-class accuracy; the test split is never used to choose. The run's own head saw those images
in training, so the choice favours its fit; README says so. The features come from the shared
feature cache (car_tf.models.feature_cache). The output directory is an ordinary run (run.json,
model.keras: images -> logits, report.json, rebalance.json with the search) that
``car_tf.evaluate``, ``python -m export`` and ``car_tf.compare`` read.
"""

import dataclasses
import json
import pathlib
import shutil
import typing

import keras
import numpy as np
from absl import flags, logging

from car_tf import cli, flags_from_config

from car_tf.data import sampling
from car_tf.data.flags import PostHocRun, base_run_data_flags, define_posthoc_flags
from car_tf.data.loading import VALIDATION_SEED, load_datasets
from car_tf.data.longtail import stratified_split
from car_tf.evaluation import metrics, report
from car_tf.evaluation.predictors import load_keras_model, read_run_info
from car_tf.models.feature_cache import cached_features
from car_tf.method import setting

METHODS = ("crt", "tau_norm", "posthoc_la")
TAUS = {"tau_norm": np.round(np.arange(0.0, 1.01, 0.1), 2), "posthoc_la": np.round(np.arange(0.0, 2.01, 0.25), 2)}


@dataclasses.dataclass(frozen=True)
class RebalanceConfig:
    """What ``rebalance`` does; each field is a flag of ``python -m car_tf.rebalance``."""

    method: typing.Literal[METHODS] = setting(help="Re-balancing: crt, tau_norm or posthoc_la.")
    validation_fraction: float = setting(0.2, lower_bound=0.01, upper_bound=0.9,
                                         help="Share of each class's training images tau is chosen on.")
    crt_epochs: int = setting(10, lower_bound=1,
                              help="Epochs of cRT's classifier (class-balanced epochs of N samples).")
    crt_lr: float = setting(0.1, lower_bound=1e-8,
                            help="Peak SGD learning rate of cRT's classifier (cosine decay, momentum 0.9).")
    batch_size: int = setting(128, lower_bound=1, help="cRT's batch size.")
    seed: int = setting(0, help="Seed of cRT's initialisation and sampling.")


def define_flags(flag_values=flags.FLAGS):
    """Defines this command's flags: the data flags, PostHocRun's and RebalanceConfig's fields."""
    return define_posthoc_flags(RebalanceConfig, flag_values)


FLAGS = flags.FLAGS


def tau_normalized(kernel, tau):
    """A Dense kernel [D, K] whose column j is w_j / ||w_j||^tau."""
    norms = np.linalg.norm(kernel, axis=0, keepdims=True)
    return kernel / np.maximum(norms, 1e-12) ** tau


def adjusted_bias(bias, counts, tau):
    """The bias that makes a linear classifier predict f(x) - tau log(prior)."""
    prior = np.asarray(counts, np.float64) / np.sum(counts)
    return (bias - tau * np.log(prior)).astype(np.float32)


def train_crt(features, labels, num_classes, *, epochs, lr, batch_size, seed):
    """(kernel [D, K], bias [K]) of a linear classifier trained from scratch with class-balanced batches."""
    keras.utils.set_random_seed(seed)
    steps = max(1, len(labels) // batch_size)
    head = keras.Sequential([keras.Input(features.shape[1:]), keras.layers.Dense(num_classes)])
    schedule = keras.optimizers.schedules.CosineDecay(lr, epochs * steps)
    head.compile(keras.optimizers.SGD(schedule, momentum=0.9),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for epoch in range(epochs):
        picks = sampling.epoch_indices(labels, "class_balanced", seed, epoch, epochs, steps * batch_size)
        head.fit(features[picks], labels[picks], batch_size=batch_size, initial_epoch=epoch, epochs=epoch + 1,
                 shuffle=False, verbose=0)
    kernel, bias = head.layers[-1].get_weights()
    return kernel, bias


def balanced_accuracy(logits, labels, num_classes):
    confusion = metrics.confusion_matrix(np.argmax(logits, -1), labels, num_classes)
    return float(np.nanmean(metrics.per_class_accuracy(confusion)))


def choose_tau(method, kernel, bias, counts, features, labels):
    """(chosen tau, [(tau, validation mean per-class accuracy)]) of tau_norm or posthoc_la."""
    scores = []
    for tau in TAUS[method]:
        new_kernel, new_bias = rebalanced(method, kernel, bias, counts, tau)
        scores.append((float(tau), balanced_accuracy(features @ new_kernel + new_bias, labels, len(counts))))
    best = max(scores, key=lambda item: (item[1], -abs(item[0] - 1.0)))[0]  # ties: closest to tau = 1
    return best, scores


def rebalanced(method, kernel, bias, counts, tau):
    if method == "tau_norm":
        return tau_normalized(kernel, tau), bias
    return kernel, adjusted_bias(bias, counts, tau)


def linear_classifier(model):
    """The model's layer named "classifier" (at the top or in a nested head), a Dense layer with a bias."""
    found = [layer for layer in _all_layers(model) if layer.name == "classifier"]
    if not found:
        raise ValueError("the run's model has no layer named 'classifier'; re-balance a run written by car_tf.train.")
    layer = found[0]
    if not isinstance(layer, keras.layers.Dense) or not layer.use_bias:
        raise ValueError(f"the run's classifier is a {type(layer).__name__}, not a linear layer with a bias; "
                         "re-balance a run trained with --head=linear (its losses: ce, logit_adjusted, car ...).")
    return layer


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def rebalance(model_dir, output_dir, config, data_config, progress=True):
    """Re-balances the run in ``model_dir`` as ``config`` (a RebalanceConfig) says, on the data
    ``data_config`` (a DataConfig) describes; writes the new run directory and returns its test report."""
    model_dir, output_dir, method = pathlib.Path(model_dir), pathlib.Path(output_dir), config.method
    info = read_run_info(model_dir)
    model = load_keras_model(model_dir / "model.keras")
    layer = linear_classifier(model)
    train, test, recipe, image_size = load_datasets(data_config)
    if train.class_names != list(info["class_names"]):
        raise ValueError(f"the data's classes differ from those {model_dir} was trained on; pass its data flags.")
    image_size = int(info.get("image_size") or image_size)
    common = dict(recipe=recipe, image_size=image_size, progress=progress)
    train_x, train_y = cached_features(model, train, split="train", **common)
    test_x, test_y = cached_features(model, test, split="test", **common)
    counts = np.asarray(info["train_counts"])
    kernel, bias = layer.get_weights()
    record = {"method": method, "base_run": str(model_dir.resolve())}
    if method == "crt":
        kernel, bias = train_crt(train_x, train_y, len(counts), epochs=config.crt_epochs,
                                 lr=config.crt_lr, batch_size=config.batch_size, seed=config.seed)
        record.update(epochs=config.crt_epochs, lr=config.crt_lr, seed=config.seed)
    else:
        _, held_out = stratified_split(train_y, config.validation_fraction, VALIDATION_SEED)
        tau, scores = choose_tau(method, kernel, bias, counts, train_x[held_out], train_y[held_out])
        kernel, bias = rebalanced(method, kernel, bias, counts, tau)
        record.update(tau=tau, validation_fraction=config.validation_fraction,
                      validation_mean_class_accuracy={f"{t:g}": s for t, s in scores})
        logging.info("%s: tau %g chosen on validation (mean per-class accuracy %.4f).", method, tau, dict(scores)[tau])
    layer.set_weights([kernel, bias])
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save(output_dir / "model.keras")
    run_info = {**info, "method": f"{info.get('method', 'unknown')}+{method}", "rebalance": record}
    (output_dir / "run.json").write_text(json.dumps(run_info, indent=1))
    (output_dir / "rebalance.json").write_text(json.dumps(record, indent=1) + "\n")
    if (model_dir / "flags.txt").is_file():  # the data flags, for export's parity check on real images
        shutil.copyfile(model_dir / "flags.txt", output_dir / "flags.txt")
    logits = test_x @ kernel + bias
    thresholds = {k: info[k] for k in ("many_threshold", "few_threshold") if k in info}
    test_report = metrics.per_class_report(logits, test_y, counts, train.class_names, **thresholds)
    confusion = metrics.confusion_matrix(logits.argmax(-1), test_y, len(counts))
    report.write_report(test_report, output_dir, confusion=confusion)
    print(report.format_table(test_report))
    return test_report


def main(argv):
    del argv
    command = flags_from_config.section_from_flags(PostHocRun, FLAGS)
    config = flags_from_config.section_from_flags(RebalanceConfig, FLAGS)
    model_dir = pathlib.Path(command.model_dir)
    if not (model_dir / "model.keras").is_file():
        raise ValueError(f"{model_dir}/model.keras does not exist; finish training the run first.")
    output_dir = command.output_dir or model_dir / config.method
    rebalance(model_dir, output_dir, config, base_run_data_flags(model_dir, FLAGS), progress=command.progress)


if __name__ == "__main__":
    define_flags()
    cli.run(main, "car_tf.rebalance")
