#!/usr/bin/env python
"""Which fine-tune recipe recovers a collapsed pruned model at an equal budget (issue 24, item 2).

One pruned checkpoint (the ``prune`` stage of a ``bench.bccd_pipeline`` arm) is fine-tuned with several recipes,
each for the same number of epochs, distilled from the dense input model as the pipeline does, and validated with
the pipeline's COCO evaluation. A recipe is a set of ultralytics train keys and distillation keys:

* ``default``: what the pipeline's fine-tune uses (``optimizer=auto``: AdamW at 0.002 * 5 / (4 + nc), e.g.
  1.2e-4 for 80 classes, ultralytics' 3 warmup epochs, and at least 100 warmup iterations);
* ``rewind_adamw``: learning-rate rewinding (Renda et al. 2020) to a training learning rate: AdamW at 1e-3, one
  warmup epoch;
* ``rewind_sgd``: the same with SGD at 0.01, the recipe the COCO yolov8n was trained with;
* ``rewind_adamw_feature``: ``rewind_adamw`` plus feature distillation (``distill=both``);
* ``no_distill``: the default recipe without a teacher (the input model may be worse than what the pruned model
  can become: an under-trained input).
* ``distill_linear``: the default recipe with ``distill_fade=linear`` (the teacher's weight falls to 1/epochs).

    python -m bench.recovery --dataset fixture --pruned bench/work/fixture_pipeline/oneshot_f16 --recipes default rewind_adamw rewind_sgd
    python -m bench.recovery --dataset bccd_e3 --pruned bench/work/undertrained_pipeline/auto_f16 --recipes no_distill

Results: ``bench/results/recovery.json`` (one entry per dataset, pruned run and recipe, with its command).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "recovery"

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "rewind_adamw": {"optimizer": "AdamW", "lr0": 1e-3, "warmup_epochs": 1},
    "rewind_adamw_3e-4": {"optimizer": "AdamW", "lr0": 3e-4, "warmup_epochs": 1},
    "rewind_sgd": {"optimizer": "SGD", "lr0": 0.01, "warmup_epochs": 1},
    "rewind_adamw_feature": {"optimizer": "AdamW", "lr0": 1e-3, "warmup_epochs": 1, "distill": "both"},
    "no_distill": {"teacher": "none"},
    "distill_linear": {"distill_fade": "linear"},
    "rewind_adamw_nomosaic": {"optimizer": "AdamW", "lr0": 1e-3, "warmup_epochs": 1, "close_mosaic": 0,
                              "mosaic": 0.0},
}


def _pruned(run: Path) -> Path:
    """The last pruned checkpoint of a pipeline run folder (or the checkpoint itself)."""
    if run.is_file():
        return run
    steps = sorted((run / "prune").glob("step*/weights/pruned.pt"), key=lambda p: int(p.parts[-3][4:]))
    if not steps:
        raise SystemExit(f"no prune/step*/weights/pruned.pt in {run}")
    return steps[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.recovery")
    ap.add_argument("--dataset", choices=("bccd", "bccd_e3", "fixture"), default="fixture",
                    help="fixture (coco128 96/32 @320), bccd (@416, the 12-epoch dense model as teacher) or bccd_e3 "
                         "(the same with the 3-epoch under-trained model as teacher)")
    ap.add_argument("--pruned", required=True, type=Path, help="a pipeline run folder or a pruned .pt")
    ap.add_argument("--dense", type=Path, help="the teacher (default: the dataset's dense model)")
    ap.add_argument("--recipes", nargs="+", default=["default", "rewind_adamw"], choices=sorted(RECIPES))
    ap.add_argument("--epochs", type=int, default=16)
    args = ap.parse_args(argv)

    import yolo_prune as yp

    if args.dataset == "fixture":
        dense, data, imgsz = common.WEIGHTS, common.coco128_split(), 320
    else:
        dense, data, imgsz = common.bccd_dense(epochs=3 if args.dataset == "bccd_e3" else 12), common.bccd(), 416
    dense = args.dense or dense
    pruned = _pruned(args.pruned)
    work = common.WORK / NAME / args.dataset
    for recipe in args.recipes:
        key = f"{args.dataset}/{common.rel(pruned.resolve())}/{recipe}_e{args.epochs}"
        entry: dict[str, Any] = {"command": common.command_line(), "started": time.strftime("%Y-%m-%d %H:%M"),
                                 "machine": common.machine(), "busy_processes_at_start": common.busy_processes(),
                                 "pruned": pruned, "teacher": dense, "recipe": RECIPES[recipe], "epochs": args.epochs}
        t0 = time.perf_counter()
        source = "-".join(pruned.parts[-5:-2]) if pruned.parent.name == "weights" else pruned.stem
        name = f"{source}_{recipe}_e{args.epochs}"
        keys = {"teacher": str(dense), **RECIPES[recipe]}
        res = yp.finetune(str(pruned), data, epochs=args.epochs, imgsz=imgsz, project=work, name=name,
                          exist_ok=True, val=False, seed=0, **keys)
        v = yp.validate(res.last, data, imgsz=imgsz)
        entry.update(map50_95=v.map50_95, map50=v.map50, last=res.last, seconds=round(time.perf_counter() - t0, 1))
        out = common.read_result(NAME) or {"runs": {}}
        out["runs"][key] = entry
        common.write_result(NAME, out)
        print(f"{key}: mAP50-95 {v.map50_95:.3f} ({entry['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
