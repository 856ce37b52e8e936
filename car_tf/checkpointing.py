"""Epoch-end checkpoints of a run directory, and resuming from them.

``checkpoints/last.weights.h5`` holds everything Keras saves for the model: its weights, the
optimizer's state and any state attached to it (CAR's EMA and power-iteration vector).
``checkpoints/last.json`` records how many epochs it has seen. Both are written to temporary
names and renamed, so a run killed while saving keeps its previous checkpoint. Since the data
stream of epoch e depends only on (seed, e), a resumed run ends with the same weights as an
uninterrupted one.
"""

import json
import os
import pathlib

import keras

WEIGHTS = "last.weights.h5"
STATE = "last.json"


def _replace_atomically(write, path):
    tmp = path.with_name("tmp-" + path.name)
    write(tmp)
    os.replace(tmp, path)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the model (with optimizer and attached state) at the end of every epoch.

    Args:
        directory: the run's checkpoints/ folder.
        write: False on the non-chief workers of a multi-worker run, which save to a scratch
            folder (every worker must take part in saving distributed variables).
    """

    def __init__(self, directory, write=True):
        super().__init__()
        self.directory = pathlib.Path(directory)
        self.write = write

    def on_epoch_end(self, epoch, logs=None):
        self.directory.mkdir(parents=True, exist_ok=True)
        _replace_atomically(lambda p: self.model.save_weights(str(p)), self.directory / WEIGHTS)
        if self.write:
            state = {"epochs_done": epoch + 1}
            _replace_atomically(
                lambda p: p.write_text(json.dumps(state)), self.directory / STATE
            )


def restore(model, directory):
    """Loads the last checkpoint into ``model`` (built, optimizer built) and returns the epochs done.

    Returns 0 when ``directory`` holds no checkpoint.
    """
    directory = pathlib.Path(directory)
    if not (directory / STATE).exists():
        return 0
    epochs_done = json.loads((directory / STATE).read_text())["epochs_done"]
    try:
        model.load_weights(str(directory / WEIGHTS))
    except ValueError as error:
        raise ValueError(
            f"the checkpoint in {directory} does not fit this model ({error}); resume with the "
            "flags the run was started with, or use a new --model_dir."
        ) from None
    return epochs_done
