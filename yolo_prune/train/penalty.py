"""The sparsity penalties of :class:`~yolo_prune.train.SparseTrainer`, applied around each optimizer step.

Three modes (``sr_mode``):

* ``subgradient``: the L1 penalty enters the gradient as ``sr * sign(gamma)`` (the historical method, see
  :func:`~yolo_prune.train.sparse.l1_step`). With Adam(W) the normaliser divides it away, and no gamma
  ever becomes exactly 0.
* ``proximal``: after every optimizer step, the proximal operator of ``lr_g * sr * |gamma|`` (soft
  thresholding): ``gamma <- sign(gamma) * max(|gamma| - lr_g * sr, 0)``, with ``lr_g`` the current
  learning rate of gamma's parameter group (warmup included). It produces exact zeros with any optimizer,
  AMP scaling or gradient clipping, since it never passes through the gradient. With ``sr_group=True``
  the proximal operator of the group lasso over the channel groups pruning uses
  (:mod:`yolo_prune.pruning.bngroups`) is applied instead: the vector of every gamma coupled to one
  channel is shrunk by its L2 norm, ``v <- v * max(1 - lr_g * sr * sqrt(len(v)) / |v|, 0)``, so all of a
  channel's coupled gammas reach 0 together, which is what frees the channel.
* ``greg`` (growing regularisation, Wang et al., ICLR 2021): the channels that pruning to ``target_macs``
  with ``method`` would remove are chosen once at the start; only their (coupled) gammas get an L2 penalty
  ``lam/2 * gamma^2``, applied as its proximal step ``gamma <- gamma / (1 + lr_g * lam)``, whose coefficient
  grows linearly with the training's progress from 0 to ``sr / lr0_g`` (``lr0_g``: the group's initial
  learning rate) over the first ``greg_ramp`` fraction of the training. So ``sr`` is the fraction by which
  each step shrinks the chosen gammas at the end of the ramp (times ``lr_g / lr0_g``), the same with SGD or
  AdamW. Then they are set to exactly 0 and kept there while the rest of the network trains on; pruning
  at the threshold afterwards removes exactly those channels and leaves the trained function unchanged.

The EMA (what ultralytics validates and saves, and what ``resume`` restarts from) follows the model:
after every EMA update, a penalised gamma that is exactly 0 in the model is set to 0 in the EMA too
(:meth:`SparsityPenalty.sync_ema`), so the zeros of training are the zeros of ``best.pt``/``last.pt``.

A channel whose coupled gammas are all 0 (or all below ``gamma_threshold``: they are first set to 0) still
emits the constant ``act(beta)``. Removing it later folds that
constant into its consumers, which is exact except at the image border (zero padding), and that border
error spreads inward through every later 3x3 conv: on bccd at imgsz 416, zeroing 40% of the MACs' gammas by
hand and removing them changed raw head outputs by up to 3.3 even in the interior. So at the end of every
epoch such channels are *retired* (:func:`retire_dead_channels`): their constant is folded into the
consumers and their betas are set to 0, in the model and in the EMA. The function is unchanged in the
interior; the network then trains its remaining epochs without the border signal of dead channels, and
pruning them afterwards is exact everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..io import write_json
from ..pruning.bngroups import BNGroup, BNGroups
from ..pruning.compensate import bn_after, shift_output
from ..pruning.graph import portable_view
from ..pruning.importance import make_importance
from ..pruning.portable import TiedGroup, tie, untie
from ..pruning.schedule import PlanOptions, plan, solve_for_macs
from ..options import choices

__all__ = ["SR_MODES", "SparsityPenalty", "GregPlan", "greg_plan", "soft_threshold_", "group_soft_threshold_",
           "retire_dead_channels"]

SR_MODES = choices("sr_mode")


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


# --------------------------------------------------------------------------------------------- proximal operators
@torch.no_grad()
def soft_threshold_(w: torch.Tensor, t: float) -> None:
    """In place: ``w <- sign(w) * max(|w| - t, 0)`` (the proximal operator of ``t * |w|``)."""
    if t > 0:
        w.copy_(torch.sign(w) * (w.abs() - t).clamp_(min=0))


@torch.no_grad()
def group_soft_threshold_(tensors: Sequence[torch.Tensor], idxs: Sequence[torch.Tensor], roots: Sequence[torch.Tensor],
                          n: int, t: torch.Tensor | float) -> torch.Tensor:
    """In place, the group-lasso proximal step over ``n`` groups spread across several tensors.

    Entry ``idxs[k][j]`` of ``tensors[k]`` belongs to group ``roots[k][j]``. Each group's vector ``v`` becomes
    ``v * max(1 - t_g / |v|_2, 0)`` (``t`` a scalar or one value per group). Returns the scale applied per group.
    """
    sq = torch.zeros(n, dtype=torch.float64)
    for w, idx, root in zip(tensors, idxs, roots):
        sq.index_add_(0, root, w.detach()[idx].double().square().cpu())
    norm = sq.sqrt()
    t = torch.as_tensor(t, dtype=torch.float64)
    scale = torch.where(norm > t, 1.0 - t / norm.clamp(min=1e-30), torch.zeros_like(norm))
    for w, idx, root in zip(tensors, idxs, roots):
        w[idx] = w[idx] * scale[root].to(w)
    return scale


# --------------------------------------------------------------------------------------------- greg's plan
@dataclasses.dataclass
class GregPlan:
    """The channels greg drives to zero: ``{bn name: [channel positions]}`` and what removing them reaches."""

    entries: dict[str, list[int]]
    target_macs: float
    macs_fraction: float
    channels: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GregPlan":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def greg_plan(groups: BNGroups, *, target_macs: float, method: str = "bn", head: bool = True,
              max_layer_ratio: float = 0.75, round_to: int | None = 8, tolerance: float = 0.03,
              seed: int = 0, portable: bool = False) -> GregPlan:
    """The channels pruning to ``target_macs`` with ranking ``method`` would remove, planned on the traced copy
    behind ``groups`` with the pruning schedule (:func:`~yolo_prune.pruning.schedule.plan` and
    :func:`~yolo_prune.pruning.schedule.solve_for_macs`), without pruning anything. With ``portable``, as portable
    pruning would (:mod:`yolo_prune.pruning.portable`: the halves of a split block tied, attention's input width
    kept), so that the channels greg zeroes are exactly those a portable threshold removal takes."""

    method = "bn" if method == "auto" else method  # auto without calibration images is bn
    if method in ("activation", "recon"):
        raise UsageError(f"sr_mode=greg ranks channels with bn, l1, l2 or random ({method} needs calibration images)")
    if not 0 < target_macs < 1:
        raise UsageError(f"sr_mode=greg needs target_macs in (0, 1), got {target_macs!r}")
    importance = make_importance(method, seed=seed)
    graph = portable_view(groups.graph) if portable else groups.graph
    offered = {g.name for g in graph.groups()}
    chosen: list[BNGroup] = [g for g in groups.select(head=head) if g.name in offered]
    by_name = {g.name: g for g in chosen}
    scored = []
    for g in chosen:
        s = importance(g.graph_group.group)
        scored.append((g.graph_group, torch.zeros(g.channels) if s is None else s.detach().float().cpu()))
    units = tie(graph, scored)  # unchanged unless portable
    scores = [s for _, s in units]
    channels = [u.channels for u, _ in units]

    def per_group(counts: Sequence[int]) -> list[int]:
        """Counts of the planned units as counts of every chosen group (a tied unit: both halves)."""
        n_of = {m.name: n for (u, _), n in zip(units, counts)
                for m in ([m for m, _ in u.members] if isinstance(u, TiedGroup) else [u])}
        return [n_of.get(g.name, 0) for g in chosen]

    opts = PlanOptions(max_layer_ratio=max_layer_ratio, round_to=round_to)
    counts, reached = solve_for_macs(lambda c: groups.macs_after(per_group(c), chosen),
                                     lambda a: plan(scores, channels, a, opts), target_macs, tolerance=tolerance,
                                     max_amount=1.0)
    plans = untie([(u, torch.argsort(s, stable=True)[:n].tolist()) for (u, s), n in zip(units, counts) if n])
    entries: dict[str, list[int]] = {}
    for group, idxs in plans:
        removed = torch.as_tensor(idxs, dtype=torch.long)
        for m in by_name[group.name].members:
            keep = torch.isin(m.root, removed)
            if keep.any():
                entries.setdefault(m.bn, []).extend(m.idx[keep].tolist())
    return GregPlan({k: sorted(v) for k, v in entries.items()}, float(target_macs), float(reached),
                    int(sum(len(idxs) for _, idxs in plans)), method)


# --------------------------------------------------------------------------------------------- the penalty
class SparsityPenalty:
    """Applies one ``sr_mode`` to a live model (bound once; rebuilt on DDP workers and on resume).

    Args:
        mode: ``subgradient``, ``proximal`` or ``greg``.
        model: the trained model (DDP wrapper allowed); BNs are looked up by name.
        groups: the BN channel groups (needed for ``group`` and ``greg``, and for the MACs statistics).
        group: group soft-thresholding instead of per-BN soft-thresholding (``proximal`` only).
        head: penalise the Detect head's BNs too.
        plan: greg's chosen channels.
        greg_ramp: fraction of the training over which greg's penalty grows to ``sr``.
    """

    def __init__(self, mode: str, model: nn.Module, *, groups: BNGroups | None = None, group: bool = False,
                 head: bool = True, plan: GregPlan | None = None, greg_ramp: float = 0.5):
        if mode not in SR_MODES:
            raise UsageError(f"sr_mode must be one of {', '.join(SR_MODES)}, got {mode!r}")
        if (group or mode == "greg") and groups is None:
            raise ValueError("group sparsity and greg need the BN channel groups")
        if mode == "greg" and plan is None:
            raise ValueError("greg needs its plan")
        self.mode, self.group, self.head, self.greg_ramp = mode, bool(group), bool(head), float(greg_ramp)
        self.groups, self.plan = groups, plan
        mods = dict(_unwrap(model).named_modules())
        head_prefix = self._head_prefix(_unwrap(model))
        if mode == "greg":
            names = sorted(plan.entries)
        elif group:
            names = groups.bn_names(head=head)
        else:
            names = [n for n, m in mods.items() if isinstance(m, nn.BatchNorm2d) and (head or not n.startswith(head_prefix))]
        self.names = names
        self.params = [mods[n].weight for n in names if mods[n].weight is not None]
        self._bound = {n: mods[n].weight for n in names}
        # group view: per group the member tensors, positions and roots, and sqrt(#coupled gammas) per channel
        self._groups: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int, torch.Tensor]] = []
        if group and mode == "proximal":
            for g in groups.select(head=head):
                ws = [mods[m.bn].weight for m in g.members]
                self._groups.append((ws, [m.idx for m in g.members], [m.root for m in g.members], g.channels,
                                     g.bns_per_channel().double().clamp(min=1).sqrt()))
        self._greg: list[tuple[torch.Tensor, torch.Tensor]] = []
        if mode == "greg":
            self._greg = [(mods[n].weight, torch.tensor(idx, dtype=torch.long)) for n, idx in plan.entries.items()]
        self._lr_index: dict[int, int] | None = None
        self._ema_pairs: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.lam = 0.0  # greg's current L2 coefficient

    @staticmethod
    def _head_prefix(model: nn.Module) -> str:
        seq = getattr(model, "model", None)
        return f"model.{len(seq) - 1}." if isinstance(seq, nn.Sequential) else "\0"

    # ------------------------------------------------------------------------------------------------ steps
    def subgradient_params(self) -> list[torch.Tensor]:
        """Parameters that get ``sr * sign(p)`` added to their gradient (``subgradient`` mode only)."""
        return self.params if self.mode == "subgradient" else []

    def _lrs(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], key: str = "lr") -> list[float]:
        """The current (or, with ``key="initial_lr"``, initial) learning rate of each parameter's group."""
        if self._lr_index is None:
            self._lr_index = {id(p): i for i, grp in enumerate(optimizer.param_groups) for p in grp["params"]}
        pg = optimizer.param_groups
        return [float(pg[self._lr_index[id(p)]].get(key, pg[self._lr_index[id(p)]]["lr"]))
                if id(p) in self._lr_index else 0.0 for p in params]

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer, sr: float, progress: float) -> None:
        """The proximal part, right after ``optimizer.step()``. ``progress`` in [0, 1] is the training's progress."""
        if self.mode == "proximal" and sr > 0:
            if self._groups:
                for ws, idxs, roots, n, weight in self._groups:
                    lr = sum(self._lrs(optimizer, ws)) / len(ws)
                    group_soft_threshold_(ws, idxs, roots, n, lr * sr * weight)
            else:
                for p, lr in zip(self.params, self._lrs(optimizer, self.params)):
                    soft_threshold_(p, lr * sr)
        elif self.mode == "greg" and sr > 0:  # sr=0 is no penalty, in every mode
            ramp = max(self.greg_ramp, 1e-9)
            if progress >= ramp:
                self.lam = float(sr)
                for w, idx in self._greg:
                    w[idx] = 0.0
            else:
                self.lam = float(sr) * progress / ramp  # times 1 / lr0 of each group
                params = [w for w, _ in self._greg]
                for (w, idx), lr, lr0 in zip(self._greg, self._lrs(optimizer, params),
                                             self._lrs(optimizer, params, "initial_lr")):
                    w[idx] = w[idx] / (1.0 + lr / max(lr0, 1e-12) * self.lam)

    @torch.no_grad()
    def sync_ema(self, ema_model: nn.Module | None) -> None:
        """Zero, in the EMA, every penalised gamma that is exactly 0 in the model."""
        if ema_model is None:
            return
        if self._ema_pairs is None or self._ema_pairs[0] != id(ema_model):
            mods = dict(_unwrap(ema_model).named_modules())
            self._ema_pairs = (id(ema_model), [(w, mods[n].weight) for n, w in self._bound.items()])
        for w, e in self._ema_pairs[1]:
            zero = w.detach() == 0
            if zero.any():
                e.masked_fill_(zero.to(e.device), 0.0)

    def retire(self, model: nn.Module, ema_model: nn.Module | None = None, *, threshold: float = 0.0) -> int:
        """:func:`retire_dead_channels` (channels whose coupled gammas are all 0 or below ``threshold``) on the model
        and on the EMA, each by its own gammas. Returns the model's count. Not in ``subgradient`` mode."""
        if self.groups is None or self.mode == "subgradient":
            return 0
        n = retire_dead_channels(model, self.groups, threshold=threshold)
        if ema_model is not None:
            retire_dead_channels(ema_model, self.groups, threshold=threshold)
        return n

    # ------------------------------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def stats(self, model: nn.Module, threshold: float, *, round_to: int | None = None) -> dict[str, float]:
        """Fractions of every BN gamma that are exactly 0 and below ``threshold``, and (with the groups) the MACs
        fraction pruning at ``threshold`` would free now."""
        g = torch.cat([m.weight.detach().abs().float().flatten().cpu() for m in _unwrap(model).modules()
                       if isinstance(m, nn.BatchNorm2d) and m.weight is not None])
        out = {"gamma_zero": float((g == 0).float().mean()), "gamma_near_zero": float((g < threshold).float().mean()),
               "gamma_mean": float(g.mean())}
        out["free_macs"] = (self.groups.free_macs(model, threshold, round_to=round_to)
                            if self.groups is not None else float("nan"))
        return out


@torch.no_grad()
def retire_dead_channels(model: nn.Module, groups: BNGroups, *, threshold: float = 0.0, imgsz: int = 64) -> int:
    """Fold the constant output of every channel whose coupled gammas are all exactly 0 into its consumers, then
    set its betas to 0 (so it outputs ``act(0) = 0``). In place; returns the number of channels retired.

    With ``threshold`` > 0, channels whose coupled gammas are all below it are first set to exactly 0 (what
    pruning at that threshold will do), so the model *is* the pruned model from then on.

    The constants are read at each conv's input on a grey image in eval mode, before and after the betas are
    zeroed: an input channel that was constant and is 0 afterwards lost exactly that constant, which is added
    back through the conv's BN (running mean) or bias (:func:`~yolo_prune.pruning.compensate.shift_output`).
    """
    net = _unwrap(model)
    mods = dict(net.named_modules())
    dead: list[tuple[nn.BatchNorm2d, torch.Tensor]] = []
    count = 0
    for g, score in zip(groups.groups, groups.scores(net)):
        roots = torch.nonzero((score < threshold) | (score == 0)).flatten()
        if not len(roots):
            continue
        entries = [(mods[m.bn], m.idx[torch.isin(m.root, roots)]) for m in g.members]
        for bn, idx in entries:
            bn.weight[idx.to(bn.weight.device)] = 0.0
        entries = [(bn, idx) for bn, idx in entries if len(idx) and bool((bn.bias[idx] != 0).any())]
        if entries:
            dead += entries
            count += len(roots)
    if not dead:
        return 0
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    p = next(net.parameters())
    x = torch.full((1, 3, imgsz, imgsz), 0.5, device=p.device, dtype=p.dtype)

    def inputs() -> dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]]:
        seen: dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(conv: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
            t = args[0].detach().float()
            seen[conv] = (t.mean((0, 2, 3)), t.amax((0, 2, 3)) - t.amin((0, 2, 3)))

        handles = [c.register_forward_hook(hook) for c in convs]
        was = net.training
        net.eval()
        try:
            net(x)
        finally:
            for h in handles:
                h.remove()
            net.train(was)
        return seen

    before = inputs()
    for bn, idx in dead:
        bn.bias[idx.to(bn.bias.device)] = 0.0
    after = inputs()
    bns = bn_after(net)
    for conv, (mean0, spread0) in before.items():
        mean1, spread1 = after[conv]
        lost = (spread0 == 0) & (spread1 == 0) & (mean1 == 0) & (mean0 != 0)
        if lost.any():
            cols = torch.nonzero(lost).flatten().to(conv.weight.device)
            w = conv.weight[:, cols].float().sum((2, 3))
            shift_output(conv, w @ mean0[lost].to(w), bns.get(conv))
    return count


def save_plan(plan: GregPlan, path: str | Path) -> Path:
    return write_json(path, plan.to_dict())


def load_plan(path: str | Path) -> GregPlan:
    return GregPlan.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
