"""The backends other than TensorFlow, and the environment of a process under one of them."""

import os

OFF_TENSORFLOW = ["jax", "torch"]


def write_tensorflow_stub(folder):
    """``folder/tensorflow``, a package that fails to import, as where TensorFlow is not installed.

    Put ``folder`` first on PYTHONPATH. A package, not an import hook: PyTorch calls
    ``find_spec("tensorflow")`` at import time and would stop at a hook that raises.
    """
    (folder / "tensorflow").mkdir()
    (folder / "tensorflow" / "__init__.py").write_text('raise ImportError("TensorFlow is not installed here")\n')
    return folder


def without_tensorflow(stub, backend):
    """The environment of a ``backend`` process in which ``import tensorflow`` fails."""
    path = os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"}
