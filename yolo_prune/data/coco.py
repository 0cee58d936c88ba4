"""COCO instances json <-> YOLO labels.

- :func:`load_coco_split` reads and checks one COCO json against its image folder;
- :func:`yolo_lines` turns its boxes into YOLO label lines for training, :func:`segment_lines` its outlines (polygons,
  or RLE masks by their largest contour: :func:`outline`) into YOLO segment lines for segmentation models;
- :func:`eval_json` gives the ground truth COCO evaluation should use (only the images and annotations kept);
- :func:`yolo_split_to_coco` goes the other way: YOLO labels of a split to a COCO instances dict, so that every
  dataset can be evaluated with the COCO protocol.

Whole-dataset problems raise :class:`~yolo_prune.errors.DatasetError`; a single bad image or annotation is skipped
and counted in a :class:`collections.Counter`, which :func:`skip_message` turns into one line.
"""

from __future__ import annotations

import collections
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import DatasetError

EXIF_ORIENTATION = 0x0112
# reasons for skipping a whole image (every other reason skips one annotation / box)
IMAGE_REASONS = frozenset({"malformed image entry", "missing image file", "unreadable image", "invalid label file",
                           "label class out of range", "unsupported image format", "duplicate file name"})


class DataWarning(UserWarning):
    """Some images or annotations of a dataset were skipped (the message counts them)."""


@dataclass
class ImageRecord:
    """One kept image: COCO id, name relative to the image folder, source file and size in pixels."""

    id: int
    file_name: str
    path: Path
    width: int
    height: int


@dataclass
class CocoSplit:
    """A checked COCO split. ``boxes`` are the training boxes per image id: (class index, x1, y1, x2, y2), clipped
    to the image, crowd boxes excluded; ``annotations`` are the kept annotations for evaluation (crowd included).
    ``segments`` (read with ``segments=True``) are the training outlines per image id: (class index, (n, 2) pixel
    polygon), in the order of ``boxes``; an annotation without a usable segmentation has its box as outline (they
    are counted in ``no_outline``)."""

    json_path: Path
    image_dir: Path
    categories: list[dict[str, Any]]
    images: list[ImageRecord]
    boxes: dict[int, list[tuple[int, float, float, float, float]]]
    annotations: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    segments: dict[int, list[tuple[int, np.ndarray]]] | None = None
    no_outline: int = 0

    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.categories]


# Reading ---------------------------------------------------------------------------------------------------------


def read_json(path: str | Path) -> Any:
    """Parse a json file; a missing file or invalid JSON raises :class:`DatasetError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO json not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as ultralytics loads it (EXIF rotation applied), or None if it cannot be read.

    Like ultralytics, an image below 10 pixels on a side counts as unreadable.
    """
    try:
        with Image.open(path) as im:
            im.verify()  # must come first (PNG); leaves the image unusable, so reopen for the header
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                w, h = h, w
    except Exception:  # PIL raises many types for broken files
        return None
    return (w, h) if min(w, h) >= 10 else None


def image_sizes(paths: Sequence[Path]) -> list[tuple[int, int] | None]:
    """:func:`image_size` of many files, read in a few threads (header-only reads, mostly I/O)."""
    if len(paths) < 64:
        return [image_size(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(image_size, paths, chunksize=64))


def parse_categories(coco: dict[str, Any], json_path: Path) -> list[dict[str, Any]]:
    """The ``categories`` of a COCO dict sorted by id (class index i <-> i-th category)."""
    cats = coco.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DatasetError(f"{json_path}: no 'categories' list")
    out, seen = [], set()
    for c in cats:
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise DatasetError(f"{json_path}: category without an integer 'id': {c!r}")
        if cid in seen:
            raise DatasetError(f"{json_path}: duplicate category id {cid}")
        seen.add(cid)
        out.append({"id": cid, "name": str(c.get("name", cid)), "supercategory": c.get("supercategory", "")})
    return sorted(out, key=lambda c: c["id"])


def _safe_rel(file_name: str) -> str:
    """``file_name`` as a relative path that stays inside the image folder (else just its base name)."""
    p = Path(file_name.replace("\\", "/"))
    return p.as_posix() if not p.is_absolute() and ".." not in p.parts else p.name


def _parse_images(coco: dict[str, Any], json_path: Path, image_dir: Path, skipped: collections.Counter,
                  formats: frozenset[str] | None) -> tuple[list[ImageRecord], set[Any]]:
    """Check the ``images`` entries; return the readable ones and the set of all declared image ids."""
    entries = coco.get("images")
    if not isinstance(entries, list):
        raise DatasetError(f"{json_path}: no 'images' list")
    declared, candidates, names = set(), [], set()
    for e in entries:
        if not isinstance(e, dict) or "id" not in e or not isinstance(e.get("file_name"), str):
            skipped["malformed image entry"] += 1
            continue
        if e["id"] in declared:
            raise DatasetError(f"{json_path}: duplicate image id {e['id']!r}")
        declared.add(e["id"])
        rel = _safe_rel(e["file_name"])
        if formats is not None and Path(rel).suffix[1:].lower() not in formats:
            skipped["unsupported image format"] += 1
        elif rel in names:
            skipped["duplicate file name"] += 1
        else:
            names.add(rel)
            candidates.append(e)
    paths = [image_dir / _safe_rel(e["file_name"]) for e in candidates]
    sizes = image_sizes([p for p in paths if p.is_file()])
    size_of = dict(zip([p for p in paths if p.is_file()], sizes))
    kept = []
    for e, p in zip(candidates, paths):
        if p not in size_of:
            skipped["missing image file"] += 1
        elif size_of[p] is None:
            skipped["unreadable image"] += 1
        else:
            w, h = size_of[p]
            jw, jh = e.get("width"), e.get("height")
            if isinstance(jw, (int, float)) and isinstance(jh, (int, float)) and jw > 0 and jh > 0:
                w, h = jw, jh  # boxes are in the json's frame
            kept.append(ImageRecord(e["id"], _safe_rel(e["file_name"]), p, int(w), int(h)))
    if entries and not kept:
        raise DatasetError(f"{json_path}: none of its {len(entries)} images can be read from {image_dir}")
    return kept, declared


def _check_box(bbox: Any) -> tuple[float, float, float, float] | str:
    """A bbox as 4 floats, or the reason it is unusable."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "malformed bbox"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "malformed bbox"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "malformed bbox"
    if w <= 0 or h <= 0:
        return "non-positive box size"
    return x, y, w, h


def load_coco_split(json_path: str | Path, image_dir: str | Path, *, formats: frozenset[str] | None = None,
                    segments: bool = False) -> CocoSplit:
    """Read a COCO instances json, check it against ``image_dir`` and return the usable part.

    ``formats``: accepted image file suffixes (lower case, no dot); others are skipped. None accepts all.
    ``segments``: also read the outlines (``CocoSplit.segments``), for segmentation models.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    coco = read_json(json_path)
    if not isinstance(coco, dict):
        raise DatasetError(f"{json_path}: not a COCO instances json (top level is not an object)")
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found (for {json_path.name})")
    categories = parse_categories(coco, json_path)
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    skipped: collections.Counter = collections.Counter()
    images, declared = _parse_images(coco, json_path, image_dir, skipped, formats)
    by_id = {im.id: im for im in images}
    anns = coco.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"{json_path}: 'annotations' is not a list")
    boxes: dict[int, list] = {im.id: [] for im in images}
    outlines: dict[int, list] | None = {im.id: [] for im in images} if segments else None
    no_outline = 0
    kept_anns: list[dict[str, Any]] = []
    for a in anns:
        reason = _annotation_problem(a, declared, class_of)
        if reason:
            skipped[reason] += 1
            continue
        im = by_id.get(a["image_id"])
        if im is None:  # its image was skipped: the annotation goes with it
            continue
        box = _check_box(a.get("bbox"))
        if isinstance(box, str):
            skipped[box] += 1
            continue
        x, y, w, h = box
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(im.width), x + w), min(float(im.height), y + h)
        if x2 <= x1 or y2 <= y1:
            skipped["box outside its image"] += 1
            continue
        kept_anns.append(a)
        if not a.get("iscrowd", 0):
            boxes[im.id].append((class_of[a["category_id"]], x1, y1, x2, y2))
            if outlines is not None:
                poly = outline(a.get("segmentation"), im.width, im.height)
                no_outline += poly is None
                poly = _corners(x1, y1, x2, y2) if poly is None else poly
                outlines[im.id].append((class_of[a["category_id"]], poly))
    info = coco.get("info") if isinstance(coco.get("info"), dict) else {}
    return CocoSplit(json_path, image_dir, categories, images, boxes, kept_anns, info, skipped, outlines, no_outline)


def _corners(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return np.array([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], np.float64)


def outline(segmentation: Any, width: int, height: int) -> np.ndarray | None:
    """One (n, 2) pixel polygon for a COCO ``segmentation``, or None when it has none usable.

    Polygons: a single one as it is, several joined into one by ultralytics' ``merge_multi_segment`` (as its COCO
    converter does). RLE (compressed or not): the mask decoded with pycocotools and its largest outer contour
    (cv2.findContours).
    """
    if isinstance(segmentation, list):
        parts = [p for p in segmentation if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
        try:
            polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in parts]
        except (TypeError, ValueError):
            return None
        polys = [p for p in polys if np.isfinite(p).all()]
        if len(polys) <= 1:
            return polys[0] if polys else None
        from ultralytics.data.converter import merge_multi_segment

        return np.concatenate(merge_multi_segment([p.ravel().tolist() for p in polys]), 0).astype(np.float64)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        return _rle_outline(segmentation)
    return None


def _rle_outline(rle: dict[str, Any]) -> np.ndarray | None:
    """The largest outer contour of an RLE mask as an (n, 2) pixel polygon (None for an empty or broken RLE)."""
    import cv2
    from pycocotools import mask as mask_utils

    try:
        h, w = (int(v) for v in rle["size"])
        if isinstance(rle["counts"], list):  # uncompressed
            rle = mask_utils.frPyObjects(rle, h, w)
        with warnings.catch_warnings():  # pycocotools' decode under numpy 2: a DeprecationWarning about copy=False
            warnings.simplefilter("ignore", DeprecationWarning)
            m = np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
    except Exception:  # pycocotools raises TypeError / ValueError / its own for malformed counts
        return None
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)
    return c + 0.5 if len(c) >= 3 else None  # pixel centres (a pixel spans [i, i + 1])


def _annotation_problem(a: Any, declared: set[Any], class_of: dict[int, int]) -> str | None:
    if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
        return "malformed annotation"
    if a["image_id"] not in declared:
        return "unknown image id"
    if a["category_id"] not in class_of:
        return "unknown category id"
    return None


# Writing ---------------------------------------------------------------------------------------------------------


def yolo_lines(boxes: Iterable[tuple[int, float, float, float, float]], width: int, height: int) -> str:
    """YOLO label text (``cls cx cy w h``, normalised) for pixel boxes (class, x1, y1, x2, y2)."""
    out = []
    for c, x1, y1, x2, y2 in boxes:
        out.append(f"{c} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                   f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
    return "".join(out)


def segment_lines(segments: Iterable[tuple[int, np.ndarray]], width: int, height: int) -> str:
    """YOLO segment label text (``cls x1 y1 x2 y2 ...``, normalised, clipped to [0, 1]) for pixel polygons."""
    out = []
    for c, poly in segments:
        xy = np.clip(np.asarray(poly, np.float64) / (width, height), 0.0, 1.0)
        out.append(f"{c} " + " ".join(f"{v:.6f}" for v in xy.ravel()) + "\n")
    return "".join(out)


def eval_json(split: CocoSplit, *, segmentation: bool = False) -> dict[str, Any]:
    """Ground truth for COCO evaluation: the kept images and annotations, original ids and boxes (and with
    ``segmentation``, each annotation's own ``segmentation``, for ``segm`` evaluation).

    Fields pycocotools needs but the source may lack are filled in (``area`` = box area, ``iscrowd`` = 0,
    ``id`` = a fresh unique id; a missing segmentation = the box as a polygon).
    """
    images = [{"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height}
              for im in split.images]
    used = {a["id"] for a in split.annotations if isinstance(a.get("id"), int)}
    next_id = max(used, default=0) + 1
    seen, annotations = set(), []
    for a in split.annotations:
        x, y, w, h = (float(v) for v in a["bbox"])
        ann_id = a.get("id")
        if not isinstance(ann_id, int) or ann_id in seen:
            ann_id, next_id = next_id, next_id + 1
        seen.add(ann_id)
        area = a.get("area")
        annotations.append({
            "id": ann_id, "image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h],
            "area": float(area) if isinstance(area, (int, float)) and area > 0 else w * h,
            "iscrowd": int(bool(a.get("iscrowd", 0))),
        })
        if segmentation:
            seg = a.get("segmentation")
            usable = isinstance(seg, dict) or (isinstance(seg, list) and any(isinstance(p, list) for p in seg))
            annotations[-1]["segmentation"] = seg if usable else [_corners(x, y, x + w, y + h).ravel().tolist()]
    return {"info": split.info, "images": images, "annotations": annotations, "categories": split.categories}


# YOLO labels -> COCO ---------------------------------------------------------------------------------------------


def read_yolo_label(path: Path, nc: int, keypoints: int = 0) -> np.ndarray | str:
    """Boxes of a YOLO label file as an (n, 5) array of class, cx, cy, w, h (normalised, duplicates removed).

    A missing file means no objects. Returns the reason instead when ultralytics would reject the file as corrupt
    (it then drops the whole image, so evaluation must too). ``keypoints``: the keypoint columns after the box in
    the rows of a pose dataset (``kpt_shape`` product); they are dropped. Segment and OBB rows (polygons) give
    their extent.
    """
    if not path.is_file():
        return np.zeros((0, 5), np.float64)
    try:
        rows = [line.split() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not rows:
            return np.zeros((0, 5), np.float64)
        if keypoints:
            if any(len(r) != 5 + keypoints for r in rows):
                return "invalid label file"
            rows = [r[:5] for r in rows]
        if any(len(r) > 6 for r in rows):  # polygons: the box is their extent
            if any(len(r) == 5 for r in rows):
                return "invalid label file"
            boxes = []
            for r in rows:
                xy = np.array(r[1:], np.float64).reshape(-1, 2)
                lo, hi = xy.min(0), xy.max(0)
                boxes.append([float(r[0]), *((lo + hi) / 2), *(hi - lo)])
            lb = np.array(boxes, np.float64).reshape(-1, 5)
        else:
            lb = np.array(rows, np.float64).reshape(len(rows), -1)
    except (OSError, UnicodeDecodeError, ValueError):
        return "invalid label file"
    if lb.shape[1] != 5 or lb[:, 1:].max() > 1.01 or lb.min() < -0.01 or (lb[:, 0] % 1 != 0).any():
        return "invalid label file"
    if lb[:, 0].max() >= nc:
        return "label class out of range"
    return np.unique(lb, axis=0)


def yolo_split_to_coco(image_files: Sequence[Path], label_files: Sequence[Path], names: Sequence[str], *,
                       root: Path | None = None, keypoints: int = 0
                       ) -> tuple[dict[str, Any], list[Path], collections.Counter]:
    """COCO instances dict of a YOLO-format split; image ids are 1..n in the given order, category ids 1..nc.
    ``keypoints``: as for :func:`read_yolo_label`.

    Returns the dict, the image files kept (in id order) and a counter of what was skipped.
    """
    skipped: collections.Counter = collections.Counter()
    images, annotations, kept = [], [], []
    for path, size, label in zip(image_files, image_sizes(list(image_files)), label_files):
        if size is None:
            skipped["unreadable image"] += 1
            continue
        lb = read_yolo_label(Path(label), len(names), keypoints)
        if isinstance(lb, str):
            skipped[lb] += 1
            continue
        kept.append(Path(path))
        w, h = size
        iid = len(kept)
        images.append({"id": iid, "file_name": _file_name(Path(path), root), "width": w, "height": h})
        for c, cx, cy, bw, bh in lb.tolist():
            x1, y1 = max(0.0, (cx - bw / 2) * w), max(0.0, (cy - bh / 2) * h)
            x2, y2 = min(float(w), (cx + bw / 2) * w), min(float(h), (cy + bh / 2) * h)
            if x2 <= x1 or y2 <= y1:
                skipped["non-positive box size"] += 1
                continue
            bw_px, bh_px = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": int(c) + 1,
                                "bbox": [round(x1, 3), round(y1, 3), round(bw_px, 3), round(bh_px, 3)],
                                "area": round(bw_px * bh_px, 3), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)]
    coco = {"info": {"description": "converted from YOLO labels by yolo-prune"}, "images": images,
            "annotations": annotations, "categories": categories}
    return coco, kept, skipped


def _file_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def skip_message(source: str | Path, skipped: collections.Counter) -> str | None:
    """One line counting what was skipped, e.g. ``a.json: skipped 2 annotations (1 unknown category id, ...)``."""
    if not skipped:
        return None
    images = {k: v for k, v in skipped.items() if k in IMAGE_REASONS}
    other = {k: v for k, v in skipped.items() if k not in images}
    parts = []
    for what, counts in (("images", images), ("annotations", other)):
        if counts:
            detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            parts.append(f"{sum(counts.values())} {what} ({detail})")
    return f"{source}: skipped " + " and ".join(parts)
