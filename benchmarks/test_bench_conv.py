"""CPU speed of sparks_ext.conv2d against torch fp32, bf16 channels_last, int8 quantized conv and
the library's dense XNOR conv, on ResNet-18's 3x3 layers (how and against what: docs/design.md, section 9).

Run the suite and the report with:
    pytest benchmarks --benchmark-json=benchmarks/results.json && \\
        python benchmarks/report.py benchmarks/results.json

Every case runs in one process with 2 threads (SPARKS_BENCH_THREADS overrides), under
torch.inference_mode(); extra_info records the layer, the BOPs
(docs/design.md, section 7) and the weight bytes, which report.py turns into a table and a chart.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparks_ext
from resnet18_layers import LAYERS, Layer

THREADS = int(os.environ.get("SPARKS_BENCH_THREADS", "2"))  # the speed targets are for 2 threads


BATCHES = [1, 16]
CODEBOOK_SIZES = [16, 32, 64]


def codebook_bops(layer: Layer, n: int) -> int:
    """docs/design.md, section 7: n responses per input patch + the gather-adds (counted as 1/2)."""
    hw = layer.out_size ** 2
    return (min(n, layer.out_channels) * layer.in_channels * 9 * hw
            + (n < layer.out_channels) * layer.out_channels * layer.in_channels * hw // 2)


def codebook_weight_bytes(layer: Layer, n: int) -> int:
    """Indices bit-packed at ceil(log2 n) bits plus the n x 9-bit codebook."""
    bits = layer.out_channels * layer.in_channels * max(1, math.ceil(math.log2(n))) + n * 9
    return math.ceil(bits / 8)


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _run(benchmark, fn, layer, batch, impl, bops, weight_bytes, n=None):
    """Times fn under torch.inference_mode(), as a deployed model runs: no implementation pays
    for autograd bookkeeping (ours would pay its Python autograd wrapper, ~15 us per call)."""
    benchmark.extra_info.update(
        layer=layer.name, batch=batch, impl=impl, n=n, threads=torch.get_num_threads(), torch=torch.__version__,
        sparks_kernel=os.environ.get("SPARKS_CPU_KERNEL", "auto") + " of " + "/".join(sparks_ext.ops.cpu_kernels()),
        onednn_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        macs=layer.macs() * batch, bops=bops * batch if bops else None, weight_bytes=weight_bytes)
    rounds = 40 if batch == 1 else 10  # medians of many rounds: this shared VM is noisy
    with torch.inference_mode():
        fn()  # warm-up outside the timing (allocations, oneDNN primitive creation)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)


def _input(layer, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, layer.in_channels, layer.size, layer.size, generator=g)


def _weight(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layer.out_channels, layer.in_channels, 3, 3, generator=g)


CASES = [(layer, batch) for batch in BATCHES for layer in LAYERS]
IDS = [f"{layer.name}-b{batch}" for layer, batch in CASES]


@pytest.mark.parametrize("layer,batch", CASES, ids=IDS)
def test_torch_fp32(benchmark, layer, batch):
    x, w = _input(layer, batch), _weight(layer)
    _run(benchmark, lambda: F.conv2d(x, w, stride=layer.stride, padding=1), layer, batch, "torch fp32",
         None, w.numel() * 4)


@pytest.mark.parametrize("layer,batch", CASES, ids=IDS)
def test_torch_bf16_channels_last(benchmark, layer, batch):
    x = _input(layer, batch).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = _weight(layer).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    _run(benchmark, lambda: F.conv2d(x, w, stride=layer.stride, padding=1), layer, batch,
         "torch bf16 CL", None, w.numel() * 2)


@pytest.mark.parametrize("layer,batch", CASES, ids=IDS)
def test_torch_int8(benchmark, layer, batch):
    torch.backends.quantized.engine = "x86"
    w = _weight(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in torch 2.13
        conv = torch.ao.nn.quantized.Conv2d(layer.in_channels, layer.out_channels, 3,
                                            stride=layer.stride, padding=1)
        conv.set_weight_bias(torch.quantize_per_tensor(w, w.abs().max().item() / 127, 0, torch.qint8), None)
        x = torch.quantize_per_tensor(_input(layer, batch), 0.05, 128, torch.quint8)
    x = x.contiguous(memory_format=torch.channels_last)
    _run(benchmark, lambda: conv(x), layer, batch, "torch int8 CL", None, w.numel())


@pytest.mark.parametrize("layer,batch", CASES, ids=IDS)
def test_sparks_binary_conv2d(benchmark, layer, batch):
    # float32 channels_last input; bool weight kept channels-last, as a layer would store it.
    x = _input(layer, batch).contiguous(memory_format=torch.channels_last)
    w = (_weight(layer) >= 0).contiguous(memory_format=torch.channels_last)
    _run(benchmark, lambda: sparks_ext.binary_conv2d(x, w, stride=layer.stride, padding=1), layer, batch,
         "sparks binary", layer.macs(), math.ceil(w.numel() / 8))


def _codebook_case(layer, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    codebook = (torch.randint(0, 2, (n, 3, 3), generator=g) * 2 - 1).to(torch.int8)
    indices = torch.randint(0, n, (layer.out_channels, layer.in_channels), generator=g)
    # uint8 indices stored as (C_in, C_out): the layout the kernel reads without a copy.
    return codebook, indices.to(torch.uint8).t().contiguous().t()


@pytest.mark.parametrize("n", CODEBOOK_SIZES)
@pytest.mark.parametrize("layer,batch", CASES, ids=IDS)
def test_sparks_conv2d(benchmark, layer, batch, n):
    x = _input(layer, batch).contiguous(memory_format=torch.channels_last)
    codebook, indices = _codebook_case(layer, n)
    _run(benchmark, lambda: sparks_ext.conv2d(x, codebook, indices, stride=layer.stride, padding=1),
         layer, batch, "sparks conv2d", codebook_bops(layer, n), codebook_weight_bytes(layer, n), n=n)


@pytest.mark.parametrize("layer,batch", CASES, ids=IDS)
def test_sparks_conv2d_bf16(benchmark, layer, batch):
    """bfloat16 channels_last in and out: the I/O of the bf16 baseline, half the bytes of fp32."""
    n = 32
    x = _input(layer, batch).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    codebook, indices = _codebook_case(layer, n)
    _run(benchmark, lambda: sparks_ext.conv2d(x, codebook, indices, stride=layer.stride, padding=1),
         layer, batch, "sparks conv2d bf16", codebook_bops(layer, n), codebook_weight_bytes(layer, n), n=n)


@pytest.mark.parametrize("layer,batch", CASES, ids=IDS)
def test_sparks_conv2d_nchw_int64(benchmark, layer, batch):
    """The same op fed plain NCHW float32 and int64 row-major indices (conversions per call)."""
    n = 32
    x = _input(layer, batch)
    codebook, indices = _codebook_case(layer, n)
    indices = indices.to(torch.int64).contiguous()
    _run(benchmark, lambda: sparks_ext.conv2d(x, codebook, indices, stride=layer.stride, padding=1),
         layer, batch, "sparks conv2d NCHW/int64", codebook_bops(layer, n),
         codebook_weight_bytes(layer, n), n=n)
