"""Supported dependency versions: the import refuses an older ultralytics / torch-pruning in one line naming the
version and the pip command; pyproject.toml declares the same minimums; a pruned checkpoint records the versions
that pruned it, and loading it where ultralytics' major.minor differs warns in one line."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from yolo_prune import compat
from yolo_prune.compat import DependencyVersionError, MINIMUM, check_versions, parse_version, version_drift
from yolo_prune.errors import YoloPruneError
from yolo_prune.models import load_model, read_provenance, save_checkpoint
from yolo_prune.provenance import versions

from .helpers import ROOT


@pytest.mark.parametrize("text, want", [("8.4.190", (8, 4, 190)), ("2.14.1+cpu", (2, 14, 1)), ("1.6.0rc1", (1, 6, 0)),
                                        ("1.5", (1, 5)), ("unknown", ())])
def test_parse_version(text, want):
    assert parse_version(text) == want


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_an_older_dependency_is_refused_in_one_line(name, monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda n: "1.0.0" if n == name else MINIMUM[n])
    with pytest.raises(DependencyVersionError) as info:
        check_versions()
    msg = str(info.value)
    assert isinstance(info.value, YoloPruneError) and "\n" not in msg
    assert f"{name}>={MINIMUM[name]}" in msg and "found 1.0.0" in msg and f'pip install -U "{name}>=' in msg


def test_the_minimum_itself_and_newer_or_absent_dependencies_pass(monkeypatch):
    assert check_versions() is None  # this environment
    asked: list[str] = []

    def at_minimum(name: str) -> str:
        asked.append(name)
        return MINIMUM[name]

    monkeypatch.setattr(compat, "installed_version", at_minimum)
    assert check_versions() is None and sorted(asked) == sorted(MINIMUM)  # every dependency is checked
    monkeypatch.setattr(compat, "installed_version", lambda n: None)  # not installed: its own import reports it
    assert check_versions() is None
    # the boundary: one patch release below the minimum fails
    name = "torch-pruning"
    major, minor, patch = (int(x) for x in MINIMUM[name].split(".")[:3])
    below = f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.99"
    monkeypatch.setattr(compat, "installed_version", lambda n: below if n == name else MINIMUM[n])
    with pytest.raises(DependencyVersionError, match=f"found {below}"):
        check_versions()


def test_import_yolo_prune_refuses_ultralytics_8_3():
    """The check runs at ``import yolo_prune``: with ultralytics' metadata saying 8.3.0, the import fails."""
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda name: '8.3.0' if name == 'ultralytics' else real(name)\n"
            "import yolo_prune\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("yolo_prune.compat.DependencyVersionError: yolo-prune needs ultralytics>="), last
    assert "found 8.3.0" in last


def test_pyproject_declares_the_minimums():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for name, minimum in MINIMUM.items():
        assert re.search(rf'"{name}>={re.escape(minimum)}"', text), f"pyproject.toml must declare {name}>={minimum}"
    assert "TORCH_PRUNING" in (ROOT / ".ci" / "oldest").read_text()  # the CI step installs exactly these


def test_version_drift_rules():
    now = {"ultralytics": "8.4.190", "torch_pruning": "1.6.1"}
    assert version_drift(now, now) == []
    assert version_drift({"ultralytics": "8.4.142", "torch_pruning": MINIMUM["torch-pruning"]}, now) == []
    assert version_drift({}, now) == []
    assert version_drift({"ultralytics": "8.5.0"}, now) == ["ultralytics 8.5.0 (this environment has 8.4.190)"]
    assert version_drift({"ultralytics": "8.4.100", "torch_pruning": "1.4.0"}, now) == [
        f"ultralytics 8.4.100 (older than the tested {MINIMUM['ultralytics']})",
        f"torch-pruning 1.4.0 (older than the tested {MINIMUM['torch-pruning']})"]


@pytest.fixture(scope="module")
def pruned_pt(tmp_path_factory):
    import yolo_prune as yp

    res = yp.prune("yolov8n.yaml", method="bn", ratio=0.2, imgsz=64, project=tmp_path_factory.mktemp("p"), name="p")
    return res.checkpoint


def test_the_pruned_checkpoint_records_the_versions_that_pruned_it(pruned_pt):
    from importlib.metadata import version

    import torch
    import ultralytics

    recorded = read_provenance(pruned_pt)["versions"]
    assert recorded["ultralytics"] == ultralytics.__version__ and recorded["torch"] == torch.__version__
    assert recorded["torch_pruning"] == version("torch-pruning")
    assert recorded["yolo_prune"] == __import__("yolo_prune").__version__


def _doctored(pruned_pt, path, **changed):
    """A copy of ``pruned_pt`` whose recorded versions have ``changed``."""
    from ultralytics import YOLO

    prov = read_provenance(pruned_pt)
    prov["versions"] = {**prov["versions"], **changed}
    return save_checkpoint(YOLO(str(pruned_pt)).model.float(), path, provenance=prov)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_warnings(path) -> list[str]:
    """The warnings of the ``yolo_prune`` logger while loading ``path`` (whether or not it propagates: the CLI's
    setup, run earlier in the session, may have stopped it)."""
    logger, records = logging.getLogger("yolo_prune"), _Records()
    level = logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    logger.addHandler(records)
    try:
        load_model(path)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return records.messages


def test_loading_where_ultralytics_minor_differs_warns_once(pruned_pt, tmp_path):
    assert _load_warnings(pruned_pt) == []
    other = f"{parse_version(versions()['ultralytics'])[0]}.{parse_version(versions()['ultralytics'])[1] + 1}.0"
    warned = _load_warnings(_doctored(pruned_pt, tmp_path / "other.pt", ultralytics=other))
    assert len(warned) == 1 and "\n" not in warned[0]
    assert f"pruned with ultralytics {other} (this environment has {versions()['ultralytics']})" in warned[0]


def test_loading_a_checkpoint_pruned_with_an_old_torch_pruning_warns(pruned_pt, tmp_path):
    same_minor = _doctored(pruned_pt, tmp_path / "patch.pt", torch_pruning="99.0")  # newer: nothing known to differ
    assert _load_warnings(same_minor) == []
    warned = _load_warnings(_doctored(pruned_pt, tmp_path / "old.pt", torch_pruning="1.4.0"))
    assert len(warned) == 1 and "torch-pruning 1.4.0 (older than the tested" in warned[0]
