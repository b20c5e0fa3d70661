import pytest
import torch

from tests.integration.server_process import ServerProcess


@pytest.fixture(scope="session")
def default_model_folder():
    from server.model.loader import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    """A real `python -m server` on 127.0.0.1 with its own adapter store, and a folder it may load
    adapters from by path (`proc.adapter_root`)."""
    adapter_root = tmp_path_factory.mktemp("adapter-root")
    proc = ServerProcess(tmp_path_factory.mktemp("store"), "--adapter-root", str(adapter_root))
    proc.adapter_root = adapter_root
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process model tests run on one torch thread: on a shared 2-core machine two OpenMP threads
    spinning against another process made small forwards and merges 8-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
