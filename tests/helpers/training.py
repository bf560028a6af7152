"""Short trainings shared by the layer and method tests (kept small and fast): a SmallCNN with
chosen convs, a few epochs on scikit-learn's 8x8 digits (the ``digits`` fixture of conftest.py),
and a SmallCNN after a few steps on random data."""
import torch
import torch.nn.functional as F
from torch import nn

from sparks_ext.models import SmallCNN


def small_cnn(make_conv, width=16):
    """SmallCNN whose four block convs are ``make_conv(in, out, kernel_size, stride, padding)``."""
    model = SmallCNN(conv="binary", width=width)
    for block in model.layers:
        for name in ("conv1", "conv2"):
            old = getattr(block, name)
            setattr(block, name, make_conv(old.in_channels, old.out_channels, old.kernel_size,
                                           old.stride, old.padding))
    return model


def fit(model, optimizer, data, epochs=4, batch=64, on_step=None):
    x_train, y_train, _, _ = data
    model.train()
    g = torch.Generator().manual_seed(0)
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(x_train), batch):
            idx = order[i:i + batch]
            if on_step is not None:
                on_step(step / steps)
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
            step += 1
    return model.eval()


@torch.no_grad()
def accuracy(model, data):
    _, _, x_test, y_test = data
    return (model(x_test).argmax(1) == y_test).float().mean().item()


def trained_small_cnn(conv, device="cpu", steps=3, seed=0):
    """A SmallCNN after a few training steps: moved weights, selections and BatchNorm stats."""
    torch.manual_seed(seed)
    model = SmallCNN(conv=conv, n_codewords=32 if conv == "sparks" else None, width=16).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        x, y = torch.randn(32, 1, 8, 8, device=device), torch.randint(0, 10, (32,), device=device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
