"""Shared helpers of the benchmark scripts: environment, work folder, datasets, JSON results.

Everything a benchmark writes goes under ``bench/work/`` (git-ignored) except the small result JSONs and
plots in ``bench/results/``. ``../shared`` is never written: the coco128 split links its images and writes
its own jsons; yolo-prune's dataset cache is pointed at ``bench/work/cache``.

Result JSONs record paths relative to the project root (``bench/work/...``) or as ``../shared/fixtures/...``
(:func:`rel`; :func:`write_result` applies it to every absolute path), never the absolute paths of the machine
that ran them; a script reading a recorded path back turns it into a usable one with :func:`resolve`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from typing_extensions import Self

os.environ.setdefault("YOLO_OFFLINE", "1")  # no network on these machines

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"
RESULTS = BENCH / "results"
# ``../shared/fixtures`` from the checkout; $YOLO_PRUNE_FIXTURES points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("YOLO_PRUNE_FIXTURES") or ROOT.parent / "shared" / "fixtures")
WEIGHTS = SHARED / "weights" / "yolov8n_coco_int8rebuild.pt"
COCO128 = SHARED / "coco128"

os.environ.setdefault("YOLO_PRUNE_CACHE", str(WORK / "cache"))


def machine() -> dict[str, Any]:
    """CPU model, core count, library versions and the load average when the run started."""
    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch
    import torch_pruning
    import ultralytics

    try:
        import faster_coco_eval

        fce = faster_coco_eval.__version__
    except ImportError:
        fce = None
    from yolo_prune.latency import cpu_model

    try:
        import openvino

        ov = openvino.__version__
    except ImportError:
        ov = None
    return {
        "cpu": cpu,
        "cpu_isa": cpu_model(),  # model name and avx2/avx512 flags: onnxruntime's and OpenVINO's kernels depend on them
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ultralytics": ultralytics.__version__,
        "torch_pruning": torch_pruning.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": ov,
        "faster_coco_eval": fce,
        "loadavg_start": list(os.getloadavg()),
    }


def command_line() -> str:
    """The command that is running, as it would be typed from the project root (``python -m bench.X ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # started with python -m
        return " ".join(["python", "-m", spec.name.removesuffix(".__main__"), *map(shlex.quote, sys.argv[1:])])
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def busy_processes(threshold: float = 20.0) -> list[str]:
    """Other processes using more than ``threshold`` % CPU right now (the machine is shared)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[1:]
    except OSError:
        return []
    me = os.getpid()
    rows = []
    for line in out:
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        pid, pcpu, args = parts
        if int(pid) == me or float(pcpu) < threshold:
            continue
        rows.append(f"{pcpu}% {args[:100]}")
    return rows


SHARED_PREFIX = "../shared/fixtures"  # how a result records a path in SHARED, wherever SHARED really is


def rel(path: str | os.PathLike) -> str:
    """``path`` as a result records it: ``../shared/fixtures/...`` inside :data:`SHARED`, relative to the project
    root inside it (``bench/work/...``); a relative path, or one outside both, is returned unchanged."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    for base, prefix in ((SHARED, Path(SHARED_PREFIX)), (ROOT, Path())):
        for b in dict.fromkeys((Path(os.path.abspath(base)), Path(base).resolve())):
            if p.is_relative_to(b):
                return (prefix / p.relative_to(b)).as_posix()
    return str(path)


def resolve(recorded: str | os.PathLike) -> Path:
    """A path read back from a result (see :func:`rel`) as a usable path: ``../shared/fixtures/...`` in
    :data:`SHARED`, another relative path under the project root, an absolute one unchanged."""
    p = Path(recorded)
    if p.is_absolute():
        return p
    prefix = Path(SHARED_PREFIX)
    if p.is_relative_to(prefix):
        return SHARED / p.relative_to(prefix)
    return ROOT / p


def relative_paths(value: Any) -> Any:
    """``value`` (a JSON-able structure) with every absolute path in it (a ``Path``, or a string that is one
    whole path) passed through :func:`rel`: what :func:`write_result` stores."""
    if isinstance(value, dict):
        return {relative_paths(k): relative_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and os.path.isabs(value):
        return rel(value)
    return value


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` atomically (indent 1, small), paths relative (:func:`relative_paths`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(relative_paths(payload), indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class Timer:
    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


# Datasets --------------------------------------------------------------------------------------------------------


def coco128_split(n_train: int = 96, root: Path | None = None) -> Path:
    """COCO-format dataset of coco128: the first ``n_train`` images (sorted by file name) train, the rest val.

    Images are symlinked from ``../shared``; the two instances jsons are filtered copies of coco128's json
    (original image ids and category ids, all 80 categories declared). Returns the data yaml.
    """
    root = root or WORK / "data" / f"coco128_split{n_train}"
    yaml = root / "coco.yaml"
    if yaml.is_file():
        return yaml
    src = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text(encoding="utf-8"))
    images = sorted(src["images"], key=lambda im: im["file_name"])
    splits = {"train": images[:n_train], "val": images[n_train:]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, imgs in splits.items():
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        ids = {im["id"] for im in imgs}
        for im in imgs:
            link = folder / im["file_name"]
            if not link.exists():
                link.symlink_to((COCO128 / "images" / "train2017" / im["file_name"]).resolve())
        doc = {k: v for k, v in src.items() if k not in ("images", "annotations")}
        doc["images"] = imgs
        doc["annotations"] = [a for a in src["annotations"] if a["image_id"] in ids]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc), encoding="utf-8")
    yaml.write_text("# coco128 split for yolo-prune benchmarks (bench/common.py)\n"
                    "train: images/train\nval: images/val\n"
                    "train_json: annotations/instances_train.json\nval_json: annotations/instances_val.json\n",
                    encoding="utf-8")
    return yaml


def coco128_full() -> Path:
    """COCO-format coco128 (all 128 images as val, as the fixture's yaml does): for evaluation timing."""
    root = WORK / "data" / "coco128_all"
    yaml = root / "coco.yaml"
    if yaml.is_file():
        return yaml
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").symlink_to((COCO128 / "images" / "train2017").resolve())
    yaml.write_text("train: images\nval: images\n"
                    f"train_json: {(COCO128 / 'annotations' / 'instances_train2017.json').resolve()}\n"
                    f"val_json: {(COCO128 / 'annotations' / 'instances_train2017.json').resolve()}\n",
                    encoding="utf-8")
    return yaml


def synthetic(n_train: int = 128, n_val: int = 32, imgsz: int = 256) -> Path:
    """The generated dataset (yolo_prune.data.synthetic); returns its YOLO-format yaml."""
    from yolo_prune.data.synthetic import make_synthetic

    root = make_synthetic(WORK / "data" / f"synthetic_{n_train}_{n_val}_{imgsz}", n_train=n_train, n_val=n_val,
                          imgsz=imgsz, seed=0)
    return Path(root) / "yolo.yaml"


BCCD = SHARED / "bccd"


def bccd() -> Path:
    """The bccd dataset in COCO format (``../shared/fixtures/bccd/bccd_coco.yaml``): yolo-prune converts it into
    its own cache (``bench/work/cache``), so nothing is ever written beside the read-only fixture."""
    return BCCD / "bccd_coco.yaml"


def bccd_dense(epochs: int = 12, imgsz: int = 416) -> Path:
    """The realistic custom-data model: the fixture COCO yolov8n fine-tuned on bccd train (ultralytics defaults,
    ``optimizer=auto``, batch 16, ``epochs`` at ``imgsz``), trained once and cached in ``bench/work``.

    The class head is rebuilt for bccd's 3 classes; every other weight starts from the COCO checkpoint.
    Returns ``best.pt`` (selected on bccd val, as a user's own training would).
    """
    from yolo_prune.train import finetune

    folder = WORK / "dense" / f"bccd_e{epochs}_{imgsz}"
    best = folder / "weights" / "best.pt"
    if best.is_file():
        return best
    finetune(str(WEIGHTS), str(bccd()), epochs=epochs, imgsz=imgsz, batch=16, seed=0, project=folder.parent,
             name=folder.name, exist_ok=True, workers=2)
    return best
