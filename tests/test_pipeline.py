"""The whole job: pipeline run folder and report, resume from the last finished stage, inputs untouched,
the demo in a shortened form."""

from __future__ import annotations

import json

import pytest

from yolo_prune import cli
from yolo_prune.io import sha256_file
from yolo_prune.job import pipeline

TINY = dict(imgsz=64, batch=4, workers=0, sparse_epochs=1, finetune_epochs=1, bench_runs=2, bench_warmup=1,
            backends=("torch",), train_args={"mosaic": 0.0, "warmup_epochs": 0})


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, synthetic):
    """A dense checkpoint to prune (random init saved as an ultralytics checkpoint)."""
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.models import save_checkpoint

    from .helpers import randomize_bn

    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    return save_checkpoint(randomize_bn(DetectionModel("yolov8n.yaml", nc=3, verbose=False)), path)


def _hash_tree(root):
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic, dense_ckpt):
    project = tmp_path_factory.mktemp("runs")
    before = (sha256_file(dense_ckpt), _hash_tree(synthetic))
    result = pipeline(dense_ckpt, synthetic / "coco.yaml", target_macs=0.5, project=project, name="p", **TINY)
    after = (sha256_file(dense_ckpt), _hash_tree(synthetic))
    return result, before, after


def test_pipeline_writes_the_report(run):
    result, _, _ = run
    d = result.save_dir
    for f in ("args.yaml", "pipeline.json", "report.json", "report.md", "layers.csv", "channels.png", "map_vs_macs.png",
              "gamma_hist.png", "prune/step1/weights/pruned.pt", "finetune/final/weights/best.pt"):
        assert (d / f).is_file(), f
    report = json.loads((d / "report.json").read_text())
    metrics = {row["metric"]: row for row in report["table"]}
    for key in ("params (M)", "size (MB)", "mAP50-95", "mAP50", "CPU latency torch (ms)"):
        assert key in metrics
    gmacs = next(v for k, v in metrics.items() if k.startswith("GMACs"))
    assert abs(gmacs["ratio"] - 0.5) <= 0.03
    assert "| mAP50-95 |" in (d / "report.md").read_text()
    assert "PipelineResult" in str(result)
    timings = report["stages"]["prune.step1"]["prune_timings"]  # where the prune stage's time went
    assert {"load", "calibration", "free_removal", "save"} <= set(timings)  # (the sparse stage freed the target)
    assert sum(timings.values()) <= report["stages"]["prune.step1"]["prune_total_seconds"]
    assert "## Prune step 1: time per sub-step" in (d / "report.md").read_text()
    # every training stage distilled from the input (dense) checkpoint, teacher=auto by default
    assert report["args"]["teacher"] and report["args"]["distill"] == "output"
    for stage in ("sparse/train", "finetune/final"):
        assert "train/kd_loss" in (d / stage / "results.csv").read_text().splitlines()[0]
    # what each stage did: the pruned model before any fine-tuning has its own row, measured on the val split
    pruned = metrics["mAP50-95 right after pruning"]
    step = json.loads((d / "pipeline.json").read_text())["stages"]["prune"]["steps"][0]
    assert pruned["after"] == step["map50_95_pruned"] and pruned["before"] == metrics["mAP50-95"]["before"]
    assert "| mAP50-95 right after pruning |" in (d / "report.md").read_text()
    assert "mAP50-95 right after pruning" in str(result)


def test_pipeline_never_touches_its_inputs(run):
    _, before, after = run
    assert before == after


def test_pipeline_resumes_from_the_last_finished_stage(run):
    result, _, _ = run
    d = result.save_dir
    state = json.loads((d / "pipeline.json").read_text())
    pruned = d / "prune" / "step1" / "weights" / "pruned.pt"
    stamp = pruned.stat().st_mtime_ns
    for stage in ("finetune", "val", "bench"):  # as if killed during fine-tuning
        state["stages"].pop(stage)
    (d / "pipeline.json").write_text(json.dumps(state))
    args = state["args"]
    resumed = pipeline(args["model"], args["data"], target_macs=0.5, project=d.parent, name=d.name,
                       resume=True, **TINY)
    after = json.loads((d / "pipeline.json").read_text())["stages"]
    assert set(after) == {"baseline", "sparse", "plan", "prune.step1", "prune", "finetune", "val", "bench"}
    assert pruned.stat().st_mtime_ns == stamp  # pruning was not redone
    assert resumed.final.is_file()


def test_cli_pipeline_resume_needs_only_the_run_folder(run, capsys):
    """`yolo-prune pipeline model=<run folder> resume=True`: no data=; imgsz, epochs, pruning settings and
    ultralytics train keys come from pipeline.json (the CLI defaults, e.g. imgsz=640, do not apply)."""
    result, _, _ = run
    d = result.save_dir
    state = json.loads((d / "pipeline.json").read_text())
    assert state["args"]["imgsz"] == TINY["imgsz"] and state["args"]["train_args"] == TINY["train_args"]
    for stage in ("finetune", "val", "bench"):  # as if killed during fine-tuning
        state["stages"].pop(stage)
    (d / "pipeline.json").write_text(json.dumps(state))
    code = cli.main(["pipeline", f"model={d}", "resume=True", "backends=torch", "bench_runs=2", "bench_warmup=1",
                     "workers=0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "[4/6] finetune: 1 epochs" in captured.err and "[2/6]" not in captured.err
    assert f"GMACs @{TINY['imgsz']}" in captured.out
    ft_args = (d / "finetune" / "final" / "args.yaml").read_text()
    assert f"imgsz: {TINY['imgsz']}" in ft_args and "mosaic: 0.0" in ft_args and "warmup_epochs: 0" in ft_args


def test_resume_without_a_run_is_an_error(tmp_path, synthetic, dense_ckpt):
    from yolo_prune.errors import UsageError

    with pytest.raises(UsageError, match="nothing to resume|no pipeline.json"):
        pipeline(dense_ckpt, synthetic / "yolo.yaml", project=tmp_path, name="none", resume=True, **TINY)


def test_demo_short(tmp_path, capsys, monkeypatch):
    code = cli.main(["demo", f"project={tmp_path}", "epochs=1", "sparse_epochs=1", "finetune_epochs=1", "imgsz=64",
                     "bench_runs=2", "bench_warmup=1", "backends=torch", "workers=0", "batch=8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "PipelineResult" in out and "mAP50-95" in out
    assert (tmp_path / "demo" / "report.md").is_file()
    from yolo_prune.demo import int8_available

    if int8_available():  # the demo ends deployable: the INT8 rows of its OpenVINO export
        assert "INT8 openvino mAP50-95" in out and "INT8 openvino latency (ms)" in out


def test_demo_of_a_segmentation_model(tmp_path, capsys):
    """`yolo-prune demo model=yolo11n-seg.yaml`: the generated data of the model's task, box and mask mAP rows, half
    the MACs; no INT8 stage (detection only)."""
    code = cli.main(["demo", "model=yolo11n-seg.yaml", f"project={tmp_path}", "epochs=1", "sparse_epochs=0",
                     "finetune_epochs=1", "imgsz=64", "bench_runs=2", "bench_warmup=1", "backends=torch", "workers=0",
                     "batch=8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "mask mAP50-95 right after pruning" in out and "\nmAP50-95 " in out and "INT8" not in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert "demo_data_segment" in report["args"]["data"]
    macs = next(r for r in report["table"] if r["metric"].startswith("GMACs"))
    assert abs(macs["ratio"] - 0.5) < 0.03


def test_iterative_steps_stop_at_the_map_budget(tmp_path, synthetic, dense_ckpt, monkeypatch):
    """steps=3 with max_map_drop: the step whose mAP falls out of budget is rejected, the one before is kept."""
    import dataclasses

    import yolo_prune.job as pl

    real = pl.evaluate
    maps = iter([0.50, 0.48, 0.47, 0.45, 0.44, 0.30, 0.29, 0.6, 0.6])  # baseline, then (pruned, tuned) per step

    def fake(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), map50_95=next(maps))

    monkeypatch.setattr(pl, "evaluate", fake)  # every evaluation of the pipeline's stages
    result = pipeline(dense_ckpt, synthetic / "yolo.yaml", target_macs=0.4, steps=3, step_epochs=1,
                      max_map_drop=0.1, project=tmp_path, name="it", **{**TINY, "finetune_epochs": 0, "sparse_epochs": 0})
    state = json.loads((result.save_dir / "pipeline.json").read_text())["stages"]["prune"]
    assert [s["step"] for s in state["steps"]] == [1, 2, 3]
    assert state["steps"][-1].get("rejected") and state["kept_step"] == 2
    fractions = [s["macs_fraction"] for s in state["steps"]]
    assert fractions[0] > fractions[1] > fractions[2] and abs(fractions[2] - 0.4) <= 0.03
    assert "step2" in state["checkpoint"]
    assert (result.save_dir / "map_vs_macs.png").is_file()


def test_a_new_run_in_a_reused_folder_starts_afresh(run, tmp_path):
    """exist_ok=True reuses the folder, not the finished stages of the run that was there: a different target
    is pruned for, and the old fine-tune is not taken as this run's result."""
    import shutil

    result, _, _ = run
    folder = tmp_path / "p"
    shutil.copytree(result.save_dir, folder)
    old = json.loads((folder / "pipeline.json").read_text())
    assert abs(old["stages"]["prune"]["steps"][0]["macs_fraction"] - 0.5) <= 0.03
    kw = {**TINY, "sparse_epochs": 0, "finetune_epochs": 0}
    again = pipeline(old["args"]["model"], old["args"]["data"], target_macs=0.8, project=tmp_path, name="p",
                     exist_ok=True, bench=False, **kw)
    assert again.save_dir == folder
    state = json.loads((folder / "pipeline.json").read_text())
    assert state["args"]["target_macs"] == 0.8
    assert abs(state["stages"]["prune"]["steps"][0]["macs_fraction"] - 0.8) <= 0.03
    assert "finetune" not in state["stages"] and "sparse" not in state["stages"]
    assert again.final == folder / "prune" / "step1" / "weights" / "pruned.pt"


def test_verdict_says_why_and_what_helps():
    from yolo_prune.stages.report import verdict

    held = verdict({"map50_95": 0.50}, {"map50_95_pruned": 0.40}, {"map50_95": 0.51}, target_macs=0.5, steps=1,
                   finetune_epochs=10)
    assert held == []
    lines = verdict({"map50_95": 0.345}, {"map50_95_pruned": 0.065}, {"map50_95": 0.315}, target_macs=0.5, steps=1,
                    finetune_epochs=10)
    assert lines[0] == ("the pruned model is worse than the model you gave: mAP50-95 0.315 < 0.345 "
                        "(input 0.345 -> right after pruning 0.065 -> final 0.315)")
    assert "kept only 19% of the mAP" in lines[1] and "target_macs=0.75" in lines[1] and "steps=auto" in lines[1]
    assert "won back 89% of the drop in 10 epoch(s)" in lines[2] and "finetune_epochs=20" in lines[2]


def test_pipeline_warns_when_the_result_is_worse_than_its_input(tmp_path, synthetic, dense_ckpt, monkeypatch):
    """A constructed case: the final model measures below the input; the pipeline says so in one line, in the
    result and in the report, with the mAP of each stage."""
    import dataclasses
    import logging

    import yolo_prune.job as pl

    real = pl.evaluate
    maps = iter([0.50, 0.20, 0.30])  # baseline, right after pruning, final

    def fake(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), map50_95=next(maps))

    monkeypatch.setattr(pl, "evaluate", fake)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # the CLI's logger does not propagate, so listen on it directly
    logger = logging.getLogger("yolo_prune")
    logger.addHandler(handler)
    try:
        result = pipeline(dense_ckpt, synthetic / "yolo.yaml", target_macs=0.5, project=tmp_path, name="worse", steps=1,
                          **{**TINY, "finetune_epochs": 0, "sparse_epochs": 0, "backends": ()})
    finally:
        logger.removeHandler(handler)
    first = "the pruned model is worse than the model you gave: mAP50-95 0.300 < 0.500"
    warned = [r for r in records if r.levelno == logging.WARNING and first in r.getMessage()]
    assert len(warned) == 1 and "right after pruning 0.200" in warned[0].getMessage()
    assert result.warning[0].startswith(first) and "WARNING: " + first in str(result)
    report = (result.save_dir / "report.md").read_text()
    assert f"**Warning: {first}" in report and "steps=auto" in report
    assert json.loads((result.save_dir / "report.json").read_text())["warning"] == result.warning


def test_step_choice_and_budget_split():
    from yolo_prune.job import split_budget, steps_for

    assert [steps_for(r) for r in (None, 0.9, 0.75, 0.6, 0.5, 0.3, 0.25, 0.1, 0.0)] == [1, 1, 1, 2, 2, 3, 3, 4, 4]
    for epochs in range(0, 31):
        for steps in (1, 2, 3, 4):
            each, final = split_budget(epochs, steps)
            assert steps * each + final == epochs and final >= each >= 0  # the asked budget, never more
    assert split_budget(10, 1) == (0, 10) and split_budget(10, 3) == (2, 4)


def test_steps_auto_spreads_the_asked_epochs_over_the_chosen_steps(tmp_path, synthetic, dense_ckpt, monkeypatch):
    """A trial prune that keeps 40% of the mAP asks for 3 steps; the 8 fine-tune epochs asked are spread over them
    (2 after each step, 2 at the end): the total trained is what was asked."""
    import dataclasses

    import yolo_prune.job as pl

    real = pl.evaluate
    maps = iter([0.50, 0.20] + [0.3, 0.4] * 3 + [0.45])  # baseline, trial, (pruned, tuned) per step, final

    def fake(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), map50_95=next(maps))

    monkeypatch.setattr(pl, "evaluate", fake)
    result = pipeline(dense_ckpt, synthetic / "yolo.yaml", target_macs=0.5, steps="auto", project=tmp_path,
                      name="auto", **{**TINY, "finetune_epochs": 8, "sparse_epochs": 0, "backends": ()})
    stages = json.loads((result.save_dir / "pipeline.json").read_text())["stages"]
    plan = stages["plan"]
    assert (plan["retained"], plan["steps"], plan["step_epochs"], plan["finetune_epochs"]) == (0.4, 3, 2, 2)
    assert [s["step"] for s in stages["prune"]["steps"]] == [1, 2, 3]
    step_runs = sorted((result.save_dir / "finetune").glob("step*/results.csv"))
    final_run = result.save_dir / "finetune" / "final" / "results.csv"
    rows = [len(p.read_text().strip().splitlines()) - 1 for p in step_runs + [final_run]]
    assert rows == [2, 2, 2, 2] and sum(rows) == 8
    assert abs(stages["prune"]["steps"][-1]["macs_fraction"] - 0.5) <= 0.03


def test_steps_auto_is_deterministic_and_keeps_a_good_trial(tmp_path, synthetic, dense_ckpt):
    """The same seed plans the same steps; a trial that keeps most of the mAP is step 1 itself (no pruning twice)."""
    plans = []
    for name in ("a", "b"):
        result = pipeline(dense_ckpt, synthetic / "yolo.yaml", target_macs=0.9, steps="auto", project=tmp_path,
                          name=name, seed=3, **{**TINY, "finetune_epochs": 0, "sparse_epochs": 0, "backends": ()})
        stages = json.loads((result.save_dir / "pipeline.json").read_text())["stages"]
        plans.append({k: stages["plan"][k] for k in ("retained", "steps", "step_epochs", "finetune_epochs")})
        if stages["plan"]["steps"] == 1:
            assert stages["prune.step1"] == stages["plan"]["trial"]
            assert not (result.save_dir / "prune" / "trial").exists()  # the trial became step 1, where it is used
            assert stages["prune"]["pruned_checkpoint"] == str(result.save_dir / "prune" / "step1" / "weights" /
                                                               "pruned.pt")
    assert plans[0] == plans[1]
