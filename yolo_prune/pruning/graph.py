"""What depends on what: the dependency graph of a YOLOv8 detection model.

The model is first put in a prunable form (C2f -> :class:`~yolo_prune.modules.C2fSplit`), then
torch-pruning's ``DependencyGraph`` is traced once. A :class:`ChannelGroup` is one set of channels that
must be removed together (a conv's outputs with its BN, every consumer's inputs, every residual add and
concat slice it feeds). The Detect head's final box/class convs and DFL are protected: their outputs
never change, only their inputs follow the layers before them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from ultralytics.nn.modules import SPPF, C2f, Concat, Conv, Detect

from ..errors import UnsupportedModelError
from ..modules import C2fSplit, to_prunable

# Top-level layer types of a YOLOv8 detection model that the graph handles correctly.
SUPPORTED_LAYERS: tuple[type, ...] = (Conv, C2f, C2fSplit, SPPF, Concat, nn.Upsample, Detect)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming every layer type yolo-prune cannot prune safely."""
    bad: dict[str, list[int]] = {}
    for i, layer in enumerate(model.model):
        ok = type(layer) in SUPPORTED_LAYERS
        if isinstance(layer, C2f) and type(layer) not in (C2f, C2fSplit):
            ok = False  # C2f subclasses (C3k2, C2fAttn, ...) carry other inner blocks
        if not ok:
            bad.setdefault(type(layer).__name__, []).append(i)
    if bad:
        what = ", ".join(f"{name} (layer {', '.join(map(str, idx))})" for name, idx in bad.items())
        raise UnsupportedModelError(
            f"cannot prune {what}: yolo-prune supports YOLOv8 detection blocks "
            f"(Conv, C2f, SPPF, Concat, Upsample, Detect)"
        )


def protected_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must never change: Detect's box/class output convs and DFL."""
    head = model.model[-1]
    layers: list[nn.Module] = []
    for name in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
        branches = getattr(head, name, None)
        if branches is not None:
            layers += [branch[-1] for branch in branches]
    layers.append(head.dfl)
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
    """A traced model: its dependency graph, its channel groups and the spatial size of every conv."""

    model: nn.Module
    dg: tp.DependencyGraph
    ignored: list[nn.Module]
    conv_hw: dict[nn.Conv2d, int]
    names: dict[nn.Module, str]

    def groups(self) -> list[ChannelGroup]:
        """The channel groups of the model as it is now (recomputed after every pruning)."""
        out = []
        for group in self.dg.get_all_groups(ignored_layers=self.ignored, root_module_types=[nn.Conv2d]):
            root = group[0].dep.target.module
            channels = self.dg.get_out_channels(root)
            if not channels:
                continue
            convs: dict[tuple[nn.Module, bool], float] = {}
            for dep, idxs in group:
                m = dep.target.module
                if isinstance(m, nn.Conv2d):
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
        """Conv MACs of the model, optionally as if ``delta[(conv, is_output)]`` channels were removed."""
        delta = delta or {}
        total = 0.0
        for conv, hw in self.conv_hw.items():
            out_c = conv.out_channels - delta.get((conv, True), 0.0)
            in_c = conv.in_channels - delta.get((conv, False), 0.0)
            depthwise = conv.groups > 1 and conv.groups == conv.in_channels
            per_out = 1.0 if depthwise else in_c / conv.groups
            total += conv.kernel_size[0] * conv.kernel_size[1] * hw * out_c * per_out
        return total


def _output(out):
    """The tensor torch-pruning should trace from a Detect model's output (eval: (y, raw), train: raw)."""
    if isinstance(out, (tuple, list)):
        return _output(out[0])
    if isinstance(out, dict):
        return [_output(v) for v in out.values()]
    return out


def build_graph(model: nn.Module, *, imgsz: int = 64) -> PruneGraph:
    """Trace the (already prepared) model at ``imgsz`` and return its :class:`PruneGraph`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, imgsz, imgsz, device=device)
    ignored = protected_layers(model)
    hw: dict[nn.Conv2d, int] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o: hw.__setitem__(mod, o.shape[-1] * o.shape[-2]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:  # one traced forward records both the graph and every conv's output size
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, output_transform=_output, verbose=False
        )
    finally:
        for h in hooks:
            h.remove()
    names = {m: n for n, m in model.named_modules()}
    model.train(was_training)
    return PruneGraph(model=model, dg=dg, ignored=ignored, conv_hw=hw, names=names)
