"""A short real training run on scikit-learn's digits must beat chance (10%) by a wide margin,
and the trained Sparks network must deploy exactly with the codebook op."""
import pytest
import torch
import torch.nn.functional as F

from sparks_ext.models import SmallCNN
from sparks_ext.nn import CodebookConv2d, SparksConv2d
from sparks_ext.selection import TemperatureSchedule, set_temperature

sklearn = pytest.importorskip("sklearn")
from sparks_ext.datasets import load_digits_split  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("conv,n", [("binary", None), ("sparks", 16)])
def test_short_training_beats_chance(conv, n):
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_split()
    model = SmallCNN(conv=conv, n_codewords=n, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    steps, batch = 120, 64
    tau = TemperatureSchedule(1.0, 0.1, steps)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(y_train), (batch,), generator=g)
        set_temperature(model, tau(step))
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
        accuracy = (logits.argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance is 0.1; typically 0.7-0.9 after 120 steps
    print(f"{conv} n={n}: test accuracy {accuracy:.3f}")
    if conv == "sparks":
        layers = [m for m in model.modules() if isinstance(m, SparksConv2d)]
        assert all(layer.selected.unique().numel() == n for layer in layers)
        with torch.no_grad():
            for block in model.layers:
                block.conv1, block.conv2 = block.conv1.to_inference(), block.conv2.to_inference()
            assert sum(isinstance(m, CodebookConv2d) for m in model.modules()) == 4
            assert torch.equal(model(x_test), logits)
