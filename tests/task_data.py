"""Tiny YOLO-format segmentation, pose and OBB datasets for the task training tests, derived from the generated
detection dataset (:func:`yolo_prune.data.synthetic.make_synthetic`): the same images (linked), each box turned into
the task's label: its rectangle as a polygon (segment), its four corners as oriented box (obb), its centre and
the middles of its left and right sides as keypoints (pose). Written under the test's tmp folder; the generated dataset is only read."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

KPT_SHAPE = [3, 3]


def _task_line(task: str, cls: str, cx: float, cy: float, w: float, h: float) -> str:
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    corners = [x0, y0, x1, y0, x1, y1, x0, y1]
    if task == "segment":
        values = corners
    elif task == "obb":
        values = corners
    else:  # pose: box, then (x, y, visible) per keypoint
        values = [cx, cy, w, h, cx, cy, 2, x0, cy, 2, x1, cy, 2]
    return " ".join([cls, *(f"{v:.6f}" if isinstance(v, float) else str(v) for v in values)])


def make_task_data(detect_root: Path, task: str, out: Path) -> Path:
    """``out/data.yaml`` of ``task`` (segment, pose, obb) over the images of ``detect_root`` (the generated
    dataset's YOLO form)."""
    src = yaml.safe_load((detect_root / "yolo.yaml").read_text())
    base = Path(src.get("path") or detect_root)
    base = base if base.is_absolute() else (detect_root / base)
    splits = {}
    for split in ("train", "val"):
        images = base / src[split]
        labels = Path(str(images).replace(f"{os.sep}images", f"{os.sep}labels"))
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for img in sorted(images.iterdir()):
            (out / "images" / split / img.name).symlink_to(img.resolve())
            label = labels / f"{img.stem}.txt"
            lines = [ln.split() for ln in label.read_text().splitlines() if ln.strip()] if label.is_file() else []
            text = "\n".join(_task_line(task, c, *map(float, v)) for c, *v in lines)
            (out / "labels" / split / f"{img.stem}.txt").write_text(text + ("\n" if text else ""))
        splits[split] = f"images/{split}"
    data = {"path": str(out), **splits, "names": src["names"]}
    if task == "pose":
        data["kpt_shape"] = KPT_SHAPE
        data["flip_idx"] = [0, 2, 1]  # centre, left, right: a mirror swaps left and right
    (out / "data.yaml").write_text(yaml.safe_dump(data))
    return out / "data.yaml"
