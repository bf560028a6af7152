"""fuse: rewrites a converted model so that each binary conv is one op call.

:func:`fuse` (run by :func:`sparks_ext.convert` unless ``fuse=False``) traces the model with
torch.fx, the library's layers (and every ``torch.nn`` layer) as leaves, and rewrites the graph
by structure, whatever classes the pieces come from:

1. ``nn.Identity`` and eval-mode ``nn.Dropout`` calls are dropped.
2. An eval-mode ``nn.BatchNorm2d`` (running statistics) that is the only user of an
   ``nn.Conv2d`` is folded into the conv's weight and bias.
3. Behind each binary conv (:class:`~sparks_ext.nn.CodebookConv2d`,
   :class:`~sparks_ext.nn.XnorConv2d` and their subclasses that keep their forward), the chain
   of single-user nodes up to the next thing it cannot take is folded into the conv's output
   transform, in this order::

       [BatchNorm2d | + c | - c | * c]*  [+ residual]  [+ c | - c]*  [PReLU]  [+ c | - c]*
       '--- into scale and bias ------'  '-residual-'  '--- bias ---'  '-prelu_weight-' '-post_bias-'

   ``c`` is a per-channel constant (a parameter or buffer broadcast along channels only, e.g.
   ``LearnableBias``, RPReLU's shifts, ``x + self.b.view(1, -1, 1, 1)``), the residual any other
   tensor. ReActNet's RPReLU is ``- c``, ``PReLU``, ``+ c``. A Bi-Real / ReActNet block then
   calls the op once per conv.
4. In front of each binary conv, the chain of single-user nodes feeding it is folded into the
   conv's own binarization, the per-input-channel ``threshold`` (``where(x >= t, +1, -1)``):
   sign-like binarizers (the library's ``BinaryActivation`` / ``sign`` / ``sign_ste`` /
   ``approx_sign``, ``torch.sign``) are dropped (the op binarizes its input with the same
   ``x >= 0`` test) and per-channel shifts before them become the threshold (RSign's
   ``sign(x - beta)``: threshold beta; ``LearnableBias`` then sign: threshold -b).
5. In a model that steps 1-4 changed, the real layers around the binary convs are deployed
   too: an ``nn.ReLU`` whose only user is an ``nn.MaxPool2d`` moves behind it (ReLU is
   monotone, so ``max_pool(relu(x)) == relu(max_pool(x))`` exactly, and the ReLU then runs on
   the pooled, smaller tensor: a quarter of the elements for the ImageNet stem's 3x3/2 pool;
   an in-place ReLU whose input others read stays), and every 1x1 ``nn.Conv2d`` (zero
   padding) becomes a :class:`OneDnnConv2d`, the same layer running on oneDNN with a kept,
   prepacked weight where it can (aten sends small 1x1 convs, such as a ResNet's shortcuts
   at batch 1, to a slower path of its own).

What the rewrite does not recognise stays as it is. A pass changes rounding only where values
are summed in another order: a folded BatchNorm computes ``acc * (s k) + (b - m) k + beta``
instead of normalizing ``acc * s + b``; two shifts before a sign are folded into one threshold
(``x + b - t >= 0`` becomes ``x >= t - b``, which can flip a value within an ulp of the
threshold); a single shift is exact (``x - t >= 0`` iff ``x >= t`` for finite values); a
:class:`OneDnnConv2d` sums in oneDNN's order, which aten's own convolution uses too where it
picks oneDNN.
"""
from __future__ import annotations

import copy
import operator
import weakref
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import quantizers
from .nn.binary import XnorConv2d
from .nn.codebook import CodebookConv2d

__all__ = ["fuse", "deploy", "is_fusable_conv", "deploy_input", "OneDnnConv2d"]


def is_fusable_conv(module: nn.Module) -> bool:
    """A binary conv whose forward is the library's fused one (CodebookConv2d, XnorConv2d and
    subclasses that keep their forward, e.g. SignedCodebookConv2d)."""
    return (isinstance(module, CodebookConv2d) and type(module).forward is CodebookConv2d.forward) or \
        (isinstance(module, XnorConv2d) and type(module).forward is XnorConv2d.forward)


@fx.wrap
def deploy_input(x, dtype: torch.dtype):
    """What a model deployed with ``convert(..., dtype=...)`` does to each input first: a
    floating tensor is cast to ``dtype``, a 4-D one made channels_last."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def _onednn_dtypes() -> frozenset:
    """The input dtypes oneDNN's convolution takes on this CPU (bf16 only where it has the
    instructions; float16 and float64 are left to aten)."""
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return frozenset((torch.float32, torch.bfloat16))
    return frozenset((torch.float32,))


_ONEDNN_DTYPES = _onednn_dtypes()  # decided once: an op call, not to be repeated per forward


def _mkldnn_op(name: str):
    return getattr(torch.ops.mkldnn, name, None) if torch.backends.mkldnn.is_available() else None


_REORDER_WEIGHT = _mkldnn_op("_reorder_convolution_weight")
_PACKED_CONVOLUTION = _mkldnn_op("_convolution_pointwise") if _REORDER_WEIGHT is not None else None
_PACKED_PATH_WORKS: Optional[bool] = None


def _packed_path_works() -> bool:
    """Whether this torch's private oneDNN ops (those inductor calls) take the arguments used
    here and compute the conv: probed once, at the first packed call. A torch that renamed or
    changed them sends OneDnnConv2d to ``nn.Conv2d``'s forward instead of failing."""
    global _PACKED_PATH_WORKS
    if _PACKED_PATH_WORKS is None:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(16, 8, 1, 1, generator=g), torch.randn(16, generator=g)
            packed = _REORDER_WEIGHT(w, [0, 0], [2, 2], [1, 1], 1, list(x.shape))
            y = _PACKED_CONVOLUTION(x, packed, b, [0, 0], [2, 2], [1, 1], 1, "none", [], "")
            _PACKED_PATH_WORKS = bool(torch.allclose(y, F.conv2d(x, w, b, 2), rtol=1e-4, atol=1e-5))
        except Exception:  # noqa: BLE001 - any failure of a private op means: do not use it
            _PACKED_PATH_WORKS = False
    return _PACKED_PATH_WORKS
# OneDnnConv2d -> (weight alias, its version, input shape, weight in oneDNN's layout).
# Outside the layers, so that copies, state dicts and files never see the opaque tensor; the
# alias keeps the packed weight's storage alive, so no other weight can take its address.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class OneDnnConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that runs a 1x1 conv on a channels_last CPU input, with autograd off
    (``torch.no_grad()``, ``inference_mode()``), on oneDNN with its weight reordered into
    oneDNN's blocked layout once per input shape and kept; everything else (other kernels,
    contiguous inputs, autograd, ``torch.compile`` / ``torch.export``, float16 / float64, oneDNN
    disabled) is ``nn.Conv2d``'s forward. aten sends such convs (a ResNet's 1x1 shortcuts at
    batch 1: all three at 1 thread, the 256 -> 512 one at 2) to its own
    ``_slow_conv2d_forward``, and where it picks oneDNN it reorders the weight at every call
    (reading and writing all of it: the 256 -> 512 weight is 512 KiB). The kept weight is
    reordered again when the weight changes (another tensor or an in-place update; a weight
    made under ``torch.inference_mode()`` has no version counter to tell, so it is not kept:
    convert outside inference mode, run inside). The packed
    call gives oneDNN's unpacked bits on channels_last inputs (checked on 216 shapes), i.e.
    aten's wherever aten picks oneDNN; on contiguous inputs it may not, hence their fallback.
    Its parameters and state dict are the ``nn.Conv2d``'s."""

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "OneDnnConv2d":
        """The layer computing ``conv``, holding ``conv``'s own weight and bias."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, device="meta")
        layer.weight = conv.weight
        layer.bias = conv.bias
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        # torch.compile / torch.export first: they trace the plain conv (and cannot trace
        # is_inference()); the rest is eager mode's choice.
        if (not torch.compiler.is_compiling() and _PACKED_CONVOLUTION is not None
                and not torch.is_grad_enabled() and x.dtype in _ONEDNN_DTYPES
                and x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last) and weight.dtype == x.dtype
                and weight.device.type == "cpu" and (bias is None or bias.dtype == x.dtype)
                and self.kernel_size == (1, 1) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and not weight.is_inference()
                and torch.backends.mkldnn.enabled and _packed_path_works()):
            return _PACKED_CONVOLUTION(x, self._packed_weight(x, weight), bias, self.padding, self.stride,
                                       self.dilation, self.groups, "none", [], "")
        return super().forward(x)

    def _packed_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        entry = _PACKED.get(self)
        if entry is None or entry[0].data_ptr() != weight.data_ptr() or entry[1] != weight._version \
                or entry[2] != shape or entry[0].dtype != weight.dtype:
            alias = weight.detach()
            packed = _REORDER_WEIGHT(alias, list(self.padding), list(self.stride), list(self.dilation),
                                     self.groups, list(x.shape))
            entry = (alias, weight._version, shape, packed)
            _PACKED[self] = entry
        return entry[3]


class _Tracer(fx.Tracer):
    """torch.nn layers and the library's layers are leaves, except the ReActNet pieces of
    sparks_ext.quantizers (RSign, RPReLU, LearnableBias), which are traced through so that the
    rewrite sees their arithmetic; the binarizer modules stay leaves (autograd Functions)."""

    def __init__(self):
        super().__init__(autowrap_functions=(quantizers.sign, quantizers.sign_ste, quantizers.approx_sign))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, quantizers.BinaryActivation):
            return True
        if isinstance(m, (quantizers.RSign, quantizers.RPReLU, quantizers.LearnableBias)):
            return False
        if type(m).__module__.startswith("sparks_ext.nn") or isinstance(m, OneDnnConv2d):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> Optional[fx.GraphModule]:
    try:
        graph = _Tracer().trace(module)
    except Exception:  # data-dependent Python, unsupported calls: fuse inside the children
        return None
    gm = fx.GraphModule(module, graph, type(module).__name__)
    gm.training = module.training
    return gm


# ---------------------------------------------------------------------------------------------

_SIGN_FUNCTIONS = {torch.sign, quantizers.sign, quantizers.sign_ste, quantizers.approx_sign}
_ADD = {operator.add, torch.add, operator.iadd}
_SUB = {operator.sub, torch.sub, operator.isub}
_MUL = {operator.mul, torch.mul, operator.imul}
# Pure functions and methods through which a per-channel constant is evaluated at convert time.
_CONST_FUNCTIONS = {operator.getitem, operator.neg, operator.add, operator.sub, operator.mul,
                    operator.truediv, torch.reshape, torch.unsqueeze, torch.squeeze, torch.neg,
                    torch.add, torch.sub, torch.mul, torch.div, torch.flatten}
_CONST_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "to", "float", "type_as", "neg",
                  "add", "sub", "mul", "div", "flatten", "clone", "detach", "contiguous", "expand"}


class _Rewriter:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.calls = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        first = next((t for t in gm.parameters() if t.is_floating_point()), None)
        self.dtype = first.dtype if first is not None else torch.float32
        self.changed = False
        self._copied = set()

    # -- helpers --------------------------------------------------------------------------
    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def own(self, node: fx.Node) -> nn.Module:
        """The module a call_module node runs, replaced by a private copy the first time it is
        rewritten (an ``inplace=True`` conversion keeps the caller's unfused layers intact)."""
        if node.target not in self._copied:
            fresh = copy.deepcopy(self.modules[node.target])
            parent, _, name = node.target.rpartition(".")
            setattr(self.gm.get_submodule(parent) if parent else self.gm, name, fresh)
            self.modules[node.target] = fresh
            self._copied.add(node.target)
        return self.modules[node.target]

    def single_call(self, node: fx.Node) -> bool:
        return self.calls.get(node.target, 0) == 1

    def constant(self, arg, _depth: int = 0):
        """The value of a node computed from parameters and buffers only (None otherwise)."""
        if not isinstance(arg, fx.Node):
            return arg if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None
        if _depth > 16:
            return None
        if arg.op == "get_attr":
            value = _get_attr(self.gm, arg.target)
            return value.detach() if isinstance(value, torch.Tensor) else None
        known = ((arg.op == "call_function" and arg.target in _CONST_FUNCTIONS)
                 or (arg.op == "call_method" and arg.target in _CONST_METHODS))
        if not known:
            return None
        missing = object()

        def value_of(a):
            if isinstance(a, fx.Node):
                if a.op == "call_function" and a.target is getattr and a.args[1] == "dtype":
                    return self.dtype  # `x.dtype` of the activations: the model's dtype
                v = self.constant(a, _depth + 1)
                return missing if v is None else v
            if isinstance(a, (tuple, list)):
                return type(a)(value_of(b) for b in a)
            return a

        args, kwargs = value_of(arg.args), {k: value_of(v) for k, v in arg.kwargs.items()}
        if _contains(args, missing) or _contains(list(kwargs.values()), missing):
            return None
        try:
            with torch.no_grad():
                if arg.op == "call_function":
                    return arg.target(*args, **kwargs)
                return getattr(args[0], arg.target)(*args[1:], **kwargs)
        except Exception:
            return None

    def per_channel(self, arg, channels: int) -> Optional[torch.Tensor]:
        """``arg`` as a float64 (channels,) vector if it is a constant that broadcasts against
        an (N, channels, H, W) tensor along channels only."""
        value = self.constant(arg)
        if isinstance(value, (int, float)):
            return torch.full((channels,), float(value), dtype=torch.float64)
        # A constant of another dtype would promote the activations: not a plain shift.
        if not isinstance(value, torch.Tensor) or value.dtype != self.dtype or value.dim() > 4:
            return None
        shape = (1,) * (4 - value.dim()) + tuple(value.shape)
        if shape[0] != 1 or shape[2:] != (1, 1) or shape[1] not in (1, channels):
            return None
        return value.reshape(-1).to(torch.float64).expand(channels).clone()

    def shift(self, node: fx.Node, x: fx.Node, channels: int) -> Optional[torch.Tensor]:
        """c if ``node`` computes ``x + c`` (or ``x - (-c)``) for a per-channel constant c."""
        if node.kwargs or len(node.args) != 2:
            return None
        a, b = node.args
        if _is_call(node, _ADD, "add"):
            other = b if a is x else a if b is x else None
            c = None if other is None or other is x else self.per_channel(other, channels)
            return c
        if _is_call(node, _SUB, "sub") and a is x and b is not x:
            c = self.per_channel(b, channels)
            return None if c is None else -c
        return None

    def scaling(self, node: fx.Node, x: fx.Node, channels: int) -> Optional[torch.Tensor]:
        if node.kwargs or len(node.args) != 2 or not _is_call(node, _MUL, "mul"):
            return None
        a, b = node.args
        other = b if a is x else a if b is x else None
        return None if other is None or other is x else self.per_channel(other, channels)

    # -- passes ---------------------------------------------------------------------------
    def drop_identities(self):
        for node in list(self.gm.graph.nodes):
            m = self.module(node)
            if (isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training)) \
                    and len(node.args) == 1 and not node.kwargs:
                node.replace_all_uses_with(node.args[0])
                self.gm.graph.erase_node(node)
                self.changed = True

    def fold_real_batchnorms(self):
        for node in list(self.gm.graph.nodes):
            conv = self.module(node)
            if type(conv) is not nn.Conv2d or len(node.users) != 1 or not self.single_call(node):
                continue
            (user,) = node.users
            bn = self.module(user)
            if not _foldable_bn(bn, conv.out_channels) or len(user.args) != 1:
                continue
            k, shift = _bn_affine(bn)
            conv = self.own(node)
            with torch.no_grad():
                w = conv.weight.double() * k.view(-1, 1, 1, 1)
                b = (conv.bias.double() if conv.bias is not None else torch.zeros_like(k)) * k + shift
                conv.weight.copy_(w.to(conv.weight.dtype))
                if conv.bias is None:
                    conv.bias = nn.Parameter(b.to(conv.weight.dtype))
                else:
                    conv.bias.copy_(b.to(conv.bias.dtype))
            user.replace_all_uses_with(node)
            self.gm.graph.erase_node(user)
            self.changed = True

    def fuse_outputs(self, node: fx.Node):
        layer = self.module(node)
        c = layer.out_channels
        scale = layer.scale.detach().double()
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(c, dtype=torch.float64)
        residual = prelu = post = None
        stage = 0  # 0: affine into scale/bias; 1: after the residual; 2: after the PReLU
        chain, last = [], node
        while len(_data_users(last)) == 1:
            (user,) = _data_users(last)
            m = self.module(user)
            shift = self.shift(user, last, c) if user.op != "call_module" else None
            if stage == 0 and _foldable_bn(m, c) and len(user.args) == 1:
                k, b = _bn_affine(m)
                scale, bias = scale * k, bias * k + b
            elif stage == 0 and user.op != "call_module" and self.scaling(user, last, c) is not None:
                k = self.scaling(user, last, c)
                scale, bias = scale * k, bias * k
            elif shift is not None and stage < 2:
                bias = bias + shift
            elif shift is not None:
                post = shift if post is None else post + shift
            elif stage == 0 and _is_call(user, _ADD, "add") and not user.kwargs and len(user.args) == 2:
                a, b = user.args
                other = b if a is last else a
                if not isinstance(other, fx.Node) or other is last or other in chain or other is node:
                    break
                residual, stage = other, 1
            elif stage < 2 and isinstance(m, nn.PReLU) and len(user.args) == 1 \
                    and m.num_parameters in (1, c):
                prelu, stage = m.weight.detach().double().expand(c).clone(), 2
            else:
                break
            chain.append(user)
            last = user
        if not chain:
            return
        # `y.dtype` reads of the fused values go to the conv's input: same dtype and device.
        for n in [node] + chain:
            _redirect_metadata(n, node.args[0])
        layer = self.own(node)
        dtype = layer.scale.dtype
        with torch.no_grad():
            layer.scale = scale.to(dtype)
            layer.bias = bias.to(dtype)
            if prelu is not None:
                layer.prelu_weight = prelu.to(dtype)
            if post is not None:
                layer.post_bias = post.to(dtype)
        # The conv moves to where its last fused node was: the residual is computed by then.
        last.prepend(node)
        node.args = (node.args[0], residual) if residual is not None else node.args[:1]
        last.replace_all_uses_with(node)
        for n in reversed(chain):
            self.gm.graph.erase_node(n)
        self.changed = True

    def fold_inputs(self, node: fx.Node):
        layer = self.module(node)
        c = layer.in_channels
        threshold = torch.zeros(c, dtype=torch.float64)
        source, shifted, folded, absorbed = node.args[0], False, False, []
        while isinstance(source, fx.Node) and len(_data_users(source)) == 1:
            absorbed.append(source)
            m = self.module(source)
            if not shifted and (isinstance(m, quantizers.BinaryActivation) or _is_sign(source)) \
                    and len(source.args) == 1 and not source.kwargs:
                source, folded = source.args[0], True
                continue
            if source.op != "call_module" and source.args:
                x = source.args[0] if _is_call(source, _SUB, "sub") else None
                shift = None
                for candidate in ([x] if x is not None else list(source.args)):
                    if isinstance(candidate, fx.Node):
                        shift = self.shift(source, candidate, c)
                        if shift is not None:
                            x = candidate
                            break
                if shift is not None:
                    threshold -= shift
                    source, shifted, folded = x, True, True
                    continue
            break
        if not folded:
            return
        absorbed = absorbed[:absorbed.index(source)] if source in absorbed else absorbed
        for n in absorbed:
            _redirect_metadata(n, source)
        old = node.args[0]
        node.args = (source,) + tuple(node.args[1:])
        if shifted:
            layer = self.own(node)
            if layer.threshold is not None:
                threshold += layer.threshold.double()
            layer.threshold = threshold.to(layer.scale.dtype)
        _erase_unused(self.gm.graph, old)
        self.changed = True

    def relus_behind_max_pools(self):
        for node in list(self.gm.graph.nodes):
            relu = self.module(node)
            if type(relu) is not nn.ReLU or len(node.args) != 1 or node.kwargs \
                    or len(node.users) != 1 or not isinstance(node.args[0], fx.Node):
                continue
            if relu.inplace and len(node.args[0].users) != 1:
                continue  # others read the input after an in-place ReLU: they see it rectified
            (pool,) = node.users
            m = self.module(pool)
            if type(m) is not nn.MaxPool2d or m.return_indices or pool.args != (node,) or pool.kwargs:
                continue
            pool.args = node.args
            pool.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            node.args = (pool,)
            pool.append(node)
            self.changed = True

    def pointwise_convs_on_onednn(self):
        for node in self.gm.graph.nodes:
            conv = self.module(node)
            if type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.padding_mode == "zeros" \
                    and not isinstance(conv.padding, str):
                layer = OneDnnConv2d.from_conv2d(self.own(node))
                parent, _, name = node.target.rpartition(".")
                setattr(self.gm.get_submodule(parent) if parent else self.gm, name, layer)
                self.modules[node.target] = layer

    def run(self) -> bool:
        self.drop_identities()
        self.fold_real_batchnorms()
        convs = [n for n in self.gm.graph.nodes if is_fusable_conv(self.module(n))
                 and self.single_call(n) and len(n.args) == 1 and not n.kwargs]
        for node in convs:
            self.fuse_outputs(node)
        for node in convs:
            self.fold_inputs(node)
        if self.changed:
            self.relus_behind_max_pools()
            self.pointwise_convs_on_onednn()
        return self.changed


def _is_call(node: fx.Node, functions: set, method: str) -> bool:
    return (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target == method)


def _metadata_users(node: fx.Node) -> list:
    """Users that read only ``node.dtype`` or ``node.device`` (``self.b.to(x.dtype)``)."""
    return [u for u in node.users if u.op == "call_function" and u.target is getattr
            and len(u.args) == 2 and u.args[0] is node and u.args[1] in ("dtype", "device")]


def _data_users(node: fx.Node) -> list:
    metadata = _metadata_users(node)
    return [u for u in node.users if u not in metadata]


def _redirect_metadata(node: fx.Node, to: fx.Node) -> None:
    for user in _metadata_users(node):
        user.replace_input_with(node, to)
        # `to` is defined before ``node``; the reading node moves right after it.
        to.append(user)


def _is_sign(node: fx.Node) -> bool:
    return _is_call(node, _SIGN_FUNCTIONS, "sign")


def _contains(values, item) -> bool:
    return any(v is item or (isinstance(v, (tuple, list)) and _contains(v, item)) for v in values)


def _get_attr(gm: nn.Module, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _foldable_bn(m, channels: int) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats
            and m.running_mean is not None and m.num_features == channels)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, b) with BN(y) = y * k + b in eval mode, float64."""
    k = 1 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.detach().double()
    b = -bn.running_mean.detach().double() * k
    if bn.bias is not None:
        b = b + bn.bias.detach().double()
    return k, b


def _erase_unused(graph: fx.Graph, node) -> None:
    """Erases ``node`` and what only it used, up to nodes with other users or side effects."""
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n.users or n.op in ("placeholder", "output"):
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        stack.extend(inputs)


def _clean(gm: fx.GraphModule) -> None:
    """Drops dead nodes, the modules no node calls any more, and the tensors no node reads.
    Only fx's own containers (plain ``nn.Module``s holding what traced-through modules read)
    lose attributes: the layers themselves are shared with the model that was traced."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if type(owner) is nn.Module and name not in used:
            delattr(owner, attr)
    for name, module in sorted(gm.named_modules(), key=lambda item: -item[0].count(".")):
        if name and type(module) is nn.Module and not module._modules and not module._parameters \
                and not module._buffers:
            parent, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(parent) if parent else gm, attr)
    gm.graph.lint()
    gm.recompile()


def _as_sequential(original: nn.Sequential, gm: fx.GraphModule) -> Optional[nn.Sequential]:
    """``original`` with each layer replaced by its rewritten copy and each layer that was
    folded away by ``nn.Identity``, if the fused graph is still a chain of its layers (it is
    unless a residual was fused or a traced-through child kept some of its arithmetic)."""
    previous, kept = None, set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            previous = node
        elif node.op == "output":
            if node.args[0] is not previous:
                return None
        elif node.op == "call_module" and node.args == (previous,) and not node.kwargs \
                and node.target not in kept:
            previous = node
            kept.add(node.target)
        else:
            return None

    def rebuild(module: nn.Module, prefix: str) -> Optional[nn.Module]:
        if prefix.rstrip(".") in kept:
            return gm.get_submodule(prefix.rstrip("."))
        inside = [t for t in kept if t.startswith(prefix)]
        if not inside:
            return nn.Identity()
        if type(module) is not nn.Sequential:
            return None  # some of a traced-through child survives: not a layer any more
        children = [(name, rebuild(child, f"{prefix}{name}.")) for name, child in module.named_children()]
        if any(c is None for _, c in children):
            return None
        result = nn.Sequential()
        for name, child in children:
            result.add_module(name, child)
        return result.train(module.training)

    return rebuild(original, "")


def _fuse_graph(module: nn.Module) -> Optional[nn.Module]:
    gm = _trace(module)
    if gm is None:
        return None
    if not _Rewriter(gm).run():
        return module
    _clean(gm)
    if type(module) is nn.Sequential:
        sequential = _as_sequential(module, gm)
        if sequential is not None:
            return sequential
    return gm


def fuse(model: nn.Module) -> nn.Module:
    """The fused form of a converted model (see the module docstring for what is rewritten).

    The model is traced whole; where it cannot be (Python control flow on values), each child
    is fused on its own. A model in which nothing was fused is returned as it is; an
    ``nn.Sequential`` whose fused form is still a chain of its layers stays an ``nn.Sequential``
    (folded layers become ``nn.Identity``, so indices keep their meaning); otherwise the result
    is a ``torch.fx.GraphModule`` holding the model's layers under their names. Modules that are
    rewritten are copies: ``model`` itself is not changed.
    """
    if is_fusable_conv(model) or next(model.children(), None) is None:
        return model
    fused = _fuse_graph(model)
    if fused is not None:
        return fused
    result = model
    for name, child in list(model.named_children()):
        new = fuse(child)
        if new is not child:
            if result is model:
                result = copy.copy(model)  # a shallow copy with its own child table
                result._modules = dict(model._modules)
            result._modules[name] = new
    return result


def deploy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts ``model`` to ``dtype`` with channels_last 4-D weights and puts
    :func:`deploy_input` in front of every input (a traced copy; an untraceable model is cast
    and expects its inputs in ``dtype``, channels_last)."""
    model = model.to(dtype=dtype, memory_format=torch.channels_last)
    gm = model if isinstance(model, fx.GraphModule) else _trace(model)
    if gm is None:
        return model
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            with gm.graph.inserting_after(node):
                cast = gm.graph.call_function(deploy_input, (node, dtype))
            node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
    gm.graph.lint()
    gm.recompile()
    return gm
