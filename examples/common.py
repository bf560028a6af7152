"""What the example scripts share: the shuffled mini-batch loop and test accuracy."""
from __future__ import annotations

import torch


def minibatches(x, y, batch: int, epochs: int, generator: torch.Generator):
    """Yields (x_batch, y_batch) for `epochs` passes, each in a fresh order drawn from `generator`."""
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model, data) -> float:
    """Top-1 accuracy in percent on the test half of a (x_train, y_train, x_test, y_test) split."""
    _, _, x_test, y_test = data
    return (model(x_test).argmax(1) == y_test).float().mean().item() * 100
