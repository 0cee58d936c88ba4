"""One run module for the staged runs (``pipeline``, ``demo``, ``sparsify``): the run folder and its state file,
resume, training stages that continue from their own ``last.pt``, stepped runs with the ``max_map_drop``
rejection, and the closing latency benchmark.

A run records every finished stage in a JSON state file (``pipeline.json``, ``sparsify.json``), written atomically;
``resume=True`` reads it back and skips what is done. Run folder names themselves (``runs/<mode>/<name>``,
``name2``...) come from :func:`yolo_prune.io.run_dir`, which every mode shares.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import UsageError
from .io import run_dir, run_path, write_json, write_yaml
from .bench import measure_latency
from .logs import LOGGER, listening


class RunState:
    """The outputs of every finished stage of a run, in ``path``. Only a resumed run (``load``) reads an existing
    file; a new run in a reused folder (``exist_ok=True``) deletes it and starts from nothing."""

    def __init__(self, path: Path, args: dict[str, Any], *, load: bool):
        self.path = path
        self.data: dict[str, Any] = {"args": args, "stages": {}}
        if load and path.is_file():
            self.data = json.loads(path.read_text(encoding="utf-8"))
        elif not load:
            path.unlink(missing_ok=True)

    @property
    def args(self) -> dict[str, Any]:
        return self.data["args"]

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def finish(self, stage: str, outputs: dict[str, Any]) -> dict[str, Any]:
        self.data["stages"][stage] = outputs
        write_json(self.path, self.data)
        return outputs


def open_folder(mode: str, *, project: Any, name: str | None, exist_ok: bool, resume: bool, state_file: str,
                save_dir: str | Path | None = None) -> Path:
    """The run folder of a staged run: ``save_dir`` when given, else ``project/name`` (a new one unless
    ``exist_ok``); a resumed run must already hold its ``state_file``."""
    if resume:
        folder = Path(save_dir).absolute() if save_dir else run_path(project, mode, name)
        if not (folder / state_file).is_file():
            raise UsageError(f"resume=True but {folder} holds no {state_file} to resume from")
        return folder
    if save_dir is not None:
        folder = Path(save_dir).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return run_dir(project, mode, name, exist_ok=exist_ok)


def recorded_args(folder: Path, state_file: str) -> dict[str, Any]:
    """The settings a run started with (what ``resume`` continues with)."""
    return RunState(folder / state_file, {}, load=True).args


def start(folder: Path, state_file: str, args: dict[str, Any], *, resume: bool) -> RunState:
    """The state of a run; a new run also records its settings in ``args.yaml``."""
    if not resume:
        write_yaml(folder / "args.yaml", args)
    return RunState(folder / state_file, args, load=resume)


def absolute(path: Any) -> str:
    """An existing file as an absolute path (a state file must resume from any working folder), else ``str``."""
    return str(Path(path).absolute()) if isinstance(path, (str, Path)) and Path(path).is_file() else str(path)


# --------------------------------------------------------------------------------------------- training stages
def train_stage(fn: Callable[..., Any], source: Any, data: Any, folder: Path, epochs: int, *, resume: bool,
                **kw: Any) -> dict[str, Any]:
    """Train ``source`` with ``fn`` (``finetune`` / ``sparse_train``) into ``folder``; the stage's outputs as a dict.

    With ``resume``, a run in ``folder`` that finished but was not yet recorded is taken as it is, and an
    interrupted one continues from its ``last.pt``.
    """
    last = folder / "weights" / "last.pt"
    if resume and last.is_file() and training_finished(last):  # finished, but not yet recorded
        best = folder / "weights" / "best.pt"
        return {"save_dir": str(folder), "best": str(best if best.is_file() else last), "last": str(last),
                "epochs": epochs}
    if resume and last.is_file():
        result = fn(last, data, resume=last, project=folder.parent, name=folder.name, **kw)
    else:
        result = fn(source, data, epochs=epochs, project=folder.parent, name=folder.name, exist_ok=True, **kw)
    return dataclasses.asdict(result)


def training_finished(last: Path) -> bool:
    """ultralytics strips the optimizer from last.pt (and sets epoch -1) when a run completes."""
    import torch

    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    return ckpt.get("epoch", -1) < 0 or ckpt.get("optimizer") is None


# --------------------------------------------------------------------------------------------- stepped runs
def dropped_too_much(base_map: float | None, record: Mapping[str, Any], max_map_drop: float | None) -> bool:
    """The ``max_map_drop`` rule: a step whose mAP50-95 fell by more than that below the input model's."""
    value = record.get("map50_95")
    return max_map_drop is not None and base_map is not None and value is not None and base_map - value > max_map_drop


def stepped(state: RunState, steps: int, run_step: Callable[[int, Any, list], dict[str, Any]], *, start: Any,
            base_map: float | None, max_map_drop: float | None, prefix: str = "", what: str = "step"
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``run_step(step, current, records)`` for ``step`` = 1..``steps``, each recorded in ``state`` as
    ``{prefix}step{k}`` (a resumed run skips the recorded ones). ``current`` is ``start`` for the first step, then
    the previous step's fine-tuned model (``finetuned``) or its ``checkpoint``. A step other than the first that
    drops mAP50-95 by more than ``max_map_drop`` is marked ``rejected`` and ends the run; returns (records, the last
    kept record)."""
    records: list[dict[str, Any]] = []
    current = start
    for step in range(1, steps + 1):
        record = state.done(f"{prefix}step{step}")
        if record is None:
            record = run_step(step, current, records)
            if records and dropped_too_much(base_map, record, max_map_drop):
                LOGGER.warning("%s %d dropped mAP50-95 by %.3f > max_map_drop=%s: keeping step %d", what, step,
                               base_map - record["map50_95"], max_map_drop, step - 1)
                record["rejected"] = True
            record = state.finish(f"{prefix}step{step}", record)
        records.append(record)
        if record.get("rejected"):
            break
        current = record.get("finetuned") or record["checkpoint"]
    return records, [r for r in records if not r.get("rejected")][-1]


# --------------------------------------------------------------------------------------------- bench
def backend_list(backends: Any) -> tuple[str, ...]:
    """``"torch,onnx"`` (the ``backends`` key) or a sequence as a tuple; empty for none."""
    if not backends:
        return ()
    items = backends.split(",") if isinstance(backends, str) else backends
    return tuple(b.strip() for b in items if b and b.strip() and b.strip() != "None")


def bench_stage(state: RunState, models: Mapping[str, Any], *, imgsz: int, backends: Sequence[str], runs: int,
                warmup: int, seed: int, verbose: bool) -> dict[str, Any] | None:
    """The closing latency benchmark (recorded as stage ``bench``); None when no backend is asked for. Progress lines
    with ``verbose`` or when someone listens to the ``yolo_prune`` logger (the CLI)."""
    done = state.done("bench")
    if done is not None or not backends:
        return done

    lat = measure_latency(dict(models), imgsz=imgsz, backends=tuple(backends), runs=runs, warmup=warmup, seed=seed,
                          progress=verbose or listening())
    return state.finish("bench", lat.to_dict())


def latency_of(bench: Mapping[str, Any] | None, model: str, backend: str) -> float | None:
    """The median latency of ``model`` on ``backend`` in a recorded bench stage."""
    for e in (bench or {}).get("entries", []):
        if e["model"] == model and e["backend"] == backend:
            return e["median_ms"]
    return None
