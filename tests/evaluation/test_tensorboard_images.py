"""PerClassEvaluation writes the confusion matrix and accuracy-vs-count images to TensorBoard."""

import collections

import keras
import numpy as np
import tensorflow as tf

from car_tf.evaluation import report as report_writers
from car_tf.evaluation.callback import (
    ACCURACY_TAG,
    CONFUSION_TAG,
    PerClassEvaluation,
    confusion_rows,
)
from car_tf.evaluation.metrics import confusion_matrix, per_class_report
from car_tf.evaluation.predictors import KerasPredictor, predict_dataset


def read_images(folder):
    """{tag: {step: uint8 image [H, W, C]}} from the event files of a TensorBoard run folder."""
    images = collections.defaultdict(dict)
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "images", value.tag
                encoded = tf.make_ndarray(value.tensor)
                width, height = int(encoded[0]), int(encoded[1])
                image = tf.io.decode_png(encoded[2]).numpy()
                assert image.shape[:2] == (height, width)
                images[value.tag][event.step] = image
    return images


def toy_run(tmp_path, num_classes, counts, epochs=2, seed=0):
    """A tiny classifier fitted with PerClassEvaluation(log_dir=tmp_path); returns the pieces."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), 3).astype(np.int32)
    images = rng.uniform(0, 255, size=(labels.size, 4, 4, 3)).astype(np.float32)
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
         keras.layers.Dense(num_classes)]
    )
    model.compile(keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    test_ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    names = [f"class_{j}" for j in range(num_classes)]
    evaluation = PerClassEvaluation(test_ds, counts, log_dir=tmp_path, class_names=names)
    model.fit(images, labels, batch_size=8, epochs=epochs, verbose=0, callbacks=[evaluation])
    scores, true = predict_dataset(KerasPredictor(model), test_ds)
    report = per_class_report(scores, true, counts, names)
    confusion = confusion_matrix(scores.argmax(-1), true, num_classes)
    return evaluation, report, confusion, names


def test_each_epoch_logs_the_confusion_and_accuracy_images(tmp_path):
    counts = [200, 50, 30, 5]
    evaluation, report, confusion, names = toy_run(tmp_path, 4, counts)
    images = read_images(tmp_path / "tb" / "per_class")
    assert set(images) == {CONFUSION_TAG, ACCURACY_TAG}
    for tag in images:
        assert sorted(images[tag]) == [0, 1]  # one image per epoch, stepped like Keras's scalars
        for image in images[tag].values():
            assert image.shape[-1] == 3 and image.dtype == np.uint8
    assert evaluation.last_report == report
    # The last epoch's images are exactly the report's plots of the trained model.
    expected = report_writers.figure_pixels(
        report_writers.confusion_figure(confusion, names, list(range(4)), "P(predicted | true)")
    )
    np.testing.assert_array_equal(images[CONFUSION_TAG][1], expected)
    expected = report_writers.figure_pixels(report_writers.accuracy_vs_count_figure(report))
    np.testing.assert_array_equal(images[ACCURACY_TAG][1], expected)
    assert images[CONFUSION_TAG][0].shape == expected_confusion_shape(4, 4)


def expected_confusion_shape(rows, columns, dpi=100):
    """Pixel shape of confusion_figure: 0.25 inch a class on either axis (capped at 24 inches)."""
    return (round(dpi * min(3 + 0.25 * rows, 24)), round(dpi * min(4 + 0.25 * columns, 24)), 3)


def test_many_classes_show_the_rows_of_the_30_worst(tmp_path):
    num_classes = 60
    counts = list(np.linspace(300, 2, num_classes).astype(int))
    _, report, confusion, names = toy_run(tmp_path, num_classes, counts, epochs=1)
    images = read_images(tmp_path / "tb" / "per_class")
    assert images[CONFUSION_TAG][0].shape == expected_confusion_shape(30, num_classes)
    expected = report_writers.figure_pixels(report_writers.confusion_figure(
        confusion, names, confusion_rows(report),
        "P(predicted | true), the 30 classes of lowest recall",
    ))
    np.testing.assert_array_equal(images[CONFUSION_TAG][0], expected)


def test_worst_rows_and_their_values_match_numpy():
    rng = np.random.default_rng(1)
    num_classes = 60
    labels = np.repeat(np.arange(num_classes), 5)
    # Class j is right with probability j / 60, so recall rises with the class id, ties broken
    # by the sampling; class 7 has no test sample and must not be chosen.
    correct = rng.uniform(size=labels.size) < labels / num_classes
    predictions = np.where(correct, labels, rng.integers(0, num_classes, labels.size))
    keep = labels != 7
    labels, predictions = labels[keep], predictions[keep]
    scores = np.eye(num_classes)[predictions] * 5.0
    report = per_class_report(scores, labels, [10] * num_classes)
    counts = confusion_matrix(predictions, labels, num_classes)
    recall = np.diag(counts) / np.maximum(counts.sum(axis=0), 1)
    recall[7] = np.inf
    expected_rows = list(np.argsort(recall, kind="stable")[:30])
    rows = confusion_rows(report)
    assert rows == expected_rows and 7 not in rows
    names = [f"c{j}" for j in range(num_classes)]
    figure = report_writers.confusion_figure(counts, names, rows)
    axes = figure.axes[0]
    shown = np.asarray(axes.images[0].get_array())
    rates = counts.T / np.maximum(counts.sum(axis=0), 1)[:, None]  # row j: P(predicted | true j)
    np.testing.assert_allclose(shown, rates[expected_rows])
    np.testing.assert_allclose(shown.sum(axis=1), 1.0)  # every shown class has test samples
    assert [t.get_text() for t in axes.get_yticklabels()] == [names[j] for j in expected_rows]
    report_writers.figure_pixels(figure)  # closes it
    small = per_class_report(np.eye(4)[[0, 1, 2, 3, 0]], [0, 1, 2, 3, 1], [5, 5, 5, 5])
    assert confusion_rows(small) == [0, 1, 2, 3]
