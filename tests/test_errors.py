"""Bad input gets a clear error naming the argument (docs/design.md, section 1)."""
import pytest
import torch

import sparks_ext
from tests.helpers import DEVICES


def _good(device="cpu"):
    x = torch.randn(2, 4, 8, 8, device=device)
    codebook = torch.ones(8, 3, 3, dtype=torch.int8, device=device)
    indices = torch.zeros(6, 4, dtype=torch.int64, device=device)
    return x, codebook, indices


def _call(device, **override):
    x, codebook, indices = _good(device)
    args = dict(input=x, codebook=codebook, indices=indices)
    args.update(override)
    return sparks_ext.conv2d(**args)


BAD = [
    # (override, exception, message pattern)
    (dict(input=torch.randn(4, 8, 8)), ValueError, r"input must be 4-D"),
    (dict(input=torch.randn(2, 4, 8, 8).to(torch.int32)), ValueError, r"input must be float16"),
    (dict(codebook=torch.ones(8, 9, dtype=torch.int8)), ValueError, r"codebook must be 3-D"),
    (dict(codebook=torch.ones(0, 3, 3, dtype=torch.int8)), ValueError, r"codebook must hold at least one"),
    (dict(codebook=torch.ones(8, 3, 3, dtype=torch.bool)), ValueError, r"codebook must be an integer or floating"),
    (dict(codebook=torch.full((8, 3, 3), 2, dtype=torch.int8)), ValueError, r"codebook entries must be -1, 0 or \+1"),
    (dict(codebook=torch.full((8, 3, 3), 0.5)), ValueError, r"codebook entries must be -1, 0 or \+1"),
    (dict(codebook=torch.ones(8, 9, 9, dtype=torch.int8)), ValueError, r"codebook kernel 9x9 has 81 taps"),
    (dict(indices=torch.zeros(6, dtype=torch.int64)), ValueError, r"indices must be 2-D"),
    (dict(indices=torch.zeros(6, 4)), ValueError, r"indices must be an integer tensor"),
    (dict(indices=torch.zeros(6, 3, dtype=torch.int64)), ValueError, r"codebook expects C_in/groups = 3"),
    (dict(indices=torch.full((6, 4), 8, dtype=torch.int64)), ValueError, r"indices must lie in \[0, n\) = \[0, 8\)"),
    (dict(indices=torch.full((6, 4), -1, dtype=torch.int64)), ValueError, r"indices must lie in \[0, n\)"),
    (dict(indices=torch.full((6, 4), 2**32, dtype=torch.int64)), ValueError, r"indices must lie in \[0, n\)"),
    (dict(scale=torch.ones(5)), ValueError, r"scale must have shape \(C_out,\)"),
    (dict(bias=torch.ones(6, 1)), ValueError, r"bias must have shape \(C_out,\)"),
    (dict(scale=torch.ones(6, dtype=torch.float64)), ValueError, r"scale must have the input's dtype"),
    (dict(bias=torch.ones(6, dtype=torch.float16)), ValueError, r"bias must have the input's dtype"),
    (dict(stride=0), ValueError, r"stride must be positive"),
    (dict(stride=(1, -1)), ValueError, r"stride must be positive"),
    (dict(stride=(1, 2, 3)), ValueError, r"stride must be an int or a pair"),
    (dict(stride="1"), ValueError, r"stride must be an int or a pair"),
    (dict(stride=1.5), ValueError, r"stride must be an int or a pair"),
    (dict(padding=-1), ValueError, r"padding must be non-negative"),
    (dict(dilation=0), ValueError, r"dilation must be positive"),
    (dict(groups=0), ValueError, r"groups must be positive"),
    (dict(groups=3), ValueError, r"groups \(3\) must divide the input channels \(4\)"),
    (dict(groups=4, indices=torch.zeros(6, 1, dtype=torch.int64)), ValueError, r"groups \(4\) must divide the output channels \(6\)"),
    (dict(pad_value=0.5), ValueError, r"pad_value must be 0, \+1 or -1"),
    (dict(input=torch.randn(2, 4, 2, 2)), ValueError, r"smaller than the dilated kernel"),
    (dict(input=torch.randn(2, 4, 8, 8), dilation=4), ValueError, r"smaller than the dilated kernel"),
]


@pytest.mark.parametrize("override,exc,pattern", BAD, ids=[p for _, _, p in BAD])
def test_bad_input_raises_named_error(override, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call("cpu", **override)


@pytest.mark.parametrize("override,exc,pattern",
                         [b for b in BAD if "indices must lie" not in b[2] and "entries must be" not in b[2]],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_on_every_device(override, exc, pattern, device):
    override = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in override.items()}
    with pytest.raises(exc, match=pattern):
        _call(device, **override)


@pytest.mark.skipif(len(DEVICES) < 2, reason="device mismatch needs a CUDA device")
@pytest.mark.parametrize("arg", ["codebook", "indices", "scale", "bias"])
def test_device_mismatch(arg):
    x, codebook, indices = _good("cuda")
    args = dict(input=x, codebook=codebook, indices=indices, scale=torch.ones(6, device="cuda"),
                bias=torch.zeros(6, device="cuda"))
    args[arg] = args[arg].cpu()
    with pytest.raises(RuntimeError, match=f"{arg} must be on the input's device"):
        sparks_ext.conv2d(**args)


def test_errors_leave_the_process_usable():
    """After every kind of error the op still works (no corrupted global state)."""
    for override, exc, _ in BAD:
        with pytest.raises(exc):
            _call("cpu", **override)
    x, codebook, indices = _good()
    assert sparks_ext.conv2d(x, codebook, indices).shape == (2, 6, 6, 6)
