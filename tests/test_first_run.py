"""The README's first commands, run the way a newcomer runs them.

Each test starts the installed ``yolo-prune`` console script as a subprocess, from a fresh temporary working
folder, with relative paths, and with ``HOME`` and ``YOLO_CONFIG_DIR`` in an empty temporary folder (so
ultralytics writes fresh settings, and its ``runs_dir`` is not this machine's). pytest's own environment is
removed: ultralytics puts relative ``project=`` folders elsewhere when it thinks tests are running, which is
how a relative-path bug once passed every test and failed ``yolo-prune demo`` on a fresh machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import ROOT


def _command() -> list[str]:
    """The ``yolo-prune`` script of the running interpreter's environment, else ``python -m yolo_prune.cli``."""
    script = Path(sys.executable).parent / ("yolo-prune.exe" if os.name == "nt" else "yolo-prune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "yolo_prune.cli"]


def _newcomer(args: list[str], cwd: Path, home: Path, timeout: float) -> subprocess.CompletedProcess:
    drop = ("YOLO_CONFIG_DIR", "XDG_CONFIG_HOME", "GITHUB_ACTIONS", "CI")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "YOLO_PRUNE_")) and k not in drop}
    env.update(HOME=str(home), YOLO_CONFIG_DIR=str(home / "ultralytics_config"), YOLO_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cwd.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_command() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _strays(home: Path, since: float, *roots: Path) -> list[Path]:
    """What ultralytics makes of a relative ``project=runs/demo/demo``: ``<runs_dir>/detect/runs/demo`` (runs_dir from
    the fresh settings file in ``home``; only if made since ``since``), or any ``detect`` folder under ``roots``."""
    settings = json.loads(next(home.rglob("settings.json")).read_text())
    found = [p for root in roots for p in root.rglob("detect") if p.is_dir()]
    stray = Path(settings["runs_dir"]) / "detect" / "runs" / "demo"
    return found + ([stray] if stray.is_dir() and stray.stat().st_mtime >= since else [])


def test_prune_writes_project_name_relative_to_the_working_folder(tmp_path):
    cwd, home = tmp_path / "work", tmp_path / "home"
    proc = _newcomer(["prune", "model=yolov8n.yaml", "target_macs=0.5", "imgsz=64", "project=rel", "name=x"],
                     cwd, home, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cwd / "rel" / "x" / "weights" / "pruned.pt").is_file()
    assert (cwd / "rel" / "x" / "report.json").is_file()
    assert sorted(p.name for p in cwd.iterdir()) == ["rel"]


@pytest.mark.slow
def test_demo_from_a_fresh_machine(tmp_path):
    """`yolo-prune demo`, shortened, from an empty folder with no ultralytics settings: the report is where the
    demo says it is, under ./runs/demo/demo, and the progress of every training shows on stderr."""
    cwd, home, t0 = tmp_path / "work", tmp_path / "home", time.time()
    proc = _newcomer(["demo", "epochs=1", "sparse_epochs=1", "finetune_epochs=1", "imgsz=64", "workers=0",
                      "bench_runs=1", "bench_warmup=0"], cwd, home, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = re.search(r"^PipelineResult: (.+) \([\d.]+ min\)$", proc.stdout, re.M)
    final = re.search(r"^final model: (.+)$", proc.stdout, re.M)
    assert said and final, proc.stdout[-2000:]
    save_dir = Path(said.group(1))
    assert save_dir == cwd / "runs" / "demo" / "demo"
    for name in ("report.md", "report.json", "pipeline.json", "layers.csv", "channels.png", "dense/weights/best.pt"):
        assert (save_dir / name).is_file(), name
    assert Path(final.group(1)).is_file() and save_dir in Path(final.group(1)).parents
    assert "mAP50-95" in proc.stdout and "CPU latency onnx (ms)" in proc.stdout
    assert not _strays(home, t0, cwd, home)  # (ultralytics started from fresh settings in home)
    err = proc.stderr
    n = 7 if "/7] baseline" in err else 6  # 7 with the INT8 stage (int8=auto: openvino and nncf installed)
    lines = ["dense: epoch 1/1", f"[1/{n}] baseline", f"[2/{n}] sparse", "sparse: epoch 1/1", f"[3/{n}] prune",
             f"[4/{n}] finetune", "finetune: epoch 1/1", f"[5/{n}] val", f"[{n}/{n}] bench"]
    for line in lines + ([f"[6/{n}] quantize"] if n == 7 else []):
        assert line in err, (line, err[-3000:])
    assert "ETA" in err and "Traceback" not in err
