"""GPU benchmark: sparks conv2d / binary_conv2d vs cuDNN on ResNet-18's 3x3 layers.

    python benchmarks/bench_cuda.py [--batch 1 64 256] [--n 16 32 64] [--reps 50]

For every ResNet-18 3x3 conv shape and batch size: cuDNN fp16 channels_last, cuDNN bf16
channels_last, the library's dense XNOR conv (binary_conv2d) and the codebook conv (conv2d, one
column per codebook size n), all on fp16 channels_last input. Times are medians of CUDA-event
timings (ms) after warm-up; the speed-up columns are cuDNN fp16 time / sparks time (> 1 means
sparks is faster). Prints a markdown table headed by the GPU model, ready for
benchmarks/RESULTS.md. Exactness is checked once per shape against the reference before timing.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import sparks_ext
from sparks_ext.reference import binary_conv2d_reference, conv2d_reference

from resnet18_layers import LAYERS, Layer


def time_ms(fn, reps: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(shape: Layer, batch: int, ns: list[int], reps: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x32 = torch.randn(batch, shape.in_channels, shape.size, shape.size, device="cuda", generator=gen)
    x16 = x32.half().contiguous(memory_format=torch.channels_last)
    xbf = x32.bfloat16().contiguous(memory_format=torch.channels_last)
    w_pm1 = torch.randint(0, 2, (shape.out_channels, shape.in_channels, 3, 3), device="cuda",
                          generator=gen).float() * 2 - 1
    w16 = w_pm1.half().contiguous(memory_format=torch.channels_last)
    wbf = w_pm1.bfloat16().contiguous(memory_format=torch.channels_last)
    scale = torch.rand(shape.out_channels, device="cuda", generator=gen).half() + 0.5
    bias = torch.randn(shape.out_channels, device="cuda", generator=gen).half()
    conv = dict(stride=shape.stride, padding=1)

    if batch <= 64:  # exactness, once per shape (the reference convolves in float64)
        got = sparks_ext.binary_conv2d(x16, w_pm1.half(), **conv)
        assert torch.equal(got, binary_conv2d_reference(x16, w_pm1, **conv)), shape

    row = {
        "cudnn_fp16": time_ms(lambda: F.conv2d(x16, w16, None, **conv), reps),
        "cudnn_bf16": time_ms(lambda: F.conv2d(xbf, wbf, None, **conv), reps),
        "binary_conv2d": time_ms(lambda: sparks_ext.binary_conv2d(x16, w16, scale, bias, **conv), reps),
    }
    for n in ns:
        cb = torch.randint(0, 2, (n, 3, 3), device="cuda", generator=gen).to(torch.int8) * 2 - 1
        idx = torch.randint(0, n, (shape.out_channels, shape.in_channels), device="cuda", generator=gen)
        if batch <= 64:
            assert torch.equal(sparks_ext.conv2d(x16, cb, idx, **conv),
                               conv2d_reference(x16, cb, idx, **conv)), (shape, n)
        row[f"conv2d_n{n}"] = time_ms(lambda: sparks_ext.conv2d(x16, cb, idx, scale, bias, **conv), reps)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--n", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no GPU")
    torch.backends.cudnn.benchmark = True

    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print("Median ms over CUDA events; speed-up = cuDNN fp16 channels_last time / sparks time; "
          "sparks ops on fp16 channels_last input with scale and bias.\n")
    ops = ["binary_conv2d"] + [f"conv2d_n{n}" for n in args.n]
    header = ["batch", "shape", "cuDNN fp16 CL", "cuDNN bf16 CL"] + ops + [f"x {op}" for op in ops]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for batch in args.batch:
        for shape in LAYERS:
            row = bench_shape(shape, batch, args.n, args.reps)
            base = row["cudnn_fp16"]
            cells = [str(batch), shape.name, f"{row['cudnn_fp16']:.4f}", f"{row['cudnn_bf16']:.4f}"]
            cells += [f"{row[op]:.4f}" for op in ops] + [f"{base / row[op]:.2f}" for op in ops]
            print("| " + " | ".join(cells) + " |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
