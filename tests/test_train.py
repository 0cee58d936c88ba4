"""Sparsity training and fine-tuning through the ultralytics trainer (yolo_prune.train).

The expensive tests train a pruned yolov8n for 2-3 epochs at imgsz=64 on the 16-image synthetic dataset.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from yolo_prune.errors import DatasetError, ModelLoadError, UsageError
from yolo_prune.train import (
    FinetuneTrainer,
    KeepArchitectureMixin,
    SparseTrainer,
    TrainResult,
    add_l1_subgradient,
    bn_layers,
    finetune,
    gamma_stats,
    l1_step,
    sparse_train,
    sr_at,
)

from .helpers import FAST, NC, ROOT, make_pruned_model, read_csv, save_like_ultralytics, shapes

pytestmark = pytest.mark.usefixtures("data_cache")


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> nn.Module:
    return make_pruned_model()


@pytest.fixture(scope="module")
def pruned_pt(pruned, tmp_path_factory) -> Path:
    return save_like_ultralytics(pruned, tmp_path_factory.mktemp("pruned") / "pruned.pt")


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = _spawned_output(proc)
            raise AssertionError(f"subprocess ended early ({proc.returncode}):\n{out[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------- pure helpers
def test_sr_schedules():
    assert [sr_at(0.1, "constant", e, 5) for e in range(5)] == [0.1] * 5
    assert [round(sr_at(0.1, "linear", e, 5), 6) for e in range(5)] == [0.1, 0.075, 0.05, 0.025, 0.0]
    cos = [sr_at(0.1, "cosine", e, 5) for e in range(5)]
    assert cos[0] == pytest.approx(0.1) and cos[2] == pytest.approx(0.05) and cos[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    assert sr_at(0.1, "linear", 0, 1) == 0.1  # a single epoch keeps its penalty
    with pytest.raises(UsageError):
        sr_at(0.1, "exp", 0, 3)


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


def _one_step(scaler, *, naive: bool = False, sr: float = 0.5) -> dict[str, torch.Tensor]:
    """One SGD step of the toy model with the L1 term; returns its parameters."""
    model = _toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    gammas = [m.weight for m in bn_layers(model)]
    if naive:  # what many pruning repos do: add to the still-scaled gradient
        add_l1_subgradient(gammas, sr)
        l1_step(opt, scaler, model.parameters(), gammas, 0.0)
    else:
        l1_step(opt, scaler, model.parameters(), gammas, sr)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_l1_update_does_not_depend_on_loss_scale():
    plain = _one_step(torch.amp.GradScaler("cpu", enabled=False))
    scaled = _one_step(torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True))
    for k in plain:
        assert torch.allclose(plain[k], scaled[k], atol=1e-6, rtol=1e-5), k
    # the trap this guards against: the same term added before unscaling is 1024x weaker
    naive = _one_step(torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True), naive=True)
    assert not torch.allclose(naive["1.weight"], plain["1.weight"], atol=1e-4)
    # and the penalty is really in there
    no_l1 = _one_step(torch.amp.GradScaler("cpu", enabled=False), sr=0.0)
    assert (plain["1.weight"] < no_l1["1.weight"]).all()  # gammas are 1 > 0: L1 pulls them down


def test_add_l1_subgradient_prescaled_equals_unscaled():
    """The other AMP-safe form: sr*sign(g)*scale added before ``unscale_``."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.0]))
    p.grad = torch.tensor([0.5, 0.5, 0.5]) * 1024
    add_l1_subgradient([p], 0.01, scale=1024)
    assert torch.allclose(p.grad / 1024, torch.tensor([0.51, 0.49, 0.5]))


def test_bn_layers_and_gamma_stats(pruned):
    from ultralytics.nn.modules import Detect

    layers = bn_layers(pruned)
    assert layers and len(layers) == sum(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    head = pruned.model[-1]
    assert isinstance(head, Detect)
    # the box/class output convs and the DFL have no BN, so "every BN" is the right set
    assert all(not isinstance(m, nn.BatchNorm2d) for s in (head.cv2, head.cv3) for seq in s for m in seq[-1:])
    bn = nn.BatchNorm2d(4)
    bn.weight.data = torch.tensor([0.005, -0.002, 0.5, -1.5])
    s = gamma_stats([bn], threshold=0.01)
    assert s["channels"] == 4
    assert s["gamma_mean"] == pytest.approx((0.005 + 0.002 + 0.5 + 1.5) / 4)
    assert s["gamma_near_zero"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- model setup
def test_trainer_keeps_pruned_architecture(pruned, pruned_pt, data, tmp_path):
    """setup_model() returns the checkpoint's own module; plain ultralytics would rebuild from the yaml."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    for cls, extra in ((FinetuneTrainer, {}), (SparseTrainer, {"sr": 0.02, "sr_schedule": "cosine"})):
        trainer = cls(overrides={"model": str(pruned_pt), "data": data, "save_dir": str(tmp_path / cls.__name__),
                                 "plots": False, **FAST, **extra})
        trainer.setup_model()
        model = trainer.model
        assert shapes(model) == shapes(pruned)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())
        assert model.yaml == pruned.yaml
    assert trainer.args.sr == 0.02 and trainer.args.sr_schedule == "cosine" and trainer.args.gamma_threshold == 0.01
    assert "sr: 0.02" in (tmp_path / "SparseTrainer" / "args.yaml").read_text()

    # the trap: ultralytics' own get_model rebuilds the unpruned yaml and drops the pruned weights
    plain = DetectionTrainer(overrides={"model": str(pruned_pt), "data": data, "plots": False,
                                        "save_dir": str(tmp_path / "plain"), **FAST})
    plain.setup_model()
    assert shapes(plain.model) != shapes(pruned)


def test_sparse_trainer_step_is_loss_scale_invariant(pruned_pt, data, tmp_path):
    """SparseTrainer.optimizer_step itself: same update with a 1024 GradScaler as without AMP, and the gammas move
    by exactly lr * sr more than without the penalty (plain SGD, no momentum)."""
    from torch.utils._pytree import tree_leaves

    trainer = SparseTrainer(overrides={"model": str(pruned_pt), "data": data, "save_dir": str(tmp_path / "s"),
                                       "plots": False, "sr": 0.05, "sr_mode": "subgradient", **FAST})
    trainer.setup_model()
    start = copy.deepcopy(trainer.model.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def step(scaler, sr):
        trainer.model.load_state_dict(start)
        trainer.model.train()
        trainer.args.sr = sr
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1, momentum=0.0)
        trainer.scaler, trainer.ema, trainer.epoch = scaler, None, 0
        outputs = [o for o in tree_leaves(trainer.model(x)) if torch.is_tensor(o)]
        loss = sum(o.float().square().mean() for o in outputs) * 1e-3  # small: the clip stays inactive
        scaler.scale(loss).backward()
        trainer.optimizer_step()
        return [b.weight.detach().clone() for b in bn_layers(trainer.model)]

    plain = step(torch.amp.GradScaler("cpu", enabled=False), 0.05)
    scaled = step(torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True), 0.05)
    without = step(torch.amp.GradScaler("cpu", enabled=False), 0.0)
    for a, b, c in zip(plain, scaled, without):
        assert torch.allclose(a, b, atol=1e-6)
        assert torch.allclose(c - a, 0.1 * 0.05 * torch.sign(c), atol=1e-5)


def test_bad_options_are_usage_errors(pruned_pt, data, tmp_path):
    with pytest.raises(UsageError, match="sr_schedule"):
        sparse_train(pruned_pt, data, sr_schedule="exp", project=tmp_path, **FAST)
    with pytest.raises(UsageError):
        sparse_train(pruned_pt, data, sr=-1, project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="not_a_key"):
        finetune(pruned_pt, data, project=tmp_path, not_a_key=1, **FAST)
    with pytest.raises(UsageError, match="save_dir"):
        finetune(pruned_pt, data, project=tmp_path, save_dir=str(tmp_path), **FAST)
    with pytest.raises(UsageError, match="pretrained"):
        finetune(pruned_pt, data, project=tmp_path, pretrained=False, **FAST)
    with pytest.raises(ModelLoadError):
        finetune(tmp_path / "missing.pt", data, project=tmp_path, **FAST)
    with pytest.raises(ModelLoadError):
        finetune(object(), data, project=tmp_path, **FAST)
    with pytest.raises(DatasetError):
        finetune(pruned_pt, tmp_path / "missing.yaml", project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="nothing to resume"):
        finetune(pruned_pt, data, project=tmp_path, name="never", resume=True, **FAST)
    assert not any(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(UsageError, match="pretrained"):  # the trainer itself refuses too
        FinetuneTrainer(overrides={"model": str(pruned_pt), "data": data, "pretrained": False, "plots": False,
                                   "save_dir": str(tmp_path / "t"), **FAST})


def test_unpruned_model_with_other_classes_gets_a_new_head(data, tmp_path):
    """Like ultralytics: an *unpruned* checkpoint on data with other classes keeps everything but the class convs."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    coco_like = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    path = save_like_ultralytics(coco_like, tmp_path / "v8n80.pt")
    trainer = FinetuneTrainer(overrides={"model": str(path), "data": data, "save_dir": str(tmp_path / "ft"),
                                         "plots": False, **FAST})
    trainer.setup_model()
    assert trainer.model.model[-1].nc == NC
    before, after = shapes(coco_like), shapes(trainer.model)
    differ = {k for k in before if before[k] != after.get(k)}
    assert differ and all(k.startswith("model.22.cv3.") for k in differ)  # only the class outputs changed


def test_pruned_model_moves_to_other_classes(data, tmp_path):
    """A pruned 5-class model on 3-class data: only Detect's final class convs change (new nc rows, the pruned
    input widths); every other tensor keeps its shape and its values, and the model runs."""
    source = make_pruned_model(nc=5)
    path = save_like_ultralytics(source, tmp_path / "nc5.pt")
    trainer = FinetuneTrainer(overrides={"model": str(path), "data": data, "save_dir": str(tmp_path / "ft"),
                                         "plots": False, **FAST})
    trainer.setup_model()
    model = trainer.model
    head = model.model[-1]
    assert head.nc == NC and head.no == NC + 4 * head.reg_max and model.nc == NC
    before, after = source.state_dict(), model.state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape}
    assert changed == {f"model.22.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")}
    for i, branch in enumerate(head.cv3):
        assert branch[-1].out_channels == NC
        assert branch[-1].in_channels == source.model[-1].cv3[i][-1].in_channels  # the pruned width
    same = [k for k in before if k not in changed]
    assert all(torch.equal(before[k].half().float(), after[k].float()) for k in same)  # saved as fp16
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64))[0]
    assert y.shape[1] == 4 + NC


def test_reset_class_head_keeps_rows_of_classes_by_name():
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.models import reset_class_head

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=4, verbose=False)
    model.names = {0: "cat", 1: "dog", 2: "car", 3: "bus"}
    old = [b[-1].weight.detach().clone() for b in model.model[-1].cv3]
    kept = reset_class_head(model, 2, names={0: "Dog", 1: "zebra"})
    assert kept == 1 and model.names == {0: "Dog", 1: "zebra"} and model.yaml["nc"] == 2
    for w, branch in zip(old, model.model[-1].cv3):
        assert torch.equal(branch[-1].weight[0], w[1])  # "Dog" is the old "dog"
        assert not torch.equal(branch[-1].weight[1], w[0])


@pytest.mark.slow
def test_pruned_model_finetunes_on_other_classes_and_reloads(data, tmp_path):
    source = make_pruned_model(nc=5)
    path = save_like_ultralytics(source, tmp_path / "nc5.pt")
    result = finetune(path, data, project=tmp_path, name="ft", epochs=1, **FAST)
    tuned = shapes(result.last)
    want = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    assert {k for k in want if want[k] != tuned[k]} == {f"model.22.cv3.{i}.2.{p}" for i in range(3)
                                                       for p in ("weight", "bias")}
    from ultralytics import YOLO

    assert len(YOLO(str(result.last)).names) == NC


def test_ddp_launcher_wipe_keeps_input_checkpoint(tmp_path, pruned_pt):
    """ultralytics' DDP launcher deletes the run folder before starting workers; an input checkpoint kept in
    the run folder (in-memory models) must survive that and be what the workers load."""
    import shutil

    from ultralytics.nn.tasks import load_checkpoint

    seen = {}

    class FakeLauncher:  # stands for BaseTrainer.train's DDP branch
        def train(self):
            shutil.rmtree(self.save_dir)  # what generate_ddp_command does
            seen["model"] = self.args.model
            seen["shapes"] = shapes(load_checkpoint(self.args.model)[0])

    class T(KeepArchitectureMixin, FakeLauncher):
        def __init__(self):  # no BaseTrainer.__init__ here
            pass

    save_dir = tmp_path / "run"
    src = save_dir / "weights" / "input.pt"
    src.parent.mkdir(parents=True)
    shutil.copy2(pruned_pt, src)
    t = T()
    t.ddp, t.resume, t.save_dir = True, False, save_dir
    t.args = SimpleNamespace(model=str(src))
    t.model = str(src)
    t.train()
    assert seen["shapes"] == shapes(pruned_pt) and Path(seen["model"]) != src
    assert src.is_file() and t.args.model == str(src.resolve()) == t.model
    assert not list(tmp_path.glob("finetune/.*"))  # the parked copy is gone


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_sparse_training_shrinks_gammas_and_keeps_shapes(pruned_pt, data, tmp_path):
    common = dict(epochs=3, seed=0, optimizer="SGD", lr0=0.1, project=tmp_path, sr_mode="subgradient", **FAST)
    base = sparse_train(pruned_pt, data, sr=0.0, name="sr0", **common)
    sparse = sparse_train(pruned_pt, data, sr=1.0, name="sr1", **common)
    assert isinstance(sparse, TrainResult) and sparse.save_dir == (tmp_path / "sr1").resolve()
    assert sparse.gamma_mean_before == pytest.approx(base.gamma_mean_before)  # same start
    assert sparse.gamma_mean_after < 0.5 * base.gamma_mean_after
    assert sparse.gamma_near_zero_after > base.gamma_near_zero_after
    assert sparse.gamma_near_zero_after > sparse.gamma_near_zero_before
    assert sparse.sr == 1.0 and sparse.sr_schedule == "constant" and sparse.epochs == 3
    # an already-pruned model stays pruned
    assert shapes(sparse.best) == shapes(pruned_pt) == shapes(sparse.last)
    # per-epoch statistics in ultralytics' results.csv, histograms in the run folder
    rows = read_csv(sparse.save_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"sparsity/sr", "sparsity/gamma_mean", "sparsity/gamma_near_zero", "metrics/mAP50-95(B)"} <= set(rows[0])
    means = [float(r["sparsity/gamma_mean"]) for r in rows]
    assert means == sorted(means, reverse=True) and means[-1] == pytest.approx(sparse.gamma_mean_after, rel=1e-3)
    for name in ("gamma_hist_start.png", "gamma_hist_end.png"):
        assert (sparse.save_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gamma_mean_after" in str(sparse) and "gamma_mean_after" not in str(
        TrainResult(mode="finetune", save_dir=tmp_path, best=None, last=None, epochs=1))


@pytest.mark.slow
def test_finetune_in_memory_pruned_model(pruned, data, tmp_path):
    """Every parameter keeps its shape; the input is saved in the run folder; best.pt validates to the
    trainer's final mAP."""
    from ultralytics import YOLO

    user_file = save_like_ultralytics(pruned, tmp_path / "user" / "p.pt")
    res = finetune(YOLO(user_file), data, epochs=2, project=tmp_path / "runs", name="ft", **FAST)
    assert res.save_dir == (tmp_path / "runs" / "ft").resolve()
    assert (res.save_dir / "weights" / "input.pt").is_file()
    assert sorted(p.name for p in user_file.parent.iterdir()) == ["p.pt"]  # nothing beside the user's file
    assert res.best and res.last and res.epochs == 2
    ref = shapes(pruned)
    assert shapes(res.best) == ref and shapes(res.last) == ref
    from ultralytics.nn.tasks import load_checkpoint

    trained, start = load_checkpoint(res.last)[0].state_dict(), pruned.state_dict()
    assert any(not torch.allclose(trained[k].float(), start[k].float(), atol=1e-3) for k in start)  # it trained
    ckpt = torch.load(res.best, map_location="cpu", weights_only=False)
    assert next(ckpt["model"].parameters()).dtype == torch.float16  # ultralytics' own checkpoint format
    metrics = YOLO(res.best).val(data=data, imgsz=FAST["imgsz"], batch=2 * FAST["batch"], device="cpu",
                                 plots=False, project=str(tmp_path / "val"), name="v", verbose=False)
    assert res.map50_95 is not None
    assert abs(metrics.box.map - res.map50_95) < 0.005
    assert abs(metrics.box.map50 - res.map50) < 0.005


def test_one_optimizer_step_per_batch_unless_nbs_is_given(pruned_pt, data, tmp_path):
    """ultralytics' nbs=64 would accumulate 16 batches of 4 here; yolo-prune's trainers step once per batch, and
    an explicit nbs still wins."""
    fast = {k: v for k, v in FAST.items() if k != "nbs"}
    for name, extra, nbs in (("default", {}, FAST["batch"]), ("given", {"nbs": 64}, 64)):
        res = finetune(pruned_pt, data, epochs=1, project=tmp_path, name=name, **fast, **extra)
        args = yaml.safe_load((res.save_dir / "args.yaml").read_text())
        assert args["batch"] == FAST["batch"] and args["nbs"] == nbs, (name, args["nbs"])


def _spawn_training(script: str, tmp_path: Path, argv: list[str] | None = None) -> subprocess.Popen:
    """``python -c script`` (or ``python argv...``) in ``tmp_path``, stdout and stderr together into
    ``tmp_path/spawned.log``: a file can be read while the process runs (to wait for a line), and unlike a pipe
    nobody has to drain it for the child to go on."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tmp_path / "spawned.log"
    with log.open("w") as fh:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, *(argv or ["-c", textwrap.dedent(script)])], cwd=tmp_path, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log
    return proc


def _spawned_output(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    return path.read_text(errors="replace") if path and path.is_file() else ""


@pytest.mark.slow
@pytest.mark.parametrize("mode,sig", [("finetune", signal.SIGTERM), ("sparse", signal.SIGINT)])
def test_kill_then_resume(mode, sig, pruned_pt, data, tmp_path):
    """Kill a running training after it saved epoch 1, then resume=True finishes it from epoch 2 with the pruned
    architecture (and, for sparsity training, the run's own sr, even if another one is passed)."""
    fn = "finetune" if mode == "finetune" else "sparse_train"
    extra = "" if mode == "finetune" else "sr=0.5, sr_schedule='linear', "
    proc = _spawn_training(f"""
        from yolo_prune.train import {fn}
        {fn}({str(pruned_pt)!r}, {data!r}, {extra}epochs=4, project={str(tmp_path)!r}, name="run", **{FAST!r})
        """, tmp_path)
    run = tmp_path / "run"
    try:
        wait_for(lambda: (run / "weights" / "last.pt").is_file(), timeout=120, proc=proc)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    out = _spawned_output(proc)
    assert proc.returncode != 0, out[-2000:]
    assert "Traceback" not in out or "KeyboardInterrupt" in out, out[-2000:]
    assert "epoch 1/4" not in out  # the library prints no progress (no handler on the yolo_prune logger)
    ckpt = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)
    saved_epoch = ckpt["epoch"]
    assert 0 <= saved_epoch < 3 and ckpt["optimizer"] is not None  # an unfinished run
    assert not list((run / "weights").glob(".*.tmp"))

    kwargs = dict(project=tmp_path, name="run", resume=True, **FAST)
    res = finetune(pruned_pt, data, **kwargs) if mode == "finetune" else sparse_train(pruned_pt, data, sr=0.123,
                                                                                      **kwargs)
    assert res.save_dir == run.resolve() and res.epochs == 4
    rows = read_csv(run / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # continued after the saved epoch, nothing redone
    assert shapes(res.last) == shapes(pruned_pt) == shapes(res.best)
    if mode == "sparse":
        assert res.sr == 0.5 and res.sr_schedule == "linear"
        assert [round(float(r["sparsity/sr"]), 6) for r in rows] == [0.5, round(0.5 * 2 / 3, 6),
                                                                    round(0.5 / 3, 6), 0.0]
        assert res.gamma_mean_before is not None and res.gamma_mean_after < res.gamma_mean_before


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["finetune", "sparse"])
def test_cli_resume_needs_only_last_pt(mode, pruned_pt, data, tmp_path, monkeypatch, capsys):
    """`yolo-prune MODE model=.../last.pt resume=True`, as `yolo train resume model=last.pt`: data, imgsz and the
    rest come from the checkpoint; the run folder was moved after the kill, and the run continues where it is now."""
    from yolo_prune import cli

    args = [f"{k}={v}" for k, v in FAST.items()] + (["sr=0.5"] if mode == "sparse" else [])
    proc = _spawn_training("", tmp_path, ["-m", "yolo_prune.cli", mode, f"model={pruned_pt}", f"data={data}",
                                          "epochs=3", "project=before", "name=run", *args])
    try:
        # ultralytics saves last.pt before the epoch-end callbacks run: wait for the progress line as well
        wait_for(lambda: (tmp_path / "before" / "run" / "weights" / "last.pt").is_file()
                 and f"{mode}: epoch 1/3" in _spawned_output(proc), timeout=120, proc=proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    out = _spawned_output(proc)
    assert proc.returncode == 130 and "yolo-prune: interrupted" in out, out[-2000:]
    assert f"{mode}: epoch 1/3" in out  # the CLI shows progress
    (tmp_path / "after").mkdir()
    os.replace(tmp_path / "before" / "run", tmp_path / "after" / "run")
    run = tmp_path / "after" / "run"
    saved_epoch = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["epoch"]

    monkeypatch.chdir(tmp_path)
    code = cli.main([mode, "model=after/run/weights/last.pt", "resume=True"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert f"resuming at epoch {saved_epoch + 2}/3" in err and f"{mode}: epoch 3/3" in err
    assert not (tmp_path / "before" / "run").exists()  # resumed in place, not in the folder recorded in last.pt
    rows = read_csv(run / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert shapes(run / "weights" / "last.pt") == shapes(pruned_pt)
    train_args = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["train_args"]
    assert train_args["imgsz"] == FAST["imgsz"] and train_args["data"] == data
    if mode == "sparse":  # the run's own sr, not the default
        assert [float(r["sparsity/sr"]) for r in rows] == [0.5] * 3


def test_epoch_progress_lines(caplog):
    """One INFO line per epoch on the yolo_prune logger: epoch i/N, losses, mAP only when validated, ETA."""
    from yolo_prune.train.progress import EpochProgress, format_seconds

    trainer = SimpleNamespace(start_epoch=0, epochs=4, epoch=0, args=SimpleNamespace(val=False, imgsz=64),
                              train_loader=SimpleNamespace(dataset=range(16)), test_loader=SimpleNamespace(dataset=range(8)),
                              save_dir="/runs/x", tloss={"box_loss": torch.tensor(1.5), "cls_loss": torch.tensor(2.25)},
                              metrics={"metrics/mAP50-95(B)": 0.25, "metrics/mAP50(B)": 0.5}, callbacks={})
    trainer.add_callback = lambda event, fn: trainer.callbacks.setdefault(event, []).append(fn)
    assert EpochProgress("sparse").logger is logging.getLogger("yolo_prune")
    EpochProgress("sparse", logging.getLogger("tests.progress")).attach(trainer)  # caplog: a logger that propagates
    with caplog.at_level(logging.INFO, logger="tests.progress"):
        for fn in trainer.callbacks["on_train_start"]:
            fn(trainer)
        for epoch in (0, 3, 4):  # a middle epoch (not validated), the last one, final_eval's "epochs + 1"
            trainer.epoch = epoch
            for fn in trainer.callbacks["on_fit_epoch_end"]:
                fn(trainer)
    start, first, last, best = [r.getMessage() for r in caplog.records if r.name == "tests.progress"]
    assert start.startswith("sparse: 4 epochs, 16 train / 8 val images, imgsz=64")
    assert first.startswith("sparse: epoch 1/4  box 1.5  cls 2.25  ") and "mAP" not in first and "ETA" in first
    assert last.startswith("sparse: epoch 4/4  box 1.5  cls 2.25  mAP50-95 0.250  mAP50 0.500") and "ETA 0:00" in last
    assert best.startswith("sparse: best.pt mAP50-95 0.250")
    assert format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"


@pytest.mark.slow
@pytest.mark.fixtures
def test_finetune_real_pruned_model_validates_like_trainer(shared_fixtures, tmp_path):
    """With real COCO weights (non-trivial mAP): prune 5%, fine-tune 1 epoch, best.pt re-validates to the trainer's
    final mAP and keeps the pruned shapes."""
    from ultralytics import YOLO

    from yolo_prune.stages.prune import prune

    pruned = prune(shared_fixtures / "weights" / "yolov8n_coco_int8rebuild.pt", method="l1", ratio=0.05, imgsz=160,
                   project=tmp_path, name="p")
    import shutil

    # a copy: ultralytics writes labels/*.cache beside the labels, and ../shared must stay untouched
    copy_root = Path(shutil.copytree(shared_fixtures / "coco8", tmp_path / "coco8", copy_function=shutil.copyfile))
    for d in [copy_root, *(p for p in copy_root.rglob("*") if p.is_dir())]:
        d.chmod(0o755)  # the fixtures are read-only, the copy must not be
    data = str(copy_root / "coco8.yaml")
    res = finetune(pruned.checkpoint, data, epochs=1, imgsz=160, batch=4, workers=0, device="cpu",
                   project=tmp_path, name="ft")
    assert shapes(res.best) == shapes(pruned.checkpoint)
    assert res.map50_95 > 0.02
    metrics = YOLO(res.best).val(data=data, imgsz=160, batch=8, device="cpu", plots=False,
                                 project=str(tmp_path / "val"), name="v", verbose=False)
    assert abs(metrics.box.map - res.map50_95) < 0.005


def test_pruned_coco_model_moves_to_bccd(shared_fixtures, tmp_path):
    """The 80-class COCO fixture, pruned, set up for training on bccd (3 blood-cell classes): the class convs are
    new (3 outputs, the pruned widths), every other tensor is the pruned model's."""
    from yolo_prune.data import resolve_data
    from yolo_prune.stages.prune import prune

    pruned = prune(shared_fixtures / "weights" / "yolov8n_coco_int8rebuild.pt", method="bn", target_macs=0.8,
                   imgsz=64, project=tmp_path, name="p")
    data = resolve_data(shared_fixtures / "bccd" / "bccd_coco.yaml")
    trainer = FinetuneTrainer(overrides={"model": str(pruned.checkpoint), "data": str(data.yaml),
                                         "save_dir": str(tmp_path / "ft"), "plots": False, **FAST})
    trainer.setup_model()
    model = trainer.model
    assert model.model[-1].nc == 3 and model.nc == 3
    before = pruned.model.model.state_dict()
    after = model.state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape}
    assert changed == {f"model.22.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")}
    from ultralytics.nn.tasks import DetectionModel

    unpruned = shapes(DetectionModel("yolov8n.yaml", nc=80, verbose=False))
    assert sum(tuple(before[k].shape) != v for k, v in unpruned.items() if k in before) > 10  # really pruned
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == 4 + 3
