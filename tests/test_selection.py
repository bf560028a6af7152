"""Gumbel-Sinkhorn selection: doubly stochastic output, Hungarian hard selection, PSTE."""
import itertools

import pytest
import torch

from sparks_ext.selection import (TemperatureSchedule, gumbel_noise, hungarian, pste, set_temperature,
                                  sinkhorn)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_square_sinkhorn_is_doubly_stochastic():
    torch.manual_seed(0)
    p = sinkhorn(torch.randn(64, 64) * 3, n_iters=50)
    assert (p >= 0).all()
    assert torch.allclose(p.sum(0), torch.ones(64), atol=1e-4)
    assert torch.allclose(p.sum(1), torch.ones(64), atol=1e-4)


def test_partial_sinkhorn_rows_sum_to_one_columns_at_most_one():
    torch.manual_seed(0)
    p = sinkhorn(torch.randn(16, 512), n_iters=30)
    assert p.shape == (16, 512)
    assert torch.allclose(p.sum(1), torch.ones(16), atol=1e-4)
    assert p.sum(0).max() <= 1 + 1e-4
    assert torch.allclose(p.sum(), torch.tensor(16.0), atol=1e-3)


def test_sinkhorn_sharpens_to_a_permutation_at_low_temperature():
    torch.manual_seed(0)
    logits = torch.randn(6, 6)
    p = sinkhorn(logits / 0.01, n_iters=200)
    cols = hungarian(p)
    best = max(itertools.permutations(range(6)), key=lambda c: sum(logits[i, c[i]] for i in range(6)))
    assert cols.tolist() == list(best)
    assert (p.gather(1, cols[:, None]) > 0.5).all()  # most of each row's mass on the match


def test_sinkhorn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="log_alpha"):
        sinkhorn(torch.randn(5, 4))
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(torch.randn(2, 4), n_iters=0)


def test_hungarian_gives_distinct_columns_maximising_the_score():
    torch.manual_seed(0)
    p = sinkhorn(torch.randn(32, 512), 20)
    cols = hungarian(p)
    assert cols.dtype == torch.int64 and cols.unique().numel() == 32
    # Against brute force on a small case.
    small = sinkhorn(torch.randn(3, 5), 20)
    got = hungarian(small)
    score = lambda c: sum(small[i, c[i]].log() for i in range(3))  # noqa: E731
    best = max(itertools.permutations(range(5), 3), key=score)
    assert got.tolist() == list(best)


def test_pste_forward_hard_backward_soft():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, requires_grad=True)
    soft = sinkhorn(logits, 10)
    cols = hungarian(soft)
    p = pste(soft, cols)
    assert torch.equal(p.detach(), torch.nn.functional.one_hot(cols, 10).float())
    weights = torch.randn(4, 10)
    (p * weights).sum().backward()
    expected, = torch.autograd.grad((sinkhorn(logits, 10) * weights).sum(), logits)
    assert torch.allclose(logits.grad, expected)
    assert logits.grad.abs().sum() > 0


def test_gumbel_noise_is_reproducible_from_the_generator():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = gumbel_noise((100, 50), g1), gumbel_noise((100, 50), g2)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert abs(a.mean().item() - 0.5772) < 0.05  # Euler-Mascheroni: the Gumbel mean


def test_temperature_schedule_and_setter():
    s = TemperatureSchedule(1.0, 0.01, 100)
    assert s(0) == 1.0 and abs(s(100) - 0.01) < 1e-12 and abs(s(50) - 0.1) < 1e-12 and s(1000) == s(100)
    with pytest.raises(ValueError):
        TemperatureSchedule(1.0, 0.0, 10)
    from sparks_ext.nn import SparksConv2d
    m = torch.nn.Sequential(SparksConv2d(4, 4, 3, n_codewords=8), SparksConv2d(4, 4, 3, n_codewords=8))
    set_temperature(m, 0.25)
    assert all(float(layer.temperature) == 0.25 for layer in m)
