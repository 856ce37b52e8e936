"""Labelled image sources: split lists, image folders, CIFAR trees and tarballs, TFDS."""
import dataclasses
import hashlib
import os
import pathlib
import shutil
import socket
import tarfile
import tempfile
import urllib.parse
import zlib

import numpy as np
from absl import logging

from car_tf import backend
from car_tf.data import longtail

DATA_DIR_ENV = "CAR_TF_DATA_DIR"
CACHE_DIR_ENV = "CAR_TF_CACHE_DIR"
SPLITS = ("train", "test")
CIFAR = ("cifar10", "cifar100")
# Already long-tailed benchmarks read from split lists: classes and default list file names.
LIST_BENCHMARKS = {
    "imagenet_lt": (1000, "ImageNet_LT_train.txt", "ImageNet_LT_test.txt"),
    "places_lt": (365, "Places_LT_train.txt", "Places_LT_test.txt"),
    "inat2018": (8142, "iNaturalist18_train.txt", "iNaturalist18_val.txt"),
}
DATASETS = CIFAR + tuple(LIST_BENCHMARKS) + ("folder", "list")
SUBSAMPLED = CIFAR + ("folder", "list")  # made long-tailed by an imbalance factor


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LabeledData:
    """Images (uint8 [N, H, W, 3] in memory) or absolute file paths, with int32 labels."""

    labels: np.ndarray
    class_names: list
    images: np.ndarray | None = None
    paths: np.ndarray | None = None
    skipped: tuple = ()  # files left out as unreadable (--skip_corrupt)

    def __post_init__(self):
        if (self.images is None) == (self.paths is None):
            raise ValueError("LabeledData needs exactly one of images= or paths=; pass one of them.")
        labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", [str(n) for n in self.class_names])
        if self.paths is not None:
            object.__setattr__(self, "paths", np.asarray(self.paths, dtype=str).reshape(-1))
        else:
            images = np.asarray(self.images)
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(
                    f"In-memory images must be uint8 [N, H, W, 3], got {images.dtype} "
                    f"{list(images.shape)}; convert them before building LabeledData."
                )
            object.__setattr__(self, "images", images)
        n = len(self.paths) if self.paths is not None else len(self.images)
        if n != labels.size:
            raise ValueError(f"Got {n} images but {labels.size} labels; pass one label per image.")
        longtail.class_counts(labels, self.num_classes)  # validates the label range

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def size(self):
        return int(self.labels.size)

    def counts(self):
        """Number of images of each class, int64 [num_classes]."""
        return longtail.class_counts(self.labels, self.num_classes)

    def subset(self, indices):
        """The images at ``indices``, same classes."""
        indices = np.asarray(indices, dtype=np.int64)
        return LabeledData(
            labels=self.labels[indices],
            class_names=self.class_names,
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else self.paths[indices],
            skipped=self.skipped,
        )


def concatenate(first, second):
    """The images of ``first`` then those of ``second`` (same classes, both in memory or both files)."""
    if first.class_names != second.class_names or (first.images is None) != (second.images is None):
        raise ValueError("only splits of the same classes, both in memory or both files, can be joined.")
    join = lambda a, b: None if a is None else np.concatenate([a, b])  # noqa: E731
    return LabeledData(
        labels=join(first.labels, second.labels),
        class_names=first.class_names,
        images=join(first.images, second.images),
        paths=join(first.paths, second.paths),
        skipped=(*first.skipped, *second.skipped),
    )


def read_split_list(list_file, image_root, num_classes=None):
    """Reads a ``relative/path label`` list (ImageNet-LT, Places-LT, iNaturalist format).

    Blank lines and lines starting with ``#`` are skipped. Paths become absolute under image_root
    (which need not exist yet); a path that leaves image_root (absolute, or climbing out with
    ``..``) is refused. num_classes defaults to the largest label + 1. The labels are the list's
    own numbers; class names are the folders holding the images (ImageNet wnids, Places scene
    names) where ``list_class_names`` finds them to name the classes, else the label numbers.
    """
    rel_paths, labels, line_numbers = _parse_split_list(list_file, image_root)
    num_classes = _check_label_range(list_file, labels, line_numbers, num_classes)
    names = list_class_names([(rel_paths, labels)], num_classes)
    return _list_data(rel_paths, labels, image_root, names)


def _parse_split_list(list_file, image_root):
    """(relative paths, int64 labels, line numbers) of a split list, every line checked."""
    list_file = pathlib.Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"Split list {list_file} does not exist; check --train_list / --test_list.")
    rel_paths, labels, line_numbers = [], [], []
    with open(list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(None, 1)
            try:
                if len(parts) != 2:
                    raise ValueError
                labels.append(int(parts[1]))
            except ValueError:
                raise ValueError(
                    f"{list_file}, line {number}: expected 'relative/path label', got {text!r}; "
                    "fix or delete that line."
                ) from None
            path = parts[0]
            if path.startswith(("/", "\\", "~")) or ".." in path:  # cheap test first: most lines pass it
                if _leaves_root(path):
                    raise ValueError(
                        f"{list_file}, line {number}: path {path!r} leaves --data_dir "
                        f"({os.path.abspath(image_root)}); list only paths relative to --data_dir, "
                        "inside it."
                    )
            rel_paths.append(path)
            line_numbers.append(number)
    if not labels:
        raise ValueError(f"Split list {list_file} holds no images; point to a non-empty list.")
    return rel_paths, np.asarray(labels, dtype=np.int64), line_numbers


def _leaves_root(path):
    """True for a list path that is absolute or climbs above the folder it is relative to."""
    if os.path.isabs(path) or path.startswith(("\\", "~")):
        return True
    return os.path.normpath(path).split(os.sep)[0] == ".."


def _check_label_range(list_file, labels, line_numbers, num_classes=None, low_only=False):
    """num_classes (default: the largest label + 1), after refusing the first label outside it."""
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    bad = np.flatnonzero((labels < 0) | ((labels >= num_classes) & (not low_only)))
    if bad.size:
        raise ValueError(
            f"{list_file}, line {line_numbers[bad[0]]}: label {labels[bad[0]]} is outside "
            f"[0, {num_classes}); fix the list or the number of classes."
        )
    return num_classes


def _list_data(rel_paths, labels, image_root, class_names):
    root = os.path.abspath(image_root) + os.sep
    paths = np.char.add(root, np.asarray(rel_paths, dtype=str))
    return LabeledData(labels=labels, paths=paths, class_names=class_names)


def list_class_names(lists, num_classes):
    """Class names for split lists: folder names where the folders are the classes, else numbers.

    lists: (relative paths, labels) of every list the classes appear in (training and test).
    A label is named after the folder holding its images (the last folder of each path) only
    when, over all the lists, every image of every label lies in one folder of its label's own,
    no two labels sharing one (ImageNet-LT's wnids, Places-LT's scene names); otherwise, as for
    shards ``s0/ s1/ ...`` or one flat folder, every class is named by its label number. The
    names never change a label: the lists' numbers are the classes.
    """
    folder_of, reason = {}, None
    for rel_paths, labels in lists:
        for label, folder in set(zip(labels.tolist(), (os.path.basename(os.path.dirname(p)) for p in rel_paths))):
            if not folder:
                reason = f"images of label {label} lie in no folder"
            elif folder_of.setdefault(label, folder) != folder:
                reason = f"images of label {label} lie in folders {folder_of[label]!r} and {folder!r}"
            if reason:
                break
        if reason:
            break
    if reason is None:
        holders = {}
        for label, folder in sorted(folder_of.items()):
            other = holders.setdefault(folder, label)
            if other != label:
                reason = f"labels {other} and {label} share folder {folder!r}"
                break
    names = [str(c) for c in range(num_classes)]
    if reason is None:
        for label, folder in folder_of.items():
            if label < num_classes:
                names[label] = folder
    else:
        logging.info("The split lists' classes are named by their label numbers, not by folders (%s).", reason)
    return names


def read_image_folder(root):
    """Class-per-folder tree: sorted folder names are the label ids, files in file-name order.

    Every entry of a class folder is listed whatever its name: files in any format, folders,
    links (``check_images`` then names each one that is not a readable JPEG, PNG, GIF or BMP
    image). Hidden entries (names starting with ".", such as .DS_Store) are left out, with a count
    in the log.
    """
    class_dirs = _class_folders(root)
    paths, labels, hidden = [], [], []
    for label, class_dir in enumerate(class_dirs):
        entries = sorted(os.scandir(class_dir), key=lambda e: e.name)
        hidden += [e.path for e in entries if e.name.startswith(".")]
        files = [e.path for e in entries if not e.name.startswith(".")]
        paths += files
        labels += [label] * len(files)
    if hidden:
        logging.info(
            "Left out %d hidden file(s) (names starting with '.') in the class folders of %s, the first: %s.",
            len(hidden), root, hidden[0],
        )
    if not paths:
        raise ValueError(f"Image folder {root} holds no files in its class folders; put the images in root/<class>/.")
    return LabeledData(
        labels=labels, paths=[os.path.abspath(p) for p in paths], class_names=[d.name for d in class_dirs]
    )


def _class_folders(root):
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist; check --data_dir.")
    class_dirs = sorted((e for e in os.scandir(root) if e.is_dir()), key=lambda e: e.name)
    if not class_dirs:
        raise ValueError(f"Image folder {root} has no class sub-folders; use root/<class>/<image> layout.")
    return class_dirs


def _class_folder_names(root):
    return [entry.name for entry in _class_folders(root)]


def load_tfds(name, split, data_dir=None):
    """Loads a TFDS image classification split into memory (downloads it when absent).

    Without network the download fails in one sentence; a download host that does not resolve is
    found at once instead of after TFDS's minutes of retries.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    try:
        if not builder.is_prepared():
            for url in builder.url_infos or {}:
                socket.getaddrinfo(urllib.parse.urlparse(url).hostname, 443)
        (images, labels), info = tfds.load(
            name, split=split, data_dir=data_dir, batch_size=-1, as_supervised=True, with_info=True
        )
    except OSError as error:  # no network (requests' errors are OSErrors too), or an unwritable folder
        reason = next((l.strip() for l in str(error).splitlines() if l.strip()), type(error).__name__)
        raise OSError(
            f"{name} could not be downloaded by TensorFlow Datasets ({reason[:200]}); without network, "
            f"point --data_dir (or ${DATA_DIR_ENV}) at a local copy: a folder with train/ and test/ "
            "class folders, or its .tar.gz."
        ) from error
    images = np.asarray(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return LabeledData(
        images=images.astype(np.uint8), labels=np.asarray(labels), class_names=info.features["label"].names
    )


def load_dataset(
    name,
    split,
    *,
    data_dir=None,
    train_list=None,
    test_list=None,
    imbalance_factor=None,
    profile="exp",
    check_files=False,
    skip_corrupt=False,
):
    """One split of a named data set as LabeledData.

    cifar10 / cifar100: data_dir is an image-folder tree with train/ and test/, a .tar.gz of one,
    or a folder holding ``<name>/`` or ``<name>-jpg.tar.gz``; None means $CAR_TF_DATA_DIR, else TFDS.
    imagenet_lt / places_lt / inat2018 / list: data_dir is the image root of the split lists.
    folder: data_dir holds train/ and test/ class-per-folder trees.
    A test split's classes are matched to the training classes by name (folder names; for lists,
    the names derived from both lists, else the label ids); a class in one split only is refused.
    imbalance_factor (cifar10, cifar100, folder, list; training split only) keeps the first n_i
    images of each class, n_max = the largest class: CIFAR in class-index order, folder and list
    by rank of class size (largest first). Every class of a training split must have an image.
    check_files: check every image file first (``check_images``), before any subsampling;
    skip_corrupt: leave the unreadable ones out instead of refusing them.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; use one of {', '.join(DATASETS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'.")
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if name in CIFAR:
        data = _load_cifar(name, split, data_dir)
    elif name == "folder":
        root = _existing_dir(data_dir, name)
        data = read_image_folder(root / split)
        if split == "test":
            data = match_classes(data, _class_folder_names(root / "train"), str(root / "test"), "folder name")
    else:
        data = _load_list(name, split, data_dir, train_list, test_list)
    if check_files:
        data = check_images(data, "training" if split == "train" else "test", skip_corrupt)
    if split == "train":
        check_every_class_present(data, name)
        if imbalance_factor is not None and name in SUBSAMPLED:
            data = _subsample(data, name, imbalance_factor, profile)
    if name in CIFAR and data.paths is not None:
        data = decode_into_memory(data)
    return data


def _subsample(data, name, imbalance_factor, profile):
    available = data.counts()
    wanted = longtail.longtail_counts(available.max(), data.num_classes, imbalance_factor, profile)
    if name not in CIFAR:  # the largest class gets n_max, the next n_1, ... (stable among ties)
        ranked = np.empty_like(wanted)
        ranked[np.argsort(-available, kind="stable")] = wanted
        wanted = ranked
    data = data.subset(longtail.subsample_longtail(data.labels, wanted, data.class_names))
    shown = ", ".join(f"{n} {c}" for c, n in zip(data.class_names, wanted))
    logging.info(
        "Long-tailed training subset (--imbalance_factor=%g, %s profile): kept %d of %d images: %s.",
        imbalance_factor, profile, data.size, int(available.sum()),
        shown if len(shown) <= 400 else shown[:400] + " ...",
    )
    return data


def match_classes(test, train_names, where, by):
    """``test`` relabelled to the training classes ``train_names`` by name; refuses a class found in
    one split only (``where`` and ``by`` word the error)."""
    train_names = [str(n) for n in train_names]
    present = [test.class_names[c] for c in np.flatnonzero(test.counts())]
    known, found = set(train_names), set(present)
    extra = [n for n in present if n not in known]
    missing = [n for n in train_names if n not in found]
    if extra or missing:
        parts = []
        if missing:
            parts.append(f"has no images of training class(es) {_quoted(missing)}")
        if extra:
            parts.append(f"has class(es) {_quoted(extra)} that the training data lacks")
        raise ValueError(
            f"The test data {where} {' and '.join(parts)}; give both splits the same classes "
            f"(matched by {by})."
        )
    index = {n: i for i, n in enumerate(train_names)}
    relabel = np.asarray([index.get(n, -1) for n in test.class_names], np.int64)
    return LabeledData(labels=relabel[test.labels], paths=test.paths, class_names=train_names)


def _quoted(names, limit=10):
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def decode_into_memory(data):
    """The same images decoded once into a uint8 array (all must share one size, as CIFAR's do).

    Small data sets then cost no JPEG decoding per epoch (CIFAR-10-LT: 12,406 images, 38 MB).
    TensorFlow decodes under its backend, in a parallel tf.data map (about 3 times faster than one
    by one here); elsewhere PIL does, with the same libjpeg integer DCT
    (car_tf.data.pipelines.decode_image), so both see the same pixels. Where the parallel map fails
    (an undecodable file, images of different sizes), the one-by-one pass names the culprit.
    """
    if data.images is not None:
        return data
    images = _tf_decode_all(data.paths) if backend.is_tensorflow() else None
    if images is None:
        images = _decode_one_by_one(data.paths)
    return LabeledData(images=images, labels=data.labels, class_names=data.class_names,
                       skipped=data.skipped)


def _tf_decode_all(paths):
    """uint8 [N, H, W, 3] of ``paths`` in order, or None where a file fails or sizes differ."""
    import tensorflow as tf

    from car_tf.data.pipelines import decode_image

    images = (tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=str))
              .map(lambda path: decode_image(tf.io.read_file(path)),
                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .batch(1024))  # batching images of different sizes fails here
    try:
        return np.concatenate(list(images.as_numpy_iterator()))
    except tf.errors.OpError:
        return None


def _decode_one_by_one(paths):
    """Decodes ``paths`` in turn, raising the sentence that names the first bad file."""
    decode = _tf_decode() if backend.is_tensorflow() else _pil_decode
    images = []
    for path in paths:
        try:
            images.append(decode(path))
        except Exception:  # TensorFlow's OpError or PIL's OSError / SyntaxError / ValueError
            raise ValueError(f"Image {path} cannot be decoded; replace or remove the file.") from None
    odd = [i for i, image in enumerate(images) if image.shape != images[0].shape]
    if odd:
        (height, width), (first_height, first_width) = images[odd[0]].shape[:2], images[0].shape[:2]
        raise ValueError(f"Image {paths[odd[0]]} is {height}x{width} pixels, unlike {paths[0]} "
                         f"({first_height}x{first_width}); resize the images to one size.")
    return np.stack(images)


def _tf_decode():
    import tensorflow as tf

    from car_tf.data.pipelines import decode_image

    return lambda path: decode_image(tf.io.read_file(path)).numpy()


def _pil_decode(path):
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit gray: the high byte, as TensorFlow
            gray = np.minimum(np.right_shift(np.asarray(image, dtype=np.uint32), 8), 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _existing_dir(data_dir, name):
    if data_dir is None:
        raise ValueError(f"Dataset {name!r} needs its data folder: pass --data_dir or set ${DATA_DIR_ENV}.")
    path = pathlib.Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Data path {path} does not exist; check --data_dir or ${DATA_DIR_ENV}.")
    return path


def _load_cifar(name, split, data_dir):
    if data_dir is None:
        return load_tfds(name, split)
    path = _existing_dir(data_dir, name)
    for candidate in (path, path / name, path / f"{name}-jpg.tar.gz", path / f"{name}.tar.gz"):
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz")):
            candidate = unpack_tarball(candidate)
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return read_image_folder(candidate / split)
    raise ValueError(
        f"{path} is neither an image-folder tree with train/ and test/ nor a .tar.gz of one; "
        f"point --data_dir at the {name} tree or tarball."
    )


def cache_root():
    """car_tf's cache folder: $CAR_TF_CACHE_DIR, default ~/.cache/car_tf (unpacked tarballs, features)."""
    return pathlib.Path(os.environ.get(CACHE_DIR_ENV, "~/.cache/car_tf")).expanduser()


def unpack_tarball(tarball):
    """Unpacks a .tar.gz once, next to it or else under ~/.cache/car_tf; returns the tree holding train/."""
    tarball = pathlib.Path(os.path.abspath(tarball))
    stem = tarball.name.removesuffix(".tar.gz").removesuffix(".tgz")
    key = hashlib.sha1(f"{tarball}:{tarball.stat().st_size}".encode()).hexdigest()[:10]
    cache = cache_root()
    beside = tarball.parent / stem
    # A folder without write bits is left untouched, even by root.
    targets = [beside] if beside.is_dir() or tarball.parent.stat().st_mode & 0o222 else []
    for target in targets + [cache / f"{stem}-{key}"]:
        if not target.is_dir():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = tempfile.mkdtemp(prefix=f".{stem}-", dir=target.parent)
            except OSError:
                continue  # not writable: try the next location
            _extract(tarball, staging)
            try:
                os.rename(staging, target)
            except OSError:  # another process finished first; keep its copy
                shutil.rmtree(staging, ignore_errors=True)
        for tree in [target, *sorted(p for p in target.iterdir() if p.is_dir())]:
            if (tree / "train").is_dir():
                return tree
        raise ValueError(
            f"Tarball {tarball} has no train/ folder; pack an image-folder tree with train/ and test/."
        )
    raise OSError(
        f"Cannot unpack {tarball}: neither its folder nor {cache} is writable; set ${CACHE_DIR_ENV}."
    )


def _extract(tarball, staging):
    """Unpacks ``tarball`` into ``staging`` with tarfile's "data" filter; a member it refuses (a path
    outside the folder, an absolute path, a link leading out, a special file) or an unreadable
    tarball is one sentence naming it, and the staging folder is removed: nothing is left behind."""
    try:
        with tarfile.open(tarball) as tar:
            tar.extractall(staging, filter=_data_filter)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, tarfile.FilterError):
            member = error.tarinfo.name
            reason = {
                tarfile.AbsolutePathError: "has an absolute path",
                tarfile.OutsideDestinationError: "would be written outside the folder it is unpacked into",
                tarfile.AbsoluteLinkError: f"is a link to the absolute path {error.tarinfo.linkname!r}",
                tarfile.LinkOutsideDestinationError:
                    f"is a link to {error.tarinfo.linkname!r}, outside the folder it is unpacked into",
                tarfile.SpecialFileError: "is a device, pipe or other special file",
            }.get(type(error), f"is refused by tarfile's data filter ({error})")
            raise ValueError(
                f"Tarball {tarball} holds member {member!r}, which {reason}; nothing was unpacked: "
                "repack it with plain files and folders only."
            ) from None
        if isinstance(error, (tarfile.TarError, EOFError, zlib.error)):
            raise ValueError(
                f"Tarball {tarball} cannot be unpacked ({_first_words(error)}); download or pack it again."
            ) from None
        raise


def _data_filter(member, path):
    """tarfile's "data" filter, which would unpack an absolute member path under the folder: that
    is refused too, as no tarball of images needs one."""
    if member.name.startswith(("/", os.sep)):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, path)


def _first_words(error):
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _load_list(name, split, data_dir, train_list, test_list):
    root = _existing_dir(data_dir, name)
    if name == "list":
        if train_list is None or test_list is None:
            raise ValueError(
                "Dataset 'list' needs both --train_list and --test_list; pass the two list files."
            )
        num_classes, default_train, default_test = None, None, None
    else:
        num_classes, default_train, default_test = LIST_BENCHMARKS[name]
    train_list = pathlib.Path(train_list) if train_list else root / default_train
    test_list = pathlib.Path(test_list) if test_list else root / default_test
    train_paths, train_labels, train_lines = _parse_split_list(train_list, root)
    num_classes = _check_label_range(train_list, train_labels, train_lines, num_classes)
    lists = [(train_paths, train_labels)]
    # The test list names the classes too (its folders must agree), so it is read for both splits
    # where it exists; --validation_fraction can train without one.
    if split == "test" or test_list.is_file():
        test_paths, test_labels, test_lines = _parse_split_list(test_list, root)
        # A benchmark's label range is fixed; a 'list' test label beyond training is named below.
        _check_label_range(test_list, test_labels, test_lines, num_classes, low_only=name == "list")
        lists.append((test_paths, test_labels))
    all_classes = max([num_classes] + [int(labels.max()) + 1 for _, labels in lists])
    names = list_class_names(lists, all_classes)
    if split == "train":
        return _list_data(train_paths, train_labels, root, names[:num_classes])
    # The lists' label numbers are the classes: a class in one split only is refused by name.
    test = _list_data(test_paths, test_labels, root, names[: max(num_classes, int(test_labels.max()) + 1)])
    return match_classes(test, names[:num_classes], f"in {test_list}", "label id")


def check_every_class_present(data, name):
    """Raises ValueError naming the first class of a training split without images."""
    empty = np.flatnonzero(data.counts() == 0)
    if empty.size:
        c = empty[0]
        raise ValueError(
            f"Class {c} ({data.class_names[c]!r}) of {name} has no training images; "
            "add images for it or remove the class and renumber the labels."
        )


# First bytes of each image format tf.io.decode_image reads, and how a complete file ends.
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP"}
# Formats that PIL may read but TensorFlow does not: named, so that the user knows to convert them.
_OTHER_FORMATS = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"8BPS": "Photoshop", b"\x00\x00\x01\x00": "ICO",
                  b"\xff\x0a": "JPEG XL", b"\x00\x00\x00\x0cJXL": "JPEG XL", b"\x00\x00\x00\x0cjP": "JPEG 2000"}
_HEAD_BYTES = 512  # signature and, for most files, the image size (JPEG: its frame header)
_TAIL_BYTES = 32
_CHECK_THREADS, _CHECK_CHUNK = 8, 2000
_SKIPPED_NAMED = 10  # skipped files named in the log (all of them are in the result's ``skipped``)
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF markers: they hold the size
_JPEG_SEGMENTS = 64  # markers walked to find the frame header before giving up


def _looks_complete(kind, head, tail, size):
    if kind == "JPEG":
        return tail.rstrip(b"\x00").endswith(b"\xff\xd9")
    if kind == "PNG":
        return b"IEND" in tail
    if kind == "GIF":
        return tail.rstrip(b"\x00").endswith(b";")
    return int.from_bytes(head[2:6], "little") <= size  # BMP: the header states the file size


def _other_format(head):
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        return "AVIF" if head[8:12].startswith(b"avi") else "HEIF"
    return next((k for magic, k in _OTHER_FORMATS.items() if head.startswith(magic)), None)


def _image_size(kind, fd, head):
    """(width, height) from the file's header, or None where it cannot be found cheaply."""
    if kind == "PNG" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if kind == "GIF" and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if kind == "BMP" and len(head) >= 26:
        if int.from_bytes(head[14:18], "little") == 12:  # OS/2 core header: 16-bit sizes
            return int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
        return (abs(int.from_bytes(head[18:22], "little", signed=True)),
                abs(int.from_bytes(head[22:26], "little", signed=True)))
    if kind == "JPEG":  # walk the segments to the frame header (beyond the head only after EXIF)
        position = 2
        for _ in range(_JPEG_SEGMENTS):
            block = head[position : position + 9]
            if len(block) < 9:
                block = os.pread(fd, 9, position)
            if len(block) < 4 or block[0] != 0xFF:
                return None
            if block[1] == 0xFF:  # fill byte
                position += 1
                continue
            if block[1] == 0x01 or 0xD0 <= block[1] <= 0xD8:  # markers without a length
                position += 2
                continue
            if block[1] in _JPEG_FRAMES:
                return int.from_bytes(block[7:9], "big"), int.from_bytes(block[5:7], "big")
            position += 2 + int.from_bytes(block[2:4], "big")
    return None


def _pixel_limit():
    """PIL's decompression-bomb limit: above it PIL (and so export.serve_onnx) refuses an image."""
    from PIL import Image

    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def image_file_problem(path, pixel_limit=None):
    """None for a readable image file, else why not ("does not exist", "is not an image", ...).

    Cheap: reads the first and last bytes only (format signature, image size, end marker, stated
    size); a file whose end looks wrong is decoded in full (PIL) before it is called truncated.
    An image of more than pixel_limit pixels (default: PIL's decompression-bomb limit, where
    PIL refuses to open it) is refused too.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head, tail = os.pread(fd, _HEAD_BYTES, 0), os.pread(fd, _TAIL_BYTES, max(size - _TAIL_BYTES, 0))
            kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
            dimensions = _image_size(kind, fd, head) if kind else None
        finally:
            os.close(fd)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "does not exist"
    except IsADirectoryError:
        return ("is a folder, not an image file (images in a folder inside a class folder are not read: "
                "move them into the class folder)")
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if kind is None:
        if size == 0:
            return "is empty"
        other = _other_format(head)
        if other:
            return f"is a {other} image, which TensorFlow does not decode (convert it to PNG or JPEG)"
        return "is not a JPEG, PNG, GIF or BMP image"
    pixel_limit = _pixel_limit() if pixel_limit is None else pixel_limit
    if dimensions and pixel_limit and dimensions[0] * dimensions[1] > pixel_limit:
        return (f"is {dimensions[0]} x {dimensions[1]} pixels, over PIL's decompression-bomb limit of "
                f"{pixel_limit} pixels (shrink it)")
    if _looks_complete(kind, head, tail, size):
        return None
    from PIL import Image  # the same libjpeg / libpng as TensorFlow's decoders, without their log noise

    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except Exception:  # PIL raises OSError, SyntaxError or ValueError for broken files
        return f"is a truncated or corrupt {kind} file"
    return None


def check_images(data, split, skip_corrupt=False):
    """``data`` with every file checked by ``image_file_problem`` before any training step.

    An unreadable file raises one sentence naming it, unless skip_corrupt: then every file that
    passes that cheap check is also decoded in full (``undecodable_images``), as the input stream
    would decode it, so that a file corrupt in its middle (intact header and end) is found too; the
    unreadable files are left out, logged with their count, and listed in the result's ``skipped``.
    The files left are the files trained or evaluated on, so the counts recorded from them are
    those of the stream. In-memory data is returned as it is.
    """
    if data.paths is None:
        return data
    from concurrent.futures import ThreadPoolExecutor

    pixel_limit = _pixel_limit() or 0

    def check(paths):
        return [image_file_problem(path, pixel_limit) for path in paths]

    # Threads over chunks: a cold disk cache is about 2x faster than one thread (about 3 s per
    # 100,000 files cold, 1.3 s warm, on two shared cores and an SSD).
    chunks = [data.paths[i : i + _CHECK_CHUNK] for i in range(0, data.size, _CHECK_CHUNK)]
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        problems = [problem for chunk in pool.map(check, chunks) for problem in chunk]
    if skip_corrupt:  # the cheap check cannot see inside a file: decode the rest in full
        readable = [i for i, problem in enumerate(problems) if not problem]
        for i in undecodable_images(data.paths[readable], split):
            problems[readable[i]] = f"is a corrupt {_format_of(data.paths[readable[i]])} file (it cannot be decoded)"
    bad = [i for i, problem in enumerate(problems) if problem]
    if not bad:
        return data
    first = f"{data.paths[bad[0]]} {problems[bad[0]]}"
    others = f" (and {len(bad) - 1} more unreadable {split} images)" if len(bad) > 1 else ""
    if not skip_corrupt:
        raise ValueError(
            f"The {split} image {first}{others}; replace or remove it (or fix its line in the list), "
            "or pass --skip_corrupt to leave unreadable images out."
        )
    skipped = tuple(f"{data.paths[i]}: {problems[i]}" for i in bad)
    shown = "; ".join(skipped[:_SKIPPED_NAMED]) + (
        f"; and {len(bad) - _SKIPPED_NAMED} more" if len(bad) > _SKIPPED_NAMED else "")
    logging.warning("Skipping %d unreadable %s image(s) (--skip_corrupt): %s.", len(bad), split, shown)
    kept = np.setdiff1d(np.arange(data.size), bad)
    return dataclasses.replace(data.subset(kept), skipped=data.skipped + skipped)


def undecodable_images(paths, split="training"):
    """Indices of the image files among ``paths`` that cannot be decoded in full.

    The decoder is the one the backend's input stream uses: TensorFlow's (``pipelines.decode_image``
    over a parallel tf.data map) under the TensorFlow backend, PIL in a thread pool elsewhere
    (``decode_into_memory``), so a file that passes decodes in the stream. It costs a full decode
    of every file; README ("Your own images") gives the time measured here.
    """
    paths = np.asarray(paths, dtype=str).reshape(-1)
    if not paths.size:
        return np.zeros((0,), np.int64)
    import time

    start = time.perf_counter()
    bad = _tf_undecodable(paths) if backend.is_tensorflow() else _pil_undecodable(paths)
    logging.info("--skip_corrupt: decoded %d %s images in full in %.1f s; %d cannot be decoded.",
                 paths.size, split, time.perf_counter() - start, len(bad))
    return bad


def _tf_undecodable(paths):
    import tensorflow as tf

    from car_tf.data.pipelines import decode_image

    def decoded(index, path):  # a file that fails to decode leaves its index out
        return index, tf.shape(decode_image(tf.io.read_file(path)))[0]

    indices = (tf.data.Dataset.from_tensor_slices(paths).enumerate()
               .map(decoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
               .ignore_errors().map(lambda index, _: index).batch(4096))
    seen = np.zeros(paths.size, bool)
    for batch in indices.as_numpy_iterator():
        seen[batch] = True
    return np.flatnonzero(~seen)


def _pil_undecodable(paths):
    from concurrent.futures import ThreadPoolExecutor

    def fails(path):
        try:
            _pil_decode(path)
        except Exception:  # PIL's OSError, SyntaxError, ValueError, DecompressionBombError
            return True
        return False

    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        failed = list(pool.map(fails, paths, chunksize=64))
    return np.flatnonzero(failed)


def _format_of(path):
    """"JPEG", "PNG", "GIF" or "BMP" from the file's first bytes ("image" where they name none)."""
    with open(path, "rb") as file:
        head = file.read(16)
    return next((k for magic, k in _MAGIC.items() if head.startswith(magic)), "image")
