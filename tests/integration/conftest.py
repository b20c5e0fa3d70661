import pytest

from tests.integration.server_process import ServerProcess


@pytest.fixture(scope="session")
def default_model_folder():
    from server.model.loader import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    """A real `python -m server` on 127.0.0.1 with its own adapter store."""
    proc = ServerProcess(tmp_path_factory.mktemp("store"))
    proc.start()
    yield proc
    proc.stop()
