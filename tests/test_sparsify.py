"""Unstructured pruning (yolo_prune.stages.sparsify, yolo_prune.pruning.masks): exact sparsity, the head left intact, the percentile method, permanent
zeros that load in a fresh process and export, fine-tuning that keeps the zeros (1 epoch, resume, DDP worker),
the iterative schedule and one-line CLI errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from yolo_prune import cli
from yolo_prune.config import build
from yolo_prune.errors import UsageError
from yolo_prune.pruning.masks import (
    SPARSITY_ATTR,
    PercentileUnstructured,
    apply_masks,
    global_sparsity,
    make_permanent,
    percentile_threshold,
    prunable_convs,
    sparsify_module,
    zero_masks,
)
from yolo_prune.stages.sparsify import sparsify

from .helpers import FAST, ROOT, make_pruned_model, randomize_bn

NC = 3


@pytest.fixture(scope="module")
def _base():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return randomize_bn(DetectionModel("yolov8n.yaml", nc=NC, verbose=False)).eval()


@pytest.fixture
def model(_base):
    return copy.deepcopy(_base)


@pytest.fixture(scope="module")
def dense_pt(_base, tmp_path_factory) -> Path:
    from yolo_prune.models import save_checkpoint

    return save_checkpoint(_base, tmp_path_factory.mktemp("dense") / "dense.pt")


@pytest.fixture(scope="module")
def data(synthetic) -> str:
    return str(synthetic / "yolo.yaml")


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach().clone() for n, m in prunable_convs(model)}


def _head_tensors(model) -> dict[str, torch.Tensor]:
    head = model.model[-1]
    out = {"dfl": head.dfl.conv.weight.detach().clone()}
    for name in ("cv2", "cv3"):
        for i, branch in enumerate(getattr(head, name)):
            out[f"{name}.{i}"] = branch[-1].weight.detach().clone()
    return out


def _python(code: str, cwd: Path) -> str:
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("method", ["l1", "random"])
def test_exact_sparsity_per_scope(model, method):
    """global: round(amount * N) zeros over all selected weights; layer: round(amount * n) in every layer -
    counting the weights that were 0 already."""
    convs = prunable_convs(model)
    with torch.no_grad():  # some zeros from before: they count as pruned, the total stays exact
        convs[3][1].weight.view(-1)[:50] = 0
    for scope in ("global", "layer"):
        m = copy.deepcopy(model)
        rows = sparsify_module(m, amount=0.37, scope=scope, method=method, seed=1)
        assert not any(n.endswith(("_orig", "_mask")) for n, _ in m.named_parameters())  # prune.remove done
        assert not any(n.endswith("_mask") for n, _ in m.named_buffers())
        if scope == "layer":
            assert all(r.zeros == round(0.37 * r.params) for r in rows)
        else:  # one ranking over all selected weights (by |w|: the layers get different amounts)
            assert sum(r.zeros for r in rows) == round(0.37 * sum(r.params for r in rows))
            assert method == "random" or len({round(r.sparsity, 2) for r in rows}) > 5
    # the earlier zeros are still zero
    m = copy.deepcopy(model)
    sparsify_module(m, amount=0.2, scope="layer", method=method, seed=2)
    assert (prunable_convs(m)[3][1].weight.view(-1)[:50] == 0).all()


def test_l1_cuts_the_smallest_magnitudes(model):
    before = _weights(model)
    sparsify_module(model, amount=0.5, scope="global", method="l1")
    after = _weights(model)
    cut = torch.cat([before[n][after[n] == 0].abs().flatten() for n in before])
    kept = torch.cat([before[n][after[n] != 0].abs().flatten() for n in before])
    assert cut.max() <= kept.min()
    assert all(torch.equal(after[n][after[n] != 0], before[n][after[n] != 0]) for n in before)  # the rest untouched


@pytest.mark.parametrize("layers", ["conv", "all"])
def test_head_stays_intact(model, layers):
    """layers=conv leaves Detect's box/class output convs and DFL untouched; layers=all adds the outputs, never DFL."""
    before = _head_tensors(model)
    sparsify_module(model, amount=0.8, scope="layer", method="l1", layers=layers)
    after = _head_tensors(model)
    assert torch.equal(after["dfl"], before["dfl"])
    outputs = [k for k in before if k != "dfl"]
    if layers == "conv":
        assert all(torch.equal(after[k], before[k]) for k in outputs)
    else:
        assert all((after[k] == 0).float().mean() > 0.75 for k in outputs)
    assert (model.model[0].conv.weight == 0).float().mean() > 0.75  # the rest was sparsified


def test_percentile_matches_numpy(model):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1001, generator=g)
    for q in (0.0, 12.5, 50.0, 73.3, 99.9):
        assert percentile_threshold(t.abs(), q) == pytest.approx(np.percentile(t.abs().numpy().astype(np.float64), q),
                                                                 abs=1e-12)
    # per layer: cut exactly the weights below the layer's percentile of |w|
    m = copy.deepcopy(model)
    before = _weights(m)
    apply_masks(m, amount=0.6, scope="layer", method="percentile")
    for n, conv in prunable_convs(m):
        w = np.abs(before[f"{n}.weight"].numpy().astype(np.float64))
        expected = w >= np.percentile(w, 60)
        assert np.array_equal(conv.weight_mask.numpy().astype(bool), expected), n
        assert any(isinstance(h, PercentileUnstructured) for h in conv._forward_pre_hooks.values())
    # global: one threshold across all layers
    m = copy.deepcopy(model)
    apply_masks(m, amount=0.6, scope="global", method="percentile")
    allw = np.concatenate([np.abs(v.numpy().astype(np.float64)).ravel() for v in before.values()])
    thr = np.percentile(allw, 60)
    for n, conv in prunable_convs(m):
        expected = np.abs(before[f"{n}.weight"].numpy().astype(np.float64)) >= thr
        assert np.array_equal(conv.weight_mask.numpy().astype(bool), expected), n
    assert make_permanent(m) == len(prunable_convs(m))
    from yolo_prune.pruning.masks import layer_sparsity

    assert global_sparsity(layer_sparsity(m)) == pytest.approx(0.6, abs=1 / allw.size)


def test_channel_pruned_model_then_weights():
    """Channels first (C2fSplit modules), then weights: exact sparsity and a working forward."""
    from yolo_prune.modules import C2fSplit

    pruned = make_pruned_model(nc=NC)
    assert any(isinstance(m, C2fSplit) for m in pruned.modules())
    rows = sparsify_module(pruned, amount=0.5, scope="global")
    assert sum(r.zeros for r in rows) == round(0.5 * sum(r.params for r in rows))
    with torch.no_grad():
        out = pruned.eval()(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(out[0]).all()


def test_batchnorm_correction_restores_the_first_layer_statistics(model):
    """Zeroing conv 0's weights shifts its BN input; the correction makes the BN output's per-channel mean and
    variance on the calibration images those of the dense model again. An unchanged model keeps its statistics."""
    from yolo_prune.pruning.masks import batchnorm_input_stats, correct_batchnorm

    images = torch.rand(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # 2 batches of the correction
    ref = batchnorm_input_stats(model, images)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert correct_batchnorm(model, ref, images) == len(ref)
    assert all(torch.allclose(b, before[n], atol=1e-6) for n, b in model.named_buffers() if n in before)

    def bn0_output(m):
        with torch.no_grad():
            return m.model[0].bn(m.model[0].conv(images))

    dense = bn0_output(model)
    plain, fixed = copy.deepcopy(model), copy.deepcopy(model)
    sparsify_module(plain, amount=0.6, scope="layer")
    sparsify_module(fixed, amount=0.6, scope="layer", calib=images)
    assert torch.equal(plain.model[0].conv.weight, fixed.model[0].conv.weight)  # weights alike, only BN differs
    err_plain = (bn0_output(plain).mean((0, 2, 3)) - dense.mean((0, 2, 3))).abs().max()
    err_fixed = (bn0_output(fixed).mean((0, 2, 3)) - dense.mean((0, 2, 3))).abs().max()
    assert err_fixed < 1e-3 < err_plain
    assert torch.allclose(bn0_output(fixed).var((0, 2, 3)), dense.var((0, 2, 3)), rtol=1e-3, atol=1e-4)


def test_amount_zero_changes_nothing(model):
    before = _weights(model)
    sparsify_module(model, amount=0.0)
    assert all(torch.equal(before[n], w) for n, w in _weights(model).items())


@pytest.mark.parametrize("kwargs, match", [
    ({"amount": -0.1}, r"amount=-0.1 is out of range: it must be in \[0, 1\)"),
    ({"amount": 1.0}, r"amount=1.0 is out of range"),
    ({"scope": "net"}, "unknown scope 'net'"),
    ({"method": "bn"}, "unknown method 'bn' for sparsify"),
    ({"layers": "head"}, "unknown layers 'head'"),
])
def test_api_refuses_bad_options(model, kwargs, match):
    with pytest.raises(UsageError, match=match):
        sparsify_module(model, **{"amount": 0.5, **kwargs})


# ----------------------------------------------------------------------------------------------- CLI / config
@pytest.mark.parametrize("argv, text", [
    (["amount=-0.2"], "amount=-0.2 is out of range: it must be in [0, 1)"),
    (["amount=1"], "amount=1.0 is out of range: it must be in [0, 1)"),
    (["amount=1.5"], "amount=1.5 is out of range"),
    (["scope=net"], "unknown scope 'net'; choose one of global, layer"),
    (["scope=globl"], "did you mean 'global'"),
    (["method=bn"], "unknown method 'bn' for sparsify"),
    (["method=magnitude"], "choose one of l1, random, percentile"),
    (["layers=head"], "unknown layers 'head'"),
])
def test_cli_errors_are_one_line(argv, text, capsys):
    assert cli.main(["sparsify", "model=yolov8n.yaml", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_method_default_depends_on_the_mode():
    assert build("sparsify", {})[0]["method"] == "l1"
    assert build("prune", {})[0]["method"] == "auto"
    assert build("sparsify", {"method": "percentile"})[0]["method"] == "percentile"
    with pytest.raises(UsageError, match="unknown method 'percentile'; choose one of auto, bn"):
        build("prune", {"method": "percentile"})


# ----------------------------------------------------------------------------------------------- the stage
def test_sparsify_writes_a_plain_checkpoint_that_reloads_with_its_zeros(dense_pt, tmp_path):
    """Masks removed: plain tensors; YOLO(path) in a fresh process sees exactly the zeros; ONNX equals torch."""
    res = sparsify(dense_pt, amount=0.5, scope="layer", method="l1", imgsz=64, bench=False, project=tmp_path,
                   name="s")
    assert res.checkpoint == tmp_path / "s" / "weights" / "sparse.pt"
    for f in ("report.json", "report.md", "layers.csv", "sparsity.png", "weight_hist.png"):
        assert (res.save_dir / f).is_file(), f
    assert res.sparsity == pytest.approx(0.5, abs=1e-6) and res.gzip_after < res.gzip_before
    assert "do not make a dense runtime faster" in (res.save_dir / "report.md").read_text()
    report = json.loads((res.save_dir / "report.json").read_text())
    assert report["sparsity"] == res.sparsity and len(report["layers_sparsity"]) == len(prunable_convs(res.model.model))

    ckpt = torch.load(res.checkpoint, map_location="cpu", weights_only=False)
    state = ckpt["model"].state_dict()
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    assert ckpt["yolo_prune"]["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    names = getattr(ckpt["model"], SPARSITY_ATTR)["params"]
    here = {n: int((state[n] == 0).sum()) for n in names}
    there = json.loads(_python(f"""
        import json
        from ultralytics import YOLO
        m = YOLO({str(res.checkpoint)!r}).model
        p = dict(m.named_parameters())
        print(json.dumps({{n: int((p[n] == 0).sum()) for n in m.{SPARSITY_ATTR}["params"]}}))
        """, tmp_path))
    assert there == here and sum(here.values()) == sum(round(0.5 * state[n].numel()) for n in names)

    from yolo_prune.deploy import export_model
    from yolo_prune.stats import inference_copy

    onnx = export_model(res.checkpoint, format="onnx", imgsz=64, save_dir=tmp_path / "onnx")
    import onnxruntime as ort

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        want = inference_copy(res.model)(x)[0].numpy()
    assert np.abs(got - want).max() < 1e-3


def test_cli_sparsify_with_data(dense_pt, synthetic, tmp_path, capsys):
    """The CLI mode end to end with data=: mAP before/after in the table, exact sparsity, BN correction recorded."""
    argv = ["sparsify", f"model={dense_pt}", "amount=0.3", "scope=layer", "method=percentile", "imgsz=64", "batch=4",
            "calib_images=4", f"data={synthetic / 'coco.yaml'}", "backends=", f"project={tmp_path}", "name=cli"]
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "SparsifyResult" in out and "mAP50-95" in out and "gzip checkpoint (MB)" in out and "latency" not in out
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["method"] == "percentile" and report["sparsity"] == pytest.approx(0.3, abs=2e-3)
    assert report["steps"][0]["bn_corrected"] and report["map50_95_after"] is not None
    assert "corrected for the zeros" in (tmp_path / "cli" / "report.md").read_text()


# ----------------------------------------------------------------------------------------------- fine-tuning
def _masked_zero(path: Path, masks: dict[str, torch.Tensor]) -> tuple[bool, int]:
    """(every masked weight is 0, number of unmasked weights that differ from 0) in a checkpoint."""
    from ultralytics.nn.tasks import load_checkpoint

    m = load_checkpoint(path)[0]
    p = dict(m.named_parameters())
    ok = all(bool((p[n][mask] == 0).all()) for n, mask in masks.items())
    return ok, sum(int((p[n][~mask] != 0).sum()) for n, mask in masks.items())


@pytest.fixture(scope="module")
def sparse_pt(dense_pt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sparse")
    return sparsify(dense_pt, amount=0.6, imgsz=64, bench=False, project=out, name="s").checkpoint


@pytest.mark.slow
def test_finetune_keeps_zeros_through_epochs_resume_and_reload(sparse_pt, data, tmp_path):
    from ultralytics.nn.tasks import load_checkpoint

    from yolo_prune.train import FinetuneTrainer, finetune

    start = load_checkpoint(sparse_pt)[0]
    masks = zero_masks(start)
    assert masks and sum(int(m.sum()) for m in masks.values()) > 0
    start_w = {n: p.detach().clone() for n, p in start.named_parameters() if n in masks}

    # 1 epoch: zeros kept in best.pt and last.pt (the EMA), and the other weights did train
    res = finetune(sparse_pt, data, epochs=1, project=tmp_path, name="ft", **FAST)
    for ckpt in (res.best, res.last):
        ok, _ = _masked_zero(ckpt, masks)
        assert ok, ckpt
    tuned = dict(load_checkpoint(res.best)[0].named_parameters())
    assert any(not torch.equal(tuned[n][~masks[n]], start_w[n][~masks[n]].float()) for n in masks)

    # an interrupted 2-epoch run (stopped after saving epoch 1), then resume=True
    class Stop(Exception):
        pass

    def stop(trainer):
        raise Stop

    overrides = dict(model=str(sparse_pt), data=data, epochs=2, project=str(tmp_path), name="rs", exist_ok=True,
                     save_dir=str(tmp_path / "rs"), plots=False, **FAST)
    trainer = FinetuneTrainer(overrides=overrides)
    trainer.add_callback("on_model_save", stop)
    with pytest.raises(Stop):
        trainer.train()
    last = tmp_path / "rs" / "weights" / "last.pt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    assert _masked_zero(last, masks)[0]
    res2 = finetune(sparse_pt, data, resume=last, **FAST)
    assert res2.epochs == 2 and _masked_zero(res2.best, masks)[0] and _masked_zero(res2.last, masks)[0]

    # a fresh process loads best.pt with YOLO(): the zeros are there, and the mark travels on for the next fine-tune
    torch.save({n: m for n, m in masks.items()}, tmp_path / "masks.pt")
    out = _python(f"""
        import torch
        from ultralytics import YOLO
        m = YOLO({str(res2.best)!r}).model
        masks = torch.load({str(tmp_path / 'masks.pt')!r})
        p = dict(m.named_parameters())
        print(all(bool((p[n][k] == 0).all()) for n, k in masks.items()), sorted(m.{SPARSITY_ATTR}["params"]) == sorted(masks))
        """, tmp_path)
    assert out == "True True"


@pytest.mark.slow
def test_sparsity_training_keeps_zeros_too(sparse_pt, data, tmp_path):
    from ultralytics.nn.tasks import load_checkpoint

    from yolo_prune.train import sparse_train

    masks = zero_masks(load_checkpoint(sparse_pt)[0])
    res = sparse_train(sparse_pt, data, sr=0.01, epochs=1, project=tmp_path, name="sp", **FAST)
    ok, free = _masked_zero(res.last, masks)
    assert ok and free > 0


@pytest.mark.slow
def test_ddp_worker_rebuild_keeps_zeros(sparse_pt, data, tmp_path):
    """ultralytics' DDP worker script rebuilds FinetuneTrainer from vars(args) in a fresh process: the masks come from
    the checkpoint on disk, and the zeros survive."""
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    from yolo_prune.train import FinetuneTrainer

    masks = zero_masks(load_checkpoint(sparse_pt)[0])
    save_dir = tmp_path / "ddp"
    trainer = FinetuneTrainer(overrides={"model": str(sparse_pt), "data": data, "save_dir": str(save_dir),
                                         "plots": False, "epochs": 1, **FAST})
    file = generate_ddp_file(trainer)
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run([sys.executable, file], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    finally:
        ddp_cleanup(trainer, file)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ok, free = _masked_zero(save_dir / "weights" / "last.pt", masks)
    assert ok and free > 0


@pytest.mark.slow
def test_iterative_steps_ramp_and_stop_at_the_map_budget(dense_pt, synthetic, tmp_path, monkeypatch):
    """steps=3 to 0.6: 0.2 -> 0.4 -> 0.6 with a fine-tune after each; the step out of the mAP budget is rejected,
    the one before is the result, and its fine-tune kept the zeros of its own step."""
    import dataclasses

    import yolo_prune.stages.sparsify as stage

    real = stage.evaluate
    maps = iter([0.50, 0.49, 0.48, 0.47, 0.45, 0.30, 0.29])  # baseline, then (sparsified, tuned) per step

    def fake(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), map50_95=next(maps))

    monkeypatch.setattr(stage, "evaluate", fake)  # every evaluation of the stage
    kw = dict(amount=0.6, steps=3, step_epochs=1, max_map_drop=0.1, data=str(synthetic / "yolo.yaml"), imgsz=64,
              batch=4, workers=0, device="cpu", bench=False, project=tmp_path, name="it",
              train_args={"nbs": 4, "warmup_epochs": 0})
    res = sparsify(dense_pt, **kw)
    assert [round(s["amount"], 6) for s in res.steps] == [0.2, 0.4, 0.6]
    assert [s["sparsity"] for s in res.steps] == pytest.approx([0.2, 0.4, 0.6], abs=1e-6)
    assert res.steps[-1].get("rejected") and res.kept_step == 2
    assert res.sparsity == pytest.approx(0.4, abs=1e-6) and res.map50_95_after == 0.45
    assert "step2" in res.steps[1]["finetuned"]
    # step 2 started from step 1's fine-tuned weights: step 1's zeros are a subset of the result's zeros
    from ultralytics.nn.tasks import load_checkpoint

    step1 = zero_masks(load_checkpoint(res.steps[0]["checkpoint"])[0])
    final = dict(load_checkpoint(res.checkpoint)[0].named_parameters())
    assert all(bool((final[n][m] == 0).all()) for n, m in step1.items())
    # resume of a finished run redoes nothing
    monkeypatch.setattr(stage, "evaluate", real)
    again = sparsify(dense_pt, **{**kw, "resume": True})
    assert again.kept_step == 2 and again.steps == res.steps


def test_resume_without_a_run_is_an_error(dense_pt, tmp_path):
    with pytest.raises(UsageError, match="no sparsify.json"):
        sparsify(dense_pt, project=tmp_path, name="none", resume=True, bench=False)


def test_steps_need_data(dense_pt, tmp_path):
    with pytest.raises(UsageError, match="needs data="):
        sparsify(dense_pt, steps=2, project=tmp_path, name="x", bench=False)
