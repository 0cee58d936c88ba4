"""Layer-level forward passes of a DetectionModel: run it layer by layer, cache the outputs, restart midway.

``DetectionModel.model`` is a list of top-level layers, each reading the outputs named by its ``f`` (from)
indices (-1: the previous layer). Sequential reconstruction and sensitivity analysis re-run parts of the
network many times on the same images; caching every layer's output once (fp16) lets them restart from the
first layer a change touches instead of from the image.

The detection head is the most expensive layer of a small detector (yolov8n at 416: a quarter of the network's
time, most of it in the branches of the finest scale) and every restart ends with it. Its branches (``cv2[k]``,
``cv3[k]``, ...: one per scale, each reading one feature map) are cached too, as a restart computes them from the
cached feature maps: a restart that changes neither a branch's weights nor its feature map *replays* that branch's
cached output instead of computing it again, with the same result to the bit.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import torch
from torch import nn

Batches = list[torch.Tensor]


def sources(layer: nn.Module, i: int) -> list[int]:
    """Indices of the outputs ``layer`` (top-level index ``i``) reads; -1 is the input image."""
    f = [layer.f] if isinstance(layer.f, int) else list(layer.f)
    return [(-1 if i == 0 else i - 1) if j == -1 else j for j in f]


def last_use(model: nn.Module) -> dict[int, int]:
    """For each layer output (and -1, the image), the last layer that reads it."""
    out: dict[int, int] = {}
    for i, layer in enumerate(model.model):
        for j in sources(layer, i):
            out[j] = i
    return out


def to_float(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float()
    return [to_float(v) for v in x]


def layer_input(layer: nn.Module, i: int, outputs: dict[int, Batches]) -> list[Any]:
    """Per batch, the input of top-level ``layer`` as ``DetectionModel._predict_once`` builds it
    (``outputs[-1]`` holds the images)."""
    src = sources(layer, i)
    if isinstance(layer.f, int):
        return list(outputs[src[0]])
    return [list(p) for p in zip(*(outputs[j] for j in src))]


def top_level_index(name: str) -> int | None:
    """``model.12.m.0.cv1.conv`` -> 12."""
    m = re.match(r"model\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def head_output(y: Any) -> torch.Tensor | list[torch.Tensor]:
    """The decoded predictions ``(batch, 4 + nc [+ task channels], anchors)`` of a Detect-like output in eval mode;
    a Segment head's as ``[predictions, prototypes (batch, nm, h, w)]``."""
    while isinstance(y, (tuple, list)):
        if len(y) == 2 and all(isinstance(t, torch.Tensor) for t in y) and y[0].ndim == 3 and y[1].ndim == 4:
            return list(y)  # Segment: ((predictions, prototypes), raw)
        y = y[0]
    if isinstance(y, dict):
        y = next(iter(y.values()))
        return head_output(y)
    return y


HEAD_BRANCHES = ("cv2", "cv3", "one2one_cv2", "one2one_cv3")  # Detect's per-scale branch lists


def head_branches(head: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(attribute, scale, branch) of every per-scale branch of a Detect-like head (one per feature map it reads)."""
    nl = len([head.f] if isinstance(head.f, int) else head.f)
    out = []
    for attr in HEAD_BRANCHES:
        branches = getattr(head, attr, None)
        if isinstance(branches, nn.ModuleList) and len(branches) == nl:
            out += [(attr, k, branch) for k, branch in enumerate(branches)]
    return out


class _Replay(nn.Module):
    """Stands in for an unchanged head branch: returns the branch's cached output of the current batch."""

    def __init__(self, outputs: Batches, batch: list[int]):
        super().__init__()
        self.outputs, self.batch = outputs, batch

    def forward(self, x: Any) -> torch.Tensor:
        return self.outputs[self.batch[0]]


class ForwardCache:
    """Every top-level layer's output of ``model`` on ``images`` (fp16, per batch), to restart from any layer, and
    the outputs of the head's branches as a restart computes them from those (see the module doc)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, images: torch.Tensor, *, batch: int = 16):
        self.device = next(model.parameters()).device
        self.outputs: dict[int, Batches] = {-1: [images[i : i + batch].to(self.device)
                                                 for i in range(0, len(images), batch)]}
        self.branches: dict[tuple[str, int], Batches] = {}
        was = model.training
        model.eval()
        try:
            layers = list(model.model)
            for i, layer in enumerate(layers[:-1]):
                self.outputs[i] = [layer(to_float(x)).half() for x in layer_input(layer, i, self.outputs)]
            head = layers[-1]
            handles = [branch.register_forward_hook(self._keep(attr, k)) for attr, k, branch in head_branches(head)]
            try:
                self.head = [to_float(head_output(head(to_float(x))))
                             for x in layer_input(head, len(layers) - 1, self.outputs)]
            finally:
                for h in handles:
                    h.remove()
            # (a branch that did not run exactly once per batch is not replayed)
            self.branches = {key: v for key, v in self.branches.items() if len(v) == len(self.head)}
        finally:
            model.train(was)

    def _keep(self, attr: str, k: int) -> Any:
        """A forward hook storing a head branch's output, batch after batch."""
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.branches.setdefault((attr, k), []).append(output)
        return hook

    @torch.no_grad()
    def run_from(self, model: nn.Module, start: int, changed: set[int] | None = None) -> Batches:
        """The head's decoded output of ``model`` (same widths as when cached), recomputing layers >= ``start``.

        ``changed``: the ids of every parameter and buffer changed since the cache was made (None: unknown); a
        head branch holding none of them and reading a layer below ``start`` replays its cached output."""
        layers = list(model.model)
        outputs = {j: v for j, v in self.outputs.items() if j < start}
        uses = last_use(model)
        for i in range(start, len(layers)):
            x = layer_input(layers[i], i, outputs)
            if i == len(layers) - 1:
                current = [0]
                with self._replay(layers[i], sources(layers[i], i), start, changed, current):
                    out = []
                    for b, xb in enumerate(x):
                        current[0] = b
                        out.append(to_float(head_output(layers[i](to_float(xb)))))
                    return out
            if uses.get(i, -1) > i:
                outputs[i] = [layers[i](to_float(b)) for b in x]
            for j in [j for j in outputs if j >= start and uses.get(j, -1) <= i]:
                del outputs[j]
        return []

    @contextlib.contextmanager
    def _replay(self, head: nn.Module, reads: list[int], start: int, changed: set[int] | None,
                current: list[int]) -> Iterator[None]:
        """Swap every unchanged head branch whose feature map comes from the cache for its :class:`_Replay` for the
        block; the branches are put back whatever happens."""
        swapped = []
        if changed is not None:
            for attr, k, branch in head_branches(head):
                tensors = [*branch.parameters(), *branch.buffers()]
                if reads[k] < start and (attr, k) in self.branches and not any(id(t) in changed for t in tensors):
                    getattr(head, attr)[k] = _Replay(self.branches[(attr, k)], current)
                    swapped.append((attr, k, branch))
        try:
            yield
        finally:
            for attr, k, branch in swapped:
                getattr(head, attr)[k] = branch
