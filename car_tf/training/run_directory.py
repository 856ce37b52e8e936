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
- ``--overwrite`` deletes the run's files and starts over, once the new command has been checked.

``--overwrite`` deletes only files car_tf writes into a run directory (``OWN_FILES``: the record,
checkpoints, logs, the model and its report, and the default outputs of evaluate, export and DLSA)
and refuses, naming them, a folder that holds anything else. While a process trains, the run
directory holds ``train.lock`` (its pid and host); a second command in it is refused, and the lock
of a process no longer alive on this host is taken over with a warning.

Flags that say where the data lives or how the run executes (``EXECUTION_FLAGS``) may differ
between the runs: the data's identity is checked through its class names and counts instead.
"""

import contextlib
import errno
import json
import os
import pathlib
import re
import socket
import time

from absl import logging

FLAGS_FILE = "flags.txt"
RUN_FILE = "run.json"
LOCK_FILE = "train.lock"
# What car_tf writes into a run directory (paths relative to it), the only files --overwrite
# deletes: the record (written through tmp- files), the lock, checkpoints with their checksums,
# the logs, the final model and report; the same below workers/<i> (a multi-worker run's other
# workers); the default output folders of car_tf.evaluate (eval/), python -m export (export/) and
# car_tf.dlsa (dlsa/), and TensorBoard's tb/, whose contents those tools choose.
_OWN_NAMES = "|".join([
    r"(tmp-)?(flags\.txt|run\.json)",
    r"train\.lock(\.(tmp|stale)-\d+)?",
    r"history\.csv",
    r"model\.keras",
    r"report\.json",
    r"per_class\.csv",
    r"(accuracy_vs_count|reliability|confusion)\.png",
    r"checkpoints/(tmp-)?epoch_\d+\.weights\.h5(\.sha256)?",
    r"metrics/epoch_\d+\.json",
    r"(tb|eval|export|dlsa)/.+",
])
OWN_FILES = re.compile(rf"^(workers/\d+/)?({_OWN_NAMES})$")
OWN_FOLDERS = re.compile(r"^(workers(/\d+)?|(workers/\d+/)?(checkpoints|metrics|(tb|eval|export|dlsa)(/.+)?))$")
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


def _entries(run_dir):
    """[(relative POSIX path, is a folder)] of everything below ``run_dir``, deepest first; links
    are entries, never followed."""
    found = []
    for top, folders, files in os.walk(run_dir, topdown=False):
        relative = pathlib.PurePath(top).relative_to(run_dir)
        for name in files:
            found.append(((relative / name).as_posix(), False))
        for name in folders:
            is_link = os.path.islink(os.path.join(top, name))
            found.append(((relative / name).as_posix(), not is_link))
    return found


def _is_own(relative, is_folder):
    return bool((OWN_FOLDERS if is_folder else OWN_FILES).match(relative))


def check_start_over(run_dir):
    """Refuses ``--overwrite`` of a folder that is not a car_tf run directory, or that holds files
    car_tf did not write (``OWN_FILES``); deletes nothing. Returns what start_over would delete."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise RunConflict(f"--model_dir={run_dir} is a file, not a folder; pass another --model_dir.")
        return []
    # The locks are left alone: this command's, and the files of one being taken over.
    entries = [(path, folder) for path, folder in _entries(run_dir) if not path.startswith(LOCK_FILE)]
    if not entries:
        return []  # an empty folder (or one holding only a lock)
    if not is_run_directory(run_dir):
        raise RunConflict(
            f"--overwrite would delete {run_dir}, which is not a car_tf run directory (it has no "
            f"{FLAGS_FILE} or {RUN_FILE}); remove it yourself or pass another --model_dir."
        )
    foreign = sorted(path + "/" * folder for path, folder in entries if not _is_own(path, folder))
    if foreign:
        # A foreign folder is named, not its contents.
        shown = [p for p in foreign if not any(p.startswith(f) for f in foreign if f.endswith("/") and f != p)]
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        raise RunConflict(
            f"--overwrite deletes only the files car_tf writes, but {run_dir} also holds others "
            f"({', '.join(shown[:3])}{more}); move them out of it, or pass another --model_dir."
        )
    return entries


def start_over(run_dir):
    """Deletes the files car_tf wrote in a run directory (``--overwrite``), and the folders they
    leave empty, keeping the folder itself and the lock of the command that starts over; refuses
    (``check_start_over``) a folder that holds anything else, deleting nothing."""
    run_dir = pathlib.Path(run_dir)
    for path, folder in check_start_over(run_dir):  # deepest first: a folder after its contents
        (os.rmdir if folder else os.unlink)(run_dir / path)


# --- the lock of a training process ------------------------------------------------------------------


class RunLocked(RunConflict):
    """The run directory is being trained by another process."""


def _process_start(pid):
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None where unknown:
    with the pid, it tells the process apart from a later one given the same pid."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder):
    """True where the lock's process may still run: on another host (unknowable), or alive here.
    An unreadable lock (not car_tf's JSON) counts as stale."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    start = holder.get("process_start")
    return start is None or _process_start(pid) in (None, start)


def _read_lock(path):
    """(text, parsed holder or {} where unreadable) of a lock file; None where there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    return text, holder if isinstance(holder, dict) else {}


def _create_lock(path, text):
    """Creates the lock file holding ``text`` where none exists; True on success. The content is
    complete before the file appears (a hard link of a written temporary file), so a reader never
    sees an empty lock of a live process."""
    tmp = path.with_name(f"{LOCK_FILE}.tmp-{os.getpid()}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as error:  # a file system without hard links
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        try:
            with open(path, "x") as f:
                f.write(text)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path, stale_text):
    """Moves the stale lock ``stale_text`` aside; a lock that changed meanwhile is put back."""
    aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_text() != stale_text:  # another process took the lock over first: it is its own
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def _refusal(run_dir, holder):
    since = f" since {holder['started']}" if holder.get("started") else ""
    who = f"process {holder.get('pid')} on {holder.get('host')}{since}"
    if holder.get("host") != socket.gethostname():
        return RunLocked(
            f"{run_dir} is being trained by {who} (its lock, {pathlib.Path(run_dir) / LOCK_FILE}); wait for "
            "it to finish or pass another --model_dir, or delete the lock if that process is gone."
        )
    return RunLocked(
        f"{run_dir} is being trained by {who}; wait for it to finish (or stop it), or pass another --model_dir."
    )


def acquire_lock(run_dir):
    """Creates ``run_dir``/train.lock for this process, or refuses (RunLocked) naming the live
    process that holds it; a lock whose process is no longer alive on this host is taken over with
    a warning. Returns the lock file's text."""
    run_dir = pathlib.Path(run_dir)
    path = run_dir / LOCK_FILE
    text = json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    for _ in range(5):
        if _create_lock(path, text):
            return text
        found = _read_lock(path)
        if found is None:
            continue  # released meanwhile
        stale_text, holder = found
        if _alive(holder):
            raise _refusal(run_dir, holder)
        logging.warning(
            "Taking over the lock of %s from process %s on %s, which is no longer running (killed?).",
            run_dir, holder.get("pid", "(unknown)"), holder.get("host", "(unknown host)"),
        )
        _take_over(path, stale_text)
    raise RunLocked(f"{run_dir} is being locked by other processes at the same time; rerun the command.")


def release_lock(run_dir, text):
    """Deletes ``run_dir``/train.lock where it is still this process's (``text``)."""
    path = pathlib.Path(run_dir) / LOCK_FILE
    found = _read_lock(path)
    if found is not None and found[0] == text:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def training_lock(run_dir):
    """Holds ``run_dir``'s lock (``acquire_lock``) for the block. A folder this creates for the lock
    is removed again where the block leaves it empty (a refused command leaves nothing behind).

    A run directory where no file can be created (a finished run on a read-only disk, say) is used
    without a lock, with a warning: a command that then needs to write there fails on its own.
    """
    run_dir = pathlib.Path(run_dir)
    created = []
    try:
        for folder in reversed([run_dir, *run_dir.parents]):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        text = acquire_lock(run_dir)
    except OSError as error:
        if created or error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not run_dir.is_dir():
            _remove_empty(created)
            raise
        logging.warning("Cannot lock %s (%s); going on without a lock.", run_dir, error.strerror)
        text = None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        if text is not None:
            release_lock(run_dir, text)
        _remove_empty(created)


def _remove_empty(folders):
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return
