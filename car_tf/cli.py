"""The command-line boundary: a user-caused error becomes one sentence on stderr, exit code 2.

Every ``python -m car_tf.*`` and ``python -m export`` command runs its absl main through ``run``;
``--debug`` shows the full stack trace instead (README, "When something goes wrong").
"""

import re
import sys

import keras
from absl import app, flags

from car_tf import backend

# Errors that bad input causes: paths, files, flag values, data, a diverging loss.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
# Keras backends the training commands are tested under (README, 'Keras backends').
TRAINING_BACKENDS = ("tensorflow", "jax", "torch")
_IMAGE_ASSERT = re.compile(r"Could not read or decode image file\]?\s*\[?([^\]\n]+?)\]?\s*\[?- fix")


def define_debug_flag(flag_values=flags.FLAGS):
    if "debug" not in flag_values:
        flags.DEFINE_bool(
            "debug", False, "On an error, show the full stack trace instead of one sentence.",
            flag_values=flag_values,
        )


def _first_line(text, limit=None):
    """The first non-empty line of ``text``, cut at ``limit`` characters (framework messages)."""
    line = next((l.strip() for l in str(text).splitlines() if l.strip()), "")
    return line if limit is None or len(line) <= limit else line[:limit] + " ..."


def _tensorflow_errors():
    tf = sys.modules.get("tensorflow")  # only translate TensorFlow's errors where it is loaded
    return tf.errors if tf is not None else None


def is_user_error(error, extra=()):
    """Whether ``error`` is one that bad input causes, a check of car_tf's that stopped a compiled
    step included, whatever framework error wraps it (JAX's JaxRuntimeError, ...)."""
    errors = _tensorflow_errors()
    op_error = (errors.OpError,) if errors is not None else ()
    return isinstance(error, USER_ERRORS + op_error + tuple(extra)) or backend.step_sentence(error) is not None


def _skip_corrupt_given():
    return flags.FLAGS.is_parsed() and "skip_corrupt" in flags.FLAGS and bool(flags.FLAGS.skip_corrupt)


def sentence(error):
    """One sentence saying what went wrong and what to do, from an exception."""
    step = backend.step_sentence(error)  # car_tf's own sentence, under the framework's wrapping
    if step is not None:
        return step
    errors = _tensorflow_errors()
    if errors is not None and isinstance(error, errors.OpError):
        message = error.message or str(error)
        image = _IMAGE_ASSERT.search(message)
        if image and _skip_corrupt_given():  # the file was read whole before the first step
            return (
                f"image file {image.group(1).strip()} cannot be read or decoded, although "
                "--skip_corrupt found it readable before the first step (it changed since); "
                "replace or delete it."
            )
        if image:
            return (
                f"image file {image.group(1).strip()} cannot be read or decoded; replace or delete "
                "it, or pass --skip_corrupt to leave unreadable images out."
            )
        if isinstance(error, errors.ResourceExhaustedError):
            return f"out of memory ({_first_line(message, 300)}); lower --batch_size or --image_size."
        if isinstance(error, errors.NotFoundError):
            return f"{_first_line(message, 300)}; check the path."
        return (
            f"TensorFlow stopped with {type(error).__name__}: {_first_line(message, 300)}; "
            "rerun with --debug for the full trace."
        )
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}; check the path and its permissions."
    return _first_line(error) or type(error).__name__


def refuse_other_backends(program, backends=("tensorflow",)):
    """Exits with one sentence (code 2) where KERAS_BACKEND is not among ``backends``, those the
    command is tested under. Commands whose modules import TensorFlow call it before them."""
    if keras.backend.backend() not in backends:
        print(f"{program}: this command runs under KERAS_BACKEND={' or '.join(backends)}, but "
              f"KERAS_BACKEND is {keras.backend.backend()!r}; unset it to use TensorFlow "
              "(README, 'Keras backends', says what runs where).",
              file=sys.stderr)
        sys.exit(2)


def define_or_exit(define):
    """``define()``: a command's flag definitions at import. Where a ``python -m car_tf.*`` command
    is running, a user error in them (a bad $CAR_TF_METHODS entry, say) is one sentence on stderr
    and exit code 2 (``--debug``: the trace); imported by anything else, the error is raised."""
    try:
        return define()
    except USER_ERRORS as error:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None or not spec.name.startswith("car_tf.") or "--debug" in sys.argv:
            raise
        print(f"{spec.name}: {sentence(error)}", file=sys.stderr)
        sys.exit(2)


def run(main, program, extra_errors=(), backends=("tensorflow",)):
    """``absl.app.run(main)``, with user errors (and ``extra_errors``) as one sentence on stderr.

    A KERAS_BACKEND outside ``backends`` is refused first (``refuse_other_backends``).
    """
    define_debug_flag()

    def guarded(argv):
        refuse_other_backends(program, backends)
        try:
            return main(argv)
        except Exception as error:
            if flags.FLAGS.debug or not is_user_error(error, extra_errors):
                raise
            print(f"{program}: {sentence(error)}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=lambda argv: parse_flags(argv, program))


def parse_flags(argv, program, flag_values=flags.FLAGS):
    """absl's flag parsing, with a bad flag (unknown, or a value it refuses) as one sentence and exit
    code 2, as every other user error; absl itself exits 1 with a usage hint."""
    try:
        return flag_values(argv)
    except flags.Error as error:
        message = re.sub(r"\s+\?", "?", " ".join(str(error).split())).rstrip(".")
        print(f"{program}: {message} (--helpfull lists every flag and its values).", file=sys.stderr)
        sys.exit(2)
