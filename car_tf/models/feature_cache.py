"""Features of a frozen backbone, computed once and kept on disk.

A backbone that does not move during a run (``--frozen_backbone``, DLSA, classifier re-balancing)
maps every image to the same features each epoch, so they are computed once. The cache of a
split is one ``.npz`` file (see ``FeatureCache``) named by a digest of everything the features
depend on: the feature extractor's weights and architecture, the image size and recipe, and the
split's images and labels. A second method or seed on the same data reuses it; changed weights,
images or size give another name, never a stale file. A file is written under a temporary name
and renamed into place, so a process killed mid-write leaves no cache that looks complete.

The cache folder is ``$CAR_TF_CACHE_DIR/features`` (default ``~/.cache/car_tf/features``).
"""

import dataclasses
import hashlib
import os
import pathlib
import zipfile

import keras
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from car_tf.data import sources
from car_tf.models.registry import features_model

FORMAT_VERSION = "1"  # part of every digest: a change of the file's layout gives new names
EXTRACTION_BATCH = 64


@dataclasses.dataclass
class FeatureCache:
    """One split's cached features.

    features: float32 [N, D], the output of the model's layer named "features" (inference mode);
    labels: int32 [N] class ids; class_names: [K] names (may be empty); source_model: what the
    features came from (a model file or a weights digest); split: "train", "test", ...
    """

    features: np.ndarray
    labels: np.ndarray
    class_names: list
    source_model: str
    split: str


def save_feature_cache(path, cache):
    """Writes ``cache`` to ``path`` (.npz) through a temporary file and a rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(
        tmp,
        features=np.asarray(cache.features, np.float32),
        labels=np.asarray(cache.labels, np.int32),
        class_names=np.asarray(list(cache.class_names), dtype=str),
        source_model=np.asarray(str(cache.source_model)),
        split=np.asarray(str(cache.split)),
    )
    os.replace(tmp, path)


def load_feature_cache(path):
    """Reads a file written by ``save_feature_cache``; returns a ``FeatureCache``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature cache {path} does not exist; extract the features first.")
    with np.load(path, allow_pickle=False) as data:
        missing = {"features", "labels", "class_names", "source_model", "split"} - set(data.files)
        if missing:
            raise ValueError(f"feature cache {path} lacks {sorted(missing)}; delete it so it is extracted again.")
        return FeatureCache(
            data["features"],
            data["labels"],
            [str(n) for n in data["class_names"]],
            str(data["source_model"]),
            str(data["split"]),
        )


def cache_dir():
    """The folder of the shared feature cache."""
    return sources.cache_root() / "features"


def weights_digest(extractor):
    """A digest of the extractor's architecture and weight values (hex)."""
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    digest.update(repr(tuple(extractor.input_shape)).encode())
    for weight in extractor.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def data_digest(data):
    """A digest of a split's images (their bytes, or each file's path, size and time) and labels."""
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    digest.update(np.ascontiguousarray(data.labels, np.int64).tobytes())
    digest.update("\n".join(map(str, data.class_names)).encode())
    if data.images is not None:
        digest.update(np.ascontiguousarray(data.images).tobytes())
    else:
        for path in data.paths:
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_features(model, data, *, recipe, image_size, split, progress=True, cache_folder=None):
    """(features float32 [N, D], labels int32 [N]) of ``model``'s "features" layer over ``data``.

    Read from the cache when a file with the same digest exists, else extracted (with a progress
    bar in images per second) and written. ``data`` is a ``car_tf.data.sources.LabeledData``;
    ``recipe`` and ``image_size`` are those of the run's evaluation stream (resize, no
    augmentation).
    """
    extractor = features_model(model, with_logits=False)
    key = hashlib.sha256(
        f"{weights_digest(extractor)}:{data_digest(data)}:{recipe}:{int(image_size)}".encode()
    ).hexdigest()[:32]
    path = pathlib.Path(cache_folder or cache_dir()) / f"{split}-{key}.npz"
    if path.is_file():
        try:
            cache = load_feature_cache(path)
            if len(cache.labels) == data.size:
                logging.info("Features of the %s split read from %s.", split, path)
                return cache.features, cache.labels
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # a damaged file is extracted again
            logging.warning("Feature cache %s is unreadable (%s); extracting again.", path, error)
    features, labels = extract(extractor, data, recipe=recipe, image_size=image_size, split=split,
                               progress=progress)
    try:
        save_feature_cache(path, FeatureCache(features, labels, data.class_names, key, split))
        logging.info("Features of the %s split cached in %s.", split, path)
    except OSError as error:
        logging.warning("Could not write the feature cache %s (%s); set $%s to a writable folder.",
                        path, error, sources.CACHE_DIR_ENV)
    return features, labels


def extract(extractor, data, *, recipe, image_size, split="", progress=True, batch_size=EXTRACTION_BATCH):
    """Runs ``extractor`` (images -> features) over ``data``'s evaluation stream, in order."""
    from car_tf.backend import compiled_inference
    from car_tf.data import streams

    batches = streams.evaluation_stream(data, recipe=recipe, image_size=image_size, batch_size=batch_size)
    call = compiled_inference(extractor)
    features, labels = [], []
    with tqdm(total=data.size, desc=f"features {split}".strip(), unit="img", disable=not progress) as bar:
        for images, batch_labels in batches:
            features.append(np.asarray(call(np.asarray(images, np.float32)), np.float32))
            labels.append(np.asarray(batch_labels).astype(np.int32).reshape(-1))
            bar.update(len(labels[-1]))
    if not features:
        raise ValueError(f"the {split or 'given'} split has no image; check the data flags or the split list.")
    return np.concatenate(features), np.concatenate(labels)


def head_model(model):
    """features [B, D] -> logits: the layers of ``model`` after its "features" layer, shared.

    Training this model trains ``model``'s head in place, so ``model`` (images -> logits) is the
    deployable network afterwards. Its input passes through an identity layer named "features",
    so what reads a model's features (the decoupled loss's terms, DLSA) reads them here too.
    """
    layers = model.layers
    try:
        start = [layer.name for layer in layers].index("features")
    except ValueError:
        raise ValueError(f"model {model.name!r} has no layer named 'features'; build it with "
                         "car_tf.models.create_model.") from None
    inputs = keras.Input(shape=tuple(layers[start].output.shape[1:]), name="backbone_features")
    outputs = keras.layers.Identity(name="features")(inputs)
    for layer in layers[start + 1 :]:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_head")
