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


def _pair(value: IntOrPair, name: str) -> list[int]:
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
    if not all(-2 ** 63 <= v < 2 ** 63 for v in items):  # the op takes int64
        raise ValueError(f"{name} must fit int64, got {value!r}")
    return items


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
) -> torch.Tensor:
    r"""Codebook-indexed binary convolution.

    Computes exactly (see DESIGN.md section 1)::

        xb  = where(input >= 0, 1, -1)
        xb  = pad(xb, padding, value=pad_value)
        out = conv2d(xb, codebook[indices], stride, 0, dilation, groups) * scale + bias

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

    Returns:
        ``Tensor[N, C_out, H_out, W_out]`` of the input's dtype; channels_last if the input is.
    """
    return torch.ops.sparks.conv2d.default(
        input, codebook, indices, scale, bias, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), int(groups), float(pad_value))


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
) -> torch.Tensor:
    r"""Dense XNOR-popcount binary convolution (a BNN layer without codebook).

    Same semantics and options as :func:`conv2d` with the dense weight in place of
    ``codebook[indices]``.

    Args:
        weight: ``Tensor[C_out, C_in // groups, kh, kw]``, either bool (True = +1) or any real
            dtype with entries in {-1, +1}.
    """
    return torch.ops.sparks.binary_conv2d.default(
        input, weight, scale, bias, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), int(groups), float(pad_value))


def cpu_kernels() -> list[str]:
    """The CPU kernel families this machine can run, slowest first: a subset of
    ``["portable", "avx2", "avx512", "amx"]`` (``amx``: the codebook conv on the int8 tile unit,
    everything else as ``avx512``). The environment variable ``SPARKS_CPU_KERNEL``
    (``auto`` | ``amx`` | ``avx512`` | ``avx2`` | ``portable``, read at every call) forces one;
    all give identical results."""
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


def _check_same_device(input, **tensors):
    """The device rule of the C++ kernels, for meta tensors: a meta input with CPU weights (or
    the reverse) dispatches here, not to a kernel that would refuse it."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} must be on the input's device {input.device}, got {t.device}")


@torch.library.register_fake("sparks::conv2d")
def _conv2d_fake(input, codebook, indices, scale, bias, stride, padding, dilation, groups, pad_value):
    _check_same_device(input, codebook=codebook, indices=indices, scale=scale, bias=bias)
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
    torch._check(codebook.dim() == 3, lambda: f"codebook must be 3-D, got {codebook.dim()}-D")
    torch._check(indices.dim() == 2, lambda: f"indices must be 2-D, got {indices.dim()}-D")
    return _output_like(input, indices.shape[0], codebook.shape[1], codebook.shape[2],
                        stride, padding, dilation)


@torch.library.register_fake("sparks::binary_conv2d")
def _binary_conv2d_fake(input, weight, scale, bias, stride, padding, dilation, groups, pad_value):
    _check_same_device(input, weight=weight, scale=scale, bias=bias)
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"weight must be 4-D, got {weight.dim()}-D")
    return _output_like(input, weight.shape[0], weight.shape[2], weight.shape[3],
                        stride, padding, dilation)


# ---------------------------------------------------------------------------------------------
# Autograd. Forward binarizes with sign; backward is the straight-through estimator clipped to
# |x| <= 1 (larq's ste_sign): d out / d x = conv_input_grad(grad * scale, W) * (|x| <= 1).
# scale and bias get their exact gradients; a floating codebook (or dense weight) gets the
# gradient of the dense weight W it decodes to, summed over the kernels that share a codeword.

def _binarize_padded(input, padding, pad_value):
    xb = torch.where(input >= 0, 1.0, -1.0).to(input.dtype)
    return F.pad(xb, (padding[1], padding[1], padding[0], padding[0]), value=pad_value)


def _conv_backward(ctx, grad, input, scale, dense_weight, raw_output):
    """Gradients shared by both ops. ``dense_weight`` is the (C_out, C_in/g, kh, kw) {-1,0,1}
    weight in the input's dtype; ``raw_output()`` recomputes the unscaled integer output."""
    grad_scaled = grad if scale is None else grad * scale[None, :, None, None]
    grad_input = grad_weight = grad_scale = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_xb = torch.nn.grad.conv2d_input(input.shape, dense_weight, grad_scaled, ctx.stride,
                                             ctx.padding, ctx.dilation, ctx.groups)
        grad_input = grad_xb * (input.abs() <= 1).to(grad_xb.dtype)
    if ctx.weight_needs_grad:
        xb = _binarize_padded(input, ctx.padding, ctx.pad_value)
        grad_weight = torch.nn.grad.conv2d_weight(xb, dense_weight.shape, grad_scaled, ctx.stride,
                                                  0, ctx.dilation, ctx.groups)
    if ctx.scale_needs_grad:
        grad_scale = (grad * raw_output()).sum(dim=(0, 2, 3))
    if ctx.bias_needs_grad:
        grad_bias = grad.sum(dim=(0, 2, 3))
    return grad_input, grad_weight, grad_scale, grad_bias


def _save_hyper(ctx, scale, bias, stride, padding, dilation, groups, pad_value,
                weight_index, scale_index):
    ctx.stride, ctx.padding, ctx.dilation = stride, padding, dilation
    ctx.groups, ctx.pad_value = groups, pad_value
    ctx.weight_needs_grad = ctx.needs_input_grad[weight_index]
    ctx.scale_needs_grad = scale is not None and ctx.needs_input_grad[scale_index]
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[scale_index + 1]


def _conv2d_setup_context(ctx, inputs, output):
    input, codebook, indices, scale, bias, stride, padding, dilation, groups, pad_value = inputs
    _save_hyper(ctx, scale, bias, stride, padding, dilation, groups, pad_value, 1, 3)
    ctx.save_for_backward(input, codebook, indices, scale)


def _conv2d_backward(ctx, grad):
    input, codebook, indices, scale = ctx.saved_tensors
    dense = codebook.to(grad.dtype)[indices.long()]
    raw = lambda: torch.ops.sparks.conv2d.default(  # noqa: E731
        input, codebook, indices, None, None, ctx.stride, ctx.padding, ctx.dilation,
        ctx.groups, ctx.pad_value)
    grad_input, grad_dense, grad_scale, grad_bias = _conv_backward(ctx, grad, input, scale, dense, raw)
    grad_codebook = None
    if grad_dense is not None:
        n, kh, kw = codebook.shape
        grad_codebook = torch.zeros((n, kh, kw), dtype=grad_dense.dtype, device=grad_dense.device)
        grad_codebook.index_add_(0, indices.reshape(-1).long(), grad_dense.reshape(-1, kh, kw))
        grad_codebook = grad_codebook.to(codebook.dtype)
    return grad_input, grad_codebook, None, grad_scale, grad_bias, None, None, None, None, None


def _binary_conv2d_setup_context(ctx, inputs, output):
    input, weight, scale, bias, stride, padding, dilation, groups, pad_value = inputs
    _save_hyper(ctx, scale, bias, stride, padding, dilation, groups, pad_value, 1, 2)
    ctx.save_for_backward(input, weight, scale)


def _binary_conv2d_backward(ctx, grad):
    input, weight, scale = ctx.saved_tensors
    dense = (weight.to(grad.dtype) * 2 - 1) if weight.dtype == torch.bool else weight.to(grad.dtype)
    raw = lambda: torch.ops.sparks.binary_conv2d.default(  # noqa: E731
        input, weight, None, None, ctx.stride, ctx.padding, ctx.dilation, ctx.groups, ctx.pad_value)
    grad_input, grad_weight, grad_scale, grad_bias = _conv_backward(ctx, grad, input, scale, dense, raw)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_input, grad_weight, grad_scale, grad_bias, None, None, None, None, None


torch.library.register_autograd("sparks::conv2d", _conv2d_backward,
                                setup_context=_conv2d_setup_context)
torch.library.register_autograd("sparks::binary_conv2d", _binary_conv2d_backward,
                                setup_context=_binary_conv2d_setup_context)
