"""Layer-level forward passes of a DetectionModel: run it layer by layer, cache the outputs, restart midway.

``DetectionModel.model`` is a list of top-level layers, each reading the outputs named by its ``f`` (from)
indices (-1: the previous layer). Sequential reconstruction and sensitivity analysis re-run parts of the
network many times on the same images; caching every layer's output once (fp16) lets them restart from the
first layer a change touches instead of from the image.
"""

from __future__ import annotations

import re
from typing import Any

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


def head_output(y: Any) -> torch.Tensor:
    """The decoded predictions ``(batch, 4 + nc, anchors)`` of a Detect output in eval mode."""
    while isinstance(y, (tuple, list)):
        y = y[0]
    if isinstance(y, dict):
        y = next(iter(y.values()))
        return head_output(y)
    return y


class ForwardCache:
    """Every top-level layer's output of ``model`` on ``images`` (fp16, per batch), to restart from any layer."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, images: torch.Tensor, *, batch: int = 16):
        self.device = next(model.parameters()).device
        self.outputs: dict[int, Batches] = {-1: [images[i : i + batch].to(self.device)
                                                 for i in range(0, len(images), batch)]}
        was = model.training
        model.eval()
        try:
            layers = list(model.model)
            for i, layer in enumerate(layers[:-1]):
                self.outputs[i] = [layer(to_float(x)).half() for x in layer_input(layer, i, self.outputs)]
            self.head = [head_output(layers[-1](to_float(x))).float()
                         for x in layer_input(layers[-1], len(layers) - 1, self.outputs)]
        finally:
            model.train(was)

    @torch.no_grad()
    def run_from(self, model: nn.Module, start: int) -> Batches:
        """The head's decoded output of ``model`` (same widths as when cached), recomputing layers >= ``start``."""
        layers = list(model.model)
        outputs = {j: v for j, v in self.outputs.items() if j < start}
        uses = last_use(model)
        for i in range(start, len(layers)):
            x = layer_input(layers[i], i, outputs)
            if i == len(layers) - 1:
                return [head_output(layers[i](to_float(b))).float() for b in x]
            if uses.get(i, -1) > i:
                outputs[i] = [layers[i](to_float(b)) for b in x]
            for j in [j for j in outputs if j >= start and uses.get(j, -1) <= i]:
                del outputs[j]
        return []
