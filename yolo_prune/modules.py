"""Prunable forms of ultralytics blocks (YOLOv8, YOLO11, YOLO26), with exactly the same outputs.

torch-pruning follows ``torch.cat``, residual adds and depthwise convs, but not what splits one tensor
by a width stored in the module: ``Tensor.chunk`` / ``split`` (C2f, C3k2, C2PSA) and the per-head
reshape of attention. Each rewrite below is a subclass of the ultralytics class it replaces, so every
isinstance check in ultralytics (export, fuse, info) still applies, and it pickles like any other module:
a pruned checkpoint loads with ``YOLO(path)`` wherever ``yolo_prune`` is installed.

- :class:`C2fSplit` / :class:`C3k2Split`: the first conv, whose output C2f chunks in two halves, is held
  as two convs (``cv0``: first half, ``cv1``: second half); the graph then sees a plain concat.
- :class:`C2Split` (YOLOv8-p6's neck) and :class:`C2PSASplit`: the same for C2's ``chunk`` and C2PSA's
  ``split``.
- :class:`PrunableAttention`: ultralytics' ``Attention`` reshapes its value path with the *input* width
  ``C`` (``view(B, C, H, W)``), which ties the block's outer channels to ``num_heads * head_dim``. This
  form stores its inner widths (``num_heads``, ``key_dim``, ``head_dim``) on its own, so the outer
  channels (``qkv`` inputs, ``proj`` outputs, the residual) can be pruned through the graph while the
  inside of the attention (``qkv`` outputs, ``pe``, ``proj`` inputs) keeps its shape. The graph protects
  those inner layers (:func:`yolo_prune.pruning.graph.protected_layers`), so a reshape never changes meaning.

:func:`to_stock` is the way back: every form above becomes the ultralytics class it came from (the two halves
joined into one ``cv1``, ``c`` set to the half width; attention with its widths as they are), so that a checkpoint
of the model loads where only ``ultralytics`` is installed. That needs what stock ``forward`` assumes: halves of
equal width and attention blocks whose input width is still ``num_heads * head_dim`` (portable pruning,
``portable=True``, keeps both; :func:`stock_problems` says what stands in the way).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import C2, C2PSA, C2f, C3k2, Conv
from ultralytics.nn.modules.block import Attention

# Attributes ultralytics' model builder puts on every layer of ``DetectionModel.model``.
_LAYER_ATTRS = ("i", "f", "type", "np")


def _slice_conv(conv: Conv, start: int, stop: int) -> Conv:
    """Return a copy of an ultralytics ``Conv`` (conv + BN + act) keeping output channels [start, stop)."""
    new = copy.deepcopy(conv)
    c, bn = new.conv, new.bn
    c.weight = nn.Parameter(conv.conv.weight.data[start:stop].clone())
    if c.bias is not None:
        c.bias = nn.Parameter(conv.conv.bias.data[start:stop].clone())
    c.out_channels = stop - start
    bn.weight = nn.Parameter(conv.bn.weight.data[start:stop].clone())
    bn.bias = nn.Parameter(conv.bn.bias.data[start:stop].clone())
    bn.running_mean = conv.bn.running_mean[start:stop].clone()
    bn.running_var = conv.bn.running_var[start:stop].clone()
    bn.num_features = stop - start
    return new


def _halves(conv: Conv, first: int) -> tuple[Conv, Conv]:
    """Split an ungrouped ``Conv`` (with its BN) into output channels [0, first) and [first, end)."""
    if getattr(conv.conv, "groups", 1) != 1 or not hasattr(conv, "bn"):
        raise ValueError("only an ungrouped, unfused Conv can be split")
    return _slice_conv(conv, 0, first), _slice_conv(conv, first, conv.conv.out_channels)


def _copy_layer_attrs(src: nn.Module, dst: nn.Module) -> nn.Module:
    for a in _LAYER_ATTRS:
        if hasattr(src, a):
            setattr(dst, a, getattr(src, a))
    dst.train(src.training)
    return dst


class _SplitFirstConv:
    """The split form shared by C2f, C3k2, C2 and C2PSA: the block's first conv, whose output the block chunks
    in two halves, held as ``cv0`` (first half) and ``cv1`` (second half); ``cv2`` and ``m`` are the block's
    own. ``c`` keeps ultralytics' attribute (the second half's width); the forwards below do not use it."""

    def __init__(self, cv0: Conv, cv1: Conv, cv2: Conv, m: nn.Module):
        nn.Module.__init__(self)  # the ultralytics __init__ would build fresh layers
        self.c = cv1.conv.out_channels
        self.cv0, self.cv1, self.cv2, self.m = cv0, cv1, cv2, m

    @classmethod
    def from_block(cls, block: nn.Module):
        """Convert the ultralytics block into this split form, weights exact."""
        cv0, cv1 = _halves(block.cv1, block.cv1.conv.out_channels // 2)
        return _copy_layer_attrs(block, cls(cv0, cv1, block.cv2, block.m))


class C2fSplit(_SplitFirstConv, C2f):
    """C2f in split form: ``forward(x) == C2f.forward(x)`` for the same weights; the halves may have
    different widths after pruning. Build it with :meth:`from_block`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    # ultralytics' exporter swaps C2f.forward for forward_split; both are the same here.
    forward_split = forward


class C3k2Split(C2fSplit, C3k2):
    """C3k2 (a C2f whose ``m`` holds Bottleneck, C3k, or Bottleneck + PSABlock) in the split form of
    :class:`C2fSplit`; still an instance of ultralytics' ``C3k2`` and ``C2f``."""


class C2Split(_SplitFirstConv, C2):
    """C2 in split form (``cv0`` goes through ``m``, ``cv1`` bypasses it); same outputs as ``C2.forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.m(self.cv0(x)), self.cv1(x)), 1))


class C2PSASplit(_SplitFirstConv, C2PSA):
    """C2PSA in split form (``cv0`` bypasses, ``cv1`` goes through the PSABlocks); same outputs as
    ``C2PSA.forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv0(x), self.m(self.cv1(x))), 1))


#: The split forms (a block's first conv held as ``cv0`` + ``cv1``; C3k2Split is a C2fSplit).
SPLIT_FORMS = (C2fSplit, C2Split, C2PSASplit)


class PrunableAttention(Attention):
    """ultralytics ``Attention`` whose inner widths do not depend on its input width.

    ``qkv`` maps the outer channels to ``num_heads * (2 * key_dim + head_dim)`` channels laid out per head
    (q, k, v); the value path (``pe``, the attention output, ``proj``'s inputs) has
    ``num_heads * head_dim`` channels. ultralytics reshapes that path with the input width, equal to it
    only before pruning; here it is ``num_heads * head_dim`` always. Same outputs for the same weights.
    """

    format: str | None = None  # set by ultralytics' exporter ("coreml": fused attention); older Attention lacks it

    def __init__(self, qkv: Conv, proj: Conv, pe: Conv, *, num_heads: int, key_dim: int, head_dim: int):
        nn.Module.__init__(self)
        self.num_heads, self.key_dim, self.head_dim = num_heads, key_dim, head_dim
        self.scale = key_dim**-0.5
        self.qkv, self.proj, self.pe = qkv, proj, pe

    @classmethod
    def from_attention(cls, attn: Attention) -> PrunableAttention:
        """Convert an ultralytics ``Attention`` (weights shared, not copied)."""
        new = cls(attn.qkv, attn.proj, attn.pe, num_heads=attn.num_heads, key_dim=attn.key_dim,
                  head_dim=attn.head_dim)
        new.scale = attn.scale
        if "format" in vars(attn):
            new.format = attn.format
        if new.inner_channels != attn.qkv.conv.in_channels or new.qkv_channels != attn.qkv.conv.out_channels:
            raise ValueError("Attention widths are inconsistent: num_heads * head_dim must equal its input width")
        return new.train(attn.training)

    @property
    def inner_channels(self) -> int:
        """Width of the value path (``pe``, ``proj`` inputs): ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def qkv_channels(self) -> int:
        """Output width of ``qkv``: ``num_heads * (2 * key_dim + head_dim)``."""
        return self.num_heads * (2 * self.key_dim + self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        N, C = H * W, self.inner_channels
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2
        )
        if self.format == "coreml" and hasattr(F, "scaled_dot_product_attention"):
            x = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1))
            x = x.transpose(-2, -1).reshape(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        else:
            attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
            x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(x)


def _prunable_form(module: nn.Module) -> nn.Module | None:
    """The prunable replacement of ``module``, or None when it needs none (exact ultralytics types only)."""
    kind = type(module)
    split = {C2f: C2fSplit, C3k2: C3k2Split, C2: C2Split, C2PSA: C2PSASplit}.get(kind)
    if split is not None:
        return split.from_block(module)
    if kind is Attention:
        return PrunableAttention.from_attention(module)
    return None


def to_prunable(model: nn.Module) -> int:
    """Replace, in place, every C2f, C3k2, C2, C2PSA and Attention of ``model`` by its prunable form.

    Returns how many modules were replaced. Already converted modules are left as they are.
    """
    count = 0
    for name, child in list(model.named_children()):
        new = _prunable_form(child)
        if new is not None:
            setattr(model, name, new)
            child = new
            count += 1
        count += to_prunable(child)
    return count


# ------------------------------------------------------------------------------------- back to stock classes
#: Each split form and the ultralytics class it converts back to (exact types).
_STOCK_OF: dict[type, type] = {C2fSplit: C2f, C3k2Split: C3k2, C2Split: C2, C2PSASplit: C2PSA}


def _join_convs(first: Conv, second: Conv) -> Conv:
    """One ``Conv`` (conv + BN + act) whose output channels are ``first``'s then ``second``'s: the inverse of
    :func:`_halves`."""
    a, b = first.conv, second.conv
    if (a.in_channels, a.kernel_size, a.stride, a.groups) != (b.in_channels, b.kernel_size, b.stride, b.groups):
        raise ValueError("only convs of the same input and kernel can be joined")
    new = copy.deepcopy(first)
    c, bn = new.conv, new.bn

    def cat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.detach(), y.detach()]).clone()

    c.weight = nn.Parameter(cat(a.weight, b.weight), requires_grad=a.weight.requires_grad)
    if a.bias is not None:
        c.bias = nn.Parameter(cat(a.bias, b.bias), requires_grad=a.bias.requires_grad)
    c.out_channels = a.out_channels + b.out_channels
    bn.weight = nn.Parameter(cat(first.bn.weight, second.bn.weight), requires_grad=first.bn.weight.requires_grad)
    bn.bias = nn.Parameter(cat(first.bn.bias, second.bn.bias), requires_grad=first.bn.bias.requires_grad)
    bn.running_mean = cat(first.bn.running_mean, second.bn.running_mean)
    bn.running_var = cat(first.bn.running_var, second.bn.running_var)
    bn.num_features = c.out_channels
    return new


def _stock_problem(module: nn.Module) -> str | None:
    """Why ``module`` (a prunable form) cannot become its ultralytics class, or None."""
    if type(module) in _STOCK_OF:
        a, b = module.cv0.conv.out_channels, module.cv1.conv.out_channels
        return None if a == b else f"its two halves have {a} and {b} channels (stock {_STOCK_OF[type(module)].__name__} " \
                                   "splits one conv in two equal halves)"
    if type(module) is PrunableAttention:
        outer = module.qkv.conv.in_channels
        return None if outer == module.inner_channels else \
            f"its input has {outer} channels, not num_heads * head_dim = {module.inner_channels} (stock Attention " \
            "reshapes its values with the input width)"
    return None


def stock_problems(model: nn.Module) -> list[str]:
    """Every prunable form in ``model`` that :func:`to_stock` cannot convert, as ``"model.4 (C2fSplit): why"``."""
    return [f"{name} ({type(m).__name__}): {why}" for name, m in model.named_modules()
            if (why := _stock_problem(m)) is not None]


def _stock_form(module: nn.Module) -> nn.Module | None:
    """The ultralytics module ``module`` (a prunable form) stands for, or None when it is no prunable form."""
    why = _stock_problem(module)
    if why is not None:
        raise ValueError(f"cannot convert a {type(module).__name__} back to its ultralytics class: {why}")
    stock = _STOCK_OF.get(type(module))
    if stock is not None:
        new = stock.__new__(stock)
        nn.Module.__init__(new)  # the ultralytics __init__ would build fresh layers
        new.c = module.cv0.conv.out_channels  # what stock forward / forward_split split by
        new.cv1, new.cv2, new.m = _join_convs(module.cv0, module.cv1), module.cv2, module.m
        return _copy_layer_attrs(module, new)
    if type(module) is PrunableAttention:
        new = Attention.__new__(Attention)
        nn.Module.__init__(new)
        new.num_heads, new.key_dim, new.head_dim, new.scale = module.num_heads, module.key_dim, module.head_dim, \
            module.scale
        new.qkv, new.proj, new.pe = module.qkv, module.proj, module.pe
        if "format" in vars(module):
            new.format = module.format
        return new.train(module.training)
    return None


def to_stock(model: nn.Module) -> int:
    """Replace, in place, every prunable form of ``model`` by the ultralytics class it came from (the inverse of
    :func:`to_prunable`, same outputs). Returns how many modules were replaced.

    Raises:
        ValueError: a form stock ultralytics cannot compute with its widths (see :func:`stock_problems`); the model
            is left unchanged then.
    """
    problems = stock_problems(model)
    if problems:
        raise ValueError(f"cannot convert {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                                            else ""))
    return _replace_stock(model)


def _replace_stock(model: nn.Module) -> int:
    count = 0
    for name, child in list(model.named_children()):
        new = _stock_form(child)
        if new is not None:
            setattr(model, name, new)
            child = new
            count += 1
        count += _replace_stock(child)
    return count
