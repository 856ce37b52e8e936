"""--sampler: the re-sampling families (Kang et al., ICLR 2020) in every training stream.

The drawn class histograms against each family's distribution (chi-square), progressive moving
from instance to class-balanced, determinism per (seed, epoch), one global stream under 1 and 2
replicas, the same draws in the tf.data, NumPy and cached-feature streams, and a killed
class-balanced run resuming to the weights of an uninterrupted one.
"""

import json

import keras
import numpy as np
import pytest

from car_tf import train as train_cli
from car_tf.data import arrays, feature_streams, pipelines, sampling, sources
from car_tf.data.sources import LabeledData
from car_tf.training import checkpointing
from car_tf.data.config import DataConfig

from strategy_helpers import strategies
from train_helpers import COUNTS, parse, tiny_args

COUNTS_LT = np.array([1000, 300, 100, 30])  # a long tail: N = 1430, K = 4
LABELS_LT = np.repeat(np.arange(COUNTS_LT.size), COUNTS_LT)
Z_99_99 = 3.719  # the standard normal's 0.9999 quantile


def chi2_quantile(df, z=Z_99_99):
    """The chi-square quantile of ``z`` (Wilson-Hilferty; within 1% for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def assert_drawn_from(histogram, probabilities):
    """Pearson's chi-square of ``histogram`` against ``probabilities`` under its 0.9999 quantile."""
    histogram = np.asarray(histogram, np.float64)
    expected = histogram.sum() * np.asarray(probabilities)
    statistic = np.sum((histogram - expected) ** 2 / expected)
    assert statistic < chi2_quantile(len(expected) - 1), (histogram, expected.round(1), statistic)


def drawn_classes(sampler, seed=0, epoch=0, epochs=1, labels=LABELS_LT):
    indices = sampling.epoch_indices(labels, sampler, seed, epoch, epochs, labels.size)
    return np.bincount(labels[indices], minlength=labels.max() + 1)


def test_class_probabilities_are_the_four_families():
    counts = np.array([100, 25, 4, 1, 0])  # the last class has no sample
    get = sampling.class_probabilities
    np.testing.assert_allclose(get(counts, "instance"), counts / 130)
    np.testing.assert_allclose(get(counts, "class_balanced"), [0.25, 0.25, 0.25, 0.25, 0])
    np.testing.assert_allclose(get(counts, "square_root"), np.array([10, 5, 2, 1, 0]) / 18)
    np.testing.assert_allclose(get(counts, "progressive", 0, 10), get(counts, "instance"))
    balanced = np.array([1, 1, 1, 1, 0]) / 4
    np.testing.assert_allclose(get(counts, "progressive", 4, 10), 0.6 * counts / 130 + 0.4 * balanced)
    np.testing.assert_allclose(get(counts, "progressive", 10, 10), get(counts, "class_balanced"))
    for sampler in sampling.SAMPLERS:
        assert np.isclose(get(counts, sampler, 3, 10).sum(), 1.0)
    gap = np.array([0, 0, 0, 2])  # class 1 has no sample: never drawn, the others half each
    drawn = np.bincount(gap[sampling.epoch_indices(gap, "class_balanced", 0, 0, 1, 400)], minlength=3)
    assert drawn[1] == 0 and 150 < drawn[0] < 250


@pytest.mark.parametrize("sampler", ["class_balanced", "square_root", "progressive"])
@pytest.mark.parametrize("seed", [0, 1])
def test_an_epochs_class_histogram_fits_the_samplers_distribution(sampler, seed):
    epoch, epochs = 3, 6
    histogram = drawn_classes(sampler, seed, epoch, epochs)
    assert_drawn_from(histogram, sampling.class_probabilities(COUNTS_LT, sampler, epoch, epochs))
    # Not the instance distribution: the tail is drawn far more often than its 30 images.
    assert histogram[-1] > 3 * COUNTS_LT[-1]
    with pytest.raises(AssertionError):
        assert_drawn_from(histogram, sampling.class_probabilities(COUNTS_LT, "instance"))


def test_instance_draws_each_sample_once_and_class_balanced_draws_uniformly_within_a_class():
    indices = sampling.epoch_indices(LABELS_LT, "instance", 0, 0, 1, 1400)
    assert len(set(indices.tolist())) == 1400  # a shuffle: each sample at most once
    assert_drawn_from(np.bincount(LABELS_LT[indices], minlength=4), COUNTS_LT / COUNTS_LT.sum())
    # The 30 images of the smallest class, over 20 class-balanced epochs: each equally often.
    tail = np.flatnonzero(LABELS_LT == 3)
    drawn = np.concatenate([sampling.epoch_indices(LABELS_LT, "class_balanced", 0, e, 20, 1430) for e in range(20)])
    drawn = drawn[LABELS_LT[drawn] == 3]
    assert set(drawn.tolist()) <= set(tail.tolist())
    assert_drawn_from(np.bincount(drawn - tail[0], minlength=tail.size), np.full(tail.size, 1 / tail.size))


def test_progressive_moves_from_instance_to_class_balanced():
    epochs = 8
    histograms = [drawn_classes("progressive", 0, e, epochs) for e in range(epochs)]
    assert_drawn_from(histograms[0], COUNTS_LT / COUNTS_LT.sum())  # epoch 0 is instance sampling
    head_share = [h[0] / h.sum() for h in histograms]
    tail_share = [h[-1] / h.sum() for h in histograms]
    assert head_share[0] > 0.65 and head_share[-1] < 0.35  # 1000/1430 -> 1/8 * 1000/1430 + 7/8 * 1/4
    assert tail_share[0] < 0.04 and tail_share[-1] > 0.2
    # Each epoch's target lies on the line between the two, and the draws follow it.
    for epoch in (2, 5):
        assert_drawn_from(histograms[epoch], sampling.class_probabilities(COUNTS_LT, "progressive", epoch, epochs))
    targets = [sampling.class_probabilities(COUNTS_LT, "progressive", e, epochs)[-1] for e in range(epochs)]
    np.testing.assert_allclose(np.diff(targets), np.diff(targets)[0])  # linear in the epoch


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_the_indices_depend_only_on_seed_and_epoch(sampler):
    draw = lambda seed, epoch: sampling.epoch_indices(LABELS_LT, sampler, seed, epoch, 5, 1400)  # noqa: E731
    np.testing.assert_array_equal(draw(3, 2), draw(3, 2))
    assert not np.array_equal(draw(3, 2), draw(3, 1))
    assert not np.array_equal(draw(3, 2), draw(4, 2))
    assert draw(3, 2).dtype == np.int64


def test_an_unknown_sampler_is_one_sentence_naming_the_flag_and_the_choices():
    for refuse in (lambda: DataConfig(sampler="balanced"),
                   lambda: sampling.epoch_indices(LABELS_LT, "balanced", 0, 0, 1, 10)):
        with pytest.raises(ValueError) as refusal:
            refuse()
        message = str(refusal.value)
        assert "--sampler=" in message and "\n" not in message
        assert all(name in message for name in sampling.SAMPLERS)
    assert DataConfig().sampler == "instance" and DataConfig(sampler="progressive").sampler == "progressive"


def test_the_flag_parses_and_is_recorded():
    config = train_cli.config_from_flags(parse(["--model_dir=x", "--sampler=square_root"]))
    assert config.data.sampler == "square_root" and config.flag_values()["sampler"] == "--sampler=square_root"
    assert train_cli.config_from_flags(parse(["--model_dir=x"])).data.sampler == "instance"


# The three streams. Image i is filled with the value i + 1 (CIFAR crops keep the centre), so the
# brightest pixel of a batch element names the sample it was drawn from; the features are i.

def source_images(labels):
    n = len(labels)
    images = np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, 8, 8, 3))
    return LabeledData(images=images.copy(), labels=np.asarray(labels), class_names=["a", "b", "c", "d"])


def drawn_sources(batches):
    return np.concatenate([np.asarray(x).reshape(len(x), -1).max(axis=1).astype(np.int64) - 1 for x, _ in batches])


SMALL_LABELS = np.repeat(np.arange(4), [120, 40, 12, 4])  # 176 samples


@pytest.mark.parametrize("sampler", ["class_balanced", "progressive"])
def test_tf_data_numpy_and_feature_streams_draw_the_same_samples(sampler):
    data = source_images(SMALL_LABELS)
    options = dict(batch_size=16, seed=7, start_epoch=1, epochs=4, sampler=sampler)
    numpy_stream = list(arrays.train_batches(data, image_size=8, **options))
    numpy_drawn = drawn_sources(numpy_stream)
    tf_drawn = drawn_sources(pipelines.train_dataset(data, recipe="cifar", image_size=8, **options))
    features = np.arange(len(SMALL_LABELS), dtype=np.float32)[:, None]
    feature_stream = feature_streams.training_stream(features, SMALL_LABELS, **options)
    feature_batches = [(x.numpy(), y.numpy()) for x, y in feature_stream]
    feature_drawn = np.concatenate([x[:, 0] for x, _ in feature_batches]).astype(np.int64)
    assert numpy_drawn.size == 3 * 176 // 16 * 16
    np.testing.assert_array_equal(tf_drawn, numpy_drawn)
    np.testing.assert_array_equal(feature_drawn, numpy_drawn)
    np.testing.assert_array_equal(np.concatenate([y for _, y in numpy_stream]), SMALL_LABELS[numpy_drawn])
    np.testing.assert_array_equal(np.concatenate([y for _, y in feature_batches]), SMALL_LABELS[numpy_drawn])
    # Each epoch is epoch_indices' draw of that (seed, epoch): a resumed stream repeats it.
    expected = [sampling.epoch_indices(SMALL_LABELS, sampler, 7, e, 4, 176) for e in (1, 2, 3)]
    np.testing.assert_array_equal(numpy_drawn, np.concatenate(expected))


def test_instance_streams_keep_their_shuffles():
    """instance is the order the streams had before samplers: each sample at most once an epoch."""
    data = source_images(SMALL_LABELS)
    for drawn in (
        drawn_sources(arrays.train_batches(data, image_size=8, batch_size=16, seed=0, epochs=1)),
        drawn_sources(pipelines.train_dataset(data, recipe="cifar", image_size=8, batch_size=16, seed=0)),
    ):
        assert drawn.size == 176 and len(set(drawn.tolist())) == 176
    np.testing.assert_array_equal(
        feature_streams.epoch_order(SMALL_LABELS, 16, 0, 0), np.random.default_rng([0, 0, 0]).permutation(176)
    )


def test_one_and_two_replicas_draw_the_same_global_batches():
    data = source_images(SMALL_LABELS)

    def global_labels(strategy):
        dataset = pipelines.train_dataset(data, recipe="cifar", image_size=8, batch_size=16, seed=3, epochs=2,
                                          sampler="class_balanced")
        out = []
        for _, labels in strategy.experimental_distribute_dataset(dataset):
            parts = [t.numpy() for t in strategy.experimental_local_results(labels)]
            out.append(np.concatenate(parts))
        return np.concatenate(out), [len(p) for p in parts]

    (one, one_split), (two, two_split) = (global_labels(s) for s in strategies().values())
    assert one_split == [16] and two_split == [8, 8]
    np.testing.assert_array_equal(one, two)
    expected = [sampling.epoch_indices(SMALL_LABELS, "class_balanced", 3, e, 2, 176) for e in (0, 1)]
    np.testing.assert_array_equal(one, SMALL_LABELS[np.concatenate(expected)])


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


@pytest.mark.slow
def test_a_killed_class_balanced_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_folder, tmp_path,
                                                                                     monkeypatch):
    def run(name, *extra):
        args = tiny_args(tiny_folder, tmp_path / name, "--sampler=class_balanced", *extra)
        return train_cli.train_and_evaluate(parse(args))

    draws = []
    epoch_indices = sampling.epoch_indices

    def recorded(labels, sampler, seed, epoch, epochs, count):
        draws.append((sampler, epoch))
        return epoch_indices(labels, sampler, seed, epoch, epochs, count)

    monkeypatch.setattr(sampling, "epoch_indices", recorded)
    run("whole")
    save = checkpointing.save

    def save_then_die(model, directory, epochs):
        save(model, directory, epochs)
        if epochs == 1:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing, "save", save_then_die)
        with pytest.raises(Killed):
            run("parts")
    del draws[:]
    run("parts")  # resumes after epoch 1
    assert sorted(set(draws)) == [("class_balanced", 1), ("class_balanced", 2)]
    weights = [keras.saving.load_model(tmp_path / name / "model.keras").weights for name in ("whole", "parts")]
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a), atol=1e-6)
    info = json.loads((tmp_path / "parts" / "run.json").read_text())
    assert info["train_counts"] == list(COUNTS.values())  # the data's counts, not the draws'
    assert "--sampler=class_balanced" in (tmp_path / "parts" / "flags.txt").read_text().splitlines()


@pytest.mark.slow
def test_a_frozen_backbone_run_trains_on_the_sampled_feature_stream(tiny_folder, tmp_path, monkeypatch):
    from car_tf.models import feature_cache

    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(tmp_path / "cache"))
    draws = []
    epoch_indices = sampling.epoch_indices

    def recorded(labels, sampler, seed, epoch, epochs, count):
        draws.append((sampler, epoch, epochs))
        return epoch_indices(labels, sampler, seed, epoch, epochs, count)

    monkeypatch.setattr(sampling, "epoch_indices", recorded)
    args = tiny_args(tiny_folder, tmp_path / "frozen", "--frozen_backbone", "--lr_schedule=constant",
                     "--sampler=progressive")
    train_cli.train_and_evaluate(parse(args))
    assert draws == [("progressive", e, 3) for e in range(3)]


def test_a_progressive_run_cannot_be_extended_since_its_draws_depend_on_the_length():
    from car_tf.training import config as run_config
    from car_tf.training import trainer

    def extendable(sampler):
        config = run_config.TrainConfig(
            run=run_config.RunConfig(model_dir="unused"), data=run_config.DataConfig(sampler=sampler),
            optimizer=run_config.OptimizerConfig(epochs=6, lr_schedule="constant", warmup_epochs=0))
        return trainer.done_epochs_unchanged(config, "ce", stored_epochs=3, steps=4, epochs_done=3)

    assert extendable("class_balanced") and not extendable("progressive")
