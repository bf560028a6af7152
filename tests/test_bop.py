"""Bop: the flip rule against a hand-computed case, the real optimizer beside it, state dicts."""
import io

import pytest
import torch

from sparks_ext.nn import BinaryConv2d
from sparks_ext.optim import Bop
from tests.helpers.training import accuracy, fit, small_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flip_rule_hand_computed():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64))
    opt = Bop([w], gamma=0.5, tau=0.1)
    # step 1: m = 0.5 * g = [0.2, 0.2, -0.05, -0.2]; w * m = [0.2, -0.2, -0.05, 0.2] -> flip 0, 3
    w.grad = torch.tensor([0.4, 0.4, -0.1, -0.4], dtype=torch.float64)
    opt.step()
    assert torch.allclose(opt.state[w]["m"], torch.tensor([0.2, 0.2, -0.05, -0.2], dtype=torch.float64))
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0]
    # step 2: m = 0.5 m + 0.5 g = [0.3, 0.3, 0.175, -0.1]; w * m = [-0.3, -0.3, 0.175, -0.1] -> flip 2
    w.grad = torch.tensor([0.4, 0.4, 0.4, 0.0], dtype=torch.float64)
    opt.step()
    assert torch.allclose(opt.state[w]["m"], torch.tensor([0.3, 0.3, 0.175, -0.1], dtype=torch.float64))
    assert w.tolist() == [-1.0, -1.0, -1.0, 1.0]


def test_defaults_and_threshold_is_strict():
    w = torch.nn.Parameter(torch.ones(3))
    opt = Bop([w])
    assert opt.defaults == {"gamma": 1e-4, "tau": 1e-8}
    # m = 1e-4 * g: 1e-4 * 1e-4 = 1e-8 is not > tau (no flip), 1e-3 * 1e-4 = 1e-7 is.
    w.grad = torch.tensor([1e-4, 1e-3, -1.0], dtype=torch.float64).float()
    opt.step()
    assert w.tolist() == [1.0, -1.0, 1.0]


def test_real_optimizer_is_stepped_and_zeroed():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    opt = Bop([w], torch.optim.SGD([b], lr=0.1), gamma=1.0, tau=0.0)
    w.grad, b.grad = torch.tensor([1.0, 1.0]), torch.tensor([2.0])
    opt.step()
    assert w.tolist() == [-1.0, -1.0]
    assert b.item() == pytest.approx(0.3)
    opt.zero_grad()
    assert w.grad is None and b.grad is None


def test_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.where(torch.randn(5, 3) >= 0, 1.0, -1.0))
    b = torch.nn.Parameter(torch.randn(3))
    opt = Bop([w], torch.optim.Adam([b], lr=0.01), gamma=0.1, tau=0.05)
    for _ in range(3):
        w.grad, b.grad = torch.randn(5, 3), torch.randn(3)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt2 = Bop([w2], torch.optim.Adam([b2], lr=0.01), gamma=0.1, tau=0.05)
    opt2.load_state_dict(saved)
    assert torch.equal(opt2.state[w2]["m"], opt.state[w]["m"])
    g_w, g_b = torch.randn(5, 3), torch.randn(3)
    for p, g in ((w, g_w), (b, g_b), (w2, g_w), (b2, g_b)):
        p.grad = g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2)
    assert torch.equal(b, b2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"), (dict(tau=-1.0), "tau"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Bop([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_parameters():
    with pytest.raises(ValueError, match="exactly -1 or \\+1"):
        Bop([torch.nn.Parameter(torch.tensor([1.0, 0.5]))])
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="both binary"):
        Bop([w], torch.optim.SGD([w], lr=0.1))
    with pytest.raises(ValueError, match="real_optimizer"):
        Bop([w], real_optimizer=[w])
    opt = Bop([w])
    with pytest.raises(ValueError, match="keys"):
        opt.load_state_dict({"state": {}, "param_groups": []})


def _bop_digits(data, gamma, tau, lr=1e-2):
    """Bop on the binary convs of a SmallCNN, Adam on the rest, both annealed linearly to zero.

    The annealing is what makes the result a property of the method rather than of the
    machine: with constant gamma and lr, Bop keeps flipping hundreds of weights per epoch up to
    the last step, so the evaluated model is a snapshot of a noisy trajectory whose BatchNorm
    running statistics lag its latest flips. Which weights cross tau is decided by the last bits
    of gradient averages, so the summation order (thread count, the CPU's conv kernels) picks
    a different trajectory: unannealed, the same seed reached 0.64 test accuracy with one
    thread and 0.39 with two, and seeds 0-5 spread over 0.41-0.69. Annealed, gamma -> 0 ends
    the flips and the real parameters settle on the final weights.
    """
    torch.manual_seed(0)
    model = small_cnn(BinaryConv2d)
    binary = [m.weight for m in model.modules() if isinstance(m, BinaryConv2d)]
    with torch.no_grad():
        for w in binary:
            w.copy_(torch.where(w >= 0, 1.0, -1.0))
    before = [w.detach().clone() for w in binary]
    others = [p for p in model.parameters() if all(p is not w for w in binary)]
    real = torch.optim.Adam(others, lr=lr)
    opt = Bop(binary, real, gamma=gamma, tau=tau)

    def anneal(progress):  # progress in [0, 1): gamma and lr stay positive
        for group in opt.param_groups:
            group["gamma"] = gamma * (1 - progress)
        for group in real.param_groups:
            group["lr"] = lr * (1 - progress)

    fit(model, opt, data, on_step=anneal)
    assert all(bool(((w == 1) | (w == -1)).all()) for w in binary)
    flipped = sum(int((w != b).sum()) for w, b in zip(binary, before)) / sum(w.numel() for w in binary)
    return flipped, accuracy(model, data)


def test_bop_trains_binary_conv_weights_without_latent_copies(digits):
    """BinaryConv2d with +-1 weights: sign(+-1) = +-1 and mean|W| = 1, so the layer uses its
    weights as they are; Bop flips them, Adam trains the rest. A short run needs a faster
    gamma and a larger tau than the defaults (tuned for ImageNet-length training). On an AMD
    EPYC (Zen 4), seeds 0-3 with one or two threads reached 0.89-0.92 with 18-20% flipped;
    frozen weights 0.64-0.72."""
    flipped, acc = _bop_digits(digits, gamma=1e-2, tau=3e-5)
    assert 0.01 < flipped < 0.5
    assert acc > 0.8  # chance is 0.1
    # The flips are what helps: with a threshold no average reaches, the binary weights stay
    # as initialised and only the real parameters learn.
    frozen_flipped, frozen_acc = _bop_digits(digits, gamma=1e-2, tau=1.0)
    assert frozen_flipped == 0
    assert acc > frozen_acc + 0.05
