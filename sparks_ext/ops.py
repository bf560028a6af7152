"""The library's ops: thin Python wrappers over ``torch.ops.sparks``, plus their fake (meta)
kernels and autograd formulas.

The C++ kernels check every argument and raise ``ValueError`` naming the argument at fault;
these wrappers only normalise arguments (ints to pairs) and document the op.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _C  # noqa: F401  (loads the library and registers torch.ops.sparks)

IntOrPair = Union[int, Sequence[int]]

__all__ = ["conv2d", "binary_conv2d", "cpu_kernels"]


_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _pair(value: IntOrPair, name: str) -> Sequence[int]:
    # Per call: a plain int or a pair of plain ints in int64 (a layer's tuples) passes through
    # two type tests; anything else (bools, int subclasses, bad values) takes the full check.
    kind = type(value)
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return (value, value)
    elif (kind is tuple or kind is list) and len(value) == 2:
        first, second = value
        if type(first) is int and type(second) is int and _INT64_MIN <= first <= _INT64_MAX \
                and _INT64_MIN <= second <= _INT64_MAX:
            return value
    return _checked_pair(value, name)


def _checked_pair(value, name: str) -> list[int]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        items = [value, value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if not all(_INT64_MIN <= v <= _INT64_MAX for v in items):  # the op takes int64
        raise ValueError(f"{name} must fit int64, got {value!r}")
    return items


_FUSED_DOC = r"""
    Fused arguments (keyword-only, each optional; all four together make one pass per conv of a
    Bi-Real / ReActNet block: read activations, write activations):
        threshold: ``Tensor[C_in]`` of the input's dtype: binarize ``input >= threshold[c]``
            instead of ``input >= 0`` (ReActNet's RSign ``sign(x - beta)`` is ``threshold =
            beta``). The comparison is made in the input's dtype while the input is packed, with
            no extra pass. It equals ``input - threshold >= 0`` for every finite input and
            threshold in float16, bfloat16, float32 and float64 (IEEE subtraction with gradual
            underflow is exact in sign: ``x - t`` is 0 only when ``x == t``, and never has the
            wrong sign; ``+0`` and ``-0`` are equal). They differ only for ``x == t == +-inf``:
            ``inf >= inf`` is True (+1) while ``inf - inf`` is NaN and ``NaN >= 0`` is False
            (-1). A NaN input or threshold gives -1 both ways. (With
            ``torch.set_flush_denormal(True)`` the CPU may compare subnormals as zero.)
        residual: ``Tensor[N, C_out, H_out, W_out]`` of the input's dtype and device, any
            memory format, added after scale and bias. The CPU reads it by its strides (fastest
            laid out like the output); CUDA copies one laid out otherwise first.
        prelu_weight: ``Tensor[C_out]``: per-channel PReLU ``y if y >= 0 else prelu_weight[c] * y``
            after the residual (RPReLU ``PReLU(v - gamma) + zeta`` is ``bias - gamma``,
            ``prelu_weight``, ``post_bias = zeta``).
        post_bias: ``Tensor[C_out]``, added last.
"""

_SEMANTICS = r"""
        t   = 0 if threshold is None else threshold[None, :, None, None]
        xb  = where(input >= t, 1, -1)
        xb  = pad(xb, padding, value=pad_value)
        acc = conv2d(xb, W, stride, 0, dilation, groups)          # exact integers
        y   = acc * scale[c] + bias[c]                            # each optional, in opmath
        y   = y + residual                                        # optional
        y   = where(y >= 0, y, prelu_weight[c] * y)               # optional
        y   = y + post_bias[c]                                    # optional
        out = y rounded once to the input's dtype

    opmath is float32 for float16 / bfloat16 / float32 inputs and float64 for float64; each
    step is rounded in opmath as written (no fused multiply-add), so every CPU kernel family,
    the CUDA kernels and :mod:`sparks_ext.reference` give the same bits.
"""


_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _run(op, *args):
    """``op(*args)``. With autograd off (``torch.no_grad()``), below the Autograd dispatch key:
    the Python autograd kernel registered below would only forward the call there (~5 us per
    call). ``torch.inference_mode()`` skips that key by itself; ``torch.compile`` /
    ``torch.export`` trace the plain call."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def conv2d(
    input: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    pad_value: float = 0.0,
    *,
    threshold: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    prelu_weight: Optional[torch.Tensor] = None,
    post_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _run(
        torch.ops.sparks.conv2d.default,
        input, codebook, indices, scale, bias, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), int(groups), float(pad_value), threshold, residual,
        prelu_weight, post_bias)


conv2d.__doc__ = r"""Codebook-indexed binary convolution.

    Computes exactly, with ``W = codebook[indices]``::
""" + _SEMANTICS + r"""
    by bit-packing the binarized input, computing each codeword's XNOR-popcount response once
    per input patch and gathering the responses by index; sums are exact integers.

    Args:
        input: ``Tensor[N, C_in, H, W]``, float16/bfloat16/float32/float64, any memory format.
        codebook: ``Tensor[n, kh, kw]`` with entries in {-1, +1} (binary) or {-1, 0, +1}
            (ternary / signed-binary); any integer or floating dtype; ``kh * kw <= 64``.
        indices: ``Tensor[C_out, C_in // groups]`` of integers in ``[0, n)``.
        scale, bias: optional ``Tensor[C_out]`` of the input's dtype (fold BatchNorm here).
        stride, padding, dilation: int or pair.
        groups: number of channel groups (``C_in`` for depthwise).
        pad_value: 0 (zero padding of the binarized input, like ``nn.Conv2d``), +1 or -1.
""" + _FUSED_DOC + r"""
    Returns:
        ``Tensor[N, C_out, H_out, W_out]`` of the input's dtype; channels_last if the input is.

    Raises:
        ValueError: naming the argument, for a wrong rank, shape, dtype, device or value.
    """


def binary_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    pad_value: float = 0.0,
    *,
    threshold: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    prelu_weight: Optional[torch.Tensor] = None,
    post_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _run(
        torch.ops.sparks.binary_conv2d.default,
        input, weight, scale, bias, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), int(groups), float(pad_value), threshold, residual,
        prelu_weight, post_bias)


binary_conv2d.__doc__ = r"""Dense XNOR-popcount binary convolution (a BNN layer without codebook).

    Same semantics and options as :func:`conv2d` with the dense weight ``W = weight``::
""" + _SEMANTICS + r"""
    Args:
        weight: ``Tensor[C_out, C_in // groups, kh, kw]``, either bool (True = +1) or any real
            dtype with entries in {-1, +1}.
        the others: as :func:`conv2d`.
""" + _FUSED_DOC


def cpu_kernels() -> list[str]:
    """The CPU kernel families this machine can run, slowest first: a subset of
    ``["portable", "avx2", "avx512", "amx"]`` on x86-64 (``amx``: the codebook conv on the int8
    tile unit, everything else as ``avx512``), ``["portable", "neon"]`` on aarch64. The
    environment variable ``SPARKS_CPU_KERNEL`` (``auto`` | ``amx`` | ``avx512`` | ``avx2`` |
    ``neon`` | ``portable``, read at every call) forces one; all give identical results."""
    return list(torch.ops.sparks.cpu_kernels.default())


# ---------------------------------------------------------------------------------------------
# Fake kernels: output metadata only, for torch.compile / torch.export.

def _output_like(input, out_channels, kh, kw, stride, padding, dilation):
    def out_size(size, k, s, p, d):
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    shape = (input.shape[0], out_channels,
             out_size(input.shape[2], kh, stride[0], padding[0], dilation[0]),
             out_size(input.shape[3], kw, stride[1], padding[1], dilation[1]))
    channels_last = (not input.is_contiguous()
                     and input.is_contiguous(memory_format=torch.channels_last))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)


def _check_same_device(input, error=RuntimeError, **tensors):
    """The device rule of the C++ kernels, for meta tensors: a meta input with CPU weights (or
    the reverse) dispatches here, not to a kernel that would refuse it. Raises ``error`` (the
    C++ checks' type: RuntimeError for the weights, scale and bias, ValueError for the fused
    arguments)."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise error(f"{name} must be on the input's device {input.device}, got {t.device}")


@torch.library.register_fake("sparks::conv2d")
def _conv2d_fake(input, codebook, indices, scale, bias, stride, padding, dilation, groups, pad_value,
                 threshold=None, residual=None, prelu_weight=None, post_bias=None):
    _check_same_device(input, codebook=codebook, indices=indices, scale=scale, bias=bias)
    _check_same_device(input, ValueError, threshold=threshold, residual=residual,
                       prelu_weight=prelu_weight, post_bias=post_bias)
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
    torch._check(codebook.dim() == 3, lambda: f"codebook must be 3-D, got {codebook.dim()}-D")
    torch._check(indices.dim() == 2, lambda: f"indices must be 2-D, got {indices.dim()}-D")
    return _output_like(input, indices.shape[0], codebook.shape[1], codebook.shape[2],
                        stride, padding, dilation)


@torch.library.register_fake("sparks::binary_conv2d")
def _binary_conv2d_fake(input, weight, scale, bias, stride, padding, dilation, groups, pad_value,
                        threshold=None, residual=None, prelu_weight=None, post_bias=None):
    _check_same_device(input, weight=weight, scale=scale, bias=bias)
    _check_same_device(input, ValueError, threshold=threshold, residual=residual,
                       prelu_weight=prelu_weight, post_bias=post_bias)
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"weight must be 4-D, got {weight.dim()}-D")
    return _output_like(input, weight.shape[0], weight.shape[2], weight.shape[3],
                        stride, padding, dilation)


# ---------------------------------------------------------------------------------------------
# Autograd. Forward binarizes with where(input >= threshold, 1, -1); backward is the
# straight-through estimator clipped to |input - threshold| <= 1 (larq's ste_sign of
# input - threshold), and the threshold gets minus the input's gradient summed per channel.
# The output transform gets its exact gradients (the backward recomputes the integer sums, and
# from them the pre-activation where PReLU needs it); a floating codebook (or dense weight) gets
# the gradient of the dense weight W it decodes to, summed over the kernels that share a codeword.

_N_CONV2D_ARGS, _N_BINARY_ARGS = 14, 13


def _per_channel(t):
    return t[None, :, None, None]


def _binarize_padded(input, threshold, padding, pad_value):
    t = 0 if threshold is None else _per_channel(threshold)
    xb = torch.where(input >= t, 1.0, -1.0).to(input.dtype)
    return F.pad(xb, (padding[1], padding[1], padding[0], padding[0]), value=pad_value)


def _transform_backward(ctx, grad, scale, bias, residual, prelu_weight, raw_output):
    """Gradients through ``y = PReLU(acc * scale + bias + residual) + post_bias``.

    Returns (d out / d acc, scale, bias, residual, prelu_weight, post_bias gradients)."""
    acc = None
    grad_pre, grad_prelu = grad, None
    if prelu_weight is not None:
        acc = raw_output()
        pre = acc if scale is None else acc * _per_channel(scale)
        if bias is not None:
            pre = pre + _per_channel(bias)
        if residual is not None:
            pre = pre + residual
        keep = pre >= 0
        grad_pre = torch.where(keep, grad, grad * _per_channel(prelu_weight))
        if ctx.fused_needs_grad["prelu_weight"]:
            grad_prelu = torch.where(keep, torch.zeros_like(grad), grad * pre).sum(dim=(0, 2, 3))
    grad_scale = grad_bias = grad_residual = grad_post = None
    if ctx.fused_needs_grad["post_bias"]:
        grad_post = grad.sum(dim=(0, 2, 3))
    if ctx.fused_needs_grad["residual"]:
        grad_residual = grad_pre
    if ctx.scale_needs_grad:
        grad_scale = (grad_pre * (raw_output() if acc is None else acc)).sum(dim=(0, 2, 3))
    if ctx.bias_needs_grad:
        grad_bias = grad_pre.sum(dim=(0, 2, 3))
    grad_acc = grad_pre if scale is None else grad_pre * _per_channel(scale)
    return grad_acc, grad_scale, grad_bias, grad_residual, grad_prelu, grad_post


def _conv_backward(ctx, grad_acc, input, threshold, dense_weight):
    """Input, threshold and dense-weight gradients from d out / d acc. ``dense_weight`` is the
    (C_out, C_in/g, kh, kw) {-1,0,1} weight in the input's dtype."""
    grad_input = grad_threshold = grad_weight = None
    if ctx.needs_input_grad[0] or ctx.fused_needs_grad["threshold"]:
        grad_xb = torch.nn.grad.conv2d_input(input.shape, dense_weight, grad_acc, ctx.stride,
                                             ctx.padding, ctx.dilation, ctx.groups)
        shifted = input if threshold is None else input - _per_channel(threshold)
        grad_shifted = grad_xb * (shifted.abs() <= 1).to(grad_xb.dtype)
        if ctx.needs_input_grad[0]:
            grad_input = grad_shifted
        if ctx.fused_needs_grad["threshold"]:
            grad_threshold = -grad_shifted.sum(dim=(0, 2, 3))
    if ctx.weight_needs_grad:
        xb = _binarize_padded(input, threshold, ctx.padding, ctx.pad_value)
        grad_weight = torch.nn.grad.conv2d_weight(xb, dense_weight.shape, grad_acc, ctx.stride,
                                                  0, ctx.dilation, ctx.groups)
    return grad_input, grad_threshold, grad_weight


_FUSED_NAMES = ("threshold", "residual", "prelu_weight", "post_bias")


def _save_hyper(ctx, inputs, weight_index, scale_index):
    """Saves the hyper-parameters and which inputs need gradients; returns the full argument
    list (scale, bias, ..., then the four fused tensors)."""
    scale, bias, stride, padding, dilation, groups, pad_value = inputs[scale_index:scale_index + 7]
    fused = inputs[scale_index + 7:scale_index + 11]
    ctx.stride, ctx.padding, ctx.dilation = stride, padding, dilation
    ctx.groups, ctx.pad_value = groups, pad_value
    ctx.weight_needs_grad = ctx.needs_input_grad[weight_index]
    ctx.scale_needs_grad = scale is not None and ctx.needs_input_grad[scale_index]
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[scale_index + 1]
    ctx.fused_needs_grad = {
        name: t is not None and ctx.needs_input_grad[scale_index + 7 + i]
        for i, (name, t) in enumerate(zip(_FUSED_NAMES, fused))}
    return scale, bias, fused


def _full(inputs, count):
    """The op's arguments with the trailing defaults (None) filled in."""
    return tuple(inputs) + (None,) * (count - len(inputs))


def _conv2d_setup_context(ctx, inputs, output):
    inputs = _full(inputs, _N_CONV2D_ARGS)
    input, codebook, indices = inputs[:3]
    scale, bias, (threshold, residual, prelu_weight, _) = _save_hyper(ctx, inputs, 1, 3)
    ctx.save_for_backward(input, codebook, indices, scale, bias, threshold, residual, prelu_weight)


def _conv2d_backward(ctx, grad):
    input, codebook, indices, scale, bias, threshold, residual, prelu_weight = ctx.saved_tensors
    dense = codebook.to(grad.dtype)[indices.long()]
    raw = lambda: torch.ops.sparks.conv2d.default(  # noqa: E731
        input, codebook, indices, None, None, ctx.stride, ctx.padding, ctx.dilation,
        ctx.groups, ctx.pad_value, threshold)
    grad_acc, grad_scale, grad_bias, grad_residual, grad_prelu, grad_post = _transform_backward(
        ctx, grad, scale, bias, residual, prelu_weight, raw)
    grad_input, grad_threshold, grad_dense = _conv_backward(ctx, grad_acc, input, threshold, dense)
    grad_codebook = None
    if grad_dense is not None:
        n, kh, kw = codebook.shape
        grad_codebook = torch.zeros((n, kh, kw), dtype=grad_dense.dtype, device=grad_dense.device)
        grad_codebook.index_add_(0, indices.reshape(-1).long(), grad_dense.reshape(-1, kh, kw))
        grad_codebook = grad_codebook.to(codebook.dtype)
    return (grad_input, grad_codebook, None, grad_scale, grad_bias, None, None, None, None, None,
            grad_threshold, grad_residual, grad_prelu, grad_post)


def _binary_conv2d_setup_context(ctx, inputs, output):
    inputs = _full(inputs, _N_BINARY_ARGS)
    input, weight = inputs[:2]
    scale, bias, (threshold, residual, prelu_weight, _) = _save_hyper(ctx, inputs, 1, 2)
    ctx.save_for_backward(input, weight, scale, bias, threshold, residual, prelu_weight)


def _binary_conv2d_backward(ctx, grad):
    input, weight, scale, bias, threshold, residual, prelu_weight = ctx.saved_tensors
    dense = (weight.to(grad.dtype) * 2 - 1) if weight.dtype == torch.bool else weight.to(grad.dtype)
    raw = lambda: torch.ops.sparks.binary_conv2d.default(  # noqa: E731
        input, weight, None, None, ctx.stride, ctx.padding, ctx.dilation, ctx.groups,
        ctx.pad_value, threshold)
    grad_acc, grad_scale, grad_bias, grad_residual, grad_prelu, grad_post = _transform_backward(
        ctx, grad, scale, bias, residual, prelu_weight, raw)
    grad_input, grad_threshold, grad_weight = _conv_backward(ctx, grad_acc, input, threshold, dense)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return (grad_input, grad_weight, grad_scale, grad_bias, None, None, None, None, None,
            grad_threshold, grad_residual, grad_prelu, grad_post)


torch.library.register_autograd("sparks::conv2d", _conv2d_backward,
                                setup_context=_conv2d_setup_context)
torch.library.register_autograd("sparks::binary_conv2d", _binary_conv2d_backward,
                                setup_context=_binary_conv2d_setup_context)
