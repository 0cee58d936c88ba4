"""Official COCO mAP of a detection, segmentation, pose or oriented-box model on any yolo-prune dataset.

:func:`evaluate` runs ultralytics' validator of the model's task over the val split (so its own P/R/mAP, and the
task's mask / pose / OBB mAP, come for free), while the ``Coco*Validator`` subclasses collect the predictions in COCO
results format with the dataset's ORIGINAL image ids and category ids. Those are written to ``predictions.json`` and
scored against the val ground truth json with pycocotools' COCOeval, or with faster-coco-eval (same numbers, faster)
when it is installed: ``bbox`` for every task (an oriented box by its axis-aligned extent), and ``segm`` beside it for
a segmentation model on COCO-format data (predicted masks as RLE at the original image size).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io as _io
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.models.yolo.obb import OBBValidator
from ultralytics.models.yolo.pose import PoseValidator
from ultralytics.models.yolo.segment import SegmentationValidator
from ultralytics.utils import ops

from .data.spec import DataSpec, resolve_data
from .errors import ModelLoadError, OutputError, UsageError
from .forms import PRUNABLE_TASKS, as_detection_model, model_task
from .io import write_json, write_text
from .logs import Progress, quiet_ultralytics
from .results import Result, table

BACKENDS = ("auto", "faster", "faster-coco-eval", "pycocotools")
#: The task metrics of :class:`ValResult` of each task (None for the other tasks).
TASK_KEYS = {"segment": ("mask_map50_95", "mask_map50", "ul_mask_map50_95", "ul_mask_map50"),
             "pose": ("pose_map50_95", "pose_map50"), "obb": ("obb_map50_95", "obb_map50")}
TASK_FIELDS = frozenset(k for keys in TASK_KEYS.values() for k in keys)


@dataclasses.dataclass
class ValResult(Result):
    """COCO metrics (``map*``, from COCOeval) and ultralytics' own metrics (``ul_*``, precision, recall).

    Area-range metrics are None when the ground truth has no object in that range (COCOeval reports -1).
    ``map*`` are box metrics for every task (an oriented box scored by its axis-aligned extent); the task's own
    metrics are set for its task only:

    - segment: ``mask_map50_95`` / ``mask_map50``: COCOeval ``segm`` when the val ground truth has masks (COCO-format
      data), else ultralytics' mask mAP; ``ul_mask_*``: ultralytics' mask mAP;
    - pose: ``pose_map50_95`` / ``pose_map50``: ultralytics' OKS keypoint mAP (sigmas 1/K unless the data yaml
      gives ``kpt_oks_sigmas``);
    - obb: ``obb_map50_95`` / ``obb_map50``: ultralytics' mAP by rotated-box IoU.
    """

    map50_95: float
    map50: float
    map75: float
    map_small: float | None
    map_medium: float | None
    map_large: float | None
    ul_map50_95: float
    ul_map50: float
    precision: float
    recall: float
    backend: str
    eval_seconds: float
    val_seconds: float
    n_images: int
    n_predictions: int
    imgsz: int
    data: str
    save_dir: Path | None = None
    predictions_json: Path | None = None
    metrics_json: Path | None = None
    val_json: Path | None = None
    per_class: dict[str, float | None] = dataclasses.field(default_factory=dict, repr=False)
    task: str = "detect"
    mask_map50_95: float | None = None
    mask_map50: float | None = None
    ul_mask_map50_95: float | None = None
    ul_mask_map50: float | None = None
    pose_map50_95: float | None = None
    pose_map50: float | None = None
    obb_map50_95: float | None = None
    obb_map50: float | None = None

    def rows(self) -> list[tuple[str, Any]]:
        """The table rows: a detection model's as they always were; another task's with its task and metrics."""
        return [(k, v) for k, v in super().rows()
                if not (k in TASK_FIELDS and v is None) and not (k == "task" and v == "detect")]

    def task_table(self) -> str:
        """Box and task mAP side by side, e.g. ``box  0.61  0.83`` / ``mask  0.52  0.80``."""
        rows = [("box", self.map50_95, self.map50)]
        for name in ("mask", "pose", "obb"):
            if getattr(self, f"{name}_map50_95") is not None:
                rows.append((name, getattr(self, f"{name}_map50_95"), getattr(self, f"{name}_map50")))
        return table(rows, header=("", "mAP50-95", "mAP50"))

    def __str__(self) -> str:
        text = super().__str__()
        return text if self.task == "detect" else f"{text}\n\n{self.task_table()}"

    def to_json(self) -> dict[str, Any]:
        """All fields, paths as strings (what ``metrics.json`` holds); the task metrics of other tasks left out."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
                if not (k in TASK_FIELDS and v is None)}


# Validator -------------------------------------------------------------------------------------------------------


class _CocoIdsMixin:
    """Collects COCO-format predictions with the dataset's original ids beside an ultralytics task validator.

    ultralytics' own json path (``save_json``) is kept off: it maps classes with the fixed COCO-80 table, takes image
    ids from numeric file names and runs its own evaluation. Here class index ``c`` maps to ``spec.category_ids[c]``
    and each image file to its id in ``spec.val_json``; predictions of classes the dataset does not have are dropped.
    After a run, ``jdict`` holds the predictions and ``coco_image_ids`` the ids of the images seen.
    """

    def __init__(self, spec: DataSpec, dataloader=None, save_dir=None, args=None, _callbacks=None) -> None:
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.spec = spec
        self.coco_image_ids: list[Any] = []
        self.unmatched_images: list[str] = []
        self._by_name = _unique_names(spec.val_image_ids)

    def init_metrics(self, model: torch.nn.Module) -> None:
        super().init_metrics(model)
        self.args.save_json = False
        self.is_coco = self.is_lvis = self.is_custom_json = self.build_gdict = False
        self.gdict = None
        self.class_map = list(self.spec.category_ids)
        self.coco_image_ids, self.unmatched_images = [], []

    def update_metrics(self, preds: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        super().update_metrics(preds, batch)
        for si, pred in enumerate(preds):
            pbatch = self._prepare_batch(si, batch)
            self.pred_to_json(self.scale_preds(pred, pbatch), pbatch)

    def coco_image_id(self, im_file: str) -> Any:
        """COCO image id of an image file of the val split (None if unknown)."""
        image_id = self.spec.image_id(im_file)
        return image_id if image_id is not None else self._by_name.get(Path(im_file).name)

    def pred_to_json(self, predn: dict[str, torch.Tensor], pbatch: dict[str, Any]) -> None:
        """Append the predictions of one image (boxes already scaled to the original image) to ``jdict``."""
        image_id = self.coco_image_id(pbatch["im_file"])
        if image_id is None:
            self.unmatched_images.append(pbatch["im_file"])
            return
        self.coco_image_ids.append(image_id)
        if not len(predn["cls"]):
            return
        boxes = self.coco_boxes(predn).tolist()
        for i, (box, score, cls) in enumerate(zip(boxes, predn["conf"].tolist(), predn["cls"].tolist())):
            if int(cls) < len(self.class_map):
                self.jdict.append({"image_id": image_id, "category_id": self.class_map[int(cls)],
                                   "bbox": [round(v, 3) for v in box], "score": round(score, 5),
                                   **self.extra_json(predn, i)})

    def coco_boxes(self, predn: dict[str, torch.Tensor]) -> torch.Tensor:
        """The predicted boxes as COCO (left, top, width, height) rows."""
        return ops.xyxy2ltwh(predn["bboxes"])

    def extra_json(self, predn: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        """More fields of the COCO result of prediction ``i`` (a task's mask, rotated box...)."""
        return {}


class CocoValidator(_CocoIdsMixin, DetectionValidator):
    """ultralytics' DetectionValidator that also collects COCO-format predictions with the dataset's original ids."""


class CocoSegmentValidator(_CocoIdsMixin, SegmentationValidator):
    """ultralytics' SegmentationValidator (box and mask mAP) that also collects COCO results with each predicted
    mask as compressed RLE at the original image size (masks are computed at the input resolution, as ultralytics
    does for its own json, then scaled back)."""

    def init_metrics(self, model: torch.nn.Module) -> None:
        super().init_metrics(model)
        self.process = ops.process_mask_native

    def extra_json(self, predn: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(predn["masks"][i].cpu().numpy().astype(np.uint8)))
        return {"segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}


class CocoPoseValidator(_CocoIdsMixin, PoseValidator):
    """ultralytics' PoseValidator (box and OKS keypoint mAP) that also collects the boxes as COCO results."""


class CocoOBBValidator(_CocoIdsMixin, OBBValidator):
    """ultralytics' OBBValidator (mAP by rotated IoU) that also collects COCO results: each rotated box by its
    axis-aligned extent (``bbox``), with ``rbox`` (cx, cy, w, h, angle) and ``poly`` (4 corners) beside it."""

    def coco_boxes(self, predn: dict[str, torch.Tensor]) -> torch.Tensor:
        corners = ops.xywhr2xyxyxyxy(predn["bboxes"])  # (n, 4, 2)
        return ops.xyxy2ltwh(torch.cat([corners.amin(1), corners.amax(1)], 1))

    def extra_json(self, predn: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        rbox = predn["bboxes"][i]
        return {"rbox": [round(v, 3) for v in rbox.tolist()],
                "poly": [round(v, 3) for v in ops.xywhr2xyxyxyxy(rbox[None]).view(-1).tolist()]}


#: The validator of each task.
VALIDATORS = {"detect": CocoValidator, "segment": CocoSegmentValidator, "pose": CocoPoseValidator,
              "obb": CocoOBBValidator}


def _unique_names(ids: dict[str, Any]) -> dict[str, Any]:
    """Base name -> image id for names that occur once (fallback when a path key does not match)."""
    by_name: dict[str, list] = {}
    for key, image_id in ids.items():
        by_name.setdefault(Path(key).name, []).append(image_id)
    return {name: v[0] for name, v in by_name.items() if len(v) == 1}


# COCO evaluation -------------------------------------------------------------------------------------------------


def resolve_backend(backend: str = "auto") -> str:
    """``"faster-coco-eval"`` or ``"pycocotools"`` for a requested backend (auto: faster-coco-eval if installed)."""
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "pycocotools":
        return "pycocotools"
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if backend != "auto":
            raise UsageError("backend='faster' needs faster-coco-eval: pip install faster-coco-eval") from None
        return "pycocotools"
    return "faster-coco-eval"


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def _results(predictions: Path, iou_type: str) -> str | list[dict[str, Any]]:
    """What ``loadRes`` reads: the file for boxes; for masks the results without their boxes (``loadRes`` would
    take a result with a ``bbox`` as a box result, giving the mask the box's area)."""
    if iou_type == "bbox":
        return str(predictions)
    return [{k: v for k, v in r.items() if k != "bbox"}
            for r in json.loads(Path(predictions).read_text(encoding="utf-8"))]


def _coco_api(backend: str, gt_json: Path, predictions: Path, iou_type: str = "bbox") -> Any:
    """A COCOeval object (not yet run) for the chosen backend."""
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster

        gt = COCO(str(gt_json), print_function=_silent)
        return COCOeval_faster(gt, gt.loadRes(_results(predictions, iou_type)), iouType=iou_type,
                               print_function=_silent)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(gt_json))
    if json.loads(Path(predictions).read_text(encoding="utf-8")):
        dt = gt.loadRes(_results(predictions, iou_type))
    else:  # pycocotools' loadRes cannot take an empty list
        dt = COCO()
        dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [], "categories": gt.dataset["categories"]}
        dt.createIndex()
    return COCOeval(gt, dt, iou_type)


def coco_eval(gt_json: str | Path, predictions: str | Path, *, backend: str = "auto",
              image_ids: Sequence[Any] | None = None, iou_type: str = "bbox") -> dict[str, Any]:
    """Score a COCO results json against a COCO instances json (``iou_type``: ``bbox`` or ``segm``).

    Returns ``map50_95, map50, map75, map_small, map_medium, map_large`` (None for an area range without ground
    truth), ``per_class`` (category name -> AP50-95) and ``backend``. ``image_ids`` restricts the images scored.
    """
    backend = resolve_backend(backend)
    with contextlib.redirect_stdout(_io.StringIO()):
        ev = _coco_api(backend, Path(gt_json), Path(predictions), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [float(x) for x in ev.stats[:6]]
    keys = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large")
    out: dict[str, Any] = {k: (None if v < 0 else v) for k, v in zip(keys, s)}
    out["per_class"] = _per_class_ap(ev)
    out["backend"] = backend
    return out


def _per_class_ap(ev: Any) -> dict[str, float | None]:
    """AP50-95 of each category (all areas, 100 detections), keyed by category name."""
    precision = np.asarray(ev.eval["precision"])  # [iou, recall, category, area, max_dets]
    cats = ev.cocoGt.loadCats(ev.params.catIds)
    out = {}
    for k, cat in enumerate(cats):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[str(cat["name"])] = float(p.mean()) if p.size else None
    return out


# evaluate() ------------------------------------------------------------------------------------------------------


def _out_dir(save_dir: str | Path | None, stack: contextlib.ExitStack) -> Path:
    if save_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="yolo_prune_val_")))
    path = Path(save_dir).expanduser().absolute()  # ultralytics gets an absolute folder, never a relative project
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {path}: {e.strerror or e}") from None
    return path


def exported_format(model: Any) -> str | None:
    """``"onnx"`` for a ``.onnx`` file, ``"openvino"`` for an OpenVINO export folder (holding an ``.xml``), else None
    (a checkpoint, yaml or in-memory model)."""
    if not isinstance(model, (str, Path)):
        return None
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.is_dir() and (next(path.glob("*.xml"), None) is not None or path.name.endswith("_openvino_model")):
        return "openvino"
    return None


def exported_metadata(path: str | Path, fmt: str) -> dict[str, Any]:
    """The metadata ultralytics' exporter stored with an ONNX file or an OpenVINO folder (``metadata.yaml``):
    ``names``, ``task``, ``imgsz``..."""
    path = Path(path)
    try:
        if fmt == "onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            meta = {k: (ast.literal_eval(v) if k in ("names", "imgsz", "kpt_shape") else v) for k, v in props.items()}
        else:
            meta = yaml.safe_load((path / "metadata.yaml").read_text(encoding="utf-8"))
        meta["names"] = dict(meta["names"])
    except FileNotFoundError:
        raise ModelLoadError(f"model file not found: {path}") from None
    except Exception as e:  # a foreign file without ultralytics' metadata, a corrupt one...
        raise ModelLoadError(f"{path} is not an ultralytics {fmt} export ({type(e).__name__}: no class names "
                             "in its metadata)") from None
    return meta


def exported_names(path: str | Path, fmt: str) -> dict[int, str]:
    """The class names ultralytics' exporter stored with an ONNX file or an OpenVINO folder (``metadata.yaml``)."""
    return exported_metadata(path, fmt)["names"]


def exported_task(path: str | Path, meta: dict[str, Any]) -> str:
    """The task of an export from its :func:`exported_metadata` (``detect`` when it has none); a task yolo-prune does
    not take is refused."""
    task = str(meta.get("task") or "detect")
    if task not in PRUNABLE_TASKS:
        raise UsageError(f"{path} is a {task} export; yolo-prune validates detection, segmentation, pose and OBB "
                         "models")
    return task


def _check_classes(names: dict[int, str] | list[str], spec: DataSpec) -> None:
    n_model = len(names)
    if n_model < spec.nc:
        raise UsageError(f"the model predicts {n_model} classes but {spec.source.name} has {spec.nc}")
    if n_model > spec.nc:
        warnings.warn(f"the model predicts {n_model} classes but {spec.source.name} has {spec.nc}: predictions of "
                      f"classes {spec.nc}..{n_model - 1} are left out of the COCO metrics", stacklevel=3)


def _size(imgsz: Any) -> int:
    """The validated image size (ultralytics keeps an export's ``[h, w]``): its larger side."""
    return int(max(imgsz)) if isinstance(imgsz, (list, tuple)) else int(imgsz)


def _stat(stats: dict[str, Any], name: str, suffix: str = "B") -> float:
    """An ultralytics metric (``metrics/<name>(B)``: box, ``M`` mask, ``P`` pose) from a validator's stats."""
    return float(stats.get(f"metrics/{name}({suffix})", 0.0))


def _task_metrics(task: str, stats: dict[str, Any], spec: DataSpec, preds_path: Path, backend: str,
                  image_ids: Sequence[Any] | None) -> dict[str, float]:
    """The :data:`TASK_FIELDS` of ``task`` (ultralytics' numbers; COCOeval ``segm`` when the data has masks)."""
    suffix = {"segment": "M", "pose": "P", "obb": "B"}[task]
    out = {k: _stat(stats, "mAP50-95" if k.endswith("50_95") else "mAP50", suffix) for k in TASK_KEYS[task]}
    if task == "segment" and spec.task == "segment":  # COCO-format data: its own masks
        segm = coco_eval(spec.val_json, preds_path, backend=backend, image_ids=image_ids, iou_type="segm")
        out["mask_map50_95"], out["mask_map50"] = segm["map50_95"] or 0.0, segm["map50"] or 0.0
    return out


def _run_validator(net: torch.nn.Module, spec: DataSpec, args: dict[str, Any], out: Path,
                   verbose: bool, progress: bool = False) -> tuple[CocoValidator, dict[str, Any], float]:
    """Run the task's validator (:data:`VALIDATORS`) on the val split; return it, ultralytics' stats and the
    seconds taken."""
    validator = VALIDATORS[args["task"]](spec, save_dir=out, args=args)
    if progress and not verbose:  # (verbose: ultralytics' own bar)
        _attach_progress(validator)
    t0 = time.perf_counter()
    with quiet_ultralytics(verbose):
        stats = validator(model=net)
    seconds = time.perf_counter() - t0
    if validator.unmatched_images:
        warnings.warn(f"{len(validator.unmatched_images)} val images are not in {spec.val_json} and were left "
                      f"out of the COCO metrics (e.g. {validator.unmatched_images[0]})", stacklevel=3)
    return validator, stats, seconds


def _attach_progress(validator: DetectionValidator) -> None:
    """Progress lines of the validation batches (:class:`~yolo_prune.logs.Progress`), by ultralytics callbacks."""
    bars: dict[str, Progress] = {}

    def start(v: Any) -> None:
        bars["bar"] = Progress("validation", len(v.dataloader), unit="batches")

    validator.add_callback("on_val_start", start)
    validator.add_callback("on_val_batch_end", lambda v: bars["bar"].update())
    validator.add_callback("on_val_end", lambda v: bars["bar"].close())


def evaluate(model: Any, data: str | Path | DataSpec, *, imgsz: int = 640, batch: int = 16,
             device: str | int | None = None, conf: float = 0.001, iou: float = 0.7,
             save_dir: str | Path | None = None, backend: str = "auto", verbose: bool = False,
             progress: bool = False) -> ValResult:
    """Validate ``model`` on the val split of ``data`` and score it with the official COCO protocol.

    The task (detect, segment, pose, obb) is the model's: its ultralytics validator runs and the result carries the
    task's metrics beside the box metrics (see :class:`ValResult`).

    Args:
        model: path to a .pt checkpoint (or model yaml), an ultralytics ``YOLO`` object or a ``DetectionModel``
            (or a segmentation, pose or OBB model);
            or an ultralytics export: a ``.onnx`` file or an OpenVINO folder (``*_openvino_model/``, FP32 or INT8),
            run by ultralytics' ``AutoBackend`` at the export's own image size when it is static.
        data: a YOLO- or COCO-format data yaml (see :func:`yolo_prune.data.resolve_data`) or a resolved DataSpec.
        imgsz, batch, device, conf, iou: as for ``yolo val`` (rectangular batches, no plots).
        save_dir: folder for ``predictions.json`` and ``metrics.json``; None keeps no files.
        backend: ``auto`` (faster-coco-eval if installed, else pycocotools), ``faster`` or ``pycocotools``.
        verbose: show ultralytics' progress bar and logs.
        progress: log progress lines of the batches on the ``yolo_prune`` logger instead (when not ``verbose``).
    """
    backend = resolve_backend(backend)
    spec = resolve_data(data)
    fmt = exported_format(model)
    if fmt is None:
        net = as_detection_model(model, tasks=PRUNABLE_TASKS)
        task, kpt_shape = model_task(net), getattr(net.model[-1], "kpt_shape", None)
        _check_classes(net.names, spec)
    else:  # ultralytics' AutoBackend runs it; a static export validates at its own input size
        net = str(Path(model).expanduser().absolute())
        meta = exported_metadata(net, fmt)
        task, kpt_shape = exported_task(net, meta), meta.get("kpt_shape")
        _check_classes(meta["names"], spec)
    spec = _check_task_data(spec, task, kpt_shape)
    args = {"data": str(spec.yaml), "imgsz": imgsz, "batch": batch, "conf": conf, "iou": iou, "task": task,
            "mode": "val", "split": "val", "rect": True, "plots": False, "verbose": False, "save_json": False}
    if device is not None:
        args["device"] = str(device)
    keep = save_dir is not None
    with contextlib.ExitStack() as stack:
        out = _out_dir(save_dir, stack)
        validator, stats, val_seconds = _run_validator(net, spec, args, out, verbose, progress)
        preds_path = write_text(out / "predictions.json", json.dumps(validator.jdict))
        seen = set(validator.coco_image_ids)  # score only the images ultralytics could load
        image_ids = None if seen == set(spec.val_image_ids.values()) else sorted(seen, key=str)
        t0 = time.perf_counter()
        coco = coco_eval(spec.val_json, preds_path, backend=backend, image_ids=image_ids)
        task_metrics = {} if task == "detect" else _task_metrics(task, stats, spec, preds_path, backend, image_ids)
        eval_seconds = time.perf_counter() - t0
        result = ValResult(
            map50_95=coco["map50_95"] or 0.0, map50=coco["map50"] or 0.0, map75=coco["map75"] or 0.0,
            map_small=coco["map_small"], map_medium=coco["map_medium"], map_large=coco["map_large"],
            ul_map50_95=_stat(stats, "mAP50-95"), ul_map50=_stat(stats, "mAP50"),
            precision=_stat(stats, "precision"), recall=_stat(stats, "recall"),
            backend=coco["backend"], eval_seconds=round(eval_seconds, 4), val_seconds=round(val_seconds, 3),
            n_images=int(validator.seen), n_predictions=len(validator.jdict), imgsz=_size(validator.args.imgsz),
            data=str(spec.source), save_dir=out if keep else None, predictions_json=preds_path if keep else None,
            metrics_json=out / "metrics.json" if keep else None, val_json=spec.val_json, per_class=coco["per_class"],
            task=task, **task_metrics,
        )
        if keep:
            write_json(out / "metrics.json", result.to_json())
    return result


def _check_task_data(spec: DataSpec, task: str, kpt_shape: Any = None) -> DataSpec:
    """The data resolved for ``task`` (COCO-format data gets outline labels for a segmentation model); a pose model
    needs a YOLO-format pose dataset with its own ``kpt_shape``."""
    if task == "obb" and spec.format == "coco":
        raise UsageError(f"{spec.source.name} is COCO-format data, which has no rotated boxes: an OBB model is "
                         "validated on a YOLO-format OBB dataset (x1 y1 ... x4 y4 labels)")
    if task in ("segment", "obb") and spec.format == "yolo" and _has_box_labels(spec.val_images):
        what = "outline (polygon)" if task == "segment" else "rotated-box (x1 y1 ... x4 y4)"
        article = "an" if task == "obb" else "a"
        raise UsageError(f"{spec.source.name} has box labels (cls cx cy w h): {article} {task} model is validated "
                         f"on {what} labels")
    if task == "segment":
        return resolve_data(spec, task="segment")
    if task == "pose":
        cfg = yaml.safe_load(Path(spec.yaml).read_text(encoding="utf-8-sig")) or {}
        if not isinstance(cfg, dict) or "kpt_shape" not in cfg:
            raise UsageError(f"{spec.source.name} has no kpt_shape: a pose model is validated on a YOLO-format pose "
                             "dataset (kpt_shape and keypoint labels)")
        if kpt_shape is not None and list(kpt_shape) != list(cfg["kpt_shape"]):
            raise UsageError(f"the model predicts keypoints of shape {list(kpt_shape)} but {spec.source.name} has "
                             f"kpt_shape {list(cfg['kpt_shape'])}")
    return spec


def _has_box_labels(images: Sequence[Path]) -> bool:
    """Whether a label file of these images has a box row (5 columns): not data of a segment or OBB model."""
    from ultralytics.data.utils import img2label_paths

    for label in img2label_paths([str(p) for p in images]):
        try:
            rows = Path(label).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        if any(len(row.split()) == 5 for row in rows):
            return True
    return False


# A fixed val sample scored from raw model outputs ------------------------------------------------------------------


class ValSample:
    """``n`` images of the val split of ``data`` preprocessed exactly as ``val`` preprocesses them for a static export
    (ultralytics' val dataset without ``rect``: square letterbox at ``imgsz``, no upscaling, batch 1, RGB floats in
    [0, 1]), and the COCO mAP50-95 of a model's raw outputs on any of them, scored like :func:`evaluate`
    (ultralytics' NMS at ``conf``/``iou``, boxes scaled back to the original images, the dataset's own ids, COCOeval).

    For callers that run the model themselves (an OpenVINO model being quantized has no folder ``val`` could read):
    ``inputs(item)`` is the model input of an item, ``score(outputs, items)`` the mAP50-95 of those items.
    """

    def __init__(self, data: str | Path | DataSpec, *, imgsz: int, n: int, conf: float = 0.001, iou: float = 0.7,
                 backend: str = "auto", end2end: bool = False, progress: bool = False) -> None:
        from ultralytics.data.utils import check_det_dataset

        self.spec, self.backend = resolve_data(data), resolve_backend(backend)
        args = {"data": str(self.spec.yaml), "imgsz": imgsz, "batch": 1, "conf": conf, "iou": iou, "task": "detect",
                "mode": "val", "split": "val", "rect": False, "plots": False, "verbose": False, "save_json": False}
        v = CocoValidator(self.spec, args=args)
        v.device, v.stride, v.end2end = torch.device("cpu"), 32, end2end
        v.class_map = list(self.spec.category_ids)
        with quiet_ultralytics(False):
            v.data = check_det_dataset(str(self.spec.yaml))
            dataset = v.build_dataset(v.data["val"], mode="val", batch=1)
        if n < 1:
            raise UsageError(f"the val sample needs at least 1 image, got {n}")
        picks = sorted({int(round(i)) for i in np.linspace(0, len(dataset) - 1, min(n, len(dataset)))})
        self.items: list[dict[str, Any]] = []
        for i in Progress("val images", len(picks), unit="images", enabled=progress).iterate(picks):
            self.items.append(v.preprocess(dataset.collate_fn([dataset[i]])))
        self._validator = v

    @staticmethod
    def inputs(item: dict[str, Any]) -> np.ndarray:
        """The ``(1, 3, imgsz, imgsz)`` float32 input of one item."""
        return item["img"].numpy()

    def score(self, outputs: Sequence[Any], items: Sequence[dict[str, Any]]) -> float:
        """COCO mAP50-95 over ``items`` of the raw outputs (``(1, 4 + nc, anchors)`` each) the model gave for them."""
        v = self._validator
        v.jdict, v.coco_image_ids, v.unmatched_images = [], [], []
        for out, item in zip(outputs, items):
            pred = v.postprocess(torch.as_tensor(np.asarray(out)))[0]
            pbatch = v._prepare_batch(0, item)
            v.pred_to_json(v.scale_preds(pred, pbatch), pbatch)
        if not v.coco_image_ids:
            return 0.0
        with tempfile.TemporaryDirectory(prefix="yolo_prune_score_") as tmp:
            preds = write_text(Path(tmp) / "predictions.json", json.dumps(v.jdict))
            coco = coco_eval(self.spec.val_json, preds, backend=self.backend,
                             image_ids=sorted(set(v.coco_image_ids), key=str))
        return float(coco["map50_95"] or 0.0)
