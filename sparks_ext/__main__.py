"""Command line: ``python -m sparks_ext demo | powerlaw | summary | bench``.

- ``demo``: trains a small Sparks network (0.56 bits per binary weight) on scikit-learn's 8x8
  digits, converts it, checks the converted outputs against the trained ones, saves it in the
  compact format, and prints accuracy (also deployed in bfloat16), bits per weight, file size,
  the summary table and the fused model's latency against the same network with float
  convolutions (median of many rounds after warm-up).
- ``summary``: the per-layer table of the binary ResNet-18 at 224x224 and its BOPs for
  1-bit and n = 64 / 32 / 16.
- ``powerlaw``: trains a 1-bit network on the digits and plots how often each of the 512 binary
  3x3 kernels occurs per layer (log-log rank/frequency, PNG; needs matplotlib).
- ``bench``: the layer benchmarks of a source checkout (``pytest benchmarks``, a few minutes)
  and their report (``benchmarks/report.py``: RESULTS.md and a chart), written to ``--out``
  (needs pytest, pytest-benchmark and matplotlib: the ``[bench]`` extra).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .convert import convert
from .datasets import load_digits_split
from .serialization import read_header, save, load
from .summary import summary


# ---------------------------------------------------------------------------------------------
# demo

def _digits(seed: int):
    try:
        return load_digits_split(test_size=0.2, seed=seed)
    except ImportError as e:
        raise SystemExit(f"the demo trains on scikit-learn's digits: {e}") from None


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def _latencies_ms(models: dict, x: torch.Tensor, rounds: int, warmup: int = 5) -> dict:
    """Median wall time (ms) of one forward pass of each model. The models take turns within
    every round, so that a burst of load on a shared machine hits all of them alike, and the
    median over many rounds ignores the bursts (a single timing varied 0.86x-3.57x)."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _train(model, x, y, epochs: int, batch_size: int, lr: float, seed: int, quiet: bool):
    from tqdm import tqdm
    from .selection import TemperatureSchedule, set_temperature

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(y) // batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total)
    tau = TemperatureSchedule(1.0, 0.05, total)
    model.train()
    bar = tqdm(total=total, desc="training", unit="step", disable=quiet, dynamic_ncols=True)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            batch = order[i:i + batch_size]
            set_temperature(model, tau(step))
            logits = model(x[batch])
            loss = nn.functional.cross_entropy(logits, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def demo(args) -> int:
    from .models import SmallCNN

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = _digits(args.seed)
    print(f"sklearn digits: {len(y_train)} training and {len(y_test)} test images of 8x8; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # Five Sinkhorn iterations per step are plenty for 32 of 512 codewords on this small task.
    model = SmallCNN(conv="sparks", n_codewords=args.n_codewords, width=args.width, image_size=8,
                     conv_kwargs=dict(sinkhorn_iters=5))
    threads = torch.get_num_threads()
    # The network is tiny: each op is too small to gain from threads, and on a busy machine
    # their synchronisation costs more than the op, so training runs on --train-threads.
    torch.set_num_threads(args.train_threads)
    start = time.perf_counter()
    try:
        _train(model, x_train, y_train, args.epochs, args.batch_size, args.lr, args.seed, args.quiet)
    finally:
        torch.set_num_threads(threads)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s "
          f"({args.train_threads} thread{'s' if args.train_threads > 1 else ''})")

    with torch.no_grad():
        trained_logits = model(x_test)
        # convert fuses by default: BatchNorm, RSign and RPReLU fold into the binary convs
        converted = convert(model)
        converted_logits = converted(x_test)
        bf16_logits = convert(model, dtype=torch.bfloat16)(x_test).float()
    accuracy = _accuracy(trained_logits, y_test)
    diff = (converted_logits - trained_logits).abs().max().item()
    relative = diff / trained_logits.abs().max().item()
    agree = (converted_logits.argmax(1) == trained_logits.argmax(1)).float().mean().item()
    # Folding changes float rounding only (see sparks_ext.convert): the deployed model must
    # make the trained model's prediction on every test image.
    ok = agree == 1.0 and relative < 1e-3
    print(f"test accuracy: {100 * accuracy:.1f}% (converted and fused: "
          f"{100 * _accuracy(converted_logits, y_test):.1f}%, deployed in bfloat16: "
          f"{100 * _accuracy(bf16_logits, y_test):.1f}%)")
    print(f"fused vs trained outputs: max |diff| {diff:.2e} ({relative:.1e} of the largest logit), "
          f"same predictions on {100 * agree:.1f}% -> {'OK' if ok else 'MISMATCH'}")

    info = summary(converted, (1, 8, 8), name="SmallCNN (Sparks, converted and fused)")
    out = Path(args.out)
    size = save(converted, out)
    header_bytes = read_header(out)["header_bytes"]
    reloaded = load(out, SmallCNN(conv="sparks", n_codewords=args.n_codewords, width=args.width)).eval()
    with torch.no_grad():
        exact = torch.equal(reloaded(x_test), converted_logits)
    print(f"bits per binary weight: {math.log2(args.n_codewords) / 9:.3f} for the indices, "
          f"{info.binary_bits_per_weight:.3f} with the codebooks")
    print(f"saved {out}: {size:,} bytes = theoretical {info.memory_bytes:,.0f} (indices at "
          f"ceil(log2 n) bits, codebooks at 1 bit, real tensors at their width) + header "
          f"{header_bytes} + {size - info.memory_bytes - header_bytes:,.0f} (framing, integer "
          f"counters); float32 would take {info.float32_bytes:,} bytes; reloaded outputs "
          f"{'identical' if exact else 'DIFFER'}")
    print()
    print(info)
    print()

    # Latency does not depend on the weights' values: untrained float and 1-bit twins will do.
    # Every binary network is the fused deployment (convert's default).
    batch = x_test[: args.latency_batch].contiguous(memory_format=torch.channels_last)
    repeats = args.latency_repeats
    sparks = f"Sparks n={args.n_codewords} fused"
    timings = _latencies_ms({
        "float": SmallCNN(conv="float", width=args.width).eval(),
        "1-bit XNOR fused": convert(SmallCNN(conv="binary", width=args.width).eval()),
        sparks: converted,
    }, batch, repeats)
    print(f"latency of SmallCNN, batch {len(batch)}, {torch.get_num_threads()} threads, median of "
          f"{repeats} rounds after warm-up: " + ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items())
          + f" (Sparks vs float: {timings['float'] / timings[sparks]:.2f}x)")
    return 0 if ok and exact else 1


def powerlaw(args) -> int:
    from . import analysis
    from .models import SmallCNN

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = _digits(args.seed)
    model = SmallCNN(conv="binary", width=args.width, image_size=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.train_threads)
    try:
        _train(model, x_train, y_train, args.epochs, args.batch_size, args.lr, args.seed, args.quiet)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = _accuracy(model(x_test), y_test)
    histograms = analysis.codeword_histogram(model)
    print(f"1-bit SmallCNN (width {args.width}) on digits: test accuracy {100 * accuracy:.1f}%")
    print(f"{'layer':<16} {'kernels':>8} {'distinct':>9} {'top-32 share':>13} {'slope':>7}")
    for name, counts in histograms.items():
        top = counts.sort(descending=True).values[:32].sum() / counts.sum()
        print(f"{name:<16} {int(counts.sum()):>8} {int((counts > 0).sum()):>9} {100 * top:>12.1f}% "
              f"{analysis.power_law_exponent(counts):>7.2f}")
    analysis.plot_rank_frequency(histograms, args.out,
                                 title="Binary 3x3 kernels of a 1-bit CNN trained on digits")
    print(f"saved {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# summary, bench

def resnet18_summaries(input_size: int = 224):
    """Summaries of the binary ResNet-18 for 1-bit and n = 64 / 32 / 16 codewords."""
    from .models import resnet18

    torch.manual_seed(0)
    configs = [("1-bit", dict(conv="binary")), *((f"n={n}", dict(conv="sparks", n_codewords=n))
                                                 for n in (64, 32, 16))]
    return {label: summary(resnet18(**kw), (3, input_size, input_size), name=f"ResNet-18 ({label})")
            for label, kw in configs}


def summary_command(args) -> int:
    results = resnet18_summaries(args.input_size)
    print(results[args.show])
    print()
    print(f"{'ResNet-18':<10} {'bits/weight':>11} {'memory':>10} {'BOPs':>10} {'FLOPs':>10} {'OPs':>10}")
    for label, s in results.items():
        print(f"{label:<10} {s.binary_bits_per_weight:>11.3f} {s.memory_bytes / 2 ** 20:>6.2f} MiB "
              f"{s.bops:>10.4g} {s.flops:>10.4g} {s.ops:>10.4g}")
    return 0


def bench(args) -> int:
    """Runs the pytest-benchmark suite of a source checkout into a JSON, then its report on it
    (README, "CPU kernels and speed"): results.json, RESULTS.md and results.png in ``--out``."""
    root = Path(__file__).resolve().parent.parent
    suite, report = root / "benchmarks", root / "benchmarks" / "report.py"
    if not report.exists():
        print(f"the benchmarks are part of the source checkout ({report} not found)", file=sys.stderr)
        return 2
    missing = [name for name in ("pytest", "pytest_benchmark", "matplotlib")
               if importlib.util.find_spec(name) is None]
    if missing:
        print(f"bench needs {', '.join(missing)}: pip install pytest pytest-benchmark matplotlib "
              f"(or the [bench] extra, e.g. pip install --no-build-isolation -e '.[bench]')",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    results, table, chart = out / "results.json", out / "RESULTS.md", out / "results.png"
    if table == (suite / "RESULTS.md").resolve():
        print(f"bench: this replaces the committed {table} (its hand-written analysis is kept) "
              f"and {chart}", file=sys.stderr)
    else:
        print(f"bench: writing {results}, {table} and {chart}; the committed benchmarks/RESULTS.md "
              f"stays as it is (--out {suite} replaces it)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    code = subprocess.call([sys.executable, "-m", "pytest", str(suite), f"--benchmark-json={results}",
                            *args.pytest_args], cwd=root)
    if code != 0:
        return code
    return subprocess.call([sys.executable, str(report), str(results), "--out", str(table),
                            "--png", str(chart)], cwd=root)


class _ParserWithDefaults(argparse.ArgumentParser):
    """Every subcommand's --help shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparks_ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ParserWithDefaults)
    p = sub.add_parser("demo", help="train, convert, save and time a Sparks network on sklearn digits")
    p.add_argument("--epochs", type=int, default=12, help="training epochs over the 1437 training images")
    p.add_argument("--n-codewords", type=int, default=32, help="codebook size n of each binary conv "
                                                             "(log2(n)/9 bits per weight)")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage (the second has twice as many)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=2e-2, help="peak learning rate of Adam (one-cycle schedule)")
    p.add_argument("--train-threads", type=int, default=1,
                   help="torch threads while training (this tiny network trains fastest on one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and batches")
    p.add_argument("--out", default="demo.spk", help="where to save the converted model (compact format)")
    p.add_argument("--latency-batch", type=int, default=256, help="batch size of the latency comparison")
    p.add_argument("--latency-repeats", type=int, default=50,
                   help="timed forward passes per network, taking turns after warm-up (median)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=demo)
    p = sub.add_parser("powerlaw", help="train a 1-bit CNN on digits and plot its kernel rank/frequency")
    p.add_argument("--out", default="power_law.png", help="where to write the plot (PNG)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage (the second has twice as many)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=2e-2, help="peak learning rate of Adam (one-cycle schedule)")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads while training")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and batches")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=powerlaw)
    p = sub.add_parser("summary", help="per-layer table and BOPs of the binary ResNet-18")
    p.add_argument("--input-size", type=int, default=224, help="image height and width")
    p.add_argument("--show", choices=["1-bit", "n=64", "n=32", "n=16"], default="n=32",
                   help="which network's per-layer table to print before the comparison")
    p.set_defaults(func=summary_command)
    from . import train as training
    p = sub.add_parser("train", help="train a float, 1-bit, Sparks or signed-binary network on an image "
                                     "folder or the digits (two-stage ReActNet recipe, distillation, "
                                     "torchrun, checkpoints), then convert and save it",
                       description=training.__doc__.split("\n\n")[0])
    training.add_arguments(p)
    p.set_defaults(func=training.main)
    p = sub.add_parser("bench", help="run the layer benchmarks (benchmarks/, a few minutes) and "
                                     "their report; further arguments go to pytest, e.g. -k 'batch1'")
    p.set_defaults(func=bench)
    p.epilog = "Further arguments go to pytest, e.g. -k batch1."
    p.add_argument("--out", default="bench-results",
                   help="folder for results.json, RESULTS.md and results.png (benchmarks/ replaces the committed ones)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.pytest_args = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
