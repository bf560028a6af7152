"""Seeded random sweep of both conv ops against the reference, on every CPU kernel path.

Each case draws a geometry (kernel up to 64 taps, stride/dilation up to 3, padding incl. int
padding, groups incl. depthwise, batch 0..3, tiny to medium spatial sizes, C_in up to 3300 so the
fast kernel's uint8 -> uint16 -> int32 accumulator widening boundaries are crossed), options
(pad_value 0/+1/-1, binary or ternary codebook of 1..600 codewords), dtypes (float16, bfloat16,
float32, float64 inputs; int or float codebooks; every int index dtype, and uint8 indices given as
a transposed view of a contiguous (C_in/groups, C_out) tensor, the fast layout) and input values
(exact zeros, -0.0, NaN, +-inf, denormals) and memory formats (contiguous, channels_last,
non-contiguous). Without scale/bias the op must equal the reference bit for bit.

Also: sums at their extreme (every term maximal or minimal) right at the widening boundaries,
and random invalid arguments, which must raise ValueError/RuntimeError and never kill the process
(run in a child process so that a crash fails one test instead of the whole session).
"""
from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
import torch

import sparks_ext
from sparks_ext.ops import cpu_kernels
from sparks_ext.reference import binary_conv2d_reference, conv2d_reference

PATHS = cpu_kernels()
CASES_PER_PATH = 150
MAX_COST = 1e7  # multiply-adds of the reference per case: keeps every case fast

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INDEX_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, "uint8-transposed",
                "uint8-transposed", "uint8-transposed-padded", "int64-strided"]
CODEBOOK_DTYPES = [torch.int8, torch.int32, torch.int64, torch.float16, torch.float32]
LAYOUTS = ["contiguous", "channels_last", "strided", "permuted"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("SPARKS_CPU_KERNEL", request.param)
    return request.param


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _draw(rng: random.Random) -> dict:
    """One valid case's parameters."""
    while True:
        r = rng.random()
        if r < 0.15:
            kh, kw = rng.choice([(1, 1), (1, 2), (2, 5), (3, 3), (1, 10), (10, 1)])
        elif r < 0.25:
            kh, kw = rng.choice([(8, 8), (4, 16), (16, 4), (1, 64), (64, 1), (7, 9), (6, 10), (11, 5)])
        elif r < 0.65:
            kh, kw = 3, 3
        else:
            kh, kw = rng.randint(1, 8), rng.randint(1, 8)
        if kh * kw > 64:
            continue
        stride = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3]))
        dilation = (rng.choice([1, 1, 1, 2, 3]), rng.choice([1, 1, 1, 2, 3]))
        padding = (rng.choice([0, 0, 1, 2, 3, 5]), rng.choice([0, 0, 1, 2, 3, 5]))
        int_padding = rng.random() < 0.2
        if int_padding:
            padding = (padding[0], padding[0])
        if rng.random() < 0.15:  # large C_in: the accumulator widening boundaries
            cin = rng.choice([127, 128, 254, 255, 256, 300, 511, 512, 600, 1100, 1500, 3276, 3300])
            groups = rng.choice([1, 1, 1, 2])
            cin -= cin % groups
        else:
            groups = rng.choice([1, 1, 1, 2, 3, 4, "depthwise"])
            if groups == "depthwise":
                cin = groups = rng.randint(1, 70)
            else:
                cin = groups * rng.randint(1, 40)
        cout_g = rng.choice([1, 2, 3, 16, 31, 32, 33, 63, 64, 65, 129, rng.randint(1, 70)])
        if groups > 8:
            cout_g = rng.choice([1, 2, 3])
        if rng.random() < 0.2:
            h, w = rng.randint(1, 4), rng.randint(1, 4)
        elif rng.random() < 0.05:
            h, w = rng.randint(30, 60), rng.randint(1, 8)
        else:
            h, w = rng.randint(1, 24), rng.randint(1, 24)
        oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
        ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
        if oh < 1 or ow < 1:
            continue
        batch = rng.choice([0, 1, 1, 1, 2, 3])
        if max(batch, 1) * cout_g * groups * (cin // groups) * kh * kw * oh * ow > MAX_COST:
            continue
        n = rng.choice([1, 2, 3, 15, 16, 17, 32, 33, 48, 63, 64, 65, 128, 255, 256, 257, 600,
                        rng.randint(1, 600)])
        if n > 64 and rng.random() < 0.4:
            n = rng.randint(1, 64)  # the LUT kernel's range, most of the time
        return dict(kernel=(kh, kw), stride=stride, dilation=dilation, padding=padding,
                    int_padding=int_padding, cin=cin, cout=cout_g * groups, groups=groups,
                    size=(h, w), batch=batch, n=n, dtype=rng.choice(DTYPES),
                    layout=rng.choice(LAYOUTS), ternary=rng.random() < 0.4,
                    codebook_dtype=rng.choice(CODEBOOK_DTYPES), index_dtype=rng.choice(INDEX_DTYPES),
                    weight_dtype=rng.choice(["bool", "int8", "float32", "input"]),
                    pad_value=rng.choice([0.0, 1.0, -1.0]), specials=rng.random() < 0.3,
                    zeros=rng.choice([0.0, 0.05, 0.5]), seed=rng.randrange(2**31))


def _cases(op: str, seed: int, count: int) -> list[dict]:
    rng = random.Random(f"{op}-{seed}")
    return [_draw(rng) for _ in range(count)]


def _make_input(p: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(p["seed"])
    shape = (p["batch"], p["cin"], *p["size"])
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if p["zeros"]:
        x[torch.rand(shape, generator=g) < p["zeros"]] = 0.0
    if p["specials"]:
        kind = torch.randint(0, 8, shape, generator=g)
        for k, v in enumerate([-0.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1e-300], 1):
            x[kind == k] = v
    x = x.to(p["dtype"])
    if p["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif p["layout"] == "strided":
        wide = torch.zeros((*shape[:3], 2 * shape[3]), dtype=p["dtype"])
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif p["layout"] == "permuted":  # H and W strides swapped
        x = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    return x


def _kwargs(p: dict) -> dict:
    return dict(stride=p["stride"], padding=p["padding"][0] if p["int_padding"] else p["padding"],
                dilation=p["dilation"], groups=p["groups"], pad_value=p["pad_value"])


def _make_codebook_indices(p: dict):
    g = torch.Generator().manual_seed(p["seed"] + 1)
    n, (kh, kw) = p["n"], p["kernel"]
    cb = torch.randint(-1 if p["ternary"] else 0, 2, (n, kh, kw), generator=g)
    if not p["ternary"]:
        cb = cb * 2 - 1
    cb = cb.to(p["codebook_dtype"])
    idx = torch.randint(0, n, (p["cout"], p["cin"] // p["groups"]), generator=g)
    dt = p["index_dtype"]
    if dt in (torch.uint8, "uint8-transposed", "uint8-transposed-padded") and n > 256:
        dt = torch.int64
    if dt == torch.int8 and n > 128:
        dt = torch.int16
    if dt == "uint8-transposed":  # the fast layout: a view of a contiguous (C_in/groups, C_out)
        idx = idx.to(torch.uint8).t().contiguous().t()
    elif dt == "uint8-transposed-padded":  # transposed, but rows longer than C_out
        big = torch.zeros((idx.shape[1], idx.shape[0] + 3), dtype=torch.uint8)
        big[:, :idx.shape[0]] = idx.t()
        idx = big[:, :idx.shape[0]].t()
    elif dt == "int64-strided":
        big = torch.zeros((idx.shape[0], 2 * idx.shape[1]), dtype=torch.int64)
        big[:, ::2] = idx
        idx = big[:, ::2]
    else:
        idx = idx.to(dt)
    return cb, idx


def _make_weight(p: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(p["seed"] + 2)
    w = torch.randint(0, 2, (p["cout"], p["cin"] // p["groups"], *p["kernel"]), generator=g).bool()
    dt = p["weight_dtype"]
    if dt == "bool":
        return w
    return w.to(p["dtype"] if dt == "input" else getattr(torch, dt)) * 2 - 1


def _describe(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


@pytest.mark.parametrize("seed", [0])
def test_conv2d_random_sweep(path, seed, one_thread):
    failures = []
    for p in _cases("conv2d", seed, CASES_PER_PATH):
        x, (cb, idx), kw = _make_input(p), _make_codebook_indices(p), _kwargs(p)
        out = sparks_ext.conv2d(x, cb, idx, **kw)
        ref = conv2d_reference(x, cb, idx, **kw)
        if not (out.dtype == ref.dtype and torch.equal(out, ref)):
            failures.append(_describe(p))
    assert not failures, f"{len(failures)} mismatches on {path}:\n" + "\n".join(failures)


@pytest.mark.parametrize("seed", [0])
def test_binary_conv2d_random_sweep(path, seed, one_thread):
    failures = []
    for p in _cases("binary_conv2d", seed, CASES_PER_PATH):
        x, w, kw = _make_input(p), _make_weight(p), _kwargs(p)
        out = sparks_ext.binary_conv2d(x, w, **kw)
        ref = binary_conv2d_reference(x, w, **kw)
        if not (out.dtype == ref.dtype and torch.equal(out, ref)):
            failures.append(_describe(p))
    assert not failures, f"{len(failures)} mismatches on {path}:\n" + "\n".join(failures)


def test_memory_format_follows_input(path, one_thread):
    """channels_last in, channels_last out (ops.conv2d's promise), on random cases."""
    for p in _cases("layout", 0, 30):
        p["layout"] = "channels_last"
        x, (cb, idx), kw = _make_input(p), _make_codebook_indices(p), _kwargs(p)
        out = sparks_ext.conv2d(x, cb, idx, **kw)
        if not x.is_contiguous() and out.numel() > 0:  # an unambiguously channels_last input
            assert out.is_contiguous(memory_format=torch.channels_last), _describe(p)


# --- Extreme sums at the fast kernel's accumulator widening boundaries -------------------------
# LUT kernel: uint8 lanes hold floor(255 / (2 taps)) terms, uint16 ones a multiple of that up to
# floor(65535 / (2 taps)). Inputs equal to the codeword make every term maximal (2 taps in the
# LUT); inputs opposite to it make it minimal (0).

def _boundaries(taps: int) -> list[int]:
    period = 255 // (2 * taps)
    chunk = (65535 // (2 * taps)) // period * period
    cins = {period - 1, period, period + 1, 2 * period + 1, 300, 600, 1100}
    if chunk <= 4000:
        cins |= {chunk - 1, chunk, chunk + 1, chunk + period + 1}
    return sorted(c for c in cins if c >= 1)


EXTREME = [(k, cin) for k in [(1, 1), (1, 2), (3, 3), (2, 5), (1, 10), (8, 8)]
           for cin in _boundaries(k[0] * k[1])]


@pytest.mark.parametrize("kernel,cin", EXTREME, ids=lambda v: str(v))
def test_extreme_sums_at_widening_boundaries(kernel, cin, path, one_thread):
    g = torch.Generator().manual_seed(cin)
    for sign, n, cout in [(1.0, 64, 65), (-1.0, 17, 33)]:
        x = torch.full((1, cin, *kernel), sign)
        cb = torch.randint(0, 2, (n, *kernel), generator=g, dtype=torch.int8) * 2 - 1
        cb[0] = int(sign)  # codeword 0 equals every input patch: maximal terms
        cb[1] = -int(sign)  # codeword 1 is its opposite: minimal terms
        idx = torch.zeros(cout, cin, dtype=torch.long)
        idx[1::3] = 1
        idx[2::3] = torch.randint(0, n, idx[2::3].shape, generator=g)
        for given in (idx, idx.to(torch.uint8).t().contiguous().t()):
            out = sparks_ext.conv2d(x, cb, given)
            assert torch.equal(out, conv2d_reference(x, cb, idx)), (kernel, cin, sign, given.dtype)
        # the same with one pixel and padding, where border taps read the pad value
        xp, pad = x[:, :, :1, :1], (kernel[0] // 2, kernel[1] // 2)
        for pv in (0.0, 1.0, -1.0):
            kw = dict(padding=pad, pad_value=pv)
            assert torch.equal(sparks_ext.conv2d(xp, cb, idx, **kw),
                               conv2d_reference(xp, cb, idx, **kw)), (kernel, cin, sign, pv)
            w = cb[idx]
            assert torch.equal(sparks_ext.binary_conv2d(xp, w, **kw),
                               binary_conv2d_reference(xp, w, **kw)), (kernel, cin, sign, pv)


# --- Invalid arguments never crash the process -------------------------------------------------

def _run_child(code: str, path: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env_code = f"import os; os.environ['SPARKS_CPU_KERNEL'] = {path!r}\n"
    return subprocess.run([sys.executable, "-c", env_code + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


_INVALID_SWEEP = r"""
import random, torch, sparks_ext
torch.set_num_threads(1)
rng = random.Random(1234)
x0 = torch.randn(2, 6, 7, 8)
cb0 = (torch.randint(0, 2, (5, 3, 3)) * 2 - 1).to(torch.int8)
idx0 = torch.randint(0, 5, (4, 3))
w0 = torch.randint(0, 2, (4, 3, 3, 3)).bool()
bad = [
    lambda x, cb, idx, kw: (x[0], cb, idx, kw),
    lambda x, cb, idx, kw: (x[None], cb, idx, kw),
    lambda x, cb, idx, kw: (x.to(rng.choice([torch.int32, torch.int8, torch.bool])), cb, idx, kw),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "groups": rng.choice([0, -1, 4, 5, 7, 1000])}),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "stride": rng.choice([0, -1, (1, 0), (0, 2), 2**40])}),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "padding": rng.choice([-1, (0, -2), 2**31 + 5, 10**6])}),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "dilation": rng.choice([0, -1, (1, 0), 2**40])}),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "pad_value": rng.choice([0.5, 2.0, float("nan"), float("inf")])}),
    lambda x, cb, idx, kw: (x, cb, idx.new_full(idx.shape, rng.choice([-1, 5, 255, 2**40])), kw),
    lambda x, cb, idx, kw: (x, cb.float().index_fill(0, torch.tensor([0]), rng.choice([2.0, 0.5, float("nan")])), idx, kw),
    lambda x, cb, idx, kw: (x, torch.ones(rng.choice([(0, 3, 3), (5, 9, 9), (5, 1, 65), (5, 0, 3), (5, 3)])), idx, kw),
    lambda x, cb, idx, kw: (x, cb, idx[:, :2] if rng.random() < 0.5 else idx[:, None], kw),
    lambda x, cb, idx, kw: (x, cb, idx.to(rng.choice([torch.float32, torch.bool])), kw),
    lambda x, cb, idx, kw: (x, cb.bool(), idx, kw),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "scale": torch.ones(rng.choice([1, 3, 5]), dtype=rng.choice([torch.float32, torch.float64, torch.int32]))}),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "bias": torch.ones((2, 2)) if rng.random() < 0.5 else torch.ones(4, dtype=torch.int64)}),
    lambda x, cb, idx, kw: (x[:, :, :rng.choice([0, 1, 2])], cb, idx, kw),
    lambda x, cb, idx, kw: (x, cb, idx, {**kw, "stride": (1, 2, 3)}),
]
for i in range(600):
    x, cb, idx, kw = rng.choice(bad)(x0, cb0, idx0, dict(padding=rng.choice([0, 1])))
    try:
        w = cb[idx.long().clamp(0, cb.shape[0] - 1)]
        if rng.random() < 0.3:
            w = w.float().flatten().index_fill(0, torch.tensor([0]), rng.choice([0.0, 2.0, float("nan")])).view(w.shape)
    except Exception:
        w = w0
    for call in (lambda: sparks_ext.conv2d(x, cb, idx, **kw), lambda: sparks_ext.binary_conv2d(x, w, **kw)):
        try:
            call()
        except (ValueError, RuntimeError):
            pass
print("ok")
"""


def test_invalid_arguments_never_crash(path):
    proc = _run_child(_INVALID_SWEEP, path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
        f"returncode {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


# --- Regressions found by fuzzing --------------------------------------------------------------

_ZERO_INPUT_CHANNELS = r"""
import torch, sparks_ext
x = torch.zeros(1, 0, 3, 3)
try:
    out = sparks_ext.conv2d(x, torch.ones(1, 1, 1), torch.zeros(1, 0, dtype=torch.long))
except (ValueError, RuntimeError) as e:
    print("raised", type(e).__name__)
else:
    # an empty sum: zeros of shape (N, C_out, H_out, W_out)
    assert out.shape == (1, 1, 3, 3) and not out.any(), (out.shape, out)
    print("zeros")
"""


def test_regression_zero_input_channels_does_not_crash(path):
    """conv2d with C_in = 0 died of SIGFPE (integer division by zero) on the avx2/avx512 paths
    (the LUT kernel's tile size divides by C_in/groups * 64); portable returns zeros."""
    proc = _run_child(_ZERO_INPUT_CHANNELS, path, timeout=60)
    assert proc.returncode == 0, f"process died with returncode {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() in ("raised ValueError", "raised RuntimeError", "zeros"), proc.stdout
