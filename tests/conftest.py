"""Fixtures shared by the test modules; shared helper code is in tests/helpers."""
import pytest
import torch

from tests.helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=[
    dict(in_channels=8, out_channels=12, padding=1),
    dict(in_channels=6, out_channels=9, stride=2, padding=(1, 0), dilation=(1, 2)),
    dict(in_channels=8, out_channels=8, padding=1, groups=4, bias=True),
], ids=["plain", "stride2-dilated", "groups4-bias"])
def geom(request):
    """Layer geometries (constructor keyword arguments besides kernel_size) for the layer tests:
    plain, strided with uneven padding and dilation, grouped with a bias."""
    return dict(request.param)


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
