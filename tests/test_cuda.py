"""CUDA-specific tests of sparks::conv2d and sparks::binary_conv2d (all skipped without a GPU).

The device-parametrised tests (test_conv2d.py, ...) already run the whole grid on CUDA against the
reference, and tests/test_fused_op.py runs the fused arguments (threshold, residual, PReLU,
post_bias) on both CUDA code paths. Here: CUDA results identical to the CPU op and to the exact epilogue arithmetic, both
CUDA code paths (tiled / tensor-core and the CUDA-core fallback, SPARKS_CUDA_PORTABLE=1), kernel
tiling edges, torch.compile incl. CUDA graphs, no host synchronisation, the current stream, and
the device-side value checks (in a subprocess: a device assert poisons the CUDA context).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparks_ext
from sparks_ext.reference import binary_conv2d_reference, conv2d_reference, output_transform_reference
from cases import GRID, Case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or not torch._C._dispatch_has_kernel_for_dispatch_key("sparks::conv2d", "CUDA"),
    reason="needs a GPU and sparks_ext built with CUDA")


def _has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


@pytest.fixture(params=["fast", "portable"])
def path(request, monkeypatch):
    """Both CUDA code paths: tiled / tensor-core kernels, and the CUDA-core fallback."""
    if request.param == "portable":
        monkeypatch.setenv("SPARKS_CUDA_PORTABLE", "1")
    else:
        monkeypatch.delenv("SPARKS_CUDA_PORTABLE", raising=False)
    return request.param


def _exact_epilogue(raw: torch.Tensor, dtype: torch.dtype, scale, bias) -> torch.Tensor:
    """The CPU/CUDA output transform on an exact integer result: opmath (float, double for
    float64), multiply rounded, add rounded, one cast."""
    return output_transform_reference(raw, dtype, scale.cpu() if scale is not None else None,
                                      bias.cpu() if bias is not None else None)


def _raw_codebook(case: Case, x, cb, idx):
    return conv2d_reference(x.cpu().double(), cb.cpu(), idx.cpu(), **case.conv_kwargs())


def _raw_dense(case: Case, x, w):
    return binary_conv2d_reference(x.cpu().double(), w.cpu(), **case.conv_kwargs())


# Codebook conv: the whole grid, both paths, with and without scale/bias.
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_conv2d_cuda_exact(case, path):
    x, cb, idx = case.make_input("cuda"), case.make_codebook("cuda"), case.make_indices("cuda")
    scale, bias = case.make_scale_bias("cuda")
    raw = _raw_codebook(case, x, cb, idx)
    out = sparks_ext.conv2d(x, cb, idx, **case.conv_kwargs())
    assert out.device.type == "cuda" and out.dtype == x.dtype
    assert torch.equal(out.cpu(), raw.to(x.dtype))
    out = sparks_ext.conv2d(x, cb, idx, scale, bias, **case.conv_kwargs())
    assert torch.equal(out.cpu(), _exact_epilogue(raw, x.dtype, scale, bias))
    if _has_cpu_kernel("sparks::conv2d"):
        cpu = sparks_ext.conv2d(x.cpu(), cb.cpu(), idx.cpu(), scale.cpu(), bias.cpu(), **case.conv_kwargs())
        assert torch.equal(out.cpu(), cpu)


# Dense XNOR conv: the same grid with a dense {-1,+1} weight (float and bool), both paths.
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_binary_conv2d_cuda_exact(case, path):
    x, w = case.make_input("cuda"), case.make_dense_weight("cuda")
    scale, bias = case.make_scale_bias("cuda")
    raw = _raw_dense(case, x, w)
    out = sparks_ext.binary_conv2d(x, w, **case.conv_kwargs())
    assert out.dtype == x.dtype
    assert torch.equal(out.cpu(), raw.to(x.dtype))
    assert torch.equal(sparks_ext.binary_conv2d(x, w > 0, **case.conv_kwargs()), out)
    out = sparks_ext.binary_conv2d(x, w, scale, bias, **case.conv_kwargs())
    assert torch.equal(out.cpu(), _exact_epilogue(raw, x.dtype, scale, bias))
    if _has_cpu_kernel("sparks::binary_conv2d"):
        cpu = sparks_ext.binary_conv2d(x.cpu(), w.cpu(), scale.cpu(), bias.cpu(), **case.conv_kwargs())
        assert torch.equal(out.cpu(), cpu)


# Shapes at the kernels' tiling edges: several 64-position / 64-channel tiles with remainders,
# input-channel chunks of the response tile, several 256-bit K steps of the MMA, codebooks too
# large for a shared-memory tile, 33..64 taps (64-bit patch words), ResNet-like layers.
EDGE_CASES = [
    Case(batch=3, in_channels=80, out_channels=130, size=(13, 11), n=64),
    Case(batch=2, in_channels=64, out_channels=64, size=(16, 16), n=32, pad_value=1.0),
    Case(batch=2, in_channels=128, out_channels=96, size=(9, 9), stride=(2, 2), n=16),
    Case(batch=1, in_channels=40, out_channels=70, size=(12, 12), kernel=(6, 6), padding=(2, 3), n=64),
    Case(batch=1, in_channels=20, out_channels=24, size=(8, 8), n=2000),
    Case(batch=2, in_channels=33, out_channels=17, size=(7, 9), n=512, ternary=True),
    Case(batch=2, in_channels=96, out_channels=96, size=(10, 10), groups=3, n=64, pad_value=-1.0),
    Case(batch=4, in_channels=16, out_channels=16, size=(5, 5), groups=16, n=16),
]


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=dt, layout=lay) for c in EDGE_CASES
                                  for dt, lay in ((torch.float32, "contiguous"),
                                                  (torch.float16, "channels_last"))],
                         ids=lambda c: c.id)
def test_tiling_edges(case, path):
    x = case.make_input("cuda")
    cb, idx, w = case.make_codebook("cuda"), case.make_indices("cuda"), case.make_dense_weight("cuda")
    scale, bias = case.make_scale_bias("cuda")
    out = sparks_ext.conv2d(x, cb, idx, scale, bias, **case.conv_kwargs())
    assert torch.equal(out.cpu(), _exact_epilogue(_raw_codebook(case, x, cb, idx), x.dtype, scale, bias))
    out = sparks_ext.binary_conv2d(x, w, scale, bias, **case.conv_kwargs())
    assert torch.equal(out.cpu(), _exact_epilogue(_raw_dense(case, x, w), x.dtype, scale, bias))


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=dt, layout=lay) for c in EDGE_CASES
                                  for dt, lay in ((torch.float32, "channels_last"),
                                                  (torch.bfloat16, "contiguous"))],
                         ids=lambda c: c.id)
def test_fused_arguments_at_tiling_edges(case, path):
    """threshold, residual (in the other memory format than the output), PReLU and post_bias at
    the kernels' tiling edges: identical to the reference and to the CPU op."""
    x = case.make_input("cuda")
    cb, idx, w = case.make_codebook("cuda"), case.make_indices("cuda"), case.make_dense_weight("cuda")
    scale, bias = case.make_scale_bias("cuda")
    g = torch.Generator().manual_seed(5)
    out_shape = sparks_ext.conv2d(x, cb, idx, **case.conv_kwargs()).shape
    residual = (torch.randn(out_shape, generator=g) * 4).to(case.dtype)
    if case.layout != "channels_last":
        residual = residual.contiguous(memory_format=torch.channels_last)
    fused = dict(threshold=(torch.randn(case.in_channels, generator=g) * 0.5).to(case.dtype),
                 residual=residual,
                 prelu_weight=(torch.rand(case.out_channels, generator=g) - 0.3).to(case.dtype),
                 post_bias=torch.randn(case.out_channels, generator=g).to(case.dtype))
    on_gpu = {k: v.cuda() for k, v in fused.items()}
    k = case.conv_kwargs()
    out = sparks_ext.conv2d(x, cb, idx, scale, bias, **k, **on_gpu)
    want = conv2d_reference(x.cpu(), cb.cpu(), idx.cpu(), scale.cpu(), bias.cpu(), **k, **fused)
    assert torch.equal(out.cpu(), want)
    out = sparks_ext.binary_conv2d(x, w, scale, bias, **k, **on_gpu)
    want = binary_conv2d_reference(x.cpu(), w.cpu(), scale.cpu(), bias.cpu(), **k, **fused)
    assert torch.equal(out.cpu(), want)


def test_sign_of_zero_nan_and_inf():
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), -1e-30, 1e-30, -2.0, 3.0],
                     device="cuda").reshape(1, 1, 3, 3)
    cb = torch.ones(1, 1, 1, dtype=torch.int8, device="cuda")
    idx = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    expect = torch.tensor([1, 1, -1, 1, -1, -1, 1, -1, 1], dtype=torch.float32).reshape(1, 1, 3, 3)
    assert torch.equal(sparks_ext.conv2d(x, cb, idx).cpu(), expect)
    w = torch.ones(1, 1, 1, 1, device="cuda")
    assert torch.equal(sparks_ext.binary_conv2d(x, w).cpu(), expect)


def test_output_memory_format_and_empty_batch():
    case = Case(layout="channels_last")
    x, cb, idx = case.make_input("cuda"), case.make_codebook("cuda"), case.make_indices("cuda")
    out = sparks_ext.conv2d(x, cb, idx, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert sparks_ext.binary_conv2d(x, case.make_dense_weight("cuda"), padding=1).is_contiguous(
        memory_format=torch.channels_last)
    empty = sparks_ext.conv2d(x[:0], cb, idx, padding=1)
    assert empty.shape == (0, case.out_channels, 9, 9) and empty.device.type == "cuda"


def test_runs_on_the_current_stream():
    case = Case(batch=8, in_channels=64, out_channels=64, size=(28, 28), n=32)
    x, cb, idx, w = (case.make_input("cuda"), case.make_codebook("cuda"), case.make_indices("cuda"),
                     case.make_dense_weight("cuda"))
    expect_cb = sparks_ext.conv2d(-x, cb, idx, padding=1)
    expect_dense = sparks_ext.binary_conv2d(-x, w, padding=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The input is written late on `side`: an op launched on any other stream would read it
        # before it is ready.
        torch.cuda._sleep(50_000_000)
        late = -x
        out_cb = sparks_ext.conv2d(late, cb, idx, padding=1)
        out_dense = sparks_ext.binary_conv2d(late, w, padding=1)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out_cb, expect_cb) and torch.equal(out_dense, expect_dense)


def test_no_host_synchronisation():
    case = Case(batch=2, in_channels=32, out_channels=32, size=(10, 10), n=16)
    x, cb, idx, w = (case.make_input("cuda"), case.make_codebook("cuda"), case.make_indices("cuda"),
                     case.make_dense_weight("cuda"))
    scale, bias = case.make_scale_bias("cuda")
    sparks_ext.conv2d(x, cb, idx, scale, bias, padding=1)  # first calls may query the device
    sparks_ext.binary_conv2d(x, w, scale, bias, padding=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sparks_ext.conv2d(x, cb, idx, scale, bias, padding=1)
        sparks_ext.binary_conv2d(x, w, scale, bias, padding=1)
        sparks_ext.binary_conv2d(x, w > 0, None, None, padding=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay():
    case = Case(batch=4, in_channels=64, out_channels=64, size=(14, 14), n=32)
    x, cb, idx, w = (case.make_input("cuda"), case.make_codebook("cuda"), case.make_indices("cuda"),
                     case.make_dense_weight("cuda"))
    static_x = x.clone()
    sparks_ext.conv2d(x, cb, idx, padding=1)  # eager calls first (one-time device queries)
    sparks_ext.binary_conv2d(x, w, padding=1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_cb = sparks_ext.conv2d(static_x, cb, idx, padding=1)
        out_dense = sparks_ext.binary_conv2d(static_x, w, padding=1)
    static_x.copy_(-x)
    graph.replay()
    torch.cuda.synchronize()
    # sign(-x) flips every sign except at exact zeros: compare with a fresh eager call.
    assert torch.equal(out_cb, sparks_ext.conv2d(-x, cb, idx, padding=1))
    assert torch.equal(out_dense, sparks_ext.binary_conv2d(-x, w, padding=1))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(mode):
    torch._dynamo.reset()
    case = Case(batch=2, in_channels=32, out_channels=48, size=(12, 12), n=16)
    x, cb, idx, w = (case.make_input("cuda"), case.make_codebook("cuda"), case.make_indices("cuda"),
                     case.make_dense_weight("cuda"))
    scale, bias = case.make_scale_bias("cuda")

    def block(inp):
        y = sparks_ext.conv2d(inp, cb, idx, scale, bias, padding=1)
        z = sparks_ext.binary_conv2d(inp, w, scale, bias, stride=2, padding=1)
        return torch.relu(y), z

    compiled = torch.compile(block, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead: warm-up runs, then graph replays
        got = compiled(x)
    expect = block(x)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    got = compiled(-x)
    expect = block(-x)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


# Bad values: the CPU op raises ValueError; the CUDA op cannot read them without a host sync, so it
# trips a device-side assert (surfacing as a RuntimeError at the next synchronisation) and never
# reads out of bounds. Run in a child process, as a device assert ends the CUDA context.
_BAD_VALUE_SCRIPT = textwrap.dedent("""
    import sys, torch, sparks_ext
    kind = sys.argv[1]
    x = torch.randn(1, 4, 6, 6, device="cuda")
    cb = torch.ones(4, 3, 3, device="cuda")
    idx = torch.zeros(8, 4, dtype=torch.long, device="cuda")
    w = torch.ones(8, 4, 3, 3, device="cuda")
    if kind == "index_high": idx[3, 1] = 4
    if kind == "index_huge": idx[0, 0] = 2 ** 40
    if kind == "index_negative": idx[7, 3] = -1
    if kind == "codebook": cb[2, 1, 1] = 0.5
    if kind == "weight": w[5, 2, 0, 0] = 0.0
    try:
        if kind == "weight":
            sparks_ext.binary_conv2d(x, w, padding=1)
        else:
            sparks_ext.conv2d(x, cb, idx, padding=1)
        torch.cuda.synchronize()
    except RuntimeError as e:
        print("RAISED", "assert" in str(e).lower())
        sys.exit(0)
    print("NO ERROR")
""")


@pytest.mark.parametrize("kind", ["index_high", "index_huge", "index_negative", "codebook", "weight"])
def test_bad_values_trip_a_device_assert(kind):
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    proc = subprocess.run([sys.executable, "-c", _BAD_VALUE_SCRIPT, kind], capture_output=True,
                          text=True, timeout=300, env=env)
    assert "RAISED True" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
