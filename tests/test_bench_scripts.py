"""The benchmark scripts in bench/: a package run as ``python -m bench.<script>``, results without absolute paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
RESULTS = sorted((BENCH / "results").glob("*.json"))


def test_bench_sources_do_not_touch_sys_path():
    offenders = [p.name for p in BENCH.glob("*.py") if re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert not offenders, f"bench scripts must import helpers as `from bench import common`: {offenders}"


def test_every_bench_module_imports_and_runs_help_as_a_module():
    """In a fresh interpreter started in the project root (as ``python -m bench.X`` is): import every module of
    bench/ as ``bench.X``, then run each script's ``--help`` the way ``-m`` runs it."""
    code = (
        "import contextlib, importlib, io, runpy, sys\n"
        f"names = {SCRIPTS!r}\n"
        "for n in names:\n"
        "    importlib.import_module('bench.' + n)\n"
        "for n in names:\n"
        "    if n == 'common':\n"
        "        continue\n"
        "    sys.argv = ['bench/' + n + '.py', '--help']\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        runpy.run_module('bench.' + n, run_name='__main__', alter_sys=True)\n"
        "    assert out.getvalue().startswith('usage: python -m bench.' + n), (n, out.getvalue()[:200])\n"
        "print('ok', len(names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the cwd makes `bench` importable
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "YOLO_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(f"ok {len(SCRIPTS)}")


def _strings(value, where: str = ""):
    """Every string of a JSON document (keys too) with where it is."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{where}/<key>", k
            yield from _strings(v, f"{where}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def absolute_paths(doc) -> list[tuple[str, str]]:
    """(where, value) of every string of ``doc`` that is an absolute path (POSIX, home-relative or Windows)."""
    return [(w, s) for w, s in _strings(doc) if os.path.isabs(s) or re.match(r"~[/\\]|[A-Za-z]:[/\\]", s)]


def test_absolute_path_check_catches_one():
    doc = {"rows": [{"checkpoint": "bench/work/a/best.pt"}, {"data": "../shared/fixtures/bccd/bccd_coco.yaml"}],
           "busy": ["55.6% /usr/bin/python run.py"], "command": "python -m bench.frontier --quick"}
    assert absolute_paths(doc) == []
    doc["rows"].append({"checkpoint": "/work/main/bench/work/a/best.pt"})
    doc["C:\\runs\\x.pt"] = 1
    assert [w for w, _ in absolute_paths(doc)] == ["/rows[2]/checkpoint", "/<key>"]


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_results_hold_no_absolute_path(path: Path):
    found = absolute_paths(json.loads(path.read_text(encoding="utf-8")))
    assert not found, f"{path.name} records absolute paths (use bench.common.rel): {found[:5]}"


def test_write_result_records_relative_paths_and_resolve_reads_them_back(tmp_path, monkeypatch):
    from bench import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ckpt = common.WORK / "runs" / "x" / "weights" / "last.pt"
    data = common.SHARED / "bccd" / "bccd_coco.yaml"
    payload = {"checkpoint": str(ckpt), "data": data, "rows": [{"save_dir": str(ckpt.parent)}],
               "busy": ["12.0% /usr/bin/python x.py"], "elsewhere": "/tmp/x.pt", str(ckpt): 1, "n": 2}
    written = json.loads(common.write_result("t", payload).read_text())
    assert written["checkpoint"] == "bench/work/runs/x/weights/last.pt"
    assert written["data"] == "../shared/fixtures/bccd/bccd_coco.yaml"
    assert written["rows"][0]["save_dir"] == "bench/work/runs/x/weights"
    assert written["bench/work/runs/x/weights/last.pt"] == 1
    assert written["busy"] == payload["busy"] and written["n"] == 2
    assert written["elsewhere"] == "/tmp/x.pt"  # outside the project and the fixtures: left, and the check above flags it
    assert common.resolve(written["checkpoint"]) == ckpt
    assert common.resolve(written["data"]) == data
    assert common.resolve("/tmp/x.pt") == Path("/tmp/x.pt")
    assert isinstance(payload["data"], Path) and payload["checkpoint"] == str(ckpt)  # the caller's payload untouched


def test_render_also_runs_as_a_file_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(BENCH / "render.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m bench.render"), proc.stderr[-2000:]


def test_tasks_block_renders_box_and_task_map_and_head_widths(tmp_path, monkeypatch):
    from bench import common, render

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert "python -m bench.tasks" in render.block_tasks("tasks_x")  # no result yet: says how to make it
    maps = {"map50_95": 0.5, "mask_map50_95": 0.4}
    row = {"task": "segment", "dense": {"params": 2.8e6, "macs": 1.2e9, **maps},
           "dense_ft": {"map50_95": 0.6, "mask_map50_95": 0.45},
           "pipeline": {"params": 1.4e6, "macs": 0.6e9, "macs_ratio": 0.5, "prune_seconds": 3.0,
                        "pruned": {"map50_95": 0.2, "mask_map50_95": 0.1},
                        "final_maps": {"map50_95": 0.55, "mask_map50_95": 0.47}},
           "latency640": {"dense_ms": 200.0, "pruned_ms": 120.0, "ratio": 0.6},
           "widths": {"dense": {"proto": {"cv1": 64, "upsample": 64, "cv2": 64, "cv3": 32}, "cv4": [[32, 32]]},
                      "pruned": {"proto": {"cv1": 48, "upsample": 16, "cv2": 16, "cv3": 32}, "cv4": [[24, 32]]}}}
    common.write_result("tasks_x", {"command": "python -m bench.tasks", "complete": True, "models": {"m-seg": row},
                                    "config": {"imgsz": 128, "finetune_epochs": 10, "finetune_lr0": 5e-4}})
    text = render.block_tasks("tasks_x")
    assert "| m-seg | box | 0.500 | 0.600 | 0.200 | 0.550 | -5.0 |" in text
    assert "| m-seg | mask | 0.400 | 0.450 | 0.100 | 0.470 | +2.0 |" in text
    assert "cv1 64->48, upsample 64->16, cv2 64->16, cv3 32->32" in text and "P3 32/32->24/32" in text
    assert "200 / 120 (0.60)" in text and "INCOMPLETE" not in text
    assert "except lr0=0.0005 for the pipeline's fine-tune and the reference" in text
