"""Frozen-feature extraction for DLSA, with an on-disk cache.

The cache is one NumPy ``.npz`` file holding:

    features      float32 [N, D]  output of the model's layer named "features" (inference mode)
    labels        int32   [N]     class ids in [0, K)
    class_names   str     [K]     names of the classes (may be empty when unknown)
    source_model  str     []      path of the model the features came from
    split         str     []      which split ("train", "test", ...)

A cache is reused only when its ``source_model`` and ``split`` match the request and the model
file is not newer than the cache; otherwise the features are extracted again and the file is
rewritten. Read one with ``load_feature_cache(path)``.
"""

import dataclasses
import os
import pathlib

import numpy as np
from tqdm.auto import tqdm

from car_tf.models.registry import features_model

@dataclasses.dataclass
class FeatureCache:
    """Contents of a feature cache file (see the module docstring)."""

    features: np.ndarray
    labels: np.ndarray
    class_names: list
    source_model: str
    split: str


def save_feature_cache(path, cache):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
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
    """Reads a cache file written by ``extract_features``; returns a ``FeatureCache``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature cache {path} does not exist; run extract_features first.")
    with np.load(path, allow_pickle=False) as data:
        missing = {"features", "labels", "class_names", "source_model", "split"} - set(data.files)
        if missing:
            raise ValueError(
                f"feature cache {path} lacks {sorted(missing)}; delete it so it is extracted again."
            )
        return FeatureCache(
            data["features"],
            data["labels"],
            [str(n) for n in data["class_names"]],
            str(data["source_model"]),
            str(data["split"]),
        )


def _cache_is_fresh(cache_path, source_model, split):
    cache_path = pathlib.Path(cache_path)
    if not cache_path.is_file():
        return False
    cache = load_feature_cache(cache_path)
    if cache.source_model != str(source_model) or cache.split != str(split):
        return False
    model_file = pathlib.Path(source_model)
    return not model_file.is_file() or model_file.stat().st_mtime <= cache_path.stat().st_mtime


def extract_features(
    model,
    dataset,
    cache_path=None,
    *,
    class_names=(),
    source_model="",
    split="",
    progress=True,
):
    """Features of the model's "features" layer over a dataset of (images, labels) batches.

    Args:
        model: a keras.Model with a layer named "features".
        dataset: iterable of (images, int labels) batches, e.g. car_tf.data.pipelines.eval_dataset.
        cache_path: optional .npz path: reused when fresh (see module docstring), else written.
        class_names, source_model, split: stored in the cache (and used to check its freshness).
        progress: show a tqdm progress bar.
    Returns:
        (features float32 [N, D], labels int32 [N]).
    """
    if cache_path is not None and _cache_is_fresh(cache_path, source_model, split):
        cache = load_feature_cache(cache_path)
        return cache.features, cache.labels
    extractor = features_model(model, with_logits=False)
    total = None
    try:
        cardinality = int(dataset.cardinality())
        total = cardinality if cardinality >= 0 else None
    except (AttributeError, TypeError):
        pass
    features, labels = [], []
    for images, batch_labels in tqdm(
        dataset, total=total, desc=f"features {split}".strip(), disable=not progress
    ):
        features.append(np.asarray(extractor(images, training=False), np.float32))
        labels.append(np.asarray(batch_labels).astype(np.int32).reshape(-1))
    if not features:
        raise ValueError(f"the {split or 'given'} dataset yielded no batch; check the data split.")
    features, labels = np.concatenate(features), np.concatenate(labels)
    if cache_path is not None:
        save_feature_cache(
            cache_path, FeatureCache(features, labels, list(class_names), str(source_model), split)
        )
    return features, labels
