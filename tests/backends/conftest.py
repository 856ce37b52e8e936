"""Fixtures for processes under the backends other than TensorFlow, TensorFlow unimportable."""

import pytest

from backend_env import OFF_TENSORFLOW, without_tensorflow, write_tensorflow_stub


@pytest.fixture(scope="session")
def tensorflow_stub(tmp_path_factory):
    return write_tensorflow_stub(tmp_path_factory.mktemp("no_tensorflow"))


@pytest.fixture(params=OFF_TENSORFLOW)
def off_tensorflow(request, tensorflow_stub):
    """(backend, environment) for each backend other than TensorFlow."""
    return request.param, without_tensorflow(tensorflow_stub, request.param)


@pytest.fixture(scope="session")
def jax_without_tensorflow(tensorflow_stub):
    return without_tensorflow(tensorflow_stub, "jax")
