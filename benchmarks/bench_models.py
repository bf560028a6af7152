"""Whole-model CPU latency: deployed sparks_ext networks against the torch paths a torch user has.

    python benchmarks/bench_models.py                      # the full table (~15 min on 2 cores)
    python benchmarks/bench_models.py --models digits --batches 1 --no-compile   # a quick look

Models: Bi-Real/ReActNet ResNet-18 with the ImageNet stem at 224x224 and the CIFAR stem at
32x32, and the digits SmallCNN at 8x8; batch 1 and 16; 2 threads (SPARKS_BENCH_THREADS
overrides); everything in one process under torch.inference_mode(), each case warmed up and
timed over many rounds, median (and quartiles) reported. Implementations:

- torch float32 NCHW, float32 channels_last, float32 compiled: the float architecture
  (``conv="float"``: the same network with real 3x3 convs), eval mode;
- torch bfloat16 channels_last, eager and compiled;
- torch int8: torchao's PT2E flow (``X86InductorQuantizer``, calibrated on random inputs,
  ``convert_pt2e``) then ``torch.compile`` (the int8 path of torch's CPU inference docs);
- sparks n=32: ``convert(model, fuse=False)`` (unfused), ``convert(model)`` (fused) eager and
  compiled, fused with ``dtype=torch.bfloat16``; and the 1-bit XNOR network fused.

Compiled cases use inductor with ``freezing`` (weights constant-folded and prepacked, the
recommended inference setting). The fused model's time is broken down per op with
torch.profiler (eager, ResNet-18 at 224) and the share spent in the binary convs reported.
The result goes into the "Whole models" section of benchmarks/RESULTS.md (``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # a source checkout

import sparks_ext
from sparks_ext.fuse import is_fusable_conv
from sparks_ext.models import SmallCNN, resnet18

THREADS = int(os.environ.get("SPARKS_BENCH_THREADS", "2"))
# Wall clock by default; --cpu-time (1 thread) times the calling thread's CPU time instead,
# which a loaded machine cannot inflate by preempting it (ops then run in that one thread).
TIMER = time.perf_counter
MODELS = {  # name -> (builder(conv, n_codewords), input shape without batch)
    "resnet18-224": (lambda conv, n: resnet18(conv=conv, n_codewords=n, stem="imagenet"), (3, 224, 224)),
    "resnet18-cifar-32": (lambda conv, n: resnet18(num_classes=10, conv=conv, n_codewords=n, stem="cifar"),
                          (3, 32, 32)),
    "digits-smallcnn-8": (lambda conv, n: SmallCNN(conv=conv, n_codewords=n, width=32, image_size=8), (1, 8, 8)),
}
SHORT = {"imagenet": "resnet18-224", "cifar": "resnet18-cifar-32", "digits": "digits-smallcnn-8"}
N_CODEWORDS = 32
TORCH_IMPLS = ["torch fp32 NCHW", "torch fp32 CL", "torch fp32 compiled", "torch bf16 CL",
               "torch bf16 compiled", "torch int8 PT2E compiled"]
SPARKS_IMPLS = ["sparks unfused", "sparks fused", "sparks fused compiled", "sparks fused bf16",
                "xnor fused"]
MARKER_BEGIN, MARKER_END = "<!-- whole-models -->", "<!-- /whole-models -->"
TITLE = "## Whole models"


def randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and RPReLU/RSign parameters, as after training (the
    latency does not depend on them, the fused-vs-unfused check does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith(("threshold", "shift_in.bias", "shift_out.bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def time_call(fn, x, min_rounds: int, max_rounds: int, budget_s: float) -> dict:
    """Median over rounds (after warm-up) of one call each; stops after ``max_rounds`` or
    ``budget_s`` seconds once ``min_rounds`` are done."""
    for _ in range(3):
        fn(x)
    times, start = [], time.perf_counter()
    while len(times) < max_rounds and (len(times) < min_rounds or time.perf_counter() - start < budget_s):
        t0 = TIMER()
        fn(x)
        times.append(TIMER() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "rounds": len(times)}


def compile_model(model):
    return torch.compile(model, fullgraph=True)


def int8_pt2e(model, example):
    """torchao's PT2E static int8 flow for x86: export, X86InductorQuantizer, calibrate,
    convert, compile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    for _ in range(4):
        prepared(torch.randn_like(example))
    return torch.compile(convert_pt2e(prepared))


def build_cases(name: str, batch: int, compiled: bool):
    """(impl, callable, input) for every implementation of ``name`` at ``batch``, built and
    converted outside inference mode, as a deployment does (run() times them inside it): a
    weight made in inference mode has no version counter, so a fused model's 1x1 convs could
    not keep their prepacked weights."""
    with torch.inference_mode(False):
        return _build_cases(name, batch, compiled)


def _build_cases(name: str, batch: int, compiled: bool):
    builder, shape = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    float_model = randomize_batchnorms(builder("float", None))
    cases = [("torch fp32 NCHW", float_model, x)]
    float_cl = copy.deepcopy(float_model).to(memory_format=torch.channels_last)
    cases.append(("torch fp32 CL", float_cl, x_cl))
    bf16 = randomize_batchnorms(builder("float", None)).to(torch.bfloat16, memory_format=torch.channels_last)
    x_bf16 = x_cl.to(torch.bfloat16)
    cases.append(("torch bf16 CL", bf16, x_bf16))
    if compiled:
        cases.append(("torch fp32 compiled", lambda: compile_model(float_cl), x_cl))
        cases.append(("torch bf16 compiled", lambda: compile_model(bf16), x_bf16))
        cases.append(("torch int8 PT2E compiled", lambda: int8_pt2e(
            randomize_batchnorms(builder("float", None)), x_cl), x_cl))
    trained = randomize_batchnorms(builder("sparks", N_CODEWORDS))
    unfused = sparks_ext.convert(trained, fuse=False)
    fused = sparks_ext.convert(trained)
    cases.append(("sparks unfused", unfused, x_cl))
    cases.append(("sparks fused", fused, x_cl))
    if compiled:
        cases.append(("sparks fused compiled", lambda: compile_model(fused), x_cl))
    cases.append(("sparks fused bf16", sparks_ext.convert(trained, dtype=torch.bfloat16), x_bf16))
    xnor = sparks_ext.convert(randomize_batchnorms(builder("binary", None)))
    cases.append(("xnor fused", xnor, x_cl))
    return cases


def profile_fused(name: str, batch: int, rounds: int = 10) -> dict:
    """Self CPU time per op of the fused model (eager), and the binary convs' share."""
    from torch.profiler import ProfilerActivity, profile

    builder, shape = MODELS[name]
    with torch.inference_mode(False):  # as in build_cases
        fused = sparks_ext.convert(randomize_batchnorms(builder("sparks", N_CODEWORDS)))
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        fused(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            fused(x)
    ops = {}
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep"):
            continue
        ops[e.key] = (e.self_cpu_time_total / rounds / 1e3, e.count // rounds)
    total = sum(t for t, _ in ops.values())
    binary = sum(t for k, (t, _) in ops.items() if k in ("sparks::conv2d", "sparks::binary_conv2d"))
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:8]
    return {"model": name, "batch": batch, "total_ms": total, "binary_ms": binary,
            "share": binary / total if total else float("nan"),
            "top": [(k, t, c) for k, (t, c) in top]}


def floors(batches) -> dict:
    """What bounds the fused ResNet-18 at 224 from below: its real-valued stem alone (7x7 conv
    with the BatchNorm folded, ReLU, max-pool; float32 and bf16 channels_last), the cost of one
    fused op call on a tiny input (dispatch, argument checks, parallel regions) times the op
    calls of the model, and the activation bytes the binary convs must read and write."""
    from torch import nn

    out = {}
    stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)).eval()
    stem = stem.to(memory_format=torch.channels_last)
    with torch.inference_mode(False):  # as in build_cases
        fused = sparks_ext.convert(randomize_batchnorms(resnet18(conv="sparks", n_codewords=N_CODEWORDS)))
    convs = [m for m in fused.modules() if is_fusable_conv(m)]
    tiny_layer = convs[0]
    tiny = torch.randn(1, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out["per_call_ms"] = time_call(lambda x: tiny_layer(x, None), tiny, 50, 400, 2.0)["median"] * 1e3
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            out[f"stem_fp32_b{batch}_ms"] = time_call(stem, x, 10, 100, 2.0)["median"] * 1e3
            stem_bf16 = stem.to(torch.bfloat16)
            out[f"stem_bf16_b{batch}_ms"] = time_call(stem_bf16, x.bfloat16(), 10, 100, 2.0)["median"] * 1e3
            stem.float()
            # float32 activations each binary conv reads (input, residual) and writes, per batch
            bytes_ = 0
            size = 56
            for conv in convs:
                out_size = size // conv.stride[0]
                bytes_ += 4 * batch * (conv.in_channels * size * size + 2 * conv.out_channels * out_size ** 2)
                size = out_size
            out[f"activation_mb_b{batch}"] = bytes_ / 1e6
    out["op_calls"] = len(convs)
    return out


def time_in_turns(cases, min_rounds: int, max_rounds: int, budget_s: float, burst: int = 4) -> dict:
    """Medians of every case, timed in turns: each turn runs one case ``burst`` times in a row
    and keeps all but the first call (which re-warms the caches the other cases evicted), so a
    burst of load on this shared machine hits every case alike instead of a few."""
    for _, fn, x in cases:
        for _ in range(3):
            fn(x)
    times = {impl: [] for impl, _, _ in cases}
    start = time.perf_counter()
    while True:
        for impl, fn, x in cases:
            fn(x)
            for _ in range(burst - 1):
                t0 = TIMER()
                fn(x)
                times[impl].append(TIMER() - t0)
        done = min(len(t) for t in times.values())
        if done >= max_rounds or (done >= min_rounds and time.perf_counter() - start > budget_s):
            break
    stats = {}
    for impl, t in times.items():
        q = statistics.quantiles(t, n=4)
        stats[impl] = {"median": statistics.median(t), "q1": q[0], "q3": q[2], "rounds": len(t)}
    return stats


def run(models, batches, compiled: bool, quiet: bool) -> dict:
    results = {}
    compile_seconds = {}
    with torch.inference_mode():
        for name in models:
            for batch in batches:
                big = name == "resnet18-224" and batch == 16
                cases = []
                for impl, model, x in build_cases(name, batch, compiled):
                    if callable(model) and not isinstance(model, torch.nn.Module):
                        t0 = time.perf_counter()
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            model = model()
                            model(x)  # the compilation
                        compile_seconds[(name, batch, impl)] = time.perf_counter() - t0
                    cases.append((impl, model, x))
                stats = time_in_turns(cases, min_rounds=12 if big else 30, max_rounds=30 if big else 300,
                                      budget_s=20.0 if big else 10.0)
                for impl, st in stats.items():
                    results[(name, batch, impl)] = st
                    if not quiet:
                        print(f"{name:>18} b{batch:<3} {impl:<26} {1e3 * st['median']:9.3f} ms "
                              f"(q1 {1e3 * st['q1']:.3f}, q3 {1e3 * st['q3']:.3f}, "
                              f"{st['rounds']} rounds)", flush=True)
                del cases
                torch.compiler.reset()
        profiles = [profile_fused("resnet18-224", b) for b in batches] if "resnet18-224" in models else []
        floor = floors(batches) if "resnet18-224" in models else {}
    return {"results": results, "compile_seconds": compile_seconds, "profiles": profiles, "floors": floor}


def fused_agreement(name: str, batch: int = 64) -> dict:
    """Fused (float32 and bf16) against the trained model in eval mode on random inputs."""
    builder, shape = MODELS[name]
    trained = randomize_batchnorms(builder("sparks", N_CODEWORDS))
    x = torch.randn(batch, *shape)
    with torch.inference_mode():
        ref = trained(x)
        fused = sparks_ext.convert(trained)(x)
        bf16 = sparks_ext.convert(trained, dtype=torch.bfloat16)(x).float()
    scale = ref.abs().max().item()
    return {"model": name, "fused_top1": (fused.argmax(1) == ref.argmax(1)).float().mean().item(),
            "fused_maxrel": (fused - ref).abs().max().item() / scale,
            "bf16_top1": (bf16.argmax(1) == ref.argmax(1)).float().mean().item(),
            "bf16_maxrel": (bf16 - ref).abs().max().item() / scale}


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def markdown(data: dict, models, batches, agreement) -> str:
    res = data["results"]
    impls = [i for i in TORCH_IMPLS + SPARKS_IMPLS if any(k[2] == i for k in res)]
    amx = "amx" in sparks_ext.ops.cpu_kernels()
    lines = [MARKER_BEGIN, TITLE, "",
             f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs, {'AMX' if amx else 'no AMX'}); "
             f"threads: {THREADS}; timer: {'CPU time of the thread' if TIMER is time.thread_time else 'wall clock'}; "
             f"torch {torch.__version__}; sparks kernels: "
             f"{os.environ.get('SPARKS_CPU_KERNEL', 'auto')} of {'/'.join(sparks_ext.ops.cpu_kernels())}; "
             f"run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"`python benchmarks/bench_models.py`.", "",
             "Median latency in ms of one forward pass (one process, torch.inference_mode(), warm-up; "
             "the implementations of a row are timed in turns, 3 timed calls per turn after one "
             "untimed, for >= 10 s (20 s and >= 12 calls for ResNet-18 at 224 batch 16), so that load "
             "bursts of the shared machine hit all columns alike). torch columns run the float "
             "architecture (same network, real 3x3 convs); CL = channels_last; compiled = "
             "`torch.compile(fullgraph=True)`, inductor with freezing; int8 = torchao 0.18 PT2E "
             "`X86InductorQuantizer` + compile. sparks columns: n = 32 codebook ResNet "
             "(0.56 bits/weight) converted with `fuse=False`, fused (default `convert`), fused and "
             "compiled, fused with `dtype=torch.bfloat16`; xnor = the 1-bit network fused. "
             "Inputs float32 channels_last (bf16 for the bf16 columns). `best torch` = fastest torch "
             "column; `x best` = best torch / sparks fused (eager).", ""]
    head = ["model", "batch"] + impls + ["best torch", "x best"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    speedups = {}
    for name in models:
        for batch in batches:
            row = {i: res.get((name, batch, i)) for i in impls}
            torch_times = [v["median"] for i, v in row.items() if i in TORCH_IMPLS and v]
            best = min(torch_times) if torch_times else None
            fused = row.get("sparks fused")
            ratio = best / fused["median"] if best and fused else None
            speedups[(name, batch)] = ratio
            cells = [name, str(batch)] + [f"{1e3 * v['median']:.3f}" if v else "" for v in row.values()]
            best_impl = min((i for i in impls if i in TORCH_IMPLS and row[i]), key=lambda i: row[i]["median"],
                            default="")
            cells += [f"{1e3 * best:.3f} ({best_impl.removeprefix('torch ')})" if best else "",
                      f"{ratio:.2f}x" if ratio else ""]
            lines.append("| " + " | ".join(cells) + " |")
    if data["compile_seconds"]:
        per = {}
        for (_, _, impl), s in data["compile_seconds"].items():
            per.setdefault(impl, []).append(s)
        lines += ["", "Compile time (s, first call, median over the model/batch cases): "
                  + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in per.items()) + "."]
    for p in data["profiles"]:
        lines += ["", f"**Per-op breakdown** of the fused model (eager, {p['model']}, batch {p['batch']}, "
                  f"torch.profiler self CPU time per forward): total {p['total_ms']:.3f} ms, binary convs "
                  f"{p['binary_ms']:.3f} ms = **{100 * p['share']:.0f}%**.", "",
                  "| op | ms per forward | calls |", "|---|---|---|"]
        lines += [f"| `{k}` | {t:.3f} | {c} |" for k, t, c in p["top"]]
    if agreement:
        lines += ["", "**Outputs** (random inputs, batch 64, against the trained model in eval mode): "
                  + "; ".join(f"{a['model']}: fused top-1 agreement {100 * a['fused_top1']:.1f}%, largest "
                              f"|diff| / max|logit| {a['fused_maxrel']:.1e}; bf16 deploy "
                              f"{100 * a['bf16_top1']:.1f}%, {a['bf16_maxrel']:.1e}" for a in agreement) + "."]
    targets = [("resnet18-224", 1, 5.0), ("resnet18-224", 16, 3.0)]
    lines += ["", "**Targets** (fused n = 32 ResNet-18 at 224, eager, against the fastest torch path, "
              "CPU without AMX):", ""]
    for name, batch, want in targets:
        got = speedups.get((name, batch))
        if got is not None:
            lines.append(f"- batch {batch}: >= {want:g}x wanted, {got:.2f}x measured: "
                         f"{'met' if got >= want else 'not met'}")
    for p in data["profiles"]:
        lines.append(f"- binary convs >= 60% of the fused model's time (batch {p['batch']}): "
                     f"{100 * p['share']:.0f}%: {'met' if p['share'] >= 0.6 else 'not met'}")
    fl = data.get("floors") or {}
    if fl:
        lines += ["", f"**Floors** (measured in the same run): one fused op call on a 1x64x2x2 input "
                  f"costs {fl['per_call_ms'] * 1e3:.0f} us, x {fl['op_calls']} binary convs = "
                  f"{fl['per_call_ms'] * fl['op_calls']:.2f} ms per forward of per-call cost alone."]
        for batch in batches:
            if f"stem_fp32_b{batch}_ms" in fl:
                lines.append(f"Batch {batch}: the real stem alone (7x7 conv, ReLU, max-pool, channels_last) "
                             f"takes {fl[f'stem_fp32_b{batch}_ms']:.2f} ms in float32 and "
                             f"{fl[f'stem_bf16_b{batch}_ms']:.2f} ms in bf16; the binary convs read and write "
                             f"{fl[f'activation_mb_b{batch}']:.1f} MB of float32 activations.")
    lines.append(MARKER_END)
    return "\n".join(lines) + "\n"


def write_section(path: pathlib.Path, section: str, notes: str = "") -> None:
    """Replaces the whole-models section of ``path`` (kept after report.py's analysis marker,
    which survives its regeneration), or appends it."""
    text = path.read_text() if path.exists() else ""
    kept = notes
    if MARKER_BEGIN in text and MARKER_END in text:
        before, rest = text.split(MARKER_BEGIN, 1)
        old, after = rest.split(MARKER_END, 1)
        # A hand-written analysis after the generated part (below "<!-- notes -->") is kept.
        kept = old.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in old and not notes else notes
    else:
        before, after = text.rstrip("\n") + "\n\n", ""
    section = section.replace(MARKER_END, ("<!-- notes -->" + kept if kept else "") + MARKER_END)
    text = before + section + after.lstrip("\n")
    path.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHORT), choices=list(SHORT))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cases")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "RESULTS.md"),
                        help="markdown file whose whole-models section is (re)written; '' for none")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="1 thread, timed by its CPU time (robust to a loaded machine)")
    args = parser.parse_args()
    global THREADS, TIMER
    if args.cpu_time:
        THREADS, TIMER = 1, time.thread_time
    torch.set_num_threads(THREADS)
    models = [SHORT[m] for m in args.models]
    if not args.no_compile:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
    data = run(models, args.batches, not args.no_compile, args.quiet)
    agreement = [fused_agreement(m) for m in models]
    text = markdown(data, models, args.batches, agreement)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"results": [[*k, v] for k, v in data["results"].items()],
             "compile_seconds": [[*k, v] for k, v in data["compile_seconds"].items()],
             "profiles": data["profiles"], "floors": data["floors"], "agreement": agreement}, indent=1))
    if args.out:
        write_section(pathlib.Path(args.out), text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
