"""The run directory as the run's record: what a rerun of a command in it may do.

A run directory keeps the flags it was started with (``flags.txt``, a flagfile: rerun with
``--flagfile=RUN/flags.txt``) and what the data turned out to be (``run.json``: classes and
training counts). A command given an existing run directory is compared with that record before
anything is written:

- the same flags resume the run from its last checkpoint, or report that it already finished;
- a larger ``--epochs`` extends the run when the epochs already trained would have seen the same
  learning rates and loss re-weighting under the longer schedule (a step or constant schedule; a
  cosine schedule depends on the total length, so it cannot be extended);
- any other difference is refused in one sentence naming the differing flags;
- ``--overwrite`` deletes the run's files and starts over.

Flags that say where the data lives or how the run executes (``EXECUTION_FLAGS``) may differ
between the runs: the data's identity is checked through its class names and counts instead.
"""

import json
import os
import pathlib
import shutil

FLAGS_FILE = "flags.txt"
RUN_FILE = "run.json"
# Flags that may change between a run and its resumption: locations and execution, not the experiment.
EXECUTION_FLAGS = frozenset(
    {
        "model_dir",
        "data_dir",
        "train_list",
        "test_list",
        "verbose",
        "debug",
        "overwrite",
        "strategy",
        "jit_compile",
        "deterministic",
    }
)


# Flags that act on the command itself and are not part of the record (rerunning flags.txt must not
# delete the run).
UNRECORDED_FLAGS = frozenset({"overwrite", "debug"})


class RunConflict(ValueError):
    """A command that does not fit the run directory it names; nothing has been written."""


def write_atomically(path, text):
    """Writes ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = pathlib.Path(path)
    tmp = path.with_name(f"tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def flagfile_text(values):
    """``values`` ({name: serialized flag, e.g. "--lr=0.1" or "--noverbose"}) as a flagfile."""
    return "".join(f"{values[name]}\n" for name in sorted(values))


def read_flagfile(run_dir):
    """{name: serialized flag} of the run's flags.txt, or None where the run has none."""
    path = pathlib.Path(run_dir) / FLAGS_FILE
    if not path.is_file():
        return None
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("--"):
            values[_flag_name(line)] = line
    return values


def _flag_name(serialized):
    name = serialized[2:].split("=", 1)[0]
    if "=" not in serialized and name.startswith("no"):
        return name[2:]  # --noverbose
    return name


def read_run_info(run_dir):
    """The run's run.json as a dict, or None where there is none."""
    path = pathlib.Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_run_directory(run_dir):
    run_dir = pathlib.Path(run_dir)
    return (run_dir / FLAGS_FILE).is_file() or (run_dir / RUN_FILE).is_file()


def differing_flags(stored, current, defaults=None):
    """Names of the experiment's flags whose value differs between two {name: serialized} dicts.

    A flag missing from one side reads as its value in ``defaults``, so a record written before a
    flag existed matches a command that leaves that flag at its default.
    """
    defaults = defaults or {}
    names = (set(stored) | set(current)) - EXECUTION_FLAGS
    return sorted(n for n in names if stored.get(n, defaults.get(n)) != current.get(n, defaults.get(n)))


def _describe(name, stored, current):
    def value(flags):
        serialized = flags.get(name)
        if serialized is None:
            return "(unset)"
        if "=" in serialized:
            return serialized.split("=", 1)[1] or '""'
        return "false" if serialized[2:].startswith("no") else "true"

    return f"--{name} {value(stored)} -> {value(current)}"


def conflict(run_dir, stored, current, names, reason=""):
    """The RunConflict for a command whose flags ``names`` differ from the run's record."""
    changes = ", ".join(_describe(n, stored, current) for n in names)
    return RunConflict(
        f"{run_dir} was started with other flags ({changes}){reason}; rerun with the run's own flags "
        f"(--flagfile={pathlib.Path(run_dir) / FLAGS_FILE}) to resume it, pass a new --model_dir, "
        "or add --overwrite to delete it and start over."
    )


def check_same_data(run_dir, info, class_names, train_counts):
    """Refuses a rerun whose training data differ from the run's record (class names and counts)."""
    if info is None:
        return
    stored = (list(info.get("class_names", [])), [int(c) for c in info.get("train_counts", [])])
    if stored == (list(class_names), [int(c) for c in train_counts]):
        return
    if stored[0] != list(class_names):
        what = f"its {len(stored[0])} classes differ from the {len(class_names)} found now"
    else:
        what = "its training counts per class differ from those found now"
    raise RunConflict(
        f"{run_dir} was trained on other data ({what}); point --data_dir at the run's data to "
        "resume it, pass a new --model_dir, or add --overwrite to delete it and start over."
    )


def start_over(run_dir):
    """Deletes a run directory's contents (``--overwrite``); refuses a folder that is not a run's."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.exists():
        return
    if not is_run_directory(run_dir):
        raise RunConflict(
            f"--overwrite would delete {run_dir}, which is not a car_tf run directory (it has no "
            f"{FLAGS_FILE} or {RUN_FILE}); remove it yourself or pass another --model_dir."
        )
    shutil.rmtree(run_dir)
