"""A deterministic synthetic detection dataset for tests and the demo.

Every class is a filled shape with its own colour (circle, square, triangle, ...), drawn at varied sizes and aspect
ratios, sometimes overlapping, on a noisy gradient background with grey clutter; some images hold no object at all.
A tiny YOLO learns these classes in a few CPU epochs, which is all the tests and the demo need.

The dataset is written twice over the same image folders:

- YOLO format: ``images/{train,val}``, ``labels/{train,val}`` and ``yolo.yaml`` (absolute ``path:``);
- COCO format: ``annotations/instances_{train,val}.json`` with non-contiguous category ids (1, 3, 7, ...) and
  non-contiguous image ids, and ``coco.yaml`` in the yolo-prune COCO-format spec (see ``datasets/README.md``).

``task`` chooses the labels (ultralytics YOLO formats), one dataset per task:

- ``detect``: boxes (the default; its files do not depend on the other tasks);
- ``segment``: the same images, each object's outline as a polygon (``cls x1 y1 x2 y2 ...``, normalized, clipped to
  the image; occlusion by later objects is not cut out); the COCO json carries the polygons, and the rings (whose
  masks have a hole) as uncompressed RLE;
- ``pose``: the same images, box + :data:`KPT_SHAPE` keypoints per object (:data:`KPT_NAMES`: the centre and where
  the outline meets the vertical and horizontal lines through it), visibility 2, or 0 (and 0 0) outside the image;
  the yaml has ``kpt_shape`` and ``flip_idx``; no COCO form;
- ``obb``: every shape drawn rotated, fully inside the image, labelled by its rotated rectangle
  (``cls x1 y1 x2 y2 x3 y3 x4 y4``, normalized); no COCO form.

Command line: ``python -m yolo_prune.data.synthetic OUT_DIR [--task detect] [--seed 0] [--n-train 64] ...``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import cv2
import numpy as np

from ..errors import UsageError
from ..io import write_json, write_text, write_yaml

GENERATOR_VERSION = 1
MARKER = "synthetic.json"
SPLITS = ("train", "val")

# (name, BGR colour); one entry per class, so nc is at most len(CLASSES)
CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("circle", (50, 50, 220)),  # red
    ("square", (60, 190, 40)),  # green
    ("triangle", (220, 110, 30)),  # blue
    ("cross", (30, 210, 230)),  # yellow
    ("ring", (200, 40, 200)),  # magenta
    ("diamond", (210, 210, 40)),  # cyan
    ("hexagon", (20, 130, 250)),  # orange
    ("star", (245, 245, 245)),  # white
)
MAX_NC = len(CLASSES)
TASKS = ("detect", "segment", "pose", "obb")
KPT_NAMES = ("centre", "top", "right", "bottom", "left")
KPT_SHAPE = (len(KPT_NAMES), 3)
FLIP_IDX = (0, 1, 4, 3, 2)  # a left-right flip swaps right and left
_RAYS = ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0))  # top, right, bottom, left (image y points down)


def category_id(index: int) -> int:
    """COCO category id of class ``index``: 1, 3, 7, 15, ... (non-contiguous on purpose)."""
    return 2 ** (index + 1) - 1


def image_id(split: str, index: int) -> int:
    """COCO image id of image ``index`` of ``split``: non-contiguous and unrelated to the file name."""
    return (1000 if split == "train" else 5000) + 7 * index


def make_synthetic(
    root: str | Path, *, n_train: int = 64, n_val: int = 16, imgsz: int = 256, nc: int = 3, seed: int = 0,
    task: str = "detect",
) -> Path:
    """Write the synthetic dataset of ``task`` (detect, segment, pose, obb) under ``root`` and return ``root``.

    ``root/yolo.yaml`` is the YOLO form; detect and segment also get the COCO form (``root/coco.yaml``). The same
    arguments always give byte-identical files. When ``root`` already holds a complete dataset made with the same
    arguments (see ``root/synthetic.json``) nothing is written.
    """
    params = _check_params(n_train=n_train, n_val=n_val, imgsz=imgsz, nc=nc, seed=seed)
    if task not in TASKS:
        raise UsageError(f"make_synthetic: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task != "detect":  # the detection marker stays as it was
        params["task"] = task
    root = Path(root).expanduser().absolute()
    if _is_complete(root, params):
        return root
    _remove_previous(root)
    files: list[str] = []
    for split, count in zip(SPLITS, (n_train, n_val)):
        files += _write_split(root, split, count, params)
    files += _write_yamls(root, nc, task)
    write_json(root / MARKER, {"generator": "yolo_prune.data.synthetic", "version": GENERATOR_VERSION,
                               "params": params, "files": files})
    return root


def _check_params(**params: int) -> dict[str, Any]:
    for key, value in params.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise UsageError(f"make_synthetic: {key} must be an integer, got {value!r}")
    if not 1 <= params["nc"] <= MAX_NC:
        raise UsageError(f"make_synthetic: nc must be in 1..{MAX_NC}, got {params['nc']}")
    if params["imgsz"] < 64:
        raise UsageError(f"make_synthetic: imgsz must be at least 64, got {params['imgsz']}")
    if params["n_train"] < 1 or params["n_val"] < 1:
        raise UsageError("make_synthetic: n_train and n_val must be at least 1")
    return {k: int(v) for k, v in params.items()}


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    marker = _read_marker(root)
    if not marker or marker.get("version") != GENERATOR_VERSION or marker.get("params") != params:
        return False
    return all((root / f).is_file() for f in marker.get("files", []))


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _remove_previous(root: Path) -> None:
    """Delete the files a previous generation listed in its marker (and ultralytics' label caches)."""
    marker = _read_marker(root)
    if not marker:
        return
    (root / MARKER).unlink(missing_ok=True)
    for rel in marker.get("files", []):
        path = root / rel
        if path.is_file() and root in path.absolute().parents:
            path.unlink()
    for split in SPLITS:
        (root / "labels" / f"{split}.cache").unlink(missing_ok=True)


# Drawing --------------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted colour gradient with Gaussian noise and grey clutter (lines, blobs, small rectangles)."""
    c0, c1 = rng.uniform(40, 170, size=(2, 3))
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
    ramp = c0[None, :] + (c1 - c0)[None, :] * t[:, None]  # (n, 3)
    img = np.broadcast_to(ramp[None] if len(t) == w else ramp[:, None], (h, w, 3)).astype(np.float32)
    img = img + rng.normal(0.0, 8.0, size=(h, w, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        grey = int(rng.integers(60, 200))
        colour = (grey, grey, grey)
        kind = rng.integers(3)
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if kind == 0:
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            axes = (int(rng.integers(2, max(3, w // 16))), int(rng.integers(2, max(3, h // 16))))
            cv2.ellipse(img, p1, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        else:
            p2 = (p1[0] + int(rng.integers(3, max(4, w // 12))), p1[1] + int(rng.integers(3, max(4, h // 12))))
            cv2.rectangle(img, p1, p2, colour, -1)
    return img


def _regular_polygon(cx: float, cy: float, rx: float, ry: float, n: int, phase: float) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def _star(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    a = -math.pi / 2 + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)], 1)


def _cross(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    tx, ty = rx / 3, ry / 3
    pts = [(-tx, -ry), (tx, -ry), (tx, -ty), (rx, -ty), (rx, ty), (tx, ty), (tx, ry), (-tx, ry), (-tx, ty),
           (-rx, ty), (-rx, -ty), (-tx, -ty)]
    return np.array([(cx + x, cy + y) for x, y in pts])


class _Drawn(NamedTuple):
    """One drawn object in pixel coordinates (a pixel spans [i, i + 1]): its box, the outer boundary of what was
    drawn, the boundary of its hole (rings) or None, its centre, and its own rectangle (rotated with it)."""

    box: tuple[float, float, float, float]  # ints for unturned ellipses (the detection json has them so)
    outline: np.ndarray
    hole: np.ndarray | None
    centre: np.ndarray
    rect: np.ndarray


def _rotate(pts: np.ndarray, cx: float, cy: float, degrees: float) -> np.ndarray:
    """``pts`` turned by ``degrees`` about (cx, cy), the way cv2.ellipse turns an ellipse."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    dx, dy = pts[:, 0] - cx, pts[:, 1] - cy
    return np.stack([cx + c * dx - s * dy, cy + s * dx + c * dy], 1)


def _corners(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return np.array([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], dtype=np.float64)


def _draw_ellipse(img: np.ndarray, ring: bool, cx: float, cy: float, rx: float, ry: float,
                  colour: tuple[int, int, int], degrees: int) -> _Drawn:
    centre, axes = (round(cx), round(cy)), (max(1, round(rx)), max(1, round(ry)))
    hole = None
    if not ring:
        cv2.ellipse(img, centre, axes, degrees, 0, 360, colour, -1, cv2.LINE_AA)
    else:
        thickness = max(2, round(min(rx, ry) / 3))
        inner = (max(1, axes[0] - thickness // 2), max(1, axes[1] - thickness // 2))
        cv2.ellipse(img, centre, inner, degrees, 0, 360, colour, thickness, cv2.LINE_AA)
        hole_axes = (max(1, axes[0] - thickness), max(1, axes[1] - thickness))
        hole = cv2.ellipse2Poly(centre, hole_axes, degrees, 0, 360, 5).astype(np.float64) + 0.5
    outline = cv2.ellipse2Poly(centre, axes, degrees, 0, 360, 5)
    if degrees:
        (x1, y1), (x2, y2) = outline.min(0).tolist(), (outline.max(0) + 1).tolist()
    else:  # ints, as the detection dataset always had them
        x1, y1, x2, y2 = centre[0] - axes[0], centre[1] - axes[1], centre[0] + axes[0] + 1, centre[1] + axes[1] + 1
    c = np.array(centre, dtype=np.float64) + 0.5
    rect = _rotate(_corners(c[0] - axes[0], c[1] - axes[1], c[0] + axes[0], c[1] + axes[1]), c[0], c[1], degrees)
    return _Drawn((x1, y1, x2, y2), outline.astype(np.float64) + 0.5, hole, c, rect)


def _draw_object(img: np.ndarray, cls: int, cx: float, cy: float, rx: float, ry: float,
                 colour: tuple[int, int, int], degrees: int = 0) -> _Drawn:
    """Draw class ``cls`` centred at (cx, cy) with half-extents (rx, ry), turned by ``degrees``."""
    name = CLASSES[cls][0]
    if name in ("circle", "ring"):
        return _draw_ellipse(img, name == "ring", cx, cy, rx, ry, colour, degrees)
    if name == "square":
        pts = np.array([(cx - rx, cy - ry), (cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)])
    elif name == "triangle":
        pts = np.array([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)])
    elif name == "cross":
        pts = _cross(cx, cy, rx, ry)
    elif name == "diamond":
        pts = _regular_polygon(cx, cy, rx, ry, 4, 0.0)
    elif name == "hexagon":
        pts = _regular_polygon(cx, cy, rx, ry, 6, 0.0)
    else:
        pts = _star(cx, cy, rx, ry)
    rect = _corners(*pts.min(0), *pts.max(0))
    if degrees:
        pts, rect = _rotate(pts, cx, cy, degrees), _rotate(rect, cx, cy, degrees)
    ipts = np.round(pts).astype(np.int32)
    cv2.fillPoly(img, [ipts], colour, cv2.LINE_AA)
    x1, y1 = ipts.min(0)
    x2, y2 = ipts.max(0) + 1
    return _Drawn((float(x1), float(y1), float(x2), float(y2)), ipts.astype(np.float64) + 0.5, None,
                  np.array([cx, cy]) + 0.5, rect + 0.5)


def _keypoints(drawn: _Drawn, w: int, h: int) -> np.ndarray:
    """The :data:`KPT_NAMES` points of a drawn object as (x, y, visibility) rows; (0, 0, 0) outside the image."""
    c, p = drawn.centre, drawn.outline
    e = np.roll(p, -1, 0) - p
    r = p - c
    pts = [c]
    for d in _RAYS:  # the farthest crossing of the ray from the centre with the outline
        den = d[0] * e[:, 1] - d[1] * e[:, 0]
        safe = np.where(np.abs(den) > 1e-12, den, 1.0)
        t = (r[:, 0] * e[:, 1] - r[:, 1] * e[:, 0]) / safe
        u = (r[:, 0] * d[1] - r[:, 1] * d[0]) / safe
        ok = (np.abs(den) > 1e-12) & (t >= 0) & (u >= 0) & (u <= 1)
        pts.append(c + np.array(d) * (t[ok].max() if ok.any() else 0.0))
    kpts = np.zeros(KPT_SHAPE)
    for k, (x, y) in enumerate(pts):
        if 0 <= x <= w and 0 <= y <= h:
            kpts[k] = (x, y, 2)
    return kpts


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _render(rng: np.random.Generator, w: int, h: int, nc: int, empty: bool,
            task: str = "detect") -> tuple[np.ndarray, list[tuple]]:
    """Render one image; return it and its objects as (class, x1, y1, x2, y2) in pixels (clipped to the image), with
    the :class:`_Drawn` object appended for the tasks other than detect."""
    img = _background(rng, h, w)
    objects: list[tuple] = []
    n = 0 if empty else int(rng.integers(1, 6))
    side = min(w, h)
    for _ in range(n):
        cls = int(rng.integers(nc))
        for _try in range(20):
            s = side * rng.uniform(0.08, 0.42) / 2  # mean half-extent
            aspect = rng.uniform(0.7, 1.4)
            rx, ry = s * math.sqrt(aspect), s / math.sqrt(aspect)
            cx = rng.uniform(0.6 * rx, w - 0.6 * rx)  # at least ~80% of the object inside the image
            cy = rng.uniform(0.6 * ry, h - 0.6 * ry)
            guess = (cx - rx, cy - ry, cx + rx, cy + ry)
            if all(_iou(guess, o[1:]) < 0.4 for o in objects):
                break
        jitter = rng.integers(-25, 26, size=3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(CLASSES[cls][1], jitter))
        degrees = 0
        if task == "obb":  # turned, and moved fully inside the image
            degrees = int(rng.integers(0, 180))
            c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
            ex, ey = rx * c + ry * s + 1, rx * s + ry * c + 1
            cx, cy = min(max(cx, ex), w - ex), min(max(cy, ey), h - ey)
        drawn = _draw_object(img, cls, cx, cy, rx, ry, colour, degrees)
        x1, y1, x2, y2 = drawn.box
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            objects.append((cls, x1, y1, x2, y2) if task == "detect" else (cls, x1, y1, x2, y2, drawn))
    return img, objects


# Writing --------------------------------------------------------------------------------------------------------


def _write_split(root: Path, split: str, count: int, params: dict[str, Any]) -> list[str]:
    """Write the images, YOLO labels and COCO json of one split; return the written files (relative to root)."""
    imgsz, nc, seed, task = params["imgsz"], params["nc"], params["seed"], params.get("task", "detect")
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    images, annotations, files = [], [], []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        w, h = (imgsz, imgsz) if rng.random() < 0.6 else (imgsz, (imgsz * 3 // 4) // 2 * 2)
        img, objects = _render(rng, w, h, nc, empty=(i % 8 == 5), task=task)
        name = f"{split}_{i:04d}"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok, "JPEG encoding failed"
        (root / "images" / split / f"{name}.jpg").write_bytes(buf.tobytes())
        (root / "labels" / split / f"{name}.txt").write_text(_yolo_lines(objects, w, h, task), encoding="utf-8")
        files += [f"images/{split}/{name}.jpg", f"labels/{split}/{name}.txt"]
        iid = image_id(split, i)
        images.append({"id": iid, "file_name": f"{name}.jpg", "width": w, "height": h})
        for obj in objects:
            annotations.append(_coco_annotation(obj, len(annotations) + 1, iid, w, h))
    if task not in ("detect", "segment"):
        return files
    coco = {
        "info": {"description": f"yolo-prune synthetic dataset ({split})", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category_id(k), "name": CLASSES[k][0], "supercategory": "shape"} for k in range(nc)],
    }
    write_json(root / "annotations" / f"instances_{split}.json", coco)
    return files + [f"annotations/instances_{split}.json"]


def _coco_annotation(obj: tuple, ann_id: int, iid: int, w: int, h: int) -> dict[str, Any]:
    """The COCO annotation of one object: its box, and for segment its polygon (rings: uncompressed RLE)."""
    cls, x1, y1, x2, y2 = obj[:5]
    bw, bh = x2 - x1, y2 - y1
    ann = {"id": ann_id, "image_id": iid, "category_id": category_id(cls),
           "bbox": [round(x1, 2), round(y1, 2), round(bw, 2), round(bh, 2)], "area": round(bw * bh, 2), "iscrowd": 0}
    if len(obj) > 5:
        drawn = obj[5]
        if drawn.hole is not None:
            mask = _mask(drawn, w, h)
            ann["segmentation"], ann["area"] = {"size": [h, w], "counts": _rle_counts(mask)}, int(mask.sum())
        else:
            pts = _clip(drawn.outline, w, h)
            x, y = pts[:, 0], pts[:, 1]
            ann["segmentation"] = [[round(float(v), 2) for v in pts.ravel()]]
            ann["area"] = round(float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2), 2)
    return ann


def _mask(drawn: _Drawn, w: int, h: int) -> np.ndarray:
    """The object's mask (outline filled, hole cut out) as a (h, w) uint8 array of 0/1."""
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(drawn.outline - 0.5).astype(np.int32)], 1)
    if drawn.hole is not None:
        cv2.fillPoly(mask, [np.round(drawn.hole - 0.5).astype(np.int32)], 0)
    return mask


def _rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a mask: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def _clip(pts: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.stack([np.clip(pts[:, 0], 0, w), np.clip(pts[:, 1], 0, h)], 1)


def _yolo_lines(objects: list[tuple], w: int, h: int, task: str = "detect") -> str:
    if task == "detect":
        lines = [f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                 for cls, x1, y1, x2, y2 in objects]
        return "".join(line + "\n" for line in lines)
    lines = []
    for cls, x1, y1, x2, y2, drawn in objects:
        if task == "pose":
            kpts = _keypoints(drawn, w, h) / (w, h, 1)
            box = f"{(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            lines.append(f"{cls} {box} " + " ".join(f"{v:.6f}" if k % 3 < 2 else f"{v:.0f}"
                                                     for k, v in enumerate(kpts.ravel())))
        else:
            pts = _clip(drawn.outline if task == "segment" else drawn.rect, w, h) / (w, h)
            lines.append(f"{cls} " + " ".join(f"{v:.6f}" for v in pts.ravel()))
    return "".join(line + "\n" for line in lines)


def _write_yamls(root: Path, nc: int, task: str = "detect") -> list[str]:
    names = [CLASSES[k][0] for k in range(nc)]
    data: dict[str, Any] = {"path": str(root), "train": "images/train", "val": "images/val", "names": names}
    if task == "pose":
        data.update(kpt_shape=list(KPT_SHAPE), flip_idx=list(FLIP_IDX))
    write_yaml(root / "yolo.yaml", data)
    if task not in ("detect", "segment"):
        return ["yolo.yaml"]
    write_text(root / "coco.yaml", "# yolo-prune COCO-format dataset yaml: folders relative to this file\n"
               "train: images/train\nval: images/val\n"
               "train_json: annotations/instances_train.json\nval_json: annotations/instances_val.json\n")
    return ["yolo.yaml", "coco.yaml"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m yolo_prune.data.synthetic OUT_DIR``: write the synthetic dataset and print its yaml paths."""
    parser = argparse.ArgumentParser(prog="python -m yolo_prune.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="dataset root to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--nc", type=int, default=3)
    parser.add_argument("--task", default="detect", choices=TASKS)
    args = parser.parse_args(argv)
    root = make_synthetic(args.out_dir, n_train=args.n_train, n_val=args.n_val, imgsz=args.imgsz, nc=args.nc,
                          seed=args.seed, task=args.task)
    print(f"YOLO format: {root / 'yolo.yaml'}")
    if (root / "coco.yaml").is_file():
        print(f"COCO format: {root / 'coco.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
