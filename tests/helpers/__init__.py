"""Helpers shared by the test modules (no test module imports another):

- :mod:`tests.helpers.cases`: the op test grid (``GRID``, ``Case``), the ``SteSign`` oracle and
  ``train_steps``;
- :mod:`tests.helpers.training`: small networks and short trainings on scikit-learn's digits.

Fixtures (``device``, ``geom``, ``one_thread``, ``digits``) are in ``tests/conftest.py``.
"""
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
