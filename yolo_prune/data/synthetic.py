"""A deterministic synthetic detection dataset for tests and the demo.

Every class is a filled shape with its own colour (circle, square, triangle, ...), drawn at varied sizes and aspect
ratios, sometimes overlapping, on a noisy gradient background with grey clutter; some images hold no object at all.
A tiny YOLO learns these classes in a few CPU epochs, which is all the tests and the demo need.

The dataset is written twice over the same image folders:

- YOLO format: ``images/{train,val}``, ``labels/{train,val}`` and ``yolo.yaml`` (absolute ``path:``);
- COCO format: ``annotations/instances_{train,val}.json`` with non-contiguous category ids (1, 3, 7, ...) and
  non-contiguous image ids, and ``coco.yaml`` in the yolo-prune COCO-format spec (see ``datasets/README.md``).

Command line: ``python -m yolo_prune.data.synthetic OUT_DIR [--seed 0] [--n-train 64] [--n-val 16] ...``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

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


def category_id(index: int) -> int:
    """COCO category id of class ``index``: 1, 3, 7, 15, ... (non-contiguous on purpose)."""
    return 2 ** (index + 1) - 1


def image_id(split: str, index: int) -> int:
    """COCO image id of image ``index`` of ``split``: non-contiguous and unrelated to the file name."""
    return (1000 if split == "train" else 5000) + 7 * index


def make_synthetic(
    root: str | Path, *, n_train: int = 64, n_val: int = 16, imgsz: int = 256, nc: int = 3, seed: int = 0
) -> Path:
    """Write the synthetic dataset under ``root`` (YOLO and COCO forms) and return ``root``.

    The same arguments always give byte-identical files. When ``root`` already holds a complete dataset made with the
    same arguments (see ``root/synthetic.json``) nothing is written.
    """
    params = _check_params(n_train=n_train, n_val=n_val, imgsz=imgsz, nc=nc, seed=seed)
    root = Path(root).expanduser().absolute()
    if _is_complete(root, params):
        return root
    _remove_previous(root)
    files: list[str] = []
    for split, count in zip(SPLITS, (n_train, n_val)):
        files += _write_split(root, split, count, params)
    files += _write_yamls(root, nc)
    write_json(root / MARKER, {"generator": "yolo_prune.data.synthetic", "version": GENERATOR_VERSION,
                               "params": params, "files": files})
    return root


def _check_params(**params: int) -> dict[str, int]:
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


def _is_complete(root: Path, params: dict[str, int]) -> bool:
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


def _draw_object(img: np.ndarray, cls: int, cx: float, cy: float, rx: float, ry: float,
                 colour: tuple[int, int, int]) -> tuple[float, float, float, float]:
    """Draw class ``cls`` centred at (cx, cy) with half-extents (rx, ry); return its box (x1, y1, x2, y2)."""
    name = CLASSES[cls][0]
    if name in ("circle", "ring"):
        centre, axes = (round(cx), round(cy)), (max(1, round(rx)), max(1, round(ry)))
        if name == "circle":
            cv2.ellipse(img, centre, axes, 0, 0, 360, colour, -1, cv2.LINE_AA)
        else:
            thickness = max(2, round(min(rx, ry) / 3))
            inner = (max(1, axes[0] - thickness // 2), max(1, axes[1] - thickness // 2))
            cv2.ellipse(img, centre, inner, 0, 0, 360, colour, thickness, cv2.LINE_AA)
        return centre[0] - axes[0], centre[1] - axes[1], centre[0] + axes[0] + 1, centre[1] + axes[1] + 1
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
    ipts = np.round(pts).astype(np.int32)
    cv2.fillPoly(img, [ipts], colour, cv2.LINE_AA)
    x1, y1 = ipts.min(0)
    x2, y2 = ipts.max(0) + 1
    return float(x1), float(y1), float(x2), float(y2)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _render(rng: np.random.Generator, w: int, h: int, nc: int, empty: bool) -> tuple[np.ndarray, list[tuple]]:
    """Render one image; return it and its objects as (class, x1, y1, x2, y2) in pixels (clipped to the image)."""
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
        x1, y1, x2, y2 = _draw_object(img, cls, cx, cy, rx, ry, colour)
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            objects.append((cls, x1, y1, x2, y2))
    return img, objects


# Writing --------------------------------------------------------------------------------------------------------


def _write_split(root: Path, split: str, count: int, params: dict[str, int]) -> list[str]:
    """Write the images, YOLO labels and COCO json of one split; return the written files (relative to root)."""
    imgsz, nc, seed = params["imgsz"], params["nc"], params["seed"]
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    images, annotations, files = [], [], []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        w, h = (imgsz, imgsz) if rng.random() < 0.6 else (imgsz, (imgsz * 3 // 4) // 2 * 2)
        img, objects = _render(rng, w, h, nc, empty=(i % 8 == 5))
        name = f"{split}_{i:04d}"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok, "JPEG encoding failed"
        (root / "images" / split / f"{name}.jpg").write_bytes(buf.tobytes())
        (root / "labels" / split / f"{name}.txt").write_text(_yolo_lines(objects, w, h), encoding="utf-8")
        files += [f"images/{split}/{name}.jpg", f"labels/{split}/{name}.txt"]
        iid = image_id(split, i)
        images.append({"id": iid, "file_name": f"{name}.jpg", "width": w, "height": h})
        for cls, x1, y1, x2, y2 in objects:
            bw, bh = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": category_id(cls),
                                "bbox": [round(x1, 2), round(y1, 2), round(bw, 2), round(bh, 2)],
                                "area": round(bw * bh, 2), "iscrowd": 0})
    coco = {
        "info": {"description": f"yolo-prune synthetic dataset ({split})", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category_id(k), "name": CLASSES[k][0], "supercategory": "shape"} for k in range(nc)],
    }
    write_json(root / "annotations" / f"instances_{split}.json", coco)
    return files + [f"annotations/instances_{split}.json"]


def _yolo_lines(objects: list[tuple], w: int, h: int) -> str:
    lines = [f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
             for cls, x1, y1, x2, y2 in objects]
    return "".join(line + "\n" for line in lines)


def _write_yamls(root: Path, nc: int) -> list[str]:
    names = [CLASSES[k][0] for k in range(nc)]
    write_yaml(root / "yolo.yaml", {"path": str(root), "train": "images/train", "val": "images/val", "names": names})
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
    args = parser.parse_args(argv)
    root = make_synthetic(args.out_dir, n_train=args.n_train, n_val=args.n_val, imgsz=args.imgsz, nc=args.nc,
                          seed=args.seed)
    print(f"YOLO format: {root / 'yolo.yaml'}\nCOCO format: {root / 'coco.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
