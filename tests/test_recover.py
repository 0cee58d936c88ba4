"""What makes a pruned model keep its accuracy without training: channel tracking, BN re-estimation, sequential
reconstruction, sensitivity analysis and sensitivity-aware allocation (yolo_prune.pruning)."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from torch import nn

from yolo_prune.errors import UsageError
from yolo_prune.pruning import prune_model
from yolo_prune.pruning.calibration import load_calibration_images
from yolo_prune.pruning.forward import head_output
from yolo_prune.pruning.graph import build_graph, prepare
from yolo_prune.pruning.recalibrate import bn_reference, recalibrate_bn
from yolo_prune.pruning.schedule import LossAllocation, LossCurve, PlanOptions, solve_for_macs
from yolo_prune.pruning.sensitivity import Probe, detection_distance


@pytest.fixture(scope="module")
def images(synthetic) -> torch.Tensor:
    from yolo_prune.data import resolve_data

    return load_calibration_images(resolve_data(synthetic / "yolo.yaml").train_images, n=16, imgsz=64)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if k.endswith(("running_mean", "running_var"))}


def test_kept_channels_record_what_survives(v8n):
    """Without compensation a pruned conv is exactly the dense conv at the kept output and input channels."""
    dense = prepare(copy.deepcopy(v8n))
    outcome = prune_model(v8n, method="bn", target_macs=0.5, compensate="none")
    kept = outcome.kept
    dmods = dict(dense.named_modules())
    checked = 0
    for name, m in v8n.named_modules():
        if isinstance(m, nn.Conv2d) and name in kept.widths:
            w = dmods[name].weight[kept.kept_out(name)][:, kept.kept_in(name)]
            assert torch.equal(m.weight, w), name
            checked += name in kept.out or name in kept.inp
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, dmods[name].running_mean[kept.kept_out(name)]), name
    assert checked > 20


@pytest.mark.parametrize("mode", ["match", "reset"])
def test_recalibration_changes_only_running_statistics(v8n, images, mode):
    dense = prepare(copy.deepcopy(v8n))
    ref = bn_reference(dense, images)
    outcome = prune_model(v8n, method="bn", target_macs=0.6, calib_images=images, compensate="lstsq")
    params, stats = _params(v8n), _stats(v8n)
    n = recalibrate_bn(v8n, images, reference=ref if mode == "match" else None, kept=outcome.kept.out, mode=mode)
    assert n == sum(isinstance(m, nn.BatchNorm2d) for m in v8n.modules())
    after = _params(v8n)
    assert all(torch.equal(params[k], after[k]) for k in params)  # every parameter bit-identical
    changed = [k for k, v in _stats(v8n).items() if not torch.allclose(v, stats[k])]
    assert len(changed) > 0.5 * len(stats)
    assert not v8n.training and all(not m.training for m in v8n.modules())  # modes restored


def test_moment_matching_leaves_an_unpruned_model_as_it_is(v8n, images):
    """Measured in one batch, the unpruned model's own statistics come back (nothing was shifted)."""
    prepare(v8n)
    before = _stats(v8n)
    recalibrate_bn(v8n, images, reference=bn_reference(v8n, images), batch=len(images))
    after = _stats(v8n)
    for k in before:
        assert torch.allclose(before[k], after[k], rtol=1e-3, atol=1e-4), k


def _bn_output_moments(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    bns = {m: n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}

    def hook(m, i, o):
        out[bns[m]] = (o.mean((0, 2, 3)), o.var((0, 2, 3), unbiased=False))

    handles = [m.register_forward_hook(hook) for m in bns]
    with torch.no_grad():
        model.eval()(images)
    for h in handles:
        h.remove()
    return out


def test_moment_matching_gives_every_bn_output_the_dense_moments(v8n, images):
    """After pruning, each BN output channel has the mean and variance of the same channel in the dense model."""
    dense = prepare(copy.deepcopy(v8n))
    ref = bn_reference(dense, images)
    outcome = prune_model(v8n, method="l1", target_macs=0.6, calib_images=images, compensate="none")
    want = _bn_output_moments(dense, images)
    before = _bn_output_moments(v8n, images)
    recalibrate_bn(v8n, images, reference=ref, kept=outcome.kept.out, batch=len(images))
    got = _bn_output_moments(v8n, images)
    better = 0
    for name, (mean, var) in got.items():
        idx = outcome.kept.kept_out(name)
        wm, wv = want[name][0][idx], want[name][1][idx]
        assert torch.allclose(mean, wm, atol=1e-3, rtol=1e-2), name
        assert torch.allclose(var, wv, atol=1e-3, rtol=1e-2), name
        err_before = float((before[name][0] - wm).abs().max())
        better += err_before > 1e-3
    assert better > 10  # pruning had shifted them


def _layer_error(model: nn.Module, dense: nn.Module, images: torch.Tensor) -> float:
    """Relative squared error of the Detect head's raw outputs (box distributions and class logits)."""
    def raw(m):
        m.eval()
        with torch.no_grad():
            out = m(images)[1]
        return [out["boxes"], out["scores"]]
    a, b = raw(dense), raw(model)
    return sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)) / sum(float((x**2).sum()) for x in a)


def test_sequential_reconstruction_beats_one_shot(v8n, images):
    dense = prepare(copy.deepcopy(v8n))
    errors = {}
    for comp in ("none", "lstsq", "lstsq_seq"):
        m = copy.deepcopy(dense)
        prune_model(m, method="l1", target_macs=0.5, calib_images=images, compensate=comp)
        errors[comp] = _layer_error(m, dense, images)
    assert errors["lstsq_seq"] < errors["lstsq"] < errors["none"]


def test_simulated_removal_equals_real_pruning(v8n, images):
    """The sensitivity probe's masked removal computes what the really pruned model computes."""
    prepare(v8n)
    graph = build_graph(v8n)
    probe = Probe(v8n, graph, images, compensate=False)
    group = next(g for g in graph.groups() if g.name == "model.15.cv2.conv")
    idxs = list(range(0, group.channels, 3))
    simulated = probe.loss([(group, idxs)])
    real = copy.deepcopy(v8n)
    g2 = build_graph(real)
    g2.prune(next(g for g in g2.groups() if g.name == group.name), idxs)
    with torch.no_grad():
        out = [head_output(real.eval()(x.float())) for x in probe.cache.outputs[-1]]
    assert simulated > 0
    assert simulated == pytest.approx(detection_distance(probe.cache.head, out), rel=0.05)
    assert probe.loss([]) == pytest.approx(0.0, abs=1e-3)


def test_detection_distance_weights_confident_anchors():
    ref = torch.zeros(1, 6, 4)
    ref[0, :4] = torch.tensor([10.0, 10.0, 4.0, 4.0])[:, None]
    ref[0, 4, 0] = 0.9  # one confident anchor
    lost = ref.clone()
    lost[0, 4, 0] = 0.1  # the detection disappears
    noise = ref.clone()
    noise[0, 5, 1:] = 0.02  # faint scores on background anchors
    assert detection_distance([ref], [ref]) == 0
    assert detection_distance([ref], [lost]) > 10 * detection_distance([ref], [noise])


def test_loss_allocation_spares_the_sensitive_group():
    opts = PlanOptions(max_layer_ratio=0.75, round_to=None)
    steep, flat = LossCurve((0.25, 0.5, 0.75), (1.0, 2.0, 4.0)), LossCurve((0.25, 0.5, 0.75), (0.01, 0.02, 0.05))
    alloc = LossAllocation([steep, flat], [32, 32], [0.01, 0.01], opts)
    previous = [0, 0]
    for amount in (0.1, 0.3, 0.5, 0.7, 0.9):
        counts = alloc(amount)
        assert all(c >= p for c, p in zip(counts, previous))  # monotone in the amount
        previous = counts
    macs_of = lambda counts: 1 - 0.01 * sum(counts)  # noqa: E731
    counts, reached = solve_for_macs(macs_of, alloc, 0.76, tolerance=0.01, max_amount=1.0)
    assert reached <= 0.77 and counts[1] == 24 and counts[0] == 0  # all from the flat group first


@pytest.mark.parametrize("allocation", ["sensitivity", "search"])
def test_allocations_reach_the_target(v8n, images, allocation):
    prepare(v8n)
    names = [g.name for g in build_graph(v8n).groups()]
    # given curves (as from a sensitivity.csv): the later a layer, the more sensitive
    curves = {n: LossCurve((0.25, 0.5, 0.75), (0.01 * i, 0.02 * i, 0.04 * i)) for i, n in enumerate(sorted(names))}
    outcome = prune_model(v8n, method="bn", target_macs=0.6, calib_images=images[:4], compensate="lstsq",
                          allocation=allocation, sensitivity=curves, search_candidates=2)
    assert outcome.steps[-1].macs_fraction == pytest.approx(0.6, abs=0.03)


def test_allocation_errors(v8n, images):
    with pytest.raises(UsageError, match="allocation"):
        prune_model(copy.deepcopy(v8n), allocation="magic")
    with pytest.raises(UsageError, match="data="):
        prune_model(copy.deepcopy(v8n), allocation="sensitivity")
    with pytest.raises(UsageError, match="ratio"):
        prune_model(copy.deepcopy(v8n), allocation="sensitivity", ratio=0.3, target_macs=None, calib_images=images)


def test_sensitivity_writes_one_row_per_group(v8n, synthetic, tmp_path):
    import yolo_prune as yp

    result = yp.sensitivity(v8n, synthetic / "yolo.yaml", imgsz=64, calib_images=4, project=tmp_path, name="s")
    model = prepare(copy.deepcopy(v8n))
    names = {g.name for g in build_graph(model).groups()}
    with open(result.csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(names) == result.groups_measured
    assert {r["group"] for r in rows} == names
    assert all(float(r["loss@0.75"]) >= 0 for r in rows)
    assert result.heatmap.is_file() and result.heatmap.stat().st_size > 1000
    # the csv drives allocation=sensitivity without measuring again
    outcome = prune_model(model, target_macs=0.6, allocation="sensitivity", sensitivity=result.csv)
    assert outcome.steps[-1].macs_fraction == pytest.approx(0.6, abs=0.03)


def test_cli_sensitivity_then_prune_with_every_option(v8n, synthetic, tmp_path, capsys):
    import json

    from yolo_prune.cli import main
    from yolo_prune.models import save_checkpoint

    assert main(["prune", "allocation=magic"]) == 2
    assert "unknown allocation 'magic'; choose one of auto, global, sensitivity, search" in capsys.readouterr().err
    assert main(["prune", "recalibrate=maybe"]) == 2
    assert main(["prune", "compensate=lstsq_sequential"]) == 2
    pt = save_checkpoint(v8n, tmp_path / "v8n.pt")
    data = str(synthetic / "yolo.yaml")
    assert main(["sensitivity", f"model={pt}", f"data={data}", "imgsz=64", "calib_images=2", f"project={tmp_path}",
                 "name=sens"]) == 0
    csv_path = tmp_path / "sens" / "sensitivity.csv"
    assert csv_path.is_file() and (tmp_path / "sens" / "sensitivity.png").is_file()
    assert main(["prune", f"model={pt}", f"data={data}", "imgsz=64", "calib_images=4", "compensate=lstsq",
                 "method=recon", "allocation=sensitivity", f"sensitivity={csv_path}", "target_macs=0.7",
                 f"project={tmp_path}", "name=pr"]) == 0
    report = json.loads((tmp_path / "pr" / "report.json").read_text())
    assert report["compensate"] == "lstsq" and report["recalibrate"] == "match" and report["method"] == "recon"
    assert report["allocation"] == "sensitivity"
    assert report["map50_95_no_recalibration"] is not None  # the report shows mAP with and without it
    assert "without BN re-estimation" in (tmp_path / "pr" / "report.md").read_text()


def test_recon_sees_that_a_duplicated_channel_costs_nothing(v8n, images):
    """Once a channel duplicates another one, removing either alone costs (almost) nothing after the consumers
    are refit: recon's score of both collapses, the other channels' scores stay where they were."""
    from yolo_prune.pruning.importance import ReconstructionImportance

    prepare(v8n)

    def scores() -> torch.Tensor:
        graph = build_graph(v8n)
        group = next(g for g in graph.groups() if g.name == "model.0.conv")
        recon = ReconstructionImportance(images, ridge=1e-5)  # a small ridge: the exact least-squares error
        recon.calibrate(v8n)
        return recon(group.group)

    before = scores()
    conv, bn = v8n.model[0].conv, v8n.model[0].bn
    with torch.no_grad():
        conv.weight[5] = conv.weight[7]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[5] = t[7]
    after = scores()
    assert float(after[7]) < 0.1 * float(before[7])
    assert float(after[5]) < 0.1 * float(before[7])
    others = [i for i in range(len(after)) if i not in (5, 7)]
    assert float(after[others].median()) == pytest.approx(float(before[others].median()), rel=0.2)


def test_auto_method_and_allocation_resolve_from_the_data(v8n, images):
    no_data = prune_model(copy.deepcopy(v8n), method="auto", allocation="auto", target_macs=0.7, compensate="none")
    assert (no_data.method, no_data.allocation) == ("bn", "global")
    names = [g.name for g in build_graph(prepare(copy.deepcopy(v8n))).groups()]
    curves = {n: LossCurve((0.25, 0.5, 0.75), (0.01, 0.02, 0.04)) for n in names}
    with_data = prune_model(v8n, method="auto", allocation="auto", target_macs=0.7, calib_images=images[:4],
                            compensate="lstsq", sensitivity=curves)
    assert (with_data.method, with_data.allocation) == ("recon", "sensitivity")
