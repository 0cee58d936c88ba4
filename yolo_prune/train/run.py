"""One training run through an ultralytics trainer: checks, run folder, overrides, resume, the result.

The API functions :func:`yolo_prune.train.sparse_train` and :func:`yolo_prune.train.finetune` both go through
:func:`run_training`: it refuses bad options before anything is written, turns an in-memory model into a
checkpoint *path* in the run folder (DDP workers and ``resume`` rebuild the model from ``args.model``, see
:mod:`yolo_prune.train.keep_arch`), finds the ``last.pt`` to resume, quiets ultralytics unless ``verbose``,
turns SIGTERM into ``KeyboardInterrupt`` and returns a :class:`~yolo_prune.train.results.TrainResult`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import DatasetError, ModelLoadError, UsageError
from ..forms import DETECT, PRUNABLE_TASKS, as_detection_model, model_task
from ..io import run_dir, run_path
from ..logs import quiet_ultralytics
from ..options import RunOptions, TrainOptions
from ..models import save_input_checkpoint
from .progress import EpochProgress
from .results import TrainResult
from ..data import resolve_data

__all__ = ["resolve_data_yaml", "run_training", "sigterm_as_interrupt"]

MAP50_95_KEY = "metrics/mAP50-95(B)"
MAP50_KEY = "metrics/mAP50(B)"


def resolve_data_yaml(data: Any, task: str = "detect") -> str:
    """Return a YOLO-format data yaml ultralytics can train a model of ``task`` on.

    The single call site of ``yolo_prune.data.resolve_data`` in training (which also converts COCO-format input,
    with the outlines of the objects as labels for a segmentation model).
    """
    return str(resolve_data(data, task=task).yaml)


# Keys the API sets itself from its own arguments.
_API_KEYS = {"model", "data", "epochs", "imgsz", "batch", "device", "project", "name", "exist_ok", "seed", "resume",
             "save_dir"}


def _check_train_args(train_args: dict[str, Any], model: Any) -> None:
    """Refuse unknown keys and keys the API owns before anything is written."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    unknown = sorted(k for k in train_args if k not in DEFAULT_CFG_DICT)
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(unknown)} (not an ultralytics train key)")
    owned = sorted(k for k in train_args if k in _API_KEYS)
    if owned:
        raise UsageError(f"pass {', '.join(owned)} as the function's own argument(s)")
    pretrained = train_args.get("pretrained", True)
    is_yaml = isinstance(model, (str, Path)) and Path(model).suffix.lower() in {".yaml", ".yml"}
    if pretrained is not True and not is_yaml:
        raise UsageError(
            f"pretrained={pretrained!r} is not supported when training a checkpoint: the checkpoint itself is the "
            "model (pruned architectures cannot be rebuilt from their yaml)"
        )


def _check_model_path(model: str | Path, tasks: tuple[str, ...]) -> tuple[str, str]:
    """A model yaml or a ``.pt`` path and its task, once it builds or loads as a model of one of ``tasks`` (before
    any run folder exists): a model of another task or with an unsupported head is refused here in one line."""
    path = Path(model)
    suffix = path.suffix.lower()
    if suffix not in {".yaml", ".yml", ".pt"}:
        raise ModelLoadError(f"model must be a .pt checkpoint or a model yaml, got {model}")
    net = as_detection_model(path, tasks=tasks)  # missing, unreadable, unsupported head, other task: one line
    # a model yaml (random init): ultralytics resolves its own names such as yolov8n.yaml
    return (str(model) if suffix != ".pt" else str(path)), model_task(net)


def checkpoint_task(path: str | Path) -> str:
    """The task of the model in a checkpoint (a resumed run's ``last.pt``): its head's, else its recorded task."""
    try:
        return model_task(as_detection_model(Path(path), tasks=PRUNABLE_TASKS))
    except ModelLoadError:  # e.g. an unfinished distill=feature run holds ultralytics' DistillationModel wrapper
        from ultralytics.utils.patches import torch_load

        ckpt = torch_load(path, map_location="cpu", weights_only=False)
        return str((ckpt.get("train_args") or {}).get("task") or "detect")


def _pick_trainer(trainers: type | Mapping[str, type], task: str) -> type:
    """The trainer class of ``task``: ``trainers`` itself, or its entry for the task."""
    if isinstance(trainers, type):
        return trainers
    if task not in trainers:
        raise ModelLoadError(f"the model is a {task} model; training takes {', '.join(trainers)} models")
    return trainers[task]


def _find_resume_checkpoint(model: Any, resume: Any, project: str | Path | None, mode: str, name: str | None) -> Path:
    """Locate ``last.pt`` for ``resume``: a path given as ``resume``, ``model=.../last.pt``, or the run folder."""
    candidates = []
    if isinstance(resume, (str, Path)):
        p = Path(resume)
        candidates.append(p if p.suffix == ".pt" else p / "weights" / "last.pt")
    elif isinstance(model, (str, Path)) and Path(model).name == "last.pt":
        candidates.append(Path(model))
    else:
        candidates.append(run_path(project, mode, name) / "weights" / "last.pt")
    for c in candidates:
        if c.is_file():
            from ultralytics.utils.patches import torch_load

            ckpt = torch_load(c, map_location="cpu", weights_only=False)
            if ckpt.get("epoch", -1) < 0 or ckpt.get("optimizer") is None:
                raise UsageError(f"{c} is from a finished run, nothing to resume")
            return c
    raise UsageError(f"nothing to resume: {candidates[0]} not found")


def _resume_data(last: Path) -> str:
    """The dataset yaml a run was trained on, from its checkpoint (``yolo train resume`` needs no ``data=``)."""
    from ultralytics.utils.patches import torch_load

    data = (torch_load(last, map_location="cpu", weights_only=False).get("train_args") or {}).get("data")
    if not data:
        raise UsageError(f"{last} does not record its dataset: pass data=...")
    if Path(str(data)).suffix.lower() in {".yaml", ".yml"} and not Path(str(data)).is_file():
        raise DatasetError(f"{last} was trained on {data}, which no longer exists: pass data=...")
    return str(data)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``KeyboardInterrupt`` while training, so a killed run unwinds like Ctrl-C.

    Only installed from the main thread and only when nobody else handles SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"training interrupted by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _final_metrics(trainer: Any) -> dict[str, Any]:
    """The trainer's final validation metrics (ultralytics' keys), from ``best.pt`` / ``last.pt`` when the trainer
    has none (e.g. a DDP parent: the workers validated)."""
    metrics = getattr(trainer, "metrics", None)
    if not metrics or MAP50_95_KEY not in metrics:  # e.g. DDP parent: the workers validated
        metrics = {}
        for ckpt_path in (trainer.best, trainer.last):
            if Path(ckpt_path).is_file():
                from ultralytics.utils.patches import torch_load

                metrics = torch_load(ckpt_path, map_location="cpu", weights_only=False).get("train_metrics") or {}
                break
    return metrics


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def run_training(trainer_cls: type | Mapping[str, type], mode: str, model: Any, data: Any, train: TrainOptions,
                 run: RunOptions, *, extra: dict[str, Any] | None = None, train_args: dict[str, Any] | None = None
                 ) -> tuple[Any, TrainResult]:
    """Build ``trainer_cls`` for the run folder ``<project>/<name>`` (default ``runs/<mode>/<mode>``), train, summarise.

    ``train`` gives epochs, imgsz, batch, workers, device and seed; ``run`` the run folder, ``resume`` and ``verbose``.

    ``trainer_cls`` is one trainer class, or one per task (``{"detect": ..., "segment": ...}``): the class of the
    model's task is used, read from the checkpoint (its head), so a task needs no option.
    ``extra`` are trainer-specific options (e.g. ``sr``) that the trainer itself pops from its overrides.
    Returns the trainer and a :class:`TrainResult` (the caller adds what is specific to its trainer).
    """
    train_args = dict(train_args or {})
    _check_train_args(train_args, model)
    tasks = DETECT if isinstance(trainer_cls, type) else tuple(trainer_cls)  # one class: a detection trainer
    if run.resume:
        overrides, task = _resume_overrides(model, data, run.resume, run.project, mode, run.name)
    else:
        overrides, task = _new_run_overrides(model, data, mode, epochs=train.epochs, imgsz=train.imgsz,
                                             batch=train.batch, seed=train.seed, project=run.project, name=run.name,
                                             exist_ok=run.exist_ok, extra=extra, tasks=tasks)
    trainer_cls = _pick_trainer(trainer_cls, task)
    if train.device is not None:
        overrides["device"] = str(train.device)
    overrides["workers"] = train.workers
    overrides.update(train_args)
    verbose = run.verbose
    with quiet_ultralytics(verbose), sigterm_as_interrupt():
        try:
            trainer = trainer_cls(overrides=overrides)
        except SyntaxError as e:  # ultralytics' unknown-key error
            raise UsageError(str(e).strip().splitlines()[-1] if str(e).strip() else str(e)) from None
        if not verbose:  # ultralytics' own output is silenced: one line per epoch on the yolo_prune logger instead
            EpochProgress(mode).attach(trainer)
        trainer.train()
    return trainer, _train_result(trainer, mode)


def _resume_overrides(model: Any, data: Any, resume: Any, project: str | Path | None, mode: str,
                      name: str | None) -> tuple[dict[str, Any], str]:
    """Overrides that continue the interrupted run whose ``last.pt`` :func:`_find_resume_checkpoint` finds, and the
    task of its model."""
    last = _find_resume_checkpoint(model, resume, project, mode, name)
    save_dir = last.resolve().parent.parent  # where last.pt is now, even if the run folder was moved
    task = checkpoint_task(last)
    return {"model": str(last), "resume": str(last), "save_dir": str(save_dir), "plots": False,
            "data": _resume_data(last) if data is None else resolve_data_yaml(data, task)}, task


def _new_run_overrides(model: Any, data: Any, mode: str, *, epochs: int, imgsz: int, batch: int, seed: int,
                       project: str | Path | None, name: str | None, exist_ok: bool,
                       extra: dict[str, Any] | None, tasks: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """Overrides of a new run and the model's task; checks the model and data first, then creates the run folder
    (and ``input.pt``)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise UsageError(f"epochs must be a positive integer, got {epochs!r}")
    model_path, module = None, None
    if isinstance(model, (str, Path)):
        model_path, task = _check_model_path(model, tasks)
    else:
        module = as_detection_model(model, tasks=tasks)
        task = model_task(module)
    data_yaml = resolve_data_yaml(data, task)
    save_dir = run_dir(project, mode, name, exist_ok=exist_ok).resolve()
    if module is not None:
        model_path = str(save_input_checkpoint(module, save_dir / "weights" / "input.pt"))
    overrides = {
        "model": model_path,
        "data": data_yaml,
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "seed": seed,
        "project": str(save_dir.parent),
        "name": save_dir.name,
        "exist_ok": True,
        "save_dir": str(save_dir),
        "plots": False,
        **(extra or {}),
    }
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
        # one optimizer step per batch: ultralytics' nbs=64 accumulates 4 batches of 16, i.e. 3 steps per epoch
        # on a 200-image dataset, too few for a pruned model to recover (BENCHMARKS.md section 7); nbs=64 in
        # train_args restores it. (batch -1 / a fraction means autobatch: ultralytics' own nbs then.)
        overrides["nbs"] = batch
    return overrides, task


def _train_result(trainer: Any, mode: str) -> TrainResult:
    """The common outcome of a finished run: checkpoints, epochs, final mAP of ``best.pt``, the teacher if any."""
    metrics = _final_metrics(trainer)
    teacher = getattr(trainer.args, "teacher", None)
    return TrainResult(
        mode=mode,
        save_dir=Path(trainer.save_dir),
        best=Path(trainer.best) if Path(trainer.best).is_file() else None,
        last=Path(trainer.last) if Path(trainer.last).is_file() else None,
        epochs=int(trainer.epochs),
        map50_95=_metric(metrics, MAP50_95_KEY),
        map50=_metric(metrics, MAP50_KEY),
        mask_map50_95=_metric(metrics, "metrics/mAP50-95(M)"),
        pose_map50_95=_metric(metrics, "metrics/mAP50-95(P)"),
        teacher=teacher,
        distill=getattr(trainer.args, "distill", None) if teacher else None,
    )
