"""Multi-process training of a pruned model, proven on CPU.

* Two ranks (gloo, localhost, launched by ``torch.distributed.run`` exactly like ultralytics launches DDP)
  each load the pruned checkpoint from disk, wrap it in DistributedDataParallel, and take optimisation steps
  with the ultralytics detection loss plus the L1 gamma step on different random data: the weights must end
  identical on both ranks and the pruned shapes must survive.
* The trainer classes import by module path in a fresh interpreter (as the DDP worker script needs).
* ultralytics' own ``generate_ddp_file`` payload, run in a fresh process, rebuilds SparseTrainer from
  ``vars(trainer.args)`` alone, with ``sr`` / ``sr_schedule`` intact and the pruned architecture loaded from disk.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from .helpers import FAST, make_pruned_model, run_ddp_file, save_like_ultralytics, shapes
from .helpers import subprocess_env as _env

WORKER = r'''
import os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import load_checkpoint
from yolo_prune.train import bn_layers, l1_step

ckpt, out_dir = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, _ = load_checkpoint(ckpt)  # every rank restores the pruned architecture from disk
model.train()
for name, p in model.named_parameters():
    p.requires_grad_(".dfl" not in name)  # ultralytics always freezes the DFL
model.args = get_cfg()  # loss hyperparameters (box, cls, dfl)
ddp = DDP(model, find_unused_parameters=True, broadcast_buffers=False)
opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
scaler = torch.amp.GradScaler("cpu", enabled=False)
g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
losses = []
for step in range(2):
    n = 3
    batch = {
        "img": torch.rand(2, 3, 64, 64, generator=g),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.randint(0, 3, (n, 1), generator=g).float(),
        "bboxes": torch.rand(n, 2, generator=g) * 0.5 + 0.25,
    }
    batch["bboxes"] = torch.cat([batch["bboxes"], torch.full((n, 2), 0.3)], 1)  # xywh, normalised
    loss, _ = ddp(batch)  # DetectionModel.forward(dict) -> ultralytics v8 detection loss
    loss = loss.sum() * world  # as BaseTrainer does under DDP
    scaler.scale(loss).backward()
    l1_step(opt, scaler, ddp.parameters(), [m.weight for m in bn_layers(ddp)], 0.01)
    opt.zero_grad()
    losses.append(float(loss))
torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "losses": losses},
           os.path.join(out_dir, f"rank{rank}.pt"))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def pruned_pt(tmp_path_factory) -> Path:
    return save_like_ultralytics(make_pruned_model(), tmp_path_factory.mktemp("ddp") / "pruned.pt")


def test_two_ranks_end_with_identical_pruned_weights(pruned_pt, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(pruned_pt), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["losses"] != r1["losses"]  # the ranks really saw different data
    ref = torch.load(pruned_pt, weights_only=False)["model"].float()
    ref_params = dict(ref.named_parameters())
    assert {k: tuple(v.shape) for k, v in r0["params"].items()} == {k: tuple(v.shape) for k, v in ref_params.items()}
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), f"{k} differs between ranks"
    changed = [k for k, v in r0["params"].items() if not torch.allclose(v, ref_params[k].float(), atol=1e-6)]
    assert len(changed) > len(r0["params"]) // 2  # the steps did train


def test_trainer_classes_import_by_module_path():
    code = textwrap.dedent("""
        import importlib
        from ultralytics.models.yolo.detect import DetectionTrainer
        for mod, name in (("yolo_prune.train.sparse", "SparseTrainer"),
                          ("yolo_prune.train.finetune", "FinetuneTrainer"),
                          ("yolo_prune.train.sparse", "SparseSegmentTrainer"),
                          ("yolo_prune.train.sparse", "SparsePoseTrainer"),
                          ("yolo_prune.train.sparse", "SparseOBBTrainer"),
                          ("yolo_prune.train.finetune", "FinetuneSegmentTrainer"),
                          ("yolo_prune.train.finetune", "FinetunePoseTrainer"),
                          ("yolo_prune.train.finetune", "FinetuneOBBTrainer")):
            cls = getattr(importlib.import_module(mod), name)
            assert issubclass(cls, DetectionTrainer) and cls.__module__ == mod, cls
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_worker_script_rebuilds_sparse_trainer(pruned_pt, synthetic, tmp_path):
    """Run ultralytics' generated DDP script (single CPU process): only ``vars(trainer.args)`` and the model path
    cross the process boundary, and the rebuilt trainer must still penalise with the run's sr and keep shapes."""
    from yolo_prune.train import SparseTrainer

    save_dir = tmp_path / "ddp"
    trainer = SparseTrainer(overrides={
        "model": str(pruned_pt), "data": str(synthetic / "yolo.yaml"), "save_dir": str(save_dir), "plots": False,
        "epochs": 2, "sr": 0.02, "sr_schedule": "linear", "gamma_threshold": 0.05, **FAST,
    })
    run_ddp_file(trainer, tmp_path)
    with open(save_dir / "results.csv", newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    assert [float(r["sparsity/sr"]) for r in rows] == [0.02, 0.0]  # linear schedule of the run's sr
    assert "gamma_threshold: 0.05" in (save_dir / "args.yaml").read_text()
    assert shapes(save_dir / "weights" / "last.pt") == shapes(pruned_pt)
    assert (save_dir / "gamma_hist_start.png").is_file() and (save_dir / "gamma_hist_end.png").is_file()


@pytest.mark.slow
def test_ddp_worker_script_rebuilds_a_task_trainer(synthetic_task, tmp_path):
    """The same for a pruned segmentation model: the worker rebuilds FinetuneSegmentTrainer (ultralytics'
    SegmentationTrainer under the mixins) from the args alone, and the pruned shapes survive."""
    from yolo_prune.models import save_checkpoint
    from yolo_prune.stages.prune import prune
    from yolo_prune.train import trainer_for

    from .helpers import random_detection_model

    pruned = prune(random_detection_model("yolo11n-seg.yaml"), method="l1", target_macs=0.5, imgsz=64, save=False)
    pt = save_checkpoint(pruned.model.model, tmp_path / "pruned_seg.pt")
    save_dir = tmp_path / "ddp"
    trainer = trainer_for(str(pt), "finetune")(overrides={
        "model": str(pt), "data": str(synthetic_task("segment") / "yolo.yaml"), "save_dir": str(save_dir),
        "plots": False, "epochs": 1, **FAST})
    run_ddp_file(trainer, tmp_path)
    assert shapes(save_dir / "weights" / "last.pt") == shapes(pt)
    assert "metrics/mAP50-95(M)" in (save_dir / "results.csv").read_text().splitlines()[0]
