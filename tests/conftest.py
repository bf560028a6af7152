"""Fixtures shared by the test modules; shared helper code is in tests/helpers."""
import pytest
import torch

from tests.helpers import DEVICES


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


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): 1347 / 450 images of 8x8."""
    from sparks_ext.datasets import load_digits_split

    return load_digits_split()
