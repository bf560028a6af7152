"""Turns pytest-benchmark JSONs of benchmarks/test_bench_conv.py into a markdown report and a
bar chart.

    python benchmarks/report.py results.json [more.json ...] [--out benchmarks/RESULTS.md] [--png benchmarks/results.png]

With several runs of the suite, each cell is the median over the runs of each run's median
(this shared VM moves single medians by up to ~20% between runs).

Per layer and batch: median latency of every implementation, the codebook conv's speed-up against
each baseline (baseline median / conv2d median, > 1 = conv2d faster), BOPs and weight bytes, and
the speed targets (n = 32, docs/design.md section 9) marked met or not.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from collections import defaultdict

BASELINES = ["torch fp32", "torch bf16 CL", "torch int8 CL", "sparks binary"]
# docs/design.md section 9: minimum speed-up of conv2d (n = 32) over each baseline, per batch size.
TARGETS = {1: {"torch fp32": 15, "torch bf16 CL": 5, "torch int8 CL": 2, "sparks binary": 1},
           16: {"torch bf16 CL": 5, "torch int8 CL": 2}}
TARGET_N = 32


def load(paths):
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    medians = defaultdict(list)  # (layer, batch, column) -> one median per run
    rows = defaultdict(dict)  # (layer, batch) -> column -> record
    order = []
    for data in runs:
        for b in data["benchmarks"]:
            info = b["extra_info"]
            key = (info["layer"], info["batch"])
            if key not in order:
                order.append(key)
            column = info["impl"] if info["n"] is None else f"{info['impl']} n={info['n']}"
            medians[key + (column,)].append(b["stats"]["median"])
            rows[key][column] = dict(info, rounds=b["stats"]["rounds"])
    for (layer, batch, column), values in medians.items():
        rows[(layer, batch)][column].update(median=statistics.median(values), runs=len(values))
    first = {k: i for i, k in enumerate(order)}
    return runs[0], len(runs), rows, sorted(order, key=lambda k: (k[1], first[k]))


def fmt_time(seconds):
    return f"{seconds * 1e3:.3f}" if seconds < 1e-1 else f"{seconds * 1e3:.1f}"


def machine_line(data):
    cpu = data["machine_info"].get("cpu", {})
    threads = {r["extra_info"].get("threads") for r in data["benchmarks"]}
    torch_versions = {r["extra_info"].get("torch") for r in data["benchmarks"]}
    kernels = {r["extra_info"].get("sparks_kernel", "?") for r in data["benchmarks"]}
    onednn = {r["extra_info"].get("onednn_isa", "default") for r in data["benchmarks"]}
    return (f"CPU: {cpu.get('brand_raw', data['machine_info'].get('processor', '?'))} "
            f"({cpu.get('count', '?')} logical CPUs, {cpu.get('hz_advertised_friendly', '?')}); "
            f"threads: {', '.join(str(t) for t in sorted(threads))}; "
            f"torch {', '.join(str(v) for v in sorted(torch_versions, key=str))}; "
            f"sparks kernels: {', '.join(sorted(kernels))}; "
            f"oneDNN ISA cap: {', '.join(sorted(onednn))}; "
            f"run {data.get('datetime', '?')}")


def markdown(data, runs, rows, order):
    n_columns = sorted({c for r in rows.values() for c in r if c.startswith("sparks conv2d n=")},
                       key=lambda c: int(c.split("=")[1]))
    extra = sorted({c for r in rows.values() for c in r} - set(BASELINES) - set(n_columns))
    main = f"sparks conv2d n={TARGET_N}"
    lines = ["# CPU benchmark: sparks_ext.conv2d vs torch and the dense XNOR conv", "",
             machine_line(data), "",
             f"Median latency in ms (pytest-benchmark, one process per run, {runs} run(s) of the suite, "
             "median over runs of each run's median, torch.inference_mode(), "
             "ResNet-18 3x3 layers, padding 1). "
             "Speed-up = baseline median / `conv2d` (n = 32) median; > 1 means `conv2d` is faster. "
             "BOPs per docs/design.md section 7 for the whole batch; weight bytes as stored (fp32 / bf16 / "
             "int8 dense, 1 bit per binary weight, ceil(log2 n)-bit indices + codebook).", "",
             "Inputs: torch fp32 NCHW; bf16 channels_last; int8 quint8 channels_last (x86 engine); "
             "sparks ops float32 channels_last input, channels-last bool weight (binary), uint8 "
             "indices stored (C_in, C_out) (conv2d). `bf16` = conv2d with bfloat16 channels_last input "
             "and output. `NCHW/int64` = conv2d fed NCHW float32 and int64 indices, paying both "
             "conversions per call.", ""]
    head = ["layer", "batch"] + BASELINES + n_columns + extra + \
           [f"x {b.replace('torch ', '').replace('sparks ', '')}" for b in BASELINES] + \
           [f"BOPs (n={TARGET_N})", "BOPs (binary)", f"bytes (n={TARGET_N})", "bytes (binary)", "bytes (fp32)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in order:
        r = rows[key]
        cells = [key[0], str(key[1])]
        cells += [fmt_time(r[c]["median"]) if c in r else "-" for c in BASELINES + n_columns + extra]
        for b in BASELINES:
            cells.append(f"{r[b]['median'] / r[main]['median']:.2f}" if b in r and main in r else "-")
        cells += [f"{r[main]['bops']:.3g}" if main in r else "-",
                  f"{r['sparks binary']['bops']:.3g}" if "sparks binary" in r else "-",
                  str(r[main]["weight_bytes"]) if main in r else "-",
                  str(r["sparks binary"]["weight_bytes"]) if "sparks binary" in r else "-",
                  str(r["torch fp32"]["weight_bytes"]) if "torch fp32" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", f"## Targets (docs/design.md section 9: conv2d n = {TARGET_N}, every layer)", "",
              "| batch | baseline | target | worst speed-up (layer) | met on | status |", "|---|---|---|---|---|---|"]
    for batch, targets in TARGETS.items():
        for base, want in targets.items():
            ratios = [(rows[k][base]["median"] / rows[k][main]["median"], k[0])
                      for k in order if k[1] == batch and base in rows[k] and main in rows[k]]
            if not ratios:
                continue
            worst = min(ratios)
            met = sum(r >= want for r, _ in ratios)
            status = "met" if met == len(ratios) else "not met"
            lines.append(f"| {batch} | {base} | >= {want}x | {worst[0]:.2f}x ({worst[1]}) | "
                         f"{met}/{len(ratios)} layers | {status} |")
    return "\n".join(lines) + "\n"


def chart(rows, order, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = BASELINES + [c for c in ("sparks conv2d n=16", "sparks conv2d n=32", "sparks conv2d n=64")
                           if any(c in r for r in rows.values())]
    batches = sorted({k[1] for k in order})
    fig, axes = plt.subplots(len(batches), 1, figsize=(12, 4.2 * len(batches)), squeeze=False)
    for ax, batch in zip(axes[:, 0], batches):
        keys = [k for k in order if k[1] == batch]
        x = np.arange(len(keys))
        width = 0.8 / len(columns)
        for i, c in enumerate(columns):
            ys = [rows[k][c]["median"] * 1e3 if c in rows[k] else np.nan for k in keys]
            ax.bar(x + (i - len(columns) / 2 + 0.5) * width, ys, width, label=c)
        ax.set_yscale("log")
        ax.set_xticks(x, [k[0] for k in keys])
        ax.set_ylabel("median latency (ms, log)")
        ax.set_title(f"ResNet-18 3x3 layers, batch {batch}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON(s) (--benchmark-json)")
    here = pathlib.Path(__file__).parent
    parser.add_argument("--out", default=str(here / "RESULTS.md"))
    parser.add_argument("--png", default=str(here / "results.png"))
    args = parser.parse_args()
    data, runs, rows, order = load(args.json)
    text = markdown(data, runs, rows, order)
    chart(rows, order, args.png)
    text += f"\n![latency chart]({pathlib.Path(args.png).name})\n"
    # A hand-written analysis after the marker survives regeneration.
    out = pathlib.Path(args.out)
    marker = "<!-- analysis -->"
    if out.exists() and marker in out.read_text():
        text += "\n" + marker + out.read_text().split(marker, 1)[1]
    out.write_text(text)
    print(machine_line(data))
    print(text)


if __name__ == "__main__":
    main()
