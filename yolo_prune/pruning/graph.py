"""What depends on what: the dependency graph of a YOLOv8 / YOLO11 / YOLO26 detection, segmentation, pose or
oriented-box model.

The model is first put in a prunable form (:func:`~yolo_prune.modules.to_prunable`: C2f, C3k2, C2
and C2PSA hold their split conv as two convs, attention keeps its inner widths on its own), then
torch-pruning's ``DependencyGraph`` is traced once. A :class:`ChannelGroup` is one set of channels that
must be removed together (a conv's outputs with its BN, every consumer's inputs, every residual add and
concat slice it feeds). Protected layers never lose output channels, and a group that would touch one is
not a group at all: the head's final convs of every branch (box, class, and the task's: mask coefficients,
keypoints and their sigmas, angle; YOLO26's one-to-one head too), DFL, ``Proto``'s output conv (the ``nm``
prototypes) and Proto26's semantic output conv, and inside every attention block the ``qkv`` and ``pe`` convs
(their outputs are split per head and reshaped; only the attention's outer channels and its FFN's hidden width
are prunable). The task branches' hidden widths and ``Proto``'s inner convs (its transposed conv included) are
groups like any other.

Branches that run only in training (Pose26's keypoint sigmas, Proto26's semantic head) are traced too, from the
features they read, so that their inputs follow every removal; the MACs model leaves them out, as ``fuse()`` does.

A graph built with ``portable=True`` offers only the groups whose removal stock ultralytics classes can still
compute (:func:`~yolo_prune.modules.to_stock` converts the model back afterwards): no group that changes an
attention's input width (stock ``Attention`` reshapes its values with it), and the two halves of a split block
(``cv0``/``cv1`` of C2f, C3k2, C2, C2PSA) only as a pair of equal width, both or neither
(:mod:`.portable` ties their counts).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from ultralytics.nn.modules import block as _block
from ultralytics.nn.modules import C2, C2PSA, DFL, SPPF, Bottleneck, C2f, C3k2, Concat, Conv, DWConv
from ultralytics.nn.modules.block import Attention, C3k, Proto, PSABlock

from ..errors import UnsupportedModelError
from ..forms import supported_heads
from ..modules import SPLIT_FORMS, C2fSplit, C2PSASplit, C2Split, C3k2Split, PrunableAttention, to_prunable

# Top-level layer types of a detection model that the graph handles correctly (exact types: a subclass
# may compute something else); the heads: Detect, Segment(26), Pose(26), OBB(26) (yolo_prune.forms).
SUPPORTED_LAYERS: tuple[type, ...] = (
    Conv, C2f, C2fSplit, C3k2, C3k2Split, C2, C2Split, SPPF, C2PSA, C2PSASplit, Concat, nn.Upsample,
    *supported_heads(),
)
_PROTO26 = getattr(_block, "Proto26", None)  # YOLO26 segmentation (absent from older ultralytics)
# Modules never traced nor pruned, whose insides are not checked: Pose26's flow model (used by its loss only).
_OPAQUE: tuple[type, ...] = tuple(t for t in (getattr(_block, "RealNVP", None),) if t is not None)
# Modules allowed inside those layers (exact types), besides parameter-free activations.
_INNER: tuple[type, ...] = (
    Conv, DWConv, nn.Conv2d, nn.BatchNorm2d, nn.Sequential, nn.ModuleList, nn.Identity, nn.MaxPool2d,
    Bottleneck, C3k, PSABlock, Attention, PrunableAttention, DFL, Proto, nn.ConvTranspose2d,
    *(t for t in (_PROTO26,) if t is not None), *_OPAQUE,
)
SUPPORTED_BLOCKS = "Conv, C2f, C2, C3k2, C3k, SPPF, C2PSA/PSABlock, Concat, Upsample, Detect, Segment, Pose, OBB"
# The convolutions the graph prunes and counts (Proto upsamples with a transposed conv).
CONVS: tuple[type, ...] = (nn.Conv2d, nn.ConvTranspose2d)


def _inner_problem(layer: nn.Module) -> str | None:
    """Why a supported top-level ``layer`` still cannot be pruned (an unknown inner block, a grouped
    conv), or None."""
    opaque = {id(x) for m in layer.modules() if isinstance(m, _OPAQUE) for x in m.modules() if x is not m}
    for m in layer.modules():
        if id(m) in opaque:
            continue
        if m is not layer and type(m) not in _INNER and type(m).__module__ != "torch.nn.modules.activation":
            return f"contains {type(m).__name__}"
        if isinstance(m, nn.Conv2d) and m.groups not in (1, m.in_channels):
            return "has a grouped convolution"
        if isinstance(m, nn.ConvTranspose2d) and m.groups != 1:
            return "has a grouped transposed convolution"
    return None


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming every layer yolo-prune cannot prune safely."""
    if any(isinstance(m, Conv) and not hasattr(m, "bn") for m in model.modules()):
        raise UnsupportedModelError(
            "cannot prune a fused model (Conv and BatchNorm folded): prune the unfused checkpoint "
            "(ultralytics' best.pt / last.pt are unfused)"
        )
    bad: dict[str, list[int]] = {}
    for i, layer in enumerate(model.model):
        name = type(layer).__name__
        if type(layer) not in SUPPORTED_LAYERS:
            bad.setdefault(name, []).append(i)
        elif (why := _inner_problem(layer)) is not None:
            bad.setdefault(f"{name} that {why}", []).append(i)
    if bad:
        what = ", ".join(f"{name} (layer {', '.join(map(str, idx))})" for name, idx in bad.items())
        raise UnsupportedModelError(
            f"cannot prune {what}: yolo-prune supports YOLOv8, YOLO11 and YOLO26 detection blocks "
            f"({SUPPORTED_BLOCKS})"
        )


# The head's per-scale branch lists: box, class, and the task's (mask coefficients, keypoints, angle; Pose26's
# shared keypoint features cv4 feed cv4_kpts and the training-only cv4_sigma). YOLO26 adds one2one_<name> of each.
HEAD_BRANCHES = ("cv2", "cv3", "cv4", "cv4_kpts", "cv4_sigma")
# (feature branch list, training-only branch list reading it): Pose26's keypoint sigmas.
_TRAINING_BRANCHES = (("cv4", "cv4_sigma"), ("one2one_cv4", "one2one_cv4_sigma"))


def _detect_branches(head: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the head's branch lists that run in inference, and those ``fuse()`` drops.

    A YOLO26 head holds one-to-many (``cv2``/``cv3``/``cv4``...) and one-to-one (``one2one_*``) branches; the one
    ``end2end`` selects is the one an inference (fused) model keeps. Pose26's sigma branches are dropped either way.
    """
    present = [n for n in HEAD_BRANCHES if getattr(head, n, None) is not None]
    one2many, one2one = present, [f"one2one_{n}" for n in HEAD_BRANCHES if getattr(head, f"one2one_{n}", None)
                                  is not None]
    if not one2one or not one2many:
        keep, drop = one2many or one2one, []
    else:
        keep, drop = (one2one, one2many) if head.end2end else (one2many, one2one)
    training = [n for n in keep if n.endswith("cv4_sigma")]
    return [n for n in keep if n not in training], drop + training


def _output_convs(head: nn.Module) -> list[nn.Module]:
    """The head's final convs (what leaves each branch: a plain ``nn.Conv2d``, the branch itself or its last
    layer), ``Proto``'s output conv and Proto26's semantic output conv."""
    convs: list[nn.Module] = []
    for name in HEAD_BRANCHES + tuple(f"one2one_{n}" for n in HEAD_BRANCHES):
        for branch in getattr(head, name, None) or []:
            last = branch[-1] if isinstance(branch, nn.Sequential) else branch
            if type(last) is nn.Conv2d:
                convs.append(last)
    proto = getattr(head, "proto", None)
    if proto is not None:
        convs.append(proto.cv3.conv)
        if getattr(proto, "semseg", None) is not None:
            convs.append(proto.semseg[-1])
    return convs


def protected_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must never change: the head's output convs (box, class and the task's, every
    branch), ``Proto``'s prototypes and DFL (:func:`_output_convs`), and every attention's ``qkv`` and ``pe``
    convs (split per head / reshaped)."""
    head = model.model[-1]
    layers: list[nn.Module] = _output_convs(head)
    layers.append(head.dfl)
    for m in model.modules():
        if isinstance(m, Attention):
            layers += [m.qkv.conv, m.pe.conv]
    return layers


def prepare(model: nn.Module) -> nn.Module:
    """Check ``model`` and rewrite it in place into its prunable form (outputs unchanged). Returns it."""
    check_supported(model)
    to_prunable(model)
    return model


@dataclasses.dataclass
class ChannelGroup:
    """One set of coupled channels, identified by its root conv (whose output channels it removes)."""

    name: str
    root: nn.Conv2d
    handler: Callable
    channels: int
    group: tp.dependency.Group = dataclasses.field(repr=False)
    # (conv, is_output, channels of that conv touched per root channel) for every conv in the group
    convs: list[tuple[nn.Conv2d, bool, float]] = dataclasses.field(repr=False, default_factory=list)


@dataclasses.dataclass
class KeptChannels:
    """Which channels of the model as it was when tracking started each conv and BN still has.

    ``out[name]`` / ``inp[name]`` are the original indices (ascending) of the output / input channels a
    module (by its name in the model) keeps; modules never touched are absent. Sequential reconstruction and
    BN re-estimation use it to compare a pruned layer with the same layer of the dense model.
    """

    widths: dict[str, tuple[int, int]]
    out: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    inp: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, names: dict[nn.Module, str] | None = None) -> KeptChannels:
        widths = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                widths[name] = (m.out_channels, m.in_channels)
            elif isinstance(m, nn.BatchNorm2d):
                widths[name] = (m.num_features, m.num_features)
        return cls(widths=widths)

    def kept_out(self, name: str) -> list[int]:
        return self.out.get(name, list(range(self.widths[name][0])))

    def kept_in(self, name: str) -> list[int]:
        return self.inp.get(name, list(range(self.widths[name][1])))

    def update(self, graph: PruneGraph, pruning_group: tp.dependency.Group) -> None:
        """Remove from the record the channels ``pruning_group`` (not yet pruned) is about to remove."""
        removed: dict[tuple[str, bool], set[int]] = {}
        for dep, idxs in pruning_group:
            m = dep.target.module
            name = graph.names.get(m)
            if name is None or name not in self.widths:
                continue
            is_out = isinstance(m, nn.BatchNorm2d) or graph.dg.is_out_channel_pruning_fn(dep.handler)
            removed.setdefault((name, is_out), set()).update(int(i) for i in idxs)
        for (name, is_out), idx in removed.items():
            current = self.kept_out(name) if is_out else self.kept_in(name)
            left = [c for pos, c in enumerate(current) if pos not in idx]
            (self.out if is_out else self.inp)[name] = left


@dataclasses.dataclass
class PruneGraph:
    """A traced model: its dependency graph, its channel groups, and the spatial size of every conv and
    the token count of every attention at the input size MACs are counted for."""

    model: nn.Module
    dg: tp.DependencyGraph
    ignored: list[nn.Module]
    conv_hw: dict[nn.Conv2d, int]
    names: dict[nn.Module, str]
    attn_tokens: dict[nn.Module, int] = dataclasses.field(default_factory=dict)
    # portable pruning: convs whose input width must stay, and the (first, second) half convs of every split block
    fixed_inputs: tuple[nn.Conv2d, ...] = ()
    pairs: tuple[tuple[nn.Conv2d, nn.Conv2d], ...] = ()
    portable: bool = False

    def groups(self) -> list[ChannelGroup]:
        """The channel groups of the model as it is now (recomputed after every pruning); with ``portable``, only
        those stock ultralytics classes can compute after their removal (see the module docstring)."""
        groups = self._all_groups()
        return _portable_groups(groups, self.fixed_inputs, self.pairs) if self.portable else groups

    def _all_groups(self) -> list[ChannelGroup]:
        out = []
        for group in self.dg.get_all_groups(ignored_layers=self.ignored, root_module_types=list(CONVS)):
            root = group[0].dep.target.module
            channels = self.dg.get_out_channels(root)
            if not channels:
                continue
            convs: dict[tuple[nn.Module, bool], float] = {}
            for dep, idxs in group:
                m = dep.target.module
                if isinstance(m, CONVS):
                    is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
                    convs[(m, is_out)] = len(idxs) / channels
            out.append(
                ChannelGroup(
                    name=self.names.get(root, "?"),
                    root=root,
                    handler=group[0].dep.handler,
                    channels=channels,
                    group=group,
                    convs=[(m, is_out, k) for (m, is_out), k in convs.items()],
                )
            )
        return out

    def prune(self, group: ChannelGroup, idxs: list[int], kept: KeptChannels | None = None) -> None:
        """Remove channels ``idxs`` of ``group``'s root, and every coupled channel, for real.

        With ``kept``, record which of the original channels every touched conv and BN keeps.
        """
        if not idxs:
            return
        pg = self.dg.get_pruning_group(group.root, group.handler, sorted(int(i) for i in idxs))
        if kept is not None:
            kept.update(self, pg)
        pg.prune()

    def start_tracking(self) -> KeptChannels:
        """A :class:`KeptChannels` record of every conv and BN at its current width (before pruning)."""
        return KeptChannels.of(self.model, self.names)

    def conv_macs(self, delta: dict[tuple[nn.Conv2d, bool], float] | None = None) -> float:
        """MACs of the model (convs and attention products, as ultralytics-thop counts them), optionally as
        if ``delta[(conv, is_output)]`` channels were removed.

        An attention's two matrix products (``q^T k`` and ``v attn^T``) cost ``num_heads * (key_dim +
        head_dim) * N^2`` for N tokens; its inner widths never change, so that part is a constant which
        grows with the square of the image area (which is why MACs are counted at the size asked for). A transposed
        conv (Proto's upsampling) counts per input pixel, as ultralytics-thop does: its ``conv_hw`` is its input
        area.
        """
        delta = delta or {}
        total = float(sum(a.num_heads * (a.key_dim + a.head_dim) * n * n for a, n in self.attn_tokens.items()))
        for conv, hw in self.conv_hw.items():
            out_c = conv.out_channels - delta.get((conv, True), 0.0)
            in_c = conv.in_channels - delta.get((conv, False), 0.0)
            depthwise = conv.groups > 1 and conv.groups == conv.in_channels
            per_out = 1.0 if depthwise else in_c / conv.groups
            total += conv.kernel_size[0] * conv.kernel_size[1] * hw * out_c * per_out
        return total


def _portable_groups(groups: list[ChannelGroup], fixed_inputs: tuple[nn.Conv2d, ...],
                     pairs: tuple[tuple[nn.Conv2d, nn.Conv2d], ...]) -> list[ChannelGroup]:
    """``groups`` without those touching the input of a ``fixed_inputs`` conv, and without any half of a pair whose
    other half is not offered at the same width (a pair owned by one group is removed alike anyway)."""
    fixed = set(fixed_inputs)
    keep = [g for g in groups if not any(conv in fixed and not is_out for conv, is_out, _ in g.convs)]
    while True:  # dropping one half can only drop its partner; repeat until nothing changes
        owner = {conv: id(g) for g in keep for conv, is_out, _ in g.convs if is_out}
        widths = {id(g): g.channels for g in keep}
        drop: set[int] = set()
        for first, second in pairs:
            a, b = owner.get(first), owner.get(second)
            if a != b and (a is None or b is None or widths[a] != widths[b]
                           or first.out_channels != second.out_channels):
                drop.update(x for x in (a, b) if x is not None)
        if not drop:
            return keep
        keep = [g for g in keep if id(g) not in drop]


def portable_constraints(model: nn.Module) -> tuple[tuple[nn.Conv2d, ...], tuple[tuple[nn.Conv2d, nn.Conv2d], ...]]:
    """(convs whose input width stock ultralytics derives widths from: every attention's ``qkv``; the
    (first half, second half) convs of every split block) of a prepared model."""
    fixed = tuple(m.qkv.conv for m in model.modules() if isinstance(m, Attention))
    pairs = tuple((m.cv0.conv, m.cv1.conv) for m in model.modules() if isinstance(m, SPLIT_FORMS))
    return fixed, pairs


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _output(out):
    """What torch-pruning should trace from a Detect model's output: the raw head outputs.

    In eval mode the model returns ``(decoded, raw)``; ``raw`` holds the box and class maps of every
    branch (``{"one2many": ..., "one2one": ...}`` for YOLO26), ``decoded`` only the selected branch, after
    a top-k for an end-to-end head. Tracing ``raw`` reaches every head conv and no index arithmetic.
    """
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (dict, list, tuple)):
        out = out[1]
    return _tensors(out)


def _size_hooks(model: nn.Module, hw: dict[nn.Conv2d, int], tokens: dict[nn.Module, int]) -> list:
    """Forward hooks recording every conv's output area (a transposed conv's input area: see
    :meth:`PruneGraph.conv_macs`) and every attention's token count."""
    hooks = [m.register_forward_hook(lambda mod, i, o: hw.__setitem__(mod, o.shape[-1] * o.shape[-2]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda mod, i, o: hw.__setitem__(mod, i[0].shape[-1] * i[0].shape[-2]))
              for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    hooks += [m.register_forward_hook(lambda mod, i, o: tokens.__setitem__(mod, i[0].shape[-1] * i[0].shape[-2]))
              for m in model.modules() if isinstance(m, Attention)]
    return hooks


def _training_readers(head: nn.Module) -> list[tuple[nn.Module, nn.Module, bool]]:
    """(training-only module, the module whose tensor it reads, whether it reads that module's input rather than its
    output): Pose26's sigma convs read each keypoint branch's features, Proto26's semantic head reads the fused
    features ``feat_fuse`` reads."""
    readers = []
    for features, sigma in _TRAINING_BRANCHES:
        if getattr(head, sigma, None) is not None:
            pairs = zip(getattr(head, features), getattr(head, sigma))
            readers += [(reader, source, False) for source, reader in pairs]
    proto = getattr(head, "proto", None)
    if getattr(proto, "semseg", None) is not None:
        readers.append((proto.semseg, proto.feat_fuse, True))
    return readers


def _trace_forward(model: nn.Module, example: torch.Tensor) -> tuple[object, list[torch.Tensor]]:
    """The eval-mode forward torch-pruning traces, plus the outputs of the head's training-only modules computed
    from the tensors they read in training (see the module docstring), so that their inputs are in the graph."""
    readers = _training_readers(model.model[-1])
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for i, (_, source, reads_input) in enumerate(readers):
        if reads_input:
            hooks.append(source.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, args[0])))
        else:
            hooks.append(source.register_forward_hook(lambda m, args, out, i=i: seen.setdefault(i, out)))
    try:
        out = model(example)
    finally:
        for h in hooks:
            h.remove()
    return out, [reader(seen[i]) for i, (reader, _, _) in enumerate(readers) if i in seen]


def build_graph(model: nn.Module, *, imgsz: int = 64, macs_imgsz: int | None = None,
                portable: bool = False) -> PruneGraph:
    """Trace the (already prepared) model at ``imgsz`` and return its :class:`PruneGraph`.

    ``macs_imgsz`` (default: ``imgsz``) is the input size whose MACs :meth:`PruneGraph.conv_macs`
    counts; it matters for attention, whose cost grows faster than the image area. With ``portable`` the graph
    offers only the groups stock ultralytics classes can compute without them (see the module docstring).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, imgsz, imgsz, device=device)
    ignored = protected_layers(model)
    hw: dict[nn.Conv2d, int] = {}
    tokens: dict[nn.Module, int] = {}
    hooks = _size_hooks(model, hw, tokens)
    try:  # one traced forward records both the graph and every conv's output size
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, forward_fn=_trace_forward,
            output_transform=lambda out: _output(out[0]) + out[1], verbose=False
        )
    finally:
        for h in hooks:
            h.remove()
    macs_imgsz = macs_imgsz or imgsz
    if macs_imgsz != imgsz:
        stride = int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 1))
        measured = None
        if macs_imgsz % stride or imgsz % stride:  # maps may not all scale alike: measure them
            measured = {}, {}
            hooks = _size_hooks(model, *measured)
            try:
                with torch.no_grad():
                    model(torch.zeros(1, 3, macs_imgsz, macs_imgsz, device=device))
            except RuntimeError:  # a size this model cannot run at (e.g. P6 at 352): scale instead
                measured = None
            finally:
                for h in hooks:
                    h.remove()
        if measured is None:  # every map scales with the image area
            k = (macs_imgsz / imgsz) ** 2
            hw = {m: round(v * k) for m, v in hw.items()}
            tokens = {m: round(v * k) for m, v in tokens.items()}
        else:
            hw, tokens = measured
    head = model.model[-1]
    dropped = [getattr(head, name) for name in _detect_branches(head)[1]]
    dropped += [reader for reader, _, _ in _training_readers(head)]
    for mod in dropped:  # MACs of the model as it runs: fuse() drops these
        for m in mod.modules():
            hw.pop(m, None)
    names = {m: n for n, m in model.named_modules()}
    model.train(was_training)
    graph = PruneGraph(model=model, dg=dg, ignored=ignored, conv_hw=hw, names=names, attn_tokens=tokens)
    return portable_view(graph) if portable else graph


def portable_view(graph: PruneGraph) -> PruneGraph:
    """The same traced graph offering only the groups of portable pruning (see the module docstring)."""
    fixed, pairs = portable_constraints(graph.model)
    return dataclasses.replace(graph, fixed_inputs=fixed, pairs=pairs, portable=True)
