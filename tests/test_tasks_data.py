"""Segmentation, pose and oriented-box data and evaluation (issue 22, the data half).

The generated dataset of each task parses with ultralytics' own dataset class (outlines, keypoints, rotated boxes,
one per drawn object) while the detection dataset stays byte for byte what it was; COCO polygons and RLE become
YOLO segment labels (on the real coco128 json when the fixtures are there); ``val`` of a segmentation, pose or OBB
checkpoint returns the task's metrics, which are exact (1) when the validator is fed the ground truth; the command
line prints box and mask mAP for a segmentation model. Random-init yolo11n task models at imgsz 64.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import yolo_prune.evaluate as ev
from yolo_prune import cli
from yolo_prune.data import make_synthetic, resolve_data
from yolo_prune.data.coco import load_coco_split, outline
from yolo_prune.data.synthetic import FLIP_IDX, KPT_SHAPE
from yolo_prune.errors import DatasetError, UsageError
from yolo_prune.evaluate import TASK_FIELDS, TASK_KEYS, evaluate
from yolo_prune.models import save_checkpoint

from ultralytics.nn.tasks import PoseModel

from .helpers import random_detection_model

pytestmark = pytest.mark.usefixtures("data_cache")

TASKS = ("segment", "pose", "obb")
CFG = {"segment": "yolo11n-seg.yaml", "pose": "yolo11n-pose.yaml", "obb": "yolo11n-obb.yaml"}
# sha256 of the detection dataset (n_train=3, n_val=2, imgsz=64, seed=0) as generated before the tasks existed
DETECT_DIGEST = "6312147c4c0a1e9129fc731beabd29c4e0ea7ba8de656d269a2f51778807c6a5"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "yolo.yaml"):  # yolo.yaml: its path
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _label_rows(root: Path, split: str = "train") -> list[list[float]]:
    return [[float(v) for v in line.split()] for f in sorted((root / "labels" / split).glob("*.txt"))
            for line in f.read_text().splitlines()]


# Generated data -------------------------------------------------------------------------------------------------


def test_detection_data_is_unchanged_and_tasks_share_its_images(tmp_path):
    detect = make_synthetic(tmp_path / "d", n_train=3, n_val=2, imgsz=64, seed=0)
    assert _digest(detect) == DETECT_DIGEST
    seg = make_synthetic(tmp_path / "s", n_train=3, n_val=2, imgsz=64, seed=0, task="segment")
    pose = make_synthetic(tmp_path / "p", n_train=3, n_val=2, imgsz=64, seed=0, task="pose")
    obb = make_synthetic(tmp_path / "o", n_train=3, n_val=2, imgsz=64, seed=0, task="obb")
    images = sorted(p.relative_to(detect) for p in (detect / "images").rglob("*.jpg"))
    for root in (seg, pose):  # the same pictures, other labels
        assert all((root / p).read_bytes() == (detect / p).read_bytes() for p in images)
        assert len(_label_rows(root)) == len(_label_rows(detect))
    assert any((obb / p).read_bytes() != (detect / p).read_bytes() for p in images)  # drawn turned
    assert (seg / "coco.yaml").is_file() and not (pose / "coco.yaml").exists() and not (obb / "coco.yaml").exists()
    with pytest.raises(UsageError, match="unknown task 'classify'"):
        make_synthetic(tmp_path / "c", task="classify")


def _dataset(root: Path, task: str):
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(root / "yolo.yaml"))
    return YOLODataset(img_path=data["train"], imgsz=64, augment=False, data=data, task=task, batch_size=4,
                       rect=False, single_cls=False, stride=32, pad=0.0, prefix="", cache=False)


@pytest.mark.parametrize("task", TASKS)
def test_generated_labels_parse_with_ultralytics(synthetic_task, task):
    root = synthetic_task(task)
    rows = _label_rows(root)
    ds = _dataset(root, task)
    labels = ds.labels
    assert sum(len(lb["cls"]) for lb in labels) == len(rows) > 10  # every object, none dropped as corrupt
    if task == "segment":
        segs = [s for lb in labels for s in lb["segments"]]
        assert len(segs) == len(rows) and all(len(s) >= 3 and 0 <= s.min() and s.max() <= 1 for s in segs)
        assert ds[0]["masks"].shape[-2:] == (16, 16)  # imgsz / mask_ratio
    elif task == "pose":
        kpts = np.concatenate([lb["keypoints"] for lb in labels if len(lb["cls"])])
        assert kpts.shape == (len(rows), *KPT_SHAPE)
        assert set(np.unique(kpts[..., 2])) <= {0.0, 2.0} and (kpts[..., 2] == 2).mean() > 0.9
        boxes = np.concatenate([lb["bboxes"] for lb in labels if len(lb["cls"])])  # xywh, normalized
        centre = kpts[:, 0, :2]
        assert (np.abs(centre - boxes[:, :2]) <= boxes[:, 2:] / 2 + 1e-3).all()  # the centre keypoint is inside
        top, bottom = kpts[:, 1], kpts[:, 3]
        seen = (top[:, 2] > 0) & (bottom[:, 2] > 0)
        assert (top[seen, 1] < bottom[seen, 1]).all()
        assert yaml_of(root)["kpt_shape"] == list(KPT_SHAPE) and yaml_of(root)["flip_idx"] == list(FLIP_IDX)
        assert ds[0]["keypoints"].shape[1:] == KPT_SHAPE
    else:
        segs = np.stack([s for lb in labels for s in lb["segments"]])
        assert segs.shape == (len(rows), 4, 2) and 0 <= segs.min() and segs.max() <= 1
        edge = segs[:, 1] - segs[:, 0]
        assert (np.abs(edge).min(1) > 1e-3).mean() > 0.5  # most rectangles really turned
        assert ds[0]["bboxes"].shape[1] == 5  # xywhr, made by ultralytics from the corners


def yaml_of(root: Path) -> dict:
    import yaml

    return yaml.safe_load((root / "yolo.yaml").read_text())


# COCO segmentation data -----------------------------------------------------------------------------------------


def test_coco_polygons_and_rle_become_segment_labels(tmp_path):
    root = make_synthetic(tmp_path / "s", n_train=8, n_val=2, imgsz=64, nc=5, seed=0, task="segment")  # 5: rings
    gt = json.loads((root / "annotations" / "instances_train.json").read_text())
    kinds = {type(a["segmentation"]).__name__ for a in gt["annotations"]}
    assert kinds == {"list", "dict"}  # polygons, and the rings as RLE
    spec = resolve_data(root / "coco.yaml", task="segment")
    assert spec.task == "segment" and resolve_data(root / "coco.yaml").task == "detect"
    rows = _label_rows(spec.cache, "train")
    assert len(rows) == len(gt["annotations"]) and all(len(r) >= 7 and len(r) % 2 == 1 for r in rows)
    assert min(min(r[1:]) for r in rows) >= 0 and max(max(r[1:]) for r in rows) <= 1
    val = json.loads(spec.val_json.read_text())
    assert all("segmentation" in a for a in val["annotations"])
    ring = next(a for a in gt["annotations"] if isinstance(a["segmentation"], dict))
    image = next(im for im in gt["images"] if im["id"] == ring["image_id"])
    poly = outline(ring["segmentation"], image["width"], image["height"])
    x, y, w, h = ring["bbox"]
    assert poly.shape[1] == 2 and abs(poly[:, 0].min() - x) < 2 and abs(poly[:, 0].max() - (x + w)) < 2


def test_outline_of_rle_and_of_several_polygons():
    from pycocotools import mask as mask_utils

    m = np.zeros((40, 50), np.uint8)
    m[5:20, 10:30] = 1  # the larger part
    m[30:34, 40:44] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    for seg in ({"size": [40, 50], "counts": rle["counts"].decode()},  # compressed
                {"size": [40, 50], "counts": [int(v) for v in _runs(m)]}):  # uncompressed
        poly = outline(seg, 50, 40)
        assert poly.min(0).tolist() == [10.5, 5.5] and poly.max(0).tolist() == [29.5, 19.5]
    two = [[0, 0, 10, 0, 10, 10, 0, 10], [20, 20, 30, 20, 30, 30]]
    joined = outline(two, 50, 40)
    assert joined.min(0).tolist() == [0, 0] and joined.max(0).tolist() == [30, 30] and len(joined) > 7
    assert outline([], 50, 40) is None and outline({"size": [4, 4], "counts": "garbage!"}, 4, 4) is None


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs


def test_coco128_polygons_become_segment_labels(shared_fixtures):
    root = shared_fixtures / "coco128"
    split = load_coco_split(root / "annotations" / "instances_train2017.json", root / "images" / "train2017",
                            segments=True)
    anns = [a for a in split.annotations if not a.get("iscrowd", 0)]
    polys = [(im.width, im.height, p) for im in split.images for _, p in split.segments[im.id]]
    assert len(polys) == len(anns) == sum(len(b) for b in split.boxes.values()) > 900
    n_parts = sum(len(a["segmentation"]) > 1 for a in anns)
    assert n_parts > 0  # several polygons of one object are joined into one outline
    for w, h, p in polys:
        assert p.ndim == 2 and p.shape[1] == 2 and len(p) >= 3
        assert -1 <= p.min() and (p[:, 0] <= w + 1).all() and (p[:, 1] <= h + 1).all()
    from yolo_prune.data.coco import segment_lines

    lines = [segment_lines(split.segments[im.id], im.width, im.height) for im in split.images]
    values = np.array([float(v) for text in lines for line in text.splitlines() for v in line.split()[1:]])
    assert values.min() >= 0 and values.max() <= 1


# val ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_ckpt(tmp_path_factory):
    made = {}

    def make(task: str) -> Path:
        if task not in made:
            if task == "pose":  # the keypoints of the data, not the yaml's 17
                torch.manual_seed(0)
                model = PoseModel(CFG[task], nc=3, data_kpt_shape=KPT_SHAPE, verbose=False).eval()
            else:
                model = random_detection_model(CFG[task], nc=3)
            made[task] = save_checkpoint(model, tmp_path_factory.mktemp(task) / f"{task}.pt")
        return made[task]

    return make


@pytest.mark.parametrize("task", TASKS)
def test_val_returns_the_task_metrics(task_ckpt, synthetic_task, task, tmp_path):
    r = evaluate(task_ckpt(task), synthetic_task(task) / "yolo.yaml", imgsz=64, batch=4, save_dir=tmp_path)
    assert r.task == task and r.n_images == 6
    for key in TASK_FIELDS:
        value = getattr(r, key)
        assert (value is not None and 0 <= value <= 1) if key in TASK_KEYS[task] else value is None, key
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == task and set(TASK_KEYS[task]) <= set(metrics)
    assert not (TASK_FIELDS - set(TASK_KEYS[task])) & set(metrics)
    name = {"segment": "mask", "pose": "pose", "obb": "obb"}[task]
    assert f"\n{name} " in str(r) and "\nbox " in str(r)


def _oracle(task: str):
    """The task's validator fed the ground truth of each image, in letterboxed input coordinates."""
    base = ev.VALIDATORS[task]

    class Oracle(base):
        def update_metrics(self, preds, batch):
            oracle = []
            for si in range(len(preds)):
                pb = self._prepare_batch(si, batch)
                n = len(pb["cls"])
                p = {"bboxes": pb["bboxes"].clone(), "conf": torch.linspace(1.0, 0.5, n), "cls": pb["cls"].float()}
                if task == "segment":
                    p["masks"] = (pb["masks"] if n else torch.zeros(0, *pb["imgsz"])).to(torch.uint8)
                if task == "pose":
                    p["keypoints"] = pb["keypoints"].clone()
                oracle.append(p)
            super().update_metrics(oracle, batch)

    return Oracle


@pytest.mark.parametrize("task, fmt", [("segment", "coco"), ("segment", "yolo"), ("pose", "yolo"), ("obb", "yolo")])
def test_ground_truth_scores_one(task_ckpt, synthetic_task, task, fmt, tmp_path, monkeypatch):
    monkeypatch.setitem(ev.VALIDATORS, task, _oracle(task))
    r = evaluate(task_ckpt(task), synthetic_task(task) / f"{fmt}.yaml", imgsz=128, batch=4, save_dir=tmp_path)
    metrics: dict = {k: getattr(r, k) for k in TASK_KEYS[task]}
    if fmt == "coco":  # COCOeval segm of the predicted masks against the json's own polygons and RLE: the oracle's
        # masks are ultralytics' ground truth masks, rasterized at a quarter of the input size, so only IoU 0.5 is
        # exact; a mask scaled back wrongly (letterbox padding, size) would miss that too
        assert r.mask_map50 == pytest.approx(1.0) and r.mask_map50_95 > 0.4, metrics
        metrics["mask_map50_95"] = None
    assert r.recall == pytest.approx(1.0) and all(v > 0.97 for v in metrics.values() if v is not None), metrics
    assert r.map50 == pytest.approx(1.0), r.map50  # OBB: the extent of the predicted rectangle, as of the labels
    preds = json.loads(r.predictions_json.read_text())
    if task == "segment":
        from pycocotools import mask as mask_utils

        gt = json.loads(resolve_data(synthetic_task(task) / f"{fmt}.yaml", task=task).val_json.read_text())
        size = {im["id"]: [im["height"], im["width"]] for im in gt["images"]}
        assert all(p["segmentation"]["size"] == size[p["image_id"]] for p in preds)  # the original image size
        assert all(mask_utils.area(p["segmentation"]) > 0 for p in preds)
        if fmt == "coco":  # both COCOeval backends score masks alike
            slow, fast = (ev.coco_eval(r.val_json, r.predictions_json, backend=b, iou_type="segm")
                          for b in ("pycocotools", "faster"))
            assert slow["map50_95"] == pytest.approx(fast["map50_95"], abs=1e-4) == r.mask_map50_95
    if task == "obb":
        assert all(len(p["rbox"]) == 5 and len(p["poly"]) == 8 for p in preds)


def test_cli_val_prints_box_and_mask_map(task_ckpt, synthetic_task, tmp_path, capsys):
    code = cli.main(["val", f"model={task_ckpt('segment')}", f"data={synthetic_task('segment') / 'coco.yaml'}",
                     "imgsz=64", "batch=4", f"project={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "mask_map50_95" in out and "\nbox " in out and "\nmask " in out
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert metrics["task"] == "segment" and 0 <= metrics["mask_map50_95"] <= metrics["mask_map50"] <= 1


def test_pose_model_needs_its_pose_data(task_ckpt, synthetic_task):
    with pytest.raises(UsageError, match="yolo.yaml has no kpt_shape"):
        evaluate(task_ckpt("pose"), synthetic_task("detect") / "yolo.yaml", imgsz=64, batch=4)
    coco_pose = random_detection_model(CFG["pose"], nc=3)  # 17 keypoints
    with pytest.raises(UsageError, match=r"keypoints of shape \[17, 3\] but yolo.yaml has kpt_shape \[5, 3\]"):
        evaluate(coco_pose, synthetic_task("pose") / "yolo.yaml", imgsz=64, batch=4)


def test_task_models_on_data_of_another_task_are_one_line_errors(task_ckpt, synthetic_task, tmp_path, capsys):
    detect = synthetic_task("detect")
    with pytest.raises(UsageError, match=r"yolo.yaml has box labels \(cls cx cy w h\): a segment model"):
        evaluate(task_ckpt("segment"), detect / "yolo.yaml", imgsz=64, batch=4)
    with pytest.raises(DatasetError, match="no annotation has a segmentation"):
        evaluate(task_ckpt("segment"), detect / "coco.yaml", imgsz=64, batch=4)
    with pytest.raises(UsageError, match="COCO-format data, which has no rotated boxes"):
        evaluate(task_ckpt("obb"), synthetic_task("segment") / "coco.yaml", imgsz=64, batch=4)
    code = cli.main(["val", f"model={task_ckpt('obb')}", f"data={detect / 'yolo.yaml'}", "imgsz=64",
                     f"project={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "an obb model is validated on rotated-box" in err, err


def test_val_of_a_segmentation_export_reads_its_task(task_ckpt, synthetic_task, tmp_path):
    from ultralytics import YOLO

    onnx_file = YOLO(str(task_ckpt("segment"))).export(format="onnx", imgsz=64, verbose=False)
    r = evaluate(onnx_file, synthetic_task("segment") / "coco.yaml", imgsz=64, batch=4)
    assert r.task == "segment" and all(0 <= getattr(r, k) <= 1 for k in TASK_KEYS["segment"])
