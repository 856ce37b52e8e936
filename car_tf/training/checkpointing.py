"""Epoch-end checkpoints of a run directory, and resuming from them.

A checkpoint is one file, ``checkpoints/epoch_NNNN.weights.h5``: everything Keras saves for the
model (its weights, the optimizer's state and any state attached to it, such as CAR's EMA) after
NNNN epochs. It is written under a temporary name and renamed, so the epoch count (the name) and
the weights (the content) appear together or not at all, whatever instant the process dies. The
previous checkpoint is deleted only once the new one is in place; a damaged latest checkpoint
falls back to the one before it. Since the data stream of epoch e depends only on (seed, e), a
resumed run ends with the same weights as an uninterrupted one.

Beside each checkpoint, ``epoch_NNNN.weights.h5.sha256`` holds the SHA-256 of its bytes, written
before the checkpoint is renamed into place; resuming verifies it, so a checkpoint damaged after it
was written (bytes zeroed in its middle, which HDF5 still opens) is skipped with a warning like an
unreadable one. A checkpoint without the file (written before checksums existed) still loads.
"""

import hashlib
import os
import pathlib
import re

import keras
from absl import logging

PREFIX, SUFFIX = "epoch_", ".weights.h5"
CHECKSUM_SUFFIX = ".sha256"
TMP_PREFIX = "tmp-"
KEEP = 2  # the newest checkpoint and the one before it, the fallback if the newest is damaged
_NAME = re.compile(rf"^{PREFIX}(\d+){re.escape(SUFFIX)}$")


class DamagedCheckpoints(ValueError):
    """Every checkpoint of a run directory is unreadable."""


def checkpoint_path(directory, epochs_done):
    return pathlib.Path(directory) / f"{PREFIX}{epochs_done:04d}{SUFFIX}"


def checkpoints(directory):
    """[(epochs done, path)] of the complete checkpoints in ``directory``, newest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = ((_NAME.match(p.name), p) for p in directory.iterdir())
    return sorted(((int(m.group(1)), p) for m, p in found if m), reverse=True)


def checksum_path(path):
    """Where the SHA-256 of the checkpoint at ``path`` is kept."""
    path = pathlib.Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def latest_epoch(directory):
    """Epochs done by the newest checkpoint in ``directory`` (0 without one); reads no weights."""
    found = checkpoints(directory)
    return found[0][0] if found else 0


def save(model, directory, epochs_done):
    """Writes the checkpoint after ``epochs_done`` epochs, then deletes all but the newest KEEP."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, epochs_done)
    tmp = final.with_name(TMP_PREFIX + final.name)
    model.save_weights(str(tmp))
    # The checksum first: a checkpoint in place always has its own (an older one's is replaced).
    checksum, tmp_checksum = checksum_path(final), checksum_path(tmp)
    tmp_checksum.write_text(f"{sha256(tmp)}  {final.name}\n")
    os.replace(tmp_checksum, checksum)
    os.replace(tmp, final)  # the commit point
    for _, old in checkpoints(directory)[KEEP:]:
        old.unlink()
        checksum_path(old).unlink(missing_ok=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the model (with optimizer and attached state) at the end of every epoch.

    Args:
        directory: the run's checkpoints/ folder (a worker's own folder on the non-chief workers
            of a multi-worker run: every worker must take part in saving distributed variables).
    """

    def __init__(self, directory):
        super().__init__()
        self.directory = pathlib.Path(directory)

    def on_epoch_end(self, epoch, logs=None):
        save(self.model, self.directory, epoch + 1)


def restore(model, directory):
    """Loads the newest readable checkpoint into ``model`` (built, optimizer built); returns its epochs.

    Returns 0 when ``directory`` holds no checkpoint. A checkpoint that cannot be read (a
    truncated or empty file), or whose bytes differ from its recorded SHA-256, is skipped with a
    warning in favour of the one before it; a checkpoint that is readable but does not fit the
    model is refused in one sentence.
    """
    directory = pathlib.Path(directory)
    found = checkpoints(directory)
    damaged = []
    for epochs_done, path in found:
        error = _unreadable(path)
        if error:
            damaged.append(path.name)
            logging.warning("Checkpoint %s cannot be read (%s); trying the one before it.", path, error)
            continue
        if not _checksum_matches(path):
            damaged.append(path.name)
            logging.warning(
                "Checkpoint %s is damaged: its bytes no longer match the SHA-256 recorded when it was "
                "written (%s); trying the one before it.", path, checksum_path(path).name,
            )
            continue
        try:
            model.load_weights(str(path))
        except ValueError:
            raise ValueError(
                f"the checkpoint {path} does not fit this model (another architecture, class count "
                "or method); resume with the flags the run was started with, or use a new --model_dir."
            ) from None
        for stale in directory.glob(TMP_PREFIX + "*"):
            stale.unlink()  # left by a run killed while saving
        for orphan in directory.glob(f"{PREFIX}*{SUFFIX}{CHECKSUM_SUFFIX}"):
            if not orphan.with_name(orphan.name[: -len(CHECKSUM_SUFFIX)]).exists():
                orphan.unlink()  # its checkpoint was never renamed into place, or was deleted
        return epochs_done
    if damaged:
        raise DamagedCheckpoints(
            f"every checkpoint in {directory} is damaged ({', '.join(damaged)}); delete them to "
            "train the run again from the start, or add --overwrite to start over."
        )
    return 0


def _unreadable(path):
    """Why the HDF5 file at ``path`` cannot be opened, or None where it can."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            f.keys()
    except OSError as error:
        return str(error).split(";")[0] or type(error).__name__
    return None


def _checksum_matches(path):
    """False where ``path`` has a recorded SHA-256 that its bytes do not match (an unreadable
    record counts as a mismatch); True where they match, or where none was recorded."""
    record = checksum_path(path)
    try:
        expected = record.read_text().split()
    except FileNotFoundError:
        return True  # a checkpoint from before checksums
    except (OSError, UnicodeDecodeError):
        return False
    return bool(expected) and expected[0] == sha256(path)
