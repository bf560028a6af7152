import pathlib
import sys

import pytest
import torch

# Lets test modules import the shared case grid (tests/cases.py) and each other's helpers.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscribing the 2-core machines we test on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
