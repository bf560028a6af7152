"""Small real data that ships offline, for examples, the demo and tests."""
from __future__ import annotations

import torch

__all__ = ["load_digits_split"]


def load_digits_split(test_size: float = 0.25, seed: int = 0):
    """scikit-learn's 8x8 handwritten digits as ``(x_train, y_train, x_test, y_test)``.

    Images are (N, 1, 8, 8) float32, standardised with the training set's mean and std; the
    split is stratified and fixed by ``seed`` (1347 / 450 images with the defaults).
    Needs scikit-learn (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("the digits data comes with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test
