"""Every CPU kernel family this machine can run (portable, avx2, avx512, amx) against the reference.

The families are forced with SPARKS_CPU_KERNEL, which the op reads at every call. Results must be
bit-identical to the reference (and so to each other) without scale/bias.
"""

import pytest
import torch

import sparks_ext
from sparks_ext.ops import cpu_kernels
from sparks_ext.reference import binary_conv2d_reference, conv2d_reference
from tests.helpers.cases import GRID, Case

PATHS = cpu_kernels()


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("SPARKS_CPU_KERNEL", request.param)
    return request.param


# Shapes that exercise the fast kernels' blocking: several 64-channel blocks and a partial one,
# more than 64 input channels (several words per pixel) and a count that is not a multiple of 16,
# every codebook size class of the AVX2 sub-tables, zero-padding borders on small images.
FAST_CASES = [
    Case(batch=2, in_channels=70, out_channels=130, size=(9, 11), n=33),
    Case(batch=1, in_channels=128, out_channels=64, size=(7, 7), n=64),
    Case(batch=1, in_channels=128, out_channels=64, size=(7, 7), n=64, pad_value=1.0, ternary=True),
    Case(batch=3, in_channels=17, out_channels=5, size=(6, 5), n=16, stride=(2, 2)),
    Case(batch=1, in_channels=64, out_channels=128, size=(14, 14), n=32, stride=(2, 2)),
    Case(batch=2, in_channels=96, out_channels=96, size=(5, 5), n=48, groups=3),
    Case(batch=1, in_channels=40, out_channels=72, size=(8, 9), n=64, kernel=(2, 5), padding=(1, 2)),
    Case(batch=1, in_channels=64, out_channels=64, size=(6, 6), n=32, dtype=torch.bfloat16,
         layout="channels_last"),
    Case(batch=1, in_channels=64, out_channels=64, size=(6, 6), n=32, dtype=torch.float64,
         layout="strided"),
    # The amx kernel's direct mode (stride 1, C_in/groups a multiple of 64): dilation, a half
    # channel pair, consecutive images, two 64-channel chunks per tap, a wide kernel's reads past
    # the image, groups, and a 64-tap kernel.
    Case(batch=2, in_channels=64, out_channels=48, size=(9, 7), n=16, dilation=(2, 1), padding=(2, 1)),
    Case(batch=1, in_channels=128, out_channels=32, size=(5, 6), kernel=(1, 7), padding=(0, 3), n=64,
         pad_value=-1.0, ternary=True),
    Case(batch=1, in_channels=192, out_channels=96, size=(5, 5), n=32, groups=3, layout="channels_last"),
    Case(batch=1, in_channels=64, out_channels=32, size=(5, 4), kernel=(8, 8), padding=(3, 3), n=32),
    Case(batch=2, in_channels=136, out_channels=40, size=(6, 5), n=32, pad_value=1.0, layout="channels_last"),
]


@pytest.mark.parametrize("case", GRID + FAST_CASES, ids=lambda c: c.id)
def test_conv2d_matches_reference(case, path):
    x, cb, idx = case.make_input(), case.make_codebook(), case.make_indices()
    out = sparks_ext.conv2d(x, cb, idx, **case.conv_kwargs())
    assert torch.equal(out, conv2d_reference(x, cb, idx, **case.conv_kwargs()))


@pytest.mark.parametrize("case", GRID + FAST_CASES, ids=lambda c: c.id)
def test_binary_conv2d_matches_reference(case, path):
    x, w = case.make_input(), case.make_dense_weight()
    if case.ternary:  # reuse the flag to cover bool weights
        w = w > 0
    out = sparks_ext.binary_conv2d(x, w, **case.conv_kwargs())
    assert torch.equal(out, binary_conv2d_reference(x, w, **case.conv_kwargs()))


@pytest.mark.parametrize("case", FAST_CASES[:3], ids=lambda c: c.id)
def test_scale_and_bias(case, path):
    x, cb, idx = case.make_input(), case.make_codebook(), case.make_indices()
    scale, bias = case.make_scale_bias()
    out = sparks_ext.conv2d(x, cb, idx, scale, bias, **case.conv_kwargs())
    torch.testing.assert_close(out, conv2d_reference(x, cb, idx, scale, bias, **case.conv_kwargs()))
    out = sparks_ext.binary_conv2d(x, case.make_dense_weight(), scale, bias, **case.conv_kwargs())
    torch.testing.assert_close(
        out, binary_conv2d_reference(x, case.make_dense_weight(), scale, bias, **case.conv_kwargs()))


@pytest.mark.parametrize("layout", ["uint8-transposed", "int64", "int32-noncontiguous"])
@pytest.mark.parametrize("groups", [1, 2])
def test_index_layouts(layout, groups, path):
    """The fast kernel reads uint8 indices stored as (C_in/groups, C_out) without a copy."""
    case = Case(batch=1, in_channels=32, out_channels=96, size=(6, 6), n=32, groups=groups)
    x, cb, idx = case.make_input(), case.make_codebook(), case.make_indices()
    if layout == "uint8-transposed":
        given = idx.to(torch.uint8).t().contiguous().t()
    elif layout == "int64":
        given = idx
    else:
        given = torch.zeros(idx.shape[0], 2 * idx.shape[1], dtype=torch.int32)[:, ::2]
        given.copy_(idx)
        assert not given.is_contiguous()
    out = sparks_ext.conv2d(x, cb, given, **case.conv_kwargs())
    assert torch.equal(out, conv2d_reference(x, cb, idx, **case.conv_kwargs()))


@pytest.mark.parametrize("kernel,in_channels", [((3, 3), 3700), ((2, 5), 3300), ((1, 1), 300)])
def test_extreme_sums_do_not_overflow(kernel, in_channels, path):
    """Every response at its maximum: the narrow accumulators must widen in time. 3x3 with 3700
    channels passes the uint16 flush point (3640) of the LUT kernel."""
    x = torch.ones(1, in_channels, kernel[0] + 1, kernel[1] + 1)
    cb = torch.ones(4, *kernel, dtype=torch.int8)
    cb[1] = -1
    idx = torch.zeros(3, in_channels, dtype=torch.int64)
    idx[1] = 1
    idx[2, ::2] = 1
    out = sparks_ext.conv2d(x, cb, idx)
    ref = conv2d_reference(x, cb, idx)
    assert torch.equal(out, ref)
    assert out[0, 0].min().item() == in_channels * kernel[0] * kernel[1]
    w = torch.ones(2, in_channels, *kernel)
    w[1] = -1
    assert torch.equal(sparks_ext.binary_conv2d(x, w), binary_conv2d_reference(x, w))


@pytest.mark.parametrize("case", [Case(batch=1, in_channels=64, out_channels=256, size=(7, 7), n=32),
                                  Case(batch=3, in_channels=32, out_channels=48, size=(15, 15), n=32)],
                         ids=lambda c: c.id)
def test_thread_counts_agree(case, path):
    x, cb, idx = case.make_input(), case.make_codebook(), case.make_indices()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparks_ext.conv2d(x, cb, idx, padding=1)
        torch.set_num_threads(max(2, threads))
        many = sparks_ext.conv2d(x, cb, idx, padding=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(one, conv2d_reference(x, cb, idx, padding=1))


def test_paths_are_listed():
    order = ["portable", "avx2", "avx512", "amx"]
    assert PATHS[0] == "portable"
    assert set(PATHS) <= set(order)
    assert PATHS == sorted(PATHS, key=order.index)
    if "amx" in PATHS:  # amx runs the avx512 kernels wherever it has no tile kernel
        assert "avx512" in PATHS


def test_auto_is_the_default(monkeypatch):
    case = Case()
    x, cb, idx = case.make_input(), case.make_codebook(), case.make_indices()
    monkeypatch.setenv("SPARKS_CPU_KERNEL", "auto")
    auto = sparks_ext.conv2d(x, cb, idx, padding=1)
    monkeypatch.delenv("SPARKS_CPU_KERNEL")
    assert torch.equal(auto, sparks_ext.conv2d(x, cb, idx, padding=1))


@pytest.mark.parametrize("op", ["conv2d", "binary_conv2d"])
def test_unknown_path_is_an_error(op, monkeypatch):
    case = Case()
    monkeypatch.setenv("SPARKS_CPU_KERNEL", "sse9")
    with pytest.raises(RuntimeError, match="SPARKS_CPU_KERNEL"):
        if op == "conv2d":
            sparks_ext.conv2d(case.make_input(), case.make_codebook(), case.make_indices())
        else:
            sparks_ext.binary_conv2d(case.make_input(), case.make_dense_weight())


@pytest.mark.parametrize("missing", sorted({"avx2", "avx512", "amx", "neon"} - set(PATHS)) or ["none"])
def test_forcing_a_path_this_cpu_lacks_is_an_error(missing, monkeypatch):
    if missing == "none":
        pytest.skip("this CPU runs every kernel family")
    case = Case()
    monkeypatch.setenv("SPARKS_CPU_KERNEL", missing)
    with pytest.raises(RuntimeError, match="cannot run"):
        sparks_ext.conv2d(case.make_input(), case.make_codebook(), case.make_indices())
