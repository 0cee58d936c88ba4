"""Progress lines and sub-step timings of the long operations (issue 23): what prune, sensitivity, the latency
table and bench log while they run, that library use stays quiet, and the ``timings`` block of the prune report."""

from __future__ import annotations

import contextlib
import json
import logging
import re

import pytest
import torch

from yolo_prune.logs import LOGGER, Progress, Timings, listening, progress_output

pytestmark = pytest.mark.usefixtures("data_cache")

COUNT = re.compile(r"^(?P<label>[\w -]+): (?P<done>\d+)/(?P<total>\d+)\b")


@contextlib.contextmanager
def listen(level: int = logging.INFO):
    """The ``yolo_prune`` logger's records, with a handler attached directly (the CLI's logger does not propagate)
    and every other handler (a CLI test's, left behind) out of the way."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    saved = LOGGER.handlers[:], LOGGER.level, LOGGER.propagate
    for h in saved[0]:
        LOGGER.removeHandler(h)
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    try:
        yield records
    finally:
        LOGGER.removeHandler(handler)
        for h in saved[0]:
            LOGGER.addHandler(h)
        LOGGER.setLevel(saved[1])
        LOGGER.propagate = saved[2]


@contextlib.contextmanager
def nobody_listening():
    """The ``yolo_prune`` logger as a plain script has it: no handler, level unset (pytest's root handler aside)."""
    saved = LOGGER.handlers[:], LOGGER.level, LOGGER.propagate
    for h in saved[0]:
        LOGGER.removeHandler(h)
    LOGGER.setLevel(logging.NOTSET)
    LOGGER.propagate = True
    try:
        yield
    finally:
        for h in saved[0]:
            LOGGER.addHandler(h)
        LOGGER.setLevel(saved[1])
        LOGGER.propagate = saved[2]


def counted(records: list[logging.LogRecord]) -> dict[str, list[tuple[int, int]]]:
    """Progress lines by label: [(done, total), ...]."""
    out: dict[str, list[tuple[int, int]]] = {}
    for r in records:
        m = COUNT.match(r.getMessage())
        if m:
            out.setdefault(m["label"], []).append((int(m["done"]), int(m["total"])))
    return out


# --------------------------------------------------------------------------------------------- the helper
def test_progress_lines_are_throttled_and_end_with_the_total():
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("tests.progress_helper")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with Progress("probes", 5, unit="probes", every=0.0, logger=logger) as bar:
            for _ in range(5):
                bar.update()
        lines = [r.getMessage() for r in records]
        assert lines[0].startswith("probes: 1/5 probes  0:00 elapsed, ETA 0:0")
        assert lines[-1] == "probes: 5/5 probes in 0:00" and len(lines) == 5  # 4 running lines + the closing one
        records.clear()
        for _ in Progress("layers", 100, every=3600, logger=logger).iterate(range(100)):
            pass
        assert [r.getMessage() for r in records] == ["layers: 100/100 in 0:00"]  # throttled: only the closing line
        records.clear()
        with Progress("quiet", 3, enabled=False, every=0.0, logger=logger) as bar:
            bar.update(3)
        with pytest.raises(RuntimeError), Progress("failed", 3, every=3600, logger=logger):
            raise RuntimeError  # no closing line claims it finished
        assert records == []
    finally:
        logger.removeHandler(handler)


def test_timings_add_up():
    t = Timings()
    with t("a"):
        pass
    with t("a"):
        pass
    t.add({"b": 1.5, "a": 1.0})
    assert set(t) == {"a", "b"} and t["b"] == 1.5 and 1.0 <= t["a"] < 2.0
    assert json.loads(json.dumps(t)) == dict(t)


def test_progress_output_goes_to_stderr_only_when_nobody_listens(capfd):
    with nobody_listening():
        assert not listening()
        with progress_output(True):
            LOGGER.info("shown on stderr")
        with progress_output(False):
            LOGGER.info("not shown")
        assert LOGGER.handlers == [] and LOGGER.level == logging.NOTSET  # restored
    with listen() as records, progress_output(True):
        assert listening()
        LOGGER.info("to the listener")
    err = capfd.readouterr().err
    assert "shown on stderr" in err and "not shown" not in err and "to the listener" not in err
    assert [r.getMessage() for r in records] == ["to the listener"]


# --------------------------------------------------------------------------------------------- prune
PRUNE = dict(imgsz=64, calib_images=8, target_macs=0.6, method="auto", compensate="lstsq_seq", recalibrate=True,
             allocation="auto")


@pytest.fixture(scope="module")
def dense_pt(tmp_path_factory):
    from ultralytics.nn.tasks import DetectionModel

    from .helpers import NC, randomize_bn, save_like_ultralytics

    torch.manual_seed(0)
    model = randomize_bn(DetectionModel("yolov8n.yaml", nc=NC, verbose=False))
    return save_like_ultralytics(model, tmp_path_factory.mktemp("dense") / "dense.pt")


def test_prune_logs_every_long_sub_step_and_reports_its_timings(dense_pt, data, tmp_path, capfd):
    import yolo_prune as yp

    with listen() as records:
        result = yp.prune(dense_pt, data=data, validate=True, progress=True, project=tmp_path, name="p", **PRUNE)
    lines = counted(records)
    for label in ("calibration images", "BN reference", "recon ranking", "sensitivity", "BN re-estimation",
                  "sequential refit", "validation"):
        assert label in lines, f"no progress line for {label}: {sorted(lines)}"
        done, total = lines[label][-1]
        assert done == total > 0  # the closing line
    assert lines["calibration images"][-1] == (8, 8)
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("prune: ") and " in all; " in m for m in messages)  # where the time went
    err = capfd.readouterr().err  # the lines went to the listener, not also to stderr
    assert not any(COUNT.match(line) for line in err.splitlines()), err[-2000:]

    report = json.loads((tmp_path / "p" / "report.json").read_text())
    timings, total = report["timings"], report["total_seconds"]
    assert timings == pytest.approx(result.timings) and total == pytest.approx(result.total_seconds)
    ran = {"load", "calibration", "stats", "trace", "ranking", "sensitivity", "planning", "removal", "compensation",
           "recalibration", "save", "validation"}
    assert ran <= set(timings), sorted(timings)
    assert all(v >= 0 for v in timings.values())
    assert sum(timings.values()) <= total
    assert report["prune_seconds"] <= total
    md = (tmp_path / "p" / "report.md").read_text()
    assert "## Time per sub-step" in md and "| sensitivity |" in md and "| total |" in md


def test_prune_is_quiet_without_progress(dense_pt, data, tmp_path, capfd):
    import yolo_prune as yp

    with listen(logging.DEBUG) as records:  # even a listener sees nothing at INFO
        result = yp.prune(dense_pt, data=data, project=tmp_path, name="q", **PRUNE)
    assert [r.getMessage() for r in records if r.levelno >= logging.INFO] == []
    assert result.timings and "sensitivity" in result.timings  # timed all the same
    with nobody_listening():  # a plain script: nothing on stderr either
        yp.prune(dense_pt, data=data, save=False, **PRUNE)
    err = capfd.readouterr().err
    assert not any(COUNT.match(line) for line in err.splitlines()), err[-2000:]


def test_prune_progress_true_in_a_plain_script_prints_to_stderr(dense_pt, data, capfd):
    import yolo_prune as yp

    with nobody_listening():
        yp.prune(dense_pt, data=data, save=False, progress=True, **{**PRUNE, "allocation": "global"})
    err = capfd.readouterr().err
    assert "calibration images: 8/8 images in " in err and "sequential refit: " in err


def test_prune_without_data_times_what_ran(dense_pt, tmp_path):
    import yolo_prune as yp

    result = yp.prune(dense_pt, method="l1", target_macs=0.7, imgsz=64, project=tmp_path, name="n")
    assert {"load", "trace", "ranking", "planning", "removal", "save"} <= set(result.timings)
    assert not {"calibration", "sensitivity", "compensation", "recalibration", "validation"} & set(result.timings)
    assert sum(result.timings.values()) <= result.total_seconds


# --------------------------------------------------------------------------------------------- other modes
def test_sensitivity_logs_its_probes(dense_pt, data, tmp_path):
    import yolo_prune as yp

    with listen() as records:
        result = yp.sensitivity(dense_pt, data, imgsz=64, calib_images=4, progress=True, project=tmp_path, name="s")
    lines = counted(records)
    assert lines["sensitivity"][-1] == (3 * result.groups_measured,) * 2
    assert lines["calibration images"][-1] == (4, 4) and "recon ranking" in lines
    with listen() as records:
        yp.sensitivity(dense_pt, data, imgsz=64, calib_images=4, save=False)
    assert records == []


def test_bench_logs_its_rounds(dense_pt):
    import yolo_prune as yp

    with listen() as records:
        yp.benchmark({"a": dense_pt}, imgsz=64, backends="torch", runs=3, warmup=1, progress=True)
    assert counted(records)["bench torch"] == [(4, 4)] and counted(records)["bench setup"] == [(1, 1)]
    with listen() as records:
        yp.benchmark({"a": dense_pt}, imgsz=64, backends="torch", runs=3, warmup=1, progress=False)
    assert records == []
