"""The ops' fused arguments (threshold, residual, prelu_weight, post_bias) against the reference.

Every test runs on every CPU kernel family this machine has (forced with SPARKS_CPU_KERNEL) and,
where a GPU and a CUDA build exist, on both CUDA code paths. The output transform is computed
step by step in opmath by the kernels and by the reference alike, so results are compared bit
for bit, not within a tolerance.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

import sparks_ext
from sparks_ext.ops import cpu_kernels
from sparks_ext.reference import binary_conv2d_reference, conv2d_reference
from tests.helpers.cases import Case, SteSign

_CUDA = (torch.cuda.is_available()
         and torch._C._dispatch_has_kernel_for_dispatch_key("sparks::conv2d", "CUDA"))
TARGETS = [f"cpu-{p}" for p in cpu_kernels()] + (["cuda-fast", "cuda-portable"] if _CUDA else [])


@pytest.fixture(params=TARGETS)
def device(request, monkeypatch):
    """A device with one of its kernel families forced; returns the device name."""
    kind, family = request.param.split("-")
    if kind == "cpu":
        monkeypatch.setenv("SPARKS_CPU_KERNEL", family)
    elif family == "portable":
        monkeypatch.setenv("SPARKS_CUDA_PORTABLE", "1")
    else:
        monkeypatch.delenv("SPARKS_CUDA_PORTABLE", raising=False)
    return kind


FUSED = ("threshold", "residual", "prelu_weight", "post_bias")
# Each argument alone, all four, and all four with scale and bias.
COMBOS = [(name,) for name in FUSED] + [FUSED, FUSED + ("scale", "bias")]


def _out_shape(case: Case):
    def size(n, k, s, p, d):
        return (n + 2 * p - d * (k - 1) - 1) // s + 1
    return (case.batch, case.out_channels,
            size(case.size[0], case.kernel[0], case.stride[0], case.padding[0], case.dilation[0]),
            size(case.size[1], case.kernel[1], case.stride[1], case.padding[1], case.dilation[1]))


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-dense view
        wide = torch.zeros((*t.shape[:3], 2 * t.shape[3]), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def make_fused(case: Case, x: torch.Tensor, names, residual_layout="contiguous", seed=0) -> dict:
    """The named optional arguments for `case`, on x's device. Some thresholds equal an input
    value exactly (the >= edge); slopes are of both signs."""
    g = torch.Generator().manual_seed(seed + 10)
    cin, cout, dt = case.in_channels, case.out_channels, case.dtype
    out = {}
    if "threshold" in names:
        t = (torch.randn(cin, generator=g, dtype=torch.float64) * 0.5).to(dt).to(x.device)
        if x.numel():
            t[::3] = x[0, ::3, 0, 0]
        out["threshold"] = t
    if "residual" in names:
        r = torch.randn(_out_shape(case), generator=g, dtype=torch.float64) * 4
        out["residual"] = _layout(r.to(dt).to(x.device), residual_layout)
    if "prelu_weight" in names:
        out["prelu_weight"] = (torch.rand(cout, generator=g, dtype=torch.float64) - 0.3).to(dt).to(x.device)
    if "post_bias" in names:
        out["post_bias"] = torch.randn(cout, generator=g, dtype=torch.float64).to(dt).to(x.device)
    if "scale" in names:
        scale, bias = case.make_scale_bias(x.device)
        out["scale"], out["bias"] = scale, bias
    return out


_BASE = Case()
CASES = [
    _BASE,
    dataclasses.replace(_BASE, layout="channels_last"),
    dataclasses.replace(_BASE, stride=(2, 2), size=(10, 11)),
    dataclasses.replace(_BASE, stride=(2, 2), size=(10, 11), layout="channels_last", pad_value=1.0),
    dataclasses.replace(_BASE, groups=2, pad_value=-1.0),
    dataclasses.replace(_BASE, groups=8, out_channels=8),  # depthwise
    dataclasses.replace(_BASE, kernel=(1, 1), padding=(0, 0), ternary=True),
    dataclasses.replace(_BASE, kernel=(5, 5), padding=(2, 2), size=(11, 10), ternary=True),
    dataclasses.replace(_BASE, layout="strided", ternary=True, pad_value=1.0),
    dataclasses.replace(_BASE, batch=0),
    # Several words per pixel, several 64-channel blocks and partial ones (the fast kernels).
    Case(batch=2, in_channels=70, out_channels=130, size=(9, 11), n=33, layout="channels_last"),
    Case(batch=1, in_channels=128, out_channels=64, size=(7, 7), n=64, ternary=True),
    Case(batch=1, in_channels=192, out_channels=96, size=(5, 5), n=32, groups=3, layout="channels_last"),
    Case(batch=1, in_channels=64, out_channels=128, size=(14, 14), n=32, stride=(2, 2),
         layout="channels_last"),
] + [dataclasses.replace(_BASE, dtype=dt, layout=lay)
     for dt, lay in itertools.product((torch.float16, torch.bfloat16, torch.float32, torch.float64),
                                      ("contiguous", "channels_last"))]
RESIDUAL_LAYOUTS = ("contiguous", "channels_last", "strided")


def _run_both(case: Case, device: str, names, residual_layout: str):
    x = case.make_input(device)
    cb, idx, w = case.make_codebook(device), case.make_indices(device), case.make_dense_weight(device)
    fused = make_fused(case, x, names, residual_layout)
    k = case.conv_kwargs()
    got = sparks_ext.conv2d(x, cb, idx, **k, **fused)
    cpu = {n: t.cpu() for n, t in fused.items()}
    want = conv2d_reference(x.cpu(), cb.cpu(), idx.cpu(), **k, **cpu)
    got_dense = sparks_ext.binary_conv2d(x, w, **k, **fused)
    want_dense = binary_conv2d_reference(x.cpu(), w.cpu(), **k, **cpu)
    return got, want, got_dense, want_dense, x


@pytest.mark.parametrize("names", COMBOS, ids=lambda n: "+".join(n))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fused_matches_reference(case, names, device):
    residual_layout = RESIDUAL_LAYOUTS[CASES.index(case) % 3]
    got, want, got_dense, want_dense, _ = _run_both(case, device, names, residual_layout)
    assert torch.equal(got.cpu(), want), (got.cpu() - want).abs().max()
    assert torch.equal(got_dense.cpu(), want_dense), (got_dense.cpu() - want_dense).abs().max()
    if got.numel():  # the output keeps the input's memory format, whatever the residual's
        assert got.is_contiguous(memory_format=torch.channels_last) == (case.layout == "channels_last")


@pytest.mark.parametrize("residual_layout", RESIDUAL_LAYOUTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_in_any_memory_format(dtype, layout, residual_layout, device):
    """The AVX-512 rows (channels_last float32 / bfloat16) and the strided writer, with every
    residual layout."""
    case = Case(batch=2, in_channels=64, out_channels=80, size=(6, 7), n=32, dtype=dtype, layout=layout)
    got, want, got_dense, want_dense, _ = _run_both(case, device, FUSED + ("scale", "bias"), residual_layout)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got_dense.cpu(), want_dense)


@pytest.mark.parametrize("case", CASES[:10], ids=lambda c: c.id)
def test_threshold_alone_is_integer_exact(case, device):
    """With only a threshold the outputs are exact integers: the op on x with threshold t is the
    op on the input binarized beforehand, and the reference."""
    x = case.make_input(device)
    cb, idx, w = case.make_codebook(device), case.make_indices(device), case.make_dense_weight(device)
    t = make_fused(case, x, ("threshold",))["threshold"]
    k = case.conv_kwargs()
    signs = torch.where(x >= t[None, :, None, None], 1.0, -1.0).to(x.dtype)
    got = sparks_ext.conv2d(x, cb, idx, **k, threshold=t)
    assert torch.equal(got, sparks_ext.conv2d(signs, cb, idx, **k))
    assert torch.equal(got.cpu(), conv2d_reference(x.cpu(), cb.cpu(), idx.cpu(), **k, threshold=t.cpu()))
    got = sparks_ext.binary_conv2d(x, w, **k, threshold=t)
    assert torch.equal(got, sparks_ext.binary_conv2d(signs, w, **k))
    assert torch.equal(got.cpu(), binary_conv2d_reference(x.cpu(), w.cpu(), **k, threshold=t.cpu()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fused_arguments_as_strided_views(layout, device):
    """Per-channel arguments that are views with a stride (a slice of a parameter), and an
    expanded (stride 0) residual, are read correctly."""
    case = Case(in_channels=16, out_channels=24, n=32, layout=layout)
    x = case.make_input(device)
    cb, idx, w = case.make_codebook(device), case.make_indices(device), case.make_dense_weight(device)
    fused = make_fused(case, x, FUSED + ("scale", "bias"))
    views = {n: torch.stack([t, torch.full_like(t, 7.0)], dim=-1)[..., 0] for n, t in fused.items()
             if n != "residual"}
    assert all(v.stride(-1) == 2 for v in views.values())
    views["residual"] = fused["residual"][:, :, :1, :1].expand_as(fused["residual"])
    k = case.conv_kwargs()
    want = conv2d_reference(x.cpu(), cb.cpu(), idx.cpu(), **k, **{n: v.cpu() for n, v in views.items()})
    assert torch.equal(sparks_ext.conv2d(x, cb, idx, **k, **views).cpu(), want)
    want = binary_conv2d_reference(x.cpu(), w.cpu(), **k, **{n: v.cpu() for n, v in views.items()})
    assert torch.equal(sparks_ext.binary_conv2d(x, w, **k, **views).cpu(), want)


# ---------------------------------------------------------------------------------------------
# The threshold compare on edge values: x >= t against x - t >= 0.

def _edge_values(dtype):
    info = torch.finfo(dtype)
    tiny_sub = info.smallest_normal * info.eps  # the smallest subnormal
    values = [0.0, -0.0, tiny_sub, -tiny_sub, 2 * tiny_sub, info.smallest_normal - tiny_sub,
              info.smallest_normal, -info.smallest_normal, 1.0, -1.0, 1.0 + info.eps, 0.5,
              info.max, -info.max, float("inf"), float("-inf"), float("nan")]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ge_threshold_equals_shifted_sign(dtype):
    """x >= t and x - t >= 0 agree for every pair of values of the dtype's edge set except
    x == t == +-inf (inf - inf is NaN); a NaN on either side gives False both ways."""
    v = _edge_values(dtype)
    x, t = torch.meshgrid(v, v, indexing="ij")
    direct, shifted = x >= t, (x - t) >= 0
    differ = direct != shifted
    assert torch.equal(differ, torch.isinf(x) & (x == t)), (x[differ], t[differ])
    nan = torch.isnan(x) | torch.isnan(t)
    assert not direct[nan].any() and not shifted[nan].any()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_threshold_binarization_on_edge_values(dtype, layout, device):
    """Every (input, threshold) pair of the edge set through both ops (a depthwise 1x1 conv with
    weight +1 returns the binarized input itself): exactly where(x >= t, 1, -1)."""
    v = _edge_values(dtype)
    c = v.numel()
    # Channel c has threshold v[c]; its pixels take every value of the set.
    x = v[None, None, :].expand(1, c, c).reshape(1, c, 1, c).clone()
    x = _layout(x, layout).to(device)
    t = v.clone().to(device)
    want = torch.where(x >= t[None, :, None, None], 1.0, -1.0).to(dtype)
    ones = torch.ones(c, 1, 1, 1, dtype=dtype, device=device)
    assert torch.equal(sparks_ext.binary_conv2d(x, ones, groups=c, threshold=t), want)
    cb = torch.ones(1, 1, 1, dtype=torch.int8, device=device)
    idx = torch.zeros(c, 1, dtype=torch.int64, device=device)
    assert torch.equal(sparks_ext.conv2d(x, cb, idx, groups=c, threshold=t), want)
    # Many channels in one word (the packers' vector lanes): 64 channels, all thresholds.
    wide = x.repeat(1, 4, 1, 1)[:, :64].contiguous()
    wide = _layout(wide, layout)
    tw = t.repeat(4)[:64].contiguous()
    want = torch.where(wide >= tw[None, :, None, None], 1.0, -1.0).to(dtype)
    ones = torch.ones(64, 1, 1, 1, dtype=dtype, device=device)
    assert torch.equal(sparks_ext.binary_conv2d(wide, ones, groups=64, threshold=tw), want)


# ---------------------------------------------------------------------------------------------
# Bad values: ValueError naming the argument.

def _bad_calls():
    x = torch.randn(2, 4, 8, 8)
    c_out = 6
    good = dict(threshold=torch.zeros(4), residual=torch.zeros(2, c_out, 6, 6),
                prelu_weight=torch.ones(c_out), post_bias=torch.zeros(c_out))
    bad = {
        "threshold": [torch.zeros(5), torch.zeros(1, 4), torch.zeros(4, dtype=torch.float64), torch.zeros(())],
        "residual": [torch.zeros(2, c_out, 6, 5), torch.zeros(1, c_out, 6, 6), torch.zeros(2, c_out, 36),
                     torch.zeros(2, c_out, 6, 6, dtype=torch.bfloat16)],
        "prelu_weight": [torch.ones(c_out + 1), torch.ones(1, c_out), torch.ones(c_out, dtype=torch.int32)],
        "post_bias": [torch.zeros(4), torch.zeros(c_out, 1), torch.zeros(c_out, dtype=torch.float16)],
    }
    for name, values in bad.items():
        for value in values:
            yield name, x, good, {**good, name: value}


@pytest.mark.parametrize("op", ["conv2d", "binary_conv2d"])
def test_bad_fused_arguments_name_the_argument(op):
    count = 0
    for name, x, good, args in _bad_calls():
        if op == "conv2d":
            cb, idx = torch.ones(8, 3, 3, dtype=torch.int8), torch.zeros(6, 4, dtype=torch.int64)
            call = lambda **a: sparks_ext.conv2d(x, cb, idx, **a)  # noqa: E731
        else:
            w = torch.ones(6, 4, 3, 3)
            call = lambda **a: sparks_ext.binary_conv2d(x, w, **a)  # noqa: E731
        assert call(**good).shape == (2, 6, 6, 6)
        with pytest.raises(ValueError, match=name):
            call(**args)
        count += 1
    assert count == 14


@pytest.mark.skipif(not _CUDA, reason="device mismatch needs a CUDA device")
@pytest.mark.parametrize("name", FUSED)
def test_fused_argument_on_another_device(name):
    case = Case()
    x = case.make_input("cuda")
    fused = make_fused(case, x, FUSED)
    fused[name] = fused[name].cpu()
    with pytest.raises(ValueError, match=f"{name} must be on the input's device"):
        sparks_ext.binary_conv2d(x, case.make_dense_weight("cuda"), **case.conv_kwargs(), **fused)


# ---------------------------------------------------------------------------------------------
# Autograd.

def _composite(x, w, scale, bias, threshold, residual, prelu_weight, post_bias, k):
    """The fused op written with torch ops and the independent SteSign oracle: sign of
    x - threshold with the clipped straight-through gradient."""
    xb = SteSign.apply(x - threshold[None, :, None, None])
    ph, pw = k["padding"]
    xb = F.pad(xb, (pw, pw, ph, ph), value=k["pad_value"])
    y = F.conv2d(xb, w, None, k["stride"], 0, k["dilation"], k["groups"])
    y = y * scale[None, :, None, None] + bias[None, :, None, None] + residual
    y = torch.where(y >= 0, y, prelu_weight[None, :, None, None] * y)
    return y + post_bias[None, :, None, None]


@pytest.mark.parametrize("op", ["conv2d", "binary_conv2d"])
@pytest.mark.parametrize("case", [Case(dtype=torch.float64), Case(dtype=torch.float64, stride=(2, 2), groups=2,
                                                                   pad_value=1.0, layout="channels_last")],
                         ids=lambda c: c.id)
def test_gradients_match_the_composite(case, op, device):
    """Every gradient (input, threshold, scale, bias, residual, prelu_weight, post_bias, weight)
    equals autograd through the composite of torch ops."""
    x = case.make_input(device)
    w = case.make_dense_weight(device)
    fused = make_fused(case, x, FUSED + ("scale", "bias"), seed=3)
    names = ["input", "threshold", "scale", "bias", "residual", "prelu_weight", "post_bias", "weight"]
    leaves = {"input": x, **fused, "weight": w}
    leaves = {n: leaves[n].detach().clone().requires_grad_() for n in names}
    k = case.conv_kwargs()
    grad_out = torch.randn(_out_shape(case), dtype=case.dtype, device=device)
    if op == "binary_conv2d":
        out = sparks_ext.binary_conv2d(
            leaves["input"], leaves["weight"], leaves["scale"], leaves["bias"], **k,
            **{n: leaves[n] for n in FUSED})
    else:
        cb = case.make_codebook(device).double()
        idx = torch.arange(case.out_channels * case.in_channels // case.groups, device=device)
        idx = (idx % case.n).reshape(case.out_channels, -1)
        leaves["weight"] = cb.clone().requires_grad_()
        out = sparks_ext.conv2d(
            leaves["input"], leaves["weight"], idx, leaves["scale"], leaves["bias"], **k,
            **{n: leaves[n] for n in FUSED})
    got = torch.autograd.grad(out, [leaves[n] for n in names], grad_out)

    ref_leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    dense = ref_leaves["weight"] if op == "binary_conv2d" else ref_leaves["weight"][idx]
    want_out = _composite(ref_leaves["input"], dense, ref_leaves["scale"], ref_leaves["bias"],
                          ref_leaves["threshold"], ref_leaves["residual"], ref_leaves["prelu_weight"],
                          ref_leaves["post_bias"], k)
    torch.testing.assert_close(out, want_out)
    want = torch.autograd.grad(want_out, [ref_leaves[n] for n in names], grad_out)
    for n, g, e in zip(names, got, want):
        torch.testing.assert_close(g, e, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("op", ["conv2d", "binary_conv2d"])
def test_gradcheck_of_the_output_transform(op, device):
    """The output is piecewise smooth in scale, bias, residual, prelu_weight and post_bias:
    their analytic gradients pass gradcheck (float64)."""
    case = Case(batch=1, in_channels=4, out_channels=6, size=(5, 5), dtype=torch.float64)
    x = case.make_input(device)
    fused = make_fused(case, x, FUSED + ("scale", "bias"), seed=5)
    t = fused.pop("threshold")
    names = ["scale", "bias", "residual", "prelu_weight", "post_bias"]
    args = tuple(fused[n].detach().clone().requires_grad_() for n in names)
    if op == "conv2d":
        cb, idx = case.make_codebook(device), case.make_indices(device)
        fn = lambda s, b, r, a, p: sparks_ext.conv2d(  # noqa: E731
            x, cb, idx, s, b, padding=1, threshold=t, residual=r, prelu_weight=a, post_bias=p)
    else:
        w = case.make_dense_weight(device)
        fn = lambda s, b, r, a, p: sparks_ext.binary_conv2d(  # noqa: E731
            x, w, s, b, padding=1, threshold=t, residual=r, prelu_weight=a, post_bias=p)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("op", ["conv2d", "binary_conv2d"])
def test_opcheck_with_fused_arguments(op, device):
    case = Case(stride=(2, 2), groups=2, pad_value=1.0)
    x = case.make_input(device).requires_grad_()
    fused = make_fused(case, x.detach(), FUSED + ("scale", "bias"))
    fused = {n: t.requires_grad_() for n, t in fused.items()}
    k = case.conv_kwargs()
    hyper = (list(k["stride"]), list(k["padding"]), list(k["dilation"]), k["groups"], k["pad_value"])
    tail = tuple(fused[n] for n in FUSED)
    if op == "conv2d":
        target = torch.ops.sparks.conv2d.default
        head = (x, case.make_codebook(device), case.make_indices(device))
    else:
        target = torch.ops.sparks.binary_conv2d.default
        head = (x, case.make_dense_weight(device).requires_grad_())
    torch.library.opcheck(target, (*head, fused["scale"], fused["bias"], *hyper, *tail))
    # Only some of them, the others defaulted.
    torch.library.opcheck(target, (*head, None, None, *hyper, fused["threshold"], None, fused["prelu_weight"]))


def test_torch_compile_fullgraph_with_fused_arguments(device):
    case = Case(in_channels=16, out_channels=16, n=32, layout="channels_last")
    x = case.make_input(device)
    cb, idx, w = case.make_codebook(device), case.make_indices(device), case.make_dense_weight(device)
    fused = make_fused(case, x, FUSED + ("scale", "bias"))
    other = make_fused(case, x, ("threshold", "prelu_weight", "post_bias"), seed=1)

    def block(x):
        y = sparks_ext.conv2d(x, cb, idx, padding=1, **fused)
        return sparks_ext.binary_conv2d(y, w, padding=1, residual=y, **other)

    want = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), want)
    torch.compiler.reset()
    compiled = torch.compile(block, fullgraph=True)
    assert torch.equal(compiled(x), want)


@pytest.mark.parametrize("op", ["conv2d", "binary_conv2d"])
def test_no_grad_call_equals_the_autograd_call(op):
    """Under torch.no_grad() the wrappers call the op below the Autograd key (skipping the Python
    autograd kernel): the same bits as with autograd on and under inference_mode, no graph."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 8, 9, 7, generator=g).requires_grad_()
    if op == "conv2d":
        weights = (torch.randint(0, 2, (16, 3, 3), generator=g).to(torch.int8) * 2 - 1,
                   torch.randint(0, 16, (6, 4), generator=g))
    else:
        weights = (torch.randint(0, 2, (6, 4, 3, 3), generator=g).float() * 2 - 1,)
    extra = dict(threshold=torch.randn(8, generator=g) * 0.3, prelu_weight=torch.rand(6, generator=g),
                 post_bias=torch.randn(6, generator=g))
    scale, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    fn = getattr(sparks_ext, op)

    def call():
        return fn(x, *weights, scale, bias, (2, 1), 1, 1, 2, 0.0, **extra)

    with_grad = call()
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        without = call()
        with torch.enable_grad():  # grad re-enabled inside: the autograd path again
            assert call().grad_fn is not None
    with torch.inference_mode():
        inference = call()
    assert without.grad_fn is None and not without.requires_grad
    assert torch.equal(without, with_grad.detach()) and torch.equal(inference, without)


@pytest.mark.parametrize("value", [True, (1, True), (1, 2 ** 63), 2 ** 63, -2 ** 63 - 1, (1, 2, 3), (1.0, 1), "11"])
def test_pair_arguments_off_the_fast_path_keep_their_errors(value):
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="stride"):
        sparks_ext.binary_conv2d(x, torch.ones(4, 4, 3, 3), stride=value)
