"""``yolo-prune MODE key=value ...``: a thin shell over the Python API.

Errors a user can cause (:class:`~yolo_prune.errors.YoloPruneError`) print one line and exit with a
non-zero status (2 for usage errors); ``verbose=True`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from . import __version__, options
from .bench import measure_latency
from .config import build, default_cfg_path, parse_argv
from .demo import demo
from .errors import UsageError, YoloPruneError
from .evaluate import evaluate
from .deploy import export_model
from .io import run_dir, write_json, write_text, write_yaml
from .job import pipeline_from_cfg
from .run import backend_list
from .stages.prune import prune
from .stages.qat import check_qat, qat_export
from .stages.sensitivity import sensitivity
from .stages.sparsify import sparsify
from .train import finetune, sparse_train

LOGGER = logging.getLogger("yolo_prune")

HELP = f"""yolo-prune {__version__}: prune ultralytics YOLOv8 detectors for real (smaller tensors, faster models).

Usage: yolo-prune MODE key=value ...

Modes:
  demo      the whole pipeline on a generated dataset with a tiny model (no download, a few minutes on CPU)
  pipeline  sparse -> prune -> finetune -> val [-> int8] -> bench in one run folder (model= data= [int8=True runtime=])
  sparse    sparsity training: drive BatchNorm gammas to 0    (model= data= sr_mode= sr= epochs=)
  prune     rank channels and remove them       (model= method= target_macs= | target_latency= runtime= | ratio=)
  sparsify  zero single weights (unstructured; smaller gzip, not faster)   (model= amount= scope= method=)
  sensitivity  per channel group: the loss when it alone is pruned at 25/50/75%  (model= data=)
  finetune  train a pruned checkpoint, keeping its architecture      (model= data= epochs= [teacher=dense.pt])
  val       COCO mAP (pycocotools) of a model on a YOLO- or COCO-format dataset  (model= data=)
            model= also takes an export: x.onnx, x_int8.onnx, x_openvino_model/, x_int8_openvino_model/
  bench     CPU latency in torch, onnxruntime, openvino               (model=a.pt,b.pt; first is reference)
  export    export with ultralytics         (model= format=onnx; INT8: format=openvino|onnx int8=True data=)
            format=openvino int8=True max_map_drop=0.01: layers kept in FP32 until mAP50-95 drops <= 0.01
            int8=True qat_epochs=N: quantization-aware training (NNCF) for N epochs first, then the INT8 export
  cfg       print the default configuration with every key documented
  version   print the version

Examples:
  yolo-prune demo
  yolo-prune prune model=best.pt method=bn target_macs=0.5
  yolo-prune prune model=runs/sparse/sparse/weights/last.pt threshold=0.01   # only the zeroed channels, lossless
  yolo-prune sparsify model=best.pt amount=0.5 data=data.yaml
  yolo-prune sensitivity model=best.pt data=data.yaml
  yolo-prune pipeline model=best.pt data=coco.yaml cfg=slim.yaml
  yolo-prune val model=runs/prune/prune/weights/pruned.pt data=data.yaml

Configuration: defaults in {default_cfg_path()}, a recipe with cfg=recipe.yaml, then key=value
(later wins). Any ultralytics train/val key (lr0, mosaic, amp, ...) passes through.

Run folders, as in ultralytics: project=P name=N writes to P/N (P relative to the working folder, or absolute);
without project=, runs/MODE/NAME (NAME defaults to the mode); an existing folder gets NAME2, NAME3... unless
exist_ok=True. Training prints one line per epoch; verbose=True shows ultralytics' full output instead.
Resume an interrupted run with its own settings (no data= needed):
  yolo-prune finetune model=runs/finetune/finetune/weights/last.pt resume=True     (sparse alike)
  yolo-prune pipeline model=runs/pipeline/pipeline resume=True
"""


def _setup_logging() -> None:
    """yolo-prune's own progress messages go to stderr; the library alone stays quiet (no handler)."""
    for h in [h for h in LOGGER.handlers if getattr(h, "_yolo_prune_cli", False)]:
        LOGGER.removeHandler(h)  # main() may run more than once in a process (tests, notebooks)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._yolo_prune_cli = True
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def mode_keys(cfg: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    """The keys the schema gives ``mode`` (model, data and mode itself left out): what its API function takes."""
    mode = mode or cfg["mode"]
    return {k.name: cfg[k.name] for k in options.keys_for(mode) if k.group != "input"}


def run_sparse(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    return sparse_train(cfg["model"], _data(cfg), **{**mode_keys(cfg), "target_macs": options.target_macs(cfg)},
                        **extra)


def run_prune(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    return prune(cfg["model"], data=cfg["data"], validate=cfg["data"] is not None, progress=True,
                 **{**mode_keys(cfg), "target_macs": options.target_macs(cfg)})


def run_sparsify(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    return sparsify(cfg["model"], data=cfg["data"], train_args=extra, **mode_keys(cfg))


def run_sensitivity(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    keys = mode_keys(cfg)
    return sensitivity(cfg["model"], _need(cfg, "data"), validate=keys.pop("sensitivity_validate"), progress=True,
                       **keys)


def run_finetune(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    return finetune(cfg["model"], _data(cfg), **mode_keys(cfg), **extra)


def run_val(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    save_dir = _run_folder(cfg, "val")
    return evaluate(cfg["model"], _need(cfg, "data"), imgsz=cfg["imgsz"], batch=cfg["batch"], device=cfg["device"],
                    conf=cfg["conf"], iou=cfg["iou"], save_dir=save_dir)


def run_bench(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    paths = [p.strip() for p in str(cfg["model"]).split(",") if p.strip()]
    stems = [Path(p).stem for p in paths]
    models = {(stem if stems.count(stem) == 1 else p): p for stem, p in zip(stems, paths)}  # unique names
    save_dir = _run_folder(cfg, "bench")
    result = measure_latency(models, imgsz=cfg["imgsz"], backends=backend_list(cfg["backends"]), runs=cfg["bench_runs"],
                             warmup=cfg["bench_warmup"], seed=cfg["seed"], threads=cfg["threads"], progress=True)
    write_json(save_dir / "latency.json", result.to_dict())
    write_text(save_dir / "latency.md", result.markdown() + "\n")
    return result


def run_export(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    qat_epochs = check_qat(cfg["qat_epochs"], int8=cfg["int8"], fmt=str(cfg["format"]).lower(), data=cfg["data"],
                           max_map_drop=cfg["max_map_drop"])
    save_dir = _run_folder(cfg, "export")
    if qat_epochs:  # quantization-aware training first (ultralytics train keys in extra go to it)
        return qat_export(cfg["model"], cfg["data"], format=cfg["format"], qat_epochs=qat_epochs, imgsz=cfg["imgsz"],
                          save_dir=save_dir, batch=cfg["batch"], workers=cfg["workers"], device=cfg["device"],
                          seed=cfg["seed"], verbose=cfg["verbose"], train_args=extra)
    return export_model(cfg["model"], format=cfg["format"], imgsz=cfg["imgsz"], save_dir=save_dir, int8=cfg["int8"],
                        data=cfg["data"], calib_images=cfg["calib_images"], seed=cfg["seed"],
                        max_map_drop=cfg["max_map_drop"], verbose=cfg["verbose"], **extra)


def run_pipeline(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    _data(cfg)
    return pipeline_from_cfg(cfg, extra)


def run_demo(cfg: dict[str, Any], extra: dict[str, Any]) -> Any:
    return demo(cfg, extra)


def _run_folder(cfg: dict[str, Any], mode: str) -> Path:
    """A new run folder holding the run's full configuration as args.yaml."""
    save_dir = run_dir(cfg["project"], mode, cfg["name"], exist_ok=cfg["exist_ok"])
    write_yaml(save_dir / "args.yaml", cfg)
    return save_dir


def _need(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) in (None, ""):
        raise UsageError(f"mode {cfg['mode']} needs {key}=...")
    return cfg[key]


def _data(cfg: dict[str, Any]) -> Any:
    """``data=``, required unless resuming (a resumed run takes it from its checkpoint or pipeline.json)."""
    return cfg["data"] if cfg["resume"] else _need(cfg, "data")


RUNNERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Any]] = {
    "sparse": run_sparse,
    "prune": run_prune,
    "sparsify": run_sparsify,
    "sensitivity": run_sensitivity,
    "finetune": run_finetune,
    "val": run_val,
    "bench": run_bench,
    "export": run_export,
    "pipeline": run_pipeline,
    "demo": run_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(a.replace(" ", "").lower() in ("verbose", "verbose=true", "verbose=1") for a in argv)
    _setup_logging()
    try:
        mode, overrides = parse_argv(argv)
        if mode == "help":
            print(HELP)
            return 0
        if mode == "version":
            print(__version__)
            return 0
        if mode == "cfg":
            print(options.default_yaml(), end="")
            return 0
        cfg, extra = build(mode, overrides)
        if not cfg["verbose"]:
            warnings.filterwarnings("ignore", category=FutureWarning)
        result = RUNNERS[mode](cfg, extra)
        print(result)
        return 0
    except YoloPruneError as e:
        if verbose:
            raise
        print(f"yolo-prune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("yolo-prune: interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
