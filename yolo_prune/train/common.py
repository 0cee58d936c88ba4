"""Shared machinery of the sparsity and fine-tuning trainers.

Why this exists (the traps of training a *pruned* model with ultralytics):

* ``DetectionTrainer.get_model`` rebuilds the network from ``model.yaml`` and then copies only the weights
  whose shapes match. For a pruned checkpoint the yaml describes the *unpruned* widths, so a plain
  ``YOLO(pruned.pt).train()`` silently trains a randomly initialised unpruned model.
  :class:`KeepArchitectureMixin` returns the checkpoint's own module instead.
* ultralytics DDP re-creates the trainer in a fresh process from ``vars(trainer.args)`` (see
  ``ultralytics/utils/dist.py``): whatever was passed in memory is lost, and the launcher deletes the
  run folder first. The model therefore always travels as a checkpoint *path* in ``args.model``,
  and trainer-specific options travel inside ``args`` (see :mod:`yolo_prune.train.sparse`).
* ultralytics writes ``last.pt`` / ``best.pt`` in place; a kill during the write leaves a truncated
  checkpoint that cannot be resumed. The mixin writes them atomically.

The API functions :func:`yolo_prune.train.sparse_train` and :func:`yolo_prune.train.finetune` both go
through :func:`run_training` here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel, load_checkpoint
from ultralytics.utils import LOGGER, RANK, IterableSimpleNamespace

from ..errors import DatasetError, ModelLoadError, UsageError
from ..io import atomic_write, run_dir, run_path, write_text
from ..results import Result
from .progress import EpochProgress

__all__ = [
    "KeepArchitectureMixin",
    "TrainResult",
    "run_training",
    "save_input_checkpoint",
    "resolve_data_yaml",
    "unwrap_detection_model",
]

MAP50_95_KEY = "metrics/mAP50-95(B)"
MAP50_KEY = "metrics/mAP50(B)"


# --------------------------------------------------------------------------------------------- trainers
class KeepArchitectureMixin:
    """Mixin for ultralytics trainers: train the checkpoint's own module, never a yaml rebuild.

    Put it *before* the ultralytics trainer in the bases: ``class T(KeepArchitectureMixin, DetectionTrainer)``.

    * :meth:`get_model` returns ``weights`` itself (float32, every parameter trainable) when
      ``BaseTrainer.setup_model`` hands it a loaded checkpoint module. ``setup_model`` loads that
      module from ``self.args.model`` - a path - so DDP ranks and ``resume=True`` (where
      ``args.model`` is ``last.pt``) rebuild the pruned architecture from disk.
    * :meth:`save_model` writes ``last.pt`` / ``best.pt`` atomically.
    * :meth:`train` keeps an input checkpoint that lives inside the run folder alive across the
      ultralytics DDP launcher, which deletes the run folder before it starts the workers.
    * Keys listed in :attr:`extra_arg_keys` (a subclass's own options, stored in ``self.args`` so that
      they reach DDP workers and resumed runs) are hidden from the validator, whose config check
      rejects keys ultralytics does not know.
    """

    #: Non-ultralytics keys a subclass keeps in ``self.args``.
    extra_arg_keys: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = str(self.args.model or "")
        if model.lower().endswith(".pt") and not self.resume and self.args.pretrained is not True:
            raise UsageError(
                f"pretrained={self.args.pretrained!r} is not supported when training a checkpoint: the checkpoint "
                "itself is the model (pruned architectures cannot be rebuilt from their yaml)"
            )

    @classmethod
    def all_extra_arg_keys(cls) -> set[str]:
        """:attr:`extra_arg_keys` of this class and of every base (e.g. a distillation mixin's and the trainer's own)."""
        return {k for c in cls.__mro__ for k in vars(c).get("extra_arg_keys", ())}

    # The model -------------------------------------------------------------------------------------
    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """Return ``weights`` itself (the loaded checkpoint module) instead of a model rebuilt from ``cfg``.

        Without ``weights`` (a ``.yaml`` model, i.e. random init) this is the ultralytics behaviour.
        If the dataset has a different class count than the checkpoint, the ultralytics rebuild (new
        class head, all other weights copied) is used when it reproduces every other shape, i.e.
        for an unpruned model; a pruned model keeps its architecture and only Detect's final class convs
        are replaced for the new class count (:func:`yolo_prune.models.reset_class_head`).
        """
        if not isinstance(weights, nn.Module):
            return super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        model = weights.float()
        nc, model_nc = int(self.data["nc"]), _model_nc(model)
        if model_nc is not None and model_nc != nc:
            if _rebuild_keeps_shapes(model, model_nc):
                LOGGER.info(f"model has nc={model_nc}, data nc={nc}: rebuilding the class head (model is unpruned)")
                return super().get_model(cfg=cfg, weights=weights, verbose=verbose)
            from ..models import reset_class_head

            kept = reset_class_head(model, nc, names=self.data.get("names"))
            LOGGER.info(f"model has nc={model_nc}, data nc={nc}: new class output convs for the pruned head "
                        f"({kept} class(es) kept by name), every other weight kept")
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)
        if hasattr(model, "criterion"):
            model.criterion = None  # rebuilt lazily with this run's hyperparameters
        model.train()
        set_names = getattr(self, "set_model_names_for_load", None)  # ultralytics >= 8.4
        return set_names(model) if set_names is not None else model

    def get_validator(self) -> Any:
        """ultralytics' validator, built from ``self.args`` without :attr:`extra_arg_keys`."""
        full, hidden = self.args, self.all_extra_arg_keys()
        self.args = IterableSimpleNamespace(**{k: v for k, v in vars(full).items() if k not in hidden})
        try:
            return super().get_validator()
        finally:
            self.args = full

    def get_dataset(self) -> dict:
        """ultralytics' dataset check, with its errors turned into :class:`DatasetError`."""
        try:
            return super().get_dataset()
        except RuntimeError as e:
            raise DatasetError(str(e).replace("❌ ", "")) from None

    # Checkpoints ----------------------------------------------------------------------------------
    def save_model(self) -> bool:
        """ultralytics' ``save_model``, but ``last.pt`` and ``best.pt`` are replaced atomically."""
        last, best = Path(self.last), Path(self.best)
        tmp_last, tmp_best = last.with_name(f".{last.name}.tmp"), best.with_name(f".{best.name}.tmp")
        for t in (tmp_last, tmp_best):
            t.unlink(missing_ok=True)
        self.last, self.best = tmp_last, tmp_best
        try:
            saved = super().save_model()
            if tmp_best.exists():
                os.replace(tmp_best, best)
            if tmp_last.exists():
                os.replace(tmp_last, last)
        finally:
            self.last, self.best = last, best
            for t in (tmp_last, tmp_best):
                t.unlink(missing_ok=True)
        return saved

    def resume_training(self, ckpt: dict | None) -> None:
        """ultralytics' resume, then drop ``results.csv`` rows of epochs the checkpoint does not contain
        (a run killed between writing the epoch's metrics and its checkpoint would log that epoch twice)."""
        super().resume_training(ckpt)
        if ckpt is not None and self.resume and RANK in {-1, 0}:
            _trim_results_csv(Path(self.csv), self.start_epoch)

    # DDP -------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Train. Under ultralytics DDP an input checkpoint stored in the run folder is moved out of the
        way while the launcher wipes the folder, and put back afterwards."""
        src = Path(str(self.args.model or ""))
        save_dir = Path(self.save_dir).resolve()
        if not (self.ddp and not self.resume and src.suffix == ".pt" and src.is_file()):
            return super().train()
        src = src.resolve()
        if save_dir not in src.parents:
            return super().train()
        tmp = save_dir.parent / f".{save_dir.name}.{src.name}"
        shutil.copy2(src, tmp)
        self.args.model = self.model = str(tmp)
        try:
            return super().train()
        finally:
            src.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, src)
            self.args.model = self.model = str(src)


def _trim_results_csv(path: Path, last_epoch: int) -> None:
    """Keep the header and the rows of epochs ``<= last_epoch`` (1-based, as ultralytics writes them)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = lines[:1]
    for line in lines[1:]:
        try:
            epoch = float(line.split(",", 1)[0])
        except ValueError:
            epoch = None
        if epoch is not None and epoch <= last_epoch:
            keep.append(line)
    if len(keep) != len(lines):
        write_text(path, "\n".join(keep) + "\n")


def _model_nc(model: nn.Module) -> int | None:
    """Class count of a detection model: its head's ``nc`` (``DetectionModel`` has no ``nc`` until trained)."""
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    nc = getattr(head, "nc", None) or getattr(model, "nc", None)
    return None if nc is None else int(nc)


def _rebuild_keeps_shapes(model: nn.Module, nc: int) -> bool:
    """True if ``DetectionModel(model.yaml)`` has exactly the parameter names and shapes of ``model``."""
    try:
        rebuilt = DetectionModel(model.yaml, nc=nc, verbose=False)
    except Exception:
        return False
    a = {k: v.shape for k, v in model.state_dict().items()}
    b = {k: v.shape for k, v in rebuilt.state_dict().items()}
    return a == b


# --------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class TrainResult(Result):
    """Outcome of :func:`~yolo_prune.train.sparse_train` or :func:`~yolo_prune.train.finetune`.

    ``map50_95`` / ``map50`` are the trainer's final validation (of ``best.pt``). The gamma fields are
    filled by sparsity training only: mean |gamma| over every BatchNorm channel, and the fraction of
    channels with |gamma| < ``gamma_threshold``, before and after training. ``teacher`` / ``distill`` are
    the checkpoint distilled from and the kind of distillation, None without a teacher.
    """

    mode: str
    save_dir: Path
    best: Path | None
    last: Path | None
    epochs: int
    map50_95: float | None = None
    map50: float | None = None
    sr: float | None = None
    sr_schedule: str | None = None
    gamma_threshold: float | None = None
    gamma_mean_before: float | None = None
    gamma_near_zero_before: float | None = None
    gamma_mean_after: float | None = None
    gamma_near_zero_after: float | None = None
    teacher: str | None = None
    distill: str | None = None
    sr_mode: str | None = None
    gamma_zero_after: float | None = None  # fraction of gammas exactly 0
    free_macs_after: float | None = None  # fraction of conv MACs pruning at gamma_threshold removes for free

    def rows(self) -> list[tuple[str, Any]]:
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and (f.name.startswith(("gamma", "sr", "free_macs")) or f.name in ("teacher", "distill")):
                continue  # sparsity fields of a fine-tune, distillation fields of a run without teacher
            out.append((f.name, str(v) if isinstance(v, Path) else v))
        return out


# --------------------------------------------------------------------------------------------- helpers
def unwrap_detection_model(model: Any) -> nn.Module:
    """Return the ``DetectionModel`` of an ultralytics ``YOLO`` object (or the module itself)."""
    inner = model if isinstance(model, DetectionModel) else getattr(model, "model", None)  # YOLO is a Module too
    if not isinstance(inner, DetectionModel):
        raise ModelLoadError(
            f"expected a .pt path, an ultralytics YOLO detection model or a DetectionModel, got {type(model).__name__}"
        )
    return inner


def save_input_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Save an in-memory model as an ultralytics-loadable checkpoint (float32, so nothing is lost)."""
    import copy

    m = copy.deepcopy(model).cpu().float()
    if hasattr(m, "criterion"):
        m.criterion = None
    for p in m.parameters():
        p.requires_grad_(False)
    args = getattr(model, "args", None)
    args = dict(args) if isinstance(args, dict) else dict(vars(args)) if args is not None else {}
    ckpt = {"model": m, "train_args": args, "date": datetime.now().astimezone().isoformat()}
    return atomic_write(path, lambda p: torch.save(ckpt, p))


def resolve_data_yaml(data: Any) -> str:
    """Return a YOLO-format data yaml ultralytics can train on.

    The single call site of ``yolo_prune.data.resolve_data`` (which also converts COCO-format input);
    without that module a path to a YOLO data yaml is required.
    """
    try:
        from ..data import resolve_data  # type: ignore[attr-defined]
    except ImportError:
        resolve_data = None
    if resolve_data is not None:
        return str(resolve_data(data).yaml)
    if data is None:
        raise DatasetError("no dataset given: data= must be a dataset yaml")
    path = Path(str(data))
    if path.suffix.lower() not in {".yaml", ".yml"}:
        raise DatasetError(f"data must be a YOLO-format dataset yaml, got {data}")
    if not path.is_file():
        raise DatasetError(f"dataset yaml not found: {data}")
    return str(path)


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


def _check_model_path(model: str | Path) -> str:
    path = Path(model)
    suffix = path.suffix.lower()
    if suffix in {".yaml", ".yml"}:
        return str(model)  # a model yaml (random init); ultralytics resolves its own names such as yolov8n.yaml
    if suffix != ".pt":
        raise ModelLoadError(f"model must be a .pt checkpoint or a model yaml, got {model}")
    if not path.is_file():
        raise ModelLoadError(f"model not found: {model}")
    try:
        loaded, _ = load_checkpoint(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load {model}: {e}") from None
    if not isinstance(loaded, DetectionModel):
        raise ModelLoadError(f"{model} is not a detection model ({type(loaded).__name__})")
    return str(path)


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
def quiet_logs(verbose: bool) -> Iterator[None]:
    """Silence ultralytics' INFO logs (and so its progress bars) unless ``verbose``."""
    if verbose:
        yield
        return
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


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


def _final_metrics(trainer: Any) -> tuple[float | None, float | None]:
    metrics = getattr(trainer, "metrics", None)
    if not metrics or MAP50_95_KEY not in metrics:  # e.g. DDP parent: the workers validated
        metrics = {}
        for ckpt_path in (trainer.best, trainer.last):
            if Path(ckpt_path).is_file():
                from ultralytics.utils.patches import torch_load

                metrics = torch_load(ckpt_path, map_location="cpu", weights_only=False).get("train_metrics") or {}
                break
    m95, m50 = metrics.get(MAP50_95_KEY), metrics.get(MAP50_KEY)
    return (None if m95 is None else float(m95)), (None if m50 is None else float(m50))


def run_training(
    trainer_cls: type,
    mode: str,
    model: Any,
    data: Any,
    *,
    epochs: int,
    imgsz: int,
    batch: int,
    device: str | int | None,
    project: str | Path | None,
    name: str | None,
    exist_ok: bool,
    seed: int,
    resume: bool | str | Path,
    verbose: bool = False,
    extra: dict[str, Any] | None = None,
    train_args: dict[str, Any] | None = None,
) -> tuple[Any, TrainResult]:
    """Build ``trainer_cls`` for the run folder ``<project>/<name>`` (default ``runs/<mode>/<mode>``), train, summarise.

    ``extra`` are trainer-specific options (e.g. ``sr``) that the trainer itself pops from its overrides.
    Returns the trainer and a :class:`TrainResult` (sparsity fields left to the caller).
    """
    train_args = dict(train_args or {})
    _check_train_args(train_args, model)
    if resume:
        last = _find_resume_checkpoint(model, resume, project, mode, name)
        save_dir = last.resolve().parent.parent  # where last.pt is now, even if the run folder was moved
        overrides: dict[str, Any] = {"model": str(last), "resume": str(last), "save_dir": str(save_dir),
                                     "plots": False,
                                     "data": _resume_data(last) if data is None else resolve_data_yaml(data)}
        if device is not None:
            overrides["device"] = str(device)
    else:
        if not isinstance(epochs, int) or epochs < 1:
            raise UsageError(f"epochs must be a positive integer, got {epochs!r}")
        model_path = _check_model_path(model) if isinstance(model, (str, Path)) else None
        module = unwrap_detection_model(model) if model_path is None else None
        data_yaml = resolve_data_yaml(data)
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
        if device is not None:
            overrides["device"] = str(device)
    overrides.update(train_args)
    with quiet_logs(verbose), sigterm_as_interrupt():
        try:
            trainer = trainer_cls(overrides=overrides)
        except SyntaxError as e:  # ultralytics' unknown-key error
            raise UsageError(str(e).strip().splitlines()[-1] if str(e).strip() else str(e)) from None
        if not verbose:  # ultralytics' own output is silenced: one line per epoch on the yolo_prune logger instead
            EpochProgress(mode).attach(trainer)
        trainer.train()
    map50_95, map50 = _final_metrics(trainer)
    result = TrainResult(
        mode=mode,
        save_dir=Path(trainer.save_dir),
        best=Path(trainer.best) if Path(trainer.best).is_file() else None,
        last=Path(trainer.last) if Path(trainer.last).is_file() else None,
        epochs=int(trainer.epochs),
        map50_95=map50_95,
        map50=map50,
    )
    return trainer, result
