"""Resolve a dataset yaml (ultralytics YOLO format or yolo-prune COCO format) into a :class:`DataSpec`.

YOLO format: the user's yaml is what ultralytics trains and validates on; a COCO instances json of the val split is
generated from the YOLO labels (into the cache) so that every dataset gets the COCO evaluation protocol. A dataset
whose label folders are read-only (no write permission bits) is mirrored into the cache instead (images linked,
labels copied, a ``data.yaml``), because ultralytics writes ``labels/*.cache`` files beside the labels and, running
as root, would ignore the read-only bits.

COCO format (a yaml with ``train_json``/``val_json``, see ``datasets/README.md``): the json files are checked and
converted into an ultralytics-ready folder in the cache: images linked (copied when links fail), YOLO label files,
a ``data.yaml`` and the cleaned val ground truth ``val.json``. Nothing is ever written into the user's dataset.
For a segmentation model (``task="segment"``) the labels are the annotations' outlines (YOLO segment lines, in a
cache folder of their own) and ``val.json`` keeps their ``segmentation`` for COCO ``segm`` evaluation.

Cache: ``$YOLO_PRUNE_CACHE/data`` if the variable is set, else ``~/.cache/yolo_prune/data``, or ``cache_dir=``.
Each dataset gets a sub-folder named by a hash of its yaml/json paths and contents (and, for YOLO format, of the
val image and label file stamps), so a changed json gives a fresh conversion.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml as pyyaml

from ..errors import DatasetError, OutputError
from ..io import sha256_file, write_json, write_yaml
from .coco import (DataWarning, eval_json, load_coco_split, segment_lines, skip_message, yolo_lines,
                   yolo_split_to_coco)

CACHE_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class DataSpec:
    """Everything yolo-prune needs to know about a dataset.

    Attributes:
        source: the user's data yaml.
        yaml: a data yaml ultralytics can train and validate on directly: the user's own for a (writable) YOLO-format
            dataset, a generated one in the cache for COCO format or a read-only YOLO dataset.
        names: class names, index = class id of the model.
        nc: number of classes.
        val_json: COCO instances json of the val split (ground truth for COCO evaluation).
        category_ids: class index -> COCO category id of ``val_json``.
        train_images: train split image files (as ultralytics sees them), e.g. for calibration.
        val_images: val split image files kept for evaluation.
        format: ``"yolo"`` or ``"coco"``.
        cache: the cache folder of this dataset.
        val_image_ids: :func:`image_key` of each val image -> its COCO image id in ``val_json``.
        warnings: one line per file whose bad images/annotations were skipped.
        task: the task the labels were written for: ``"segment"`` for a COCO-format dataset resolved for a
            segmentation model (outlines as labels, ``segmentation`` in ``val_json``), else ``"detect"``.
    """

    source: Path
    yaml: Path
    names: list[str]
    nc: int
    val_json: Path
    category_ids: list[int]
    train_images: list[Path] = field(repr=False)
    val_images: list[Path] = field(repr=False)
    format: str
    cache: Path
    val_image_ids: dict[str, Any] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list, repr=False)
    task: str = "detect"

    def image_id(self, path: str | Path) -> Any:
        """COCO image id of a val image file, or None if it is not part of the val split."""
        return self.val_image_ids.get(image_key(path))


def image_key(path: str | Path) -> str:
    """Canonical key of an image file: its folder resolved, its own name kept (images may be symlinks)."""
    p = Path(os.path.abspath(path))
    return str(p.parent.resolve() / p.name)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Folder holding yolo-prune's converted datasets."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("YOLO_PRUNE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "yolo_prune") / "data"


def resolve_data(data: str | Path | DataSpec, *, cache_dir: str | Path | None = None,
                 task: str = "detect") -> DataSpec:
    """Resolve a YOLO-format or COCO-format data yaml into a :class:`DataSpec` (converting into the cache if needed).

    ``task``: the task of the model that will use it. Only ``"segment"`` changes anything, and only for COCO-format
    data: the labels are the annotations' outlines (polygons; RLE masks by their largest contour). YOLO-format data
    is used as it is (its labels are those of its task; pose labels are read by the yaml's ``kpt_shape``).

    Raises :class:`DatasetError` for problems with the whole dataset; single bad images or annotations are skipped
    with one :class:`DataWarning` per file counting them.
    """
    if isinstance(data, DataSpec):
        if task == "segment" and data.format == "coco" and data.task != "segment":
            return resolve_data(data.source, cache_dir=data.cache.parent, task=task)
        return data
    if data is None or str(data) == "":
        raise DatasetError("no dataset given (data=...)")
    source = Path(data).expanduser().absolute()
    if not source.is_file():
        raise DatasetError(f"{source}: data yaml not found")
    cfg = _load_yaml(source)
    root = cache_root(cache_dir)
    if any(str(k).endswith("_json") for k in cfg):
        return _resolve_coco(source, cfg, root, segment=task == "segment")
    return _resolve_yolo(source, cfg, root)


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        cfg = pyyaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    except pyyaml.YAMLError as e:
        raise DatasetError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise DatasetError(f"{path}: not a data yaml (expected a mapping with train/val keys)")
    return cfg


# Cache helpers ---------------------------------------------------------------------------------------------------


def _digest(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == CACHE_VERSION else None


def _cached(dest: Path, build: Callable[[Path], None]) -> dict[str, Any]:
    """Manifest of the cache folder ``dest``, building it first (in a temporary folder, then renamed) if needed."""
    manifest = _read_manifest(dest)
    if manifest is not None:
        return manifest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create cache folder {dest.parent}: {e.strerror or e}") from None
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        build(tmp)
        if dest.exists() and _read_manifest(dest) is None:  # an interrupted build: replace it
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if _read_manifest(dest) is None:  # not a concurrent build that finished first
                raise OutputError(f"cannot write cache folder {dest}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_manifest(dest) or {}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def _emit(messages: Iterable[str]) -> None:
    for m in messages:
        warnings.warn(m, DataWarning, stacklevel=4)  # -> caller of resolve_data


# COCO format -----------------------------------------------------------------------------------------------------


def _coco_split_paths(cfg: dict[str, Any], split: str, root: Path, source: Path) -> tuple[Path, Path] | None:
    """(image folder, json) of a split of a COCO-format yaml, None when the yaml has neither key."""
    images, js = cfg.get(split), cfg.get(f"{split}_json")
    if images is None and js is None:
        return None
    if not isinstance(images, str) or not isinstance(js, str):
        raise DatasetError(f"{source}: '{split}' (an image folder) and '{split}_json' (a COCO json) must both be set")
    return (root / images).expanduser().absolute(), (root / js).expanduser().absolute()


def _resolve_coco(source: Path, cfg: dict[str, Any], cache: Path, segment: bool = False) -> DataSpec:
    root = Path(str(cfg["path"])).expanduser() if cfg.get("path") else source.parent
    root = root if root.is_absolute() else source.parent / root
    val = _coco_split_paths(cfg, "val", root, source)
    if val is None:
        raise DatasetError(f"{source}: 'val' and 'val_json' are required in a COCO-format data yaml")
    train = _coco_split_paths(cfg, "train", root, source) or val
    for folder, js in (train, val):
        if not js.is_file():
            raise DatasetError(f"{js}: COCO json not found (from {source.name})")
        if not folder.is_dir():
            raise DatasetError(f"{folder}: image folder not found (from {source.name})")
    parts = [CACHE_VERSION, "coco"] + (["segment"] if segment else [])
    for folder, js in (train, val):
        parts += [str(folder.resolve()), str(js.resolve()), sha256_file(js)]
    dest = cache.expanduser().absolute().resolve() / f"coco-{_digest(parts)}"
    manifest = _cached(dest, lambda tmp: _build_coco(tmp, dest, source, train, val, segment))
    _emit(manifest["warnings"])
    val_images = [dest / rel for rel, _ in manifest["val_image_ids"]]
    return DataSpec(
        source=source, yaml=dest / "data.yaml", names=manifest["names"], nc=len(manifest["names"]),
        val_json=dest / "val.json", category_ids=manifest["category_ids"],
        train_images=[dest / rel for rel in manifest["train"]], val_images=val_images, format="coco", cache=dest,
        val_image_ids={image_key(p): iid for p, (_, iid) in zip(val_images, manifest["val_image_ids"])},
        warnings=list(manifest["warnings"]), task="segment" if segment else "detect",
    )


def _build_coco(tmp: Path, dest: Path, source: Path, train: tuple[Path, Path], val: tuple[Path, Path],
                segment: bool = False) -> None:
    """Convert a COCO-format dataset into ``tmp`` (which will be renamed to ``dest``); with ``segment``, the labels
    are outlines."""
    from ultralytics.data.utils import IMG_FORMATS

    formats = frozenset(IMG_FORMATS)
    val_split = load_coco_split(val[1], val[0], formats=formats, segments=segment)
    train_split = val_split if train == val else load_coco_split(train[1], train[0], formats=formats,
                                                                 segments=segment)
    if [(c["id"], c["name"]) for c in train_split.categories] != [(c["id"], c["name"]) for c in val_split.categories]:
        raise DatasetError(f"{train[1]}: categories differ from those of {val[1].name}")
    if not any(not a.get("iscrowd", 0) for a in val_split.annotations):
        raise DatasetError(f"{val[1]}: no usable annotations in the val split")
    files = {name: _write_yolo_split(tmp, name, split) for name, split in (("train", train_split), ("val", val_split))}
    write_json(tmp / "val.json", eval_json(val_split, segmentation=segment))
    names = val_split.names
    write_yaml(tmp / "data.yaml", {"path": str(dest), "train": "images/train", "val": "images/val",
                                   "names": names})
    splits = {id(train_split): train_split, id(val_split): val_split}.values()
    messages = [skip_message(s.json_path, s.skipped) for s in splits]
    if segment:
        messages += _outline_messages(splits)
    write_json(tmp / MANIFEST, {
        "version": CACHE_VERSION, "format": "coco", "source": str(source), "names": names,
        "category_ids": val_split.category_ids, "train": files["train"],
        "val_image_ids": [[rel, im.id] for rel, im in zip(files["val"], val_split.images)],
        "warnings": [m for m in messages if m],
    })


def _outline_messages(splits: Iterable[Any]) -> list[str]:
    """For segment labels: none of a split's annotations has a segmentation is an error, some a warning line."""
    out = []
    for split in splits:
        n = sum(len(v) for v in split.segments.values())
        if n and split.no_outline == n:
            raise DatasetError(f"{split.json_path}: no annotation has a segmentation (polygons or RLE); a "
                               "segmentation model needs them")
        if split.no_outline:
            out.append(f"{split.json_path}: {split.no_outline} of {n} annotations have no segmentation; their boxes "
                       "are their outlines")
    return out


def _write_yolo_split(tmp: Path, name: str, split: Any) -> list[str]:
    """Link the images of a COCO split into ``tmp/images/name`` and write YOLO labels beside them (as ultralytics
    expects: the last ``/images/`` of the path replaced by ``/labels/``). Returns the image paths relative to tmp."""
    from ultralytics.data.utils import img2label_paths

    rels = []
    for im in split.images:
        rel = f"images/{name}/{im.file_name}"
        dst = tmp / rel
        _link_or_copy(im.path, dst)
        label = Path(img2label_paths([str(dst)])[0])
        label.parent.mkdir(parents=True, exist_ok=True)
        text = (yolo_lines(split.boxes[im.id], im.width, im.height) if split.segments is None
                else segment_lines(split.segments[im.id], im.width, im.height))
        label.write_text(text, encoding="utf-8")
        rels.append(rel)
    return rels


# YOLO format -----------------------------------------------------------------------------------------------------


def _yolo_names(cfg: dict[str, Any], source: Path) -> list[str]:
    from ultralytics.nn.autobackend import check_class_names

    names, nc = cfg.get("names"), cfg.get("nc")
    if names is None:
        if not isinstance(nc, int) or nc < 1:
            raise DatasetError(f"{source}: 'names' (or an integer 'nc') is required")
        return [f"class_{i}" for i in range(nc)]
    try:
        mapping = check_class_names(names)
    except Exception as e:  # KeyError/ValueError for non-contiguous or malformed names
        raise DatasetError(f"{source}: invalid 'names' ({e})") from None
    if isinstance(nc, int) and nc != len(mapping):
        raise DatasetError(f"{source}: 'names' has {len(mapping)} entries but nc is {nc}")
    return [mapping[i] for i in range(len(mapping))]


def _yolo_root(cfg: dict[str, Any], source: Path) -> Path:
    """Dataset root exactly as ultralytics resolves it (``path:`` relative to the working directory, then to its
    datasets folder; the yaml's folder when absent)."""
    root = Path(str(cfg["path"])).expanduser() if cfg.get("path") else source.parent
    if not root.exists() and not root.is_absolute():
        from ultralytics.utils import DATASETS_DIR

        root = Path(DATASETS_DIR) / root
    return root.resolve()


def _yolo_entries(cfg: dict[str, Any], split: str, root: Path, source: Path) -> list[Path]:
    value = cfg.get(split)
    if split == "val" and value is None:
        value = cfg.get("validation")
    if not value or not isinstance(value, (str, list)):
        raise DatasetError(f"{source}: '{split}' key missing (an image folder, image list file or list of them)")
    entries = []
    for v in value if isinstance(value, list) else [value]:
        p = (root / str(v)).resolve()
        if not p.exists() and str(v).startswith("../"):
            p = (root / str(v)[3:]).resolve()
        if not p.exists():
            raise DatasetError(f"{source}: {split} images not found: {p}")
        entries.append(p)
    return entries


def list_images(entries: Iterable[Path]) -> list[Path]:
    """Image files of folders (recursive) and image-list text files, sorted as ultralytics lists them."""
    from ultralytics.data.utils import IMG_FORMATS

    files: list[str] = []
    for p in entries:
        if p.is_dir():
            files += glob.glob(str(Path(glob.escape(str(p))) / "**" / "*.*"), recursive=True)
        else:
            parent = str(p.parent) + os.sep
            lines = p.read_text(encoding="utf-8-sig").strip().splitlines()
            files += [x.replace("./", parent, 1) if x.startswith("./") else x for x in lines]
    return [Path(f) for f in sorted(x.replace("/", os.sep) for x in files
                                    if x.rpartition(".")[-1].lower() in IMG_FORMATS)]


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _label_files(images: list[Path]) -> list[Path]:
    from ultralytics.data.utils import img2label_paths

    return [Path(p) for p in img2label_paths([str(p) for p in images])]


def _read_only(folder: Path) -> bool:
    """True for an existing folder without write permission bits (read-only even for root) or not writable by us."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return not mode & 0o222 or not os.access(folder, os.W_OK)


def _mirror_split(tmp: Path, split: str, images: list[Path], labels: list[Path]) -> dict[Path, str]:
    """Link the images of a YOLO split into ``tmp/images/split`` and copy their labels beside them.

    Returns source image -> path relative to tmp. Used for read-only datasets, where ultralytics could otherwise
    write its ``labels/*.cache`` files (as root it ignores the read-only bits).
    """
    from ultralytics.data.utils import img2label_paths

    out: dict[Path, str] = {}
    used: set[str] = set()
    for i, (img, label) in enumerate(zip(images, labels)):
        name = img.name if img.name not in used else f"{i:06d}_{img.name}"
        used.add(name)
        rel = f"images/{split}/{name}"
        _link_or_copy(img, tmp / rel)
        dst = Path(img2label_paths([str(tmp / rel)])[0])
        dst.parent.mkdir(parents=True, exist_ok=True)
        if label.is_file():
            shutil.copyfile(label, dst)
        out[img] = rel
    return out


def _keypoint_columns(cfg: dict[str, Any], source: Path) -> int:
    """How many keypoint columns follow the box in a label row of a pose dataset (``kpt_shape``), 0 without."""
    shape = cfg.get("kpt_shape")
    if shape is None:
        return 0
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(isinstance(v, int) for v in shape)
            or shape[0] < 1 or shape[1] not in (2, 3)):
        raise DatasetError(f"{source}: kpt_shape must be [number of keypoints, 2 or 3], got {shape!r}")
    return shape[0] * shape[1]


def _resolve_yolo(source: Path, cfg: dict[str, Any], cache: Path) -> DataSpec:
    names = _yolo_names(cfg, source)
    root = _yolo_root(cfg, source)
    val_images = list_images(_yolo_entries(cfg, "val", root, source))
    if not val_images:
        raise DatasetError(f"{source}: no val images found")
    train_images = list_images(_yolo_entries(cfg, "train", root, source))
    val_labels, train_labels = _label_files(val_images), _label_files(train_images)
    # ultralytics writes <labels folder>.cache beside each split's label folder
    mirror = any(_read_only(lbs[0].parent.parent) for lbs in (train_labels, val_labels) if lbs)
    parts = [CACHE_VERSION, "yolo", str(source.resolve()), source.read_bytes(), names, mirror]
    parts += [(str(i), _stamp(i), _stamp(lb)) for i, lb in zip(val_images, val_labels)]
    if mirror:
        parts += [(str(i), _stamp(lb)) for i, lb in zip(train_images, train_labels)]
    dest = cache.expanduser().absolute().resolve() / f"yolo-{_digest(parts)}"

    def build(tmp: Path) -> None:
        coco, kept, skipped = yolo_split_to_coco(val_images, val_labels, names, root=root,
                                                 keypoints=_keypoint_columns(cfg, source))
        if not coco["annotations"]:
            raise DatasetError(f"{source}: no usable labels in the val split")
        write_json(tmp / "val.json", coco)
        manifest: dict[str, Any] = {"version": CACHE_VERSION, "format": "yolo", "source": str(source),
                                    "names": names, "mirror": mirror}
        if mirror:
            train_rel = _mirror_split(tmp, "train", train_images, train_labels)
            val_rel = _mirror_split(tmp, "val", val_images, val_labels)
            write_yaml(tmp / "data.yaml", {"path": str(dest), "train": "images/train", "val": "images/val",
                                           "names": names})
            manifest["train"] = [train_rel[p] for p in train_images]
            kept_paths = [val_rel[p] for p in kept]
        else:
            kept_paths = [str(p) for p in kept]
        message = skip_message(source, skipped)
        manifest["val_image_ids"] = [[p, i + 1] for i, p in enumerate(kept_paths)]
        manifest["warnings"] = [message] if message else []
        write_json(tmp / MANIFEST, manifest)

    manifest = _cached(dest, build)
    _emit(manifest["warnings"])
    val_kept = [dest / p for p, _ in manifest["val_image_ids"]]  # dest / absolute path == absolute path
    if manifest["mirror"]:
        yaml_path, train_images = dest / "data.yaml", [dest / rel for rel in manifest["train"]]
    else:
        yaml_path = source
    return DataSpec(
        source=source, yaml=yaml_path, names=names, nc=len(names), val_json=dest / "val.json",
        category_ids=list(range(1, len(names) + 1)), train_images=train_images, val_images=val_kept,
        format="yolo", cache=dest,
        val_image_ids={image_key(p): iid for p, (_, iid) in zip(val_kept, manifest["val_image_ids"])},
        warnings=list(manifest["warnings"]),
    )


# Unlabeled images --------------------------------------------------------------------------------------------------


def image_folder(images: str | Path | Iterable[str | Path], *, cache_dir: str | Path | None = None) -> Path:
    """An ``images/`` folder in the cache linking every image of ``images``, for training without labels.

    ``images`` is a folder (searched recursively), a text file listing image paths (one per line, as in a YOLO data
    yaml), or a list of either. The links live in the cache because ultralytics writes a ``<labels>.cache`` file
    beside the labels it looks for; a user folder of unlabeled images stays untouched. Each image gets an empty
    label file in ``labels/`` (ultralytics refuses to train on a split where it finds no label file at all).
    Returns the ``images`` folder (absolute).
    """
    entries = [images] if isinstance(images, (str, Path)) else list(images)
    paths = []
    for e in entries:
        p = Path(e).expanduser().absolute()
        if not p.exists():
            raise DatasetError(f"unlabeled images not found: {p}")
        paths.append(p)
    files = list_images(paths)
    if not files:
        raise DatasetError(f"no images found in {', '.join(map(str, paths))}")
    files = [f.absolute() for f in files]
    dest = cache_root(cache_dir).expanduser().absolute().resolve()
    dest = dest / f"images-{_digest([CACHE_VERSION, 'images', *[(str(f), _stamp(f)) for f in files]])}"

    def build(tmp: Path) -> None:
        used: set[str] = set()
        for i, f in enumerate(files):
            name = f.name if f.name not in used else f"{i:06d}_{f.name}"
            used.add(name)
            _link_or_copy(f, tmp / "images" / name)
            label = (tmp / "labels" / name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.touch()
        write_json(tmp / MANIFEST, {"version": CACHE_VERSION, "format": "images", "sources": [str(p) for p in paths],
                                    "images": len(files), "warnings": []})

    _cached(dest, build)
    return dest / "images"
