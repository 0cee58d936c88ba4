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
        for _ in Progress("probes", 100, every=0.0, logger=logger).iterate(range(100)):
            pass
        assert [int(COUNT.match(r.getMessage())["done"]) for r in records] == [5 * k for k in range(1, 21)]
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
    assert [n for n in lines["Gram matrices"] if n[0] == n[1]] == [(8, 8)]  # measured once: the probes reuse them
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
    assert lines["Gram matrices"] == [(4, 4)]  # ranking's, reused by the probes
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


# --------------------------------------------------------------------------------------------- the speed-up
@pytest.fixture(scope="module")
def images(synthetic):
    from yolo_prune.data import resolve_data
    from yolo_prune.pruning.calibration import load_calibration_images

    return load_calibration_images(resolve_data(synthetic / "yolo.yaml").train_images, n=12, imgsz=64)


def test_head_replay_gives_the_same_outputs_to_the_bit(v8n, images):
    """Every group removed alone (at a third of its channels, compensated): the restarted forward pass with the
    unchanged head branches replayed equals the one that recomputes them, tensor for tensor; and the replay
    really happened for the groups that spare a branch."""
    from yolo_prune.pruning import build_graph, prepare
    from yolo_prune.pruning.forward import _Replay
    from yolo_prune.pruning.sensitivity import Probe

    prepare(v8n)
    graph = build_graph(v8n)
    probe = Probe(v8n, graph, images, batch=5)  # 3 batches, the last one short
    assert len(probe.cache.branches) == 6 and all(len(v) == 3 for v in probe.cache.branches.values())
    head = v8n.model[-1]
    replayed = []
    calls = {"n": 0}

    def count(module, inputs, output):  # a branch really computed
        calls["n"] += 1

    handles = [b.register_forward_hook(count) for attr in ("cv2", "cv3") for b in getattr(head, attr)]
    try:
        for group in graph.groups():
            record, start = probe.apply([(group, list(range(0, group.channels, 3)))])
            try:
                calls["n"] = 0
                full = probe.cache.run_from(v8n, start)
                computed = calls["n"]
                calls["n"] = 0
                fast = probe.cache.run_from(v8n, start, changed={id(t) for t, _ in record})
                replayed.append(computed - calls["n"])
            finally:
                probe.undo(record)
            assert len(full) == len(fast) == 3
            assert all(torch.equal(a, b) for a, b in zip(full, fast)), group.name
    finally:
        for h in handles:
            h.remove()
    assert not any(isinstance(m, _Replay) for m in v8n.modules())  # every branch put back
    assert sum(r > 0 for r in replayed) >= 20  # the neck's last groups and the head's own spare branches
    assert max(replayed) == 5 * 3  # a head-internal group: 5 of the 6 branches replayed, in each of the 3 batches


def test_sensitivity_with_replay_is_unchanged(v8n, images):
    """The sensitivity curves are the same with the replay as without it, to the bit: so are the allocation the
    engine plans from them and the pruned widths."""
    from yolo_prune.pruning import build_graph, prepare
    from yolo_prune.pruning.importance import make_importance
    from yolo_prune.pruning.sensitivity import Probe, measure_sensitivity

    prepare(v8n)
    graph = build_graph(v8n)
    importance = make_importance("l1")
    scored = [(g, importance(g.group)) for g in graph.groups()]
    scored = [(g, s) for g, s in scored if s is not None]
    saved = [1.0] * len(scored)
    fast = measure_sensitivity(Probe(v8n, graph, images), scored, macs_saved=saved)
    slow = measure_sensitivity(Probe(v8n, graph, images, replay=False), scored, macs_saved=saved)
    assert [g.losses for g in fast] == [g.losses for g in slow]
    assert sum(loss > 0 for g in fast for loss in g.losses) > len(fast)  # (the probes did change the outputs)


def test_probes_reuse_the_gram_matrices_of_recon_ranking(v8n, images):
    """What recon ranking measured is exactly what a probe of the same model would measure (so reusing it changes
    nothing)."""
    from yolo_prune.pruning import prepare
    from yolo_prune.pruning.importance import make_importance
    from yolo_prune.pruning.sensitivity import PROBE_IMAGES, ConvGrams

    prepare(v8n)
    ranking = make_importance("recon", seed=3, calib_images=images)
    ranking.calibrate(v8n)
    own = ConvGrams(v8n, images[:PROBE_IMAGES], seed=3)
    assert ranking.grams.grams.keys() == own.grams.keys()
    assert all(torch.equal(ranking.grams.grams[c], own.grams[c]) for c in own.grams)
