"""COCO evaluation: id mapping through ultralytics' validator, backends, result files, and the coco128 fixture."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import yolo_prune.evaluate as ev
from yolo_prune.data import make_synthetic, resolve_data
from yolo_prune.errors import ModelLoadError, UsageError
from yolo_prune.evaluate import CocoValidator, ValResult, coco_eval, evaluate

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
METRIC_KEYS = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_PRUNE_CACHE", str(tmp_path / "ypcache"))


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_train=4, n_val=16, imgsz=128, nc=3, seed=1)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        return DetectionModel("yolov8n.yaml", nc=3, verbose=False)


class OracleValidator(CocoValidator):
    """Predicts the ground truth of each image (in letterboxed input coordinates, as the model would).

    Everything downstream - rescaling to the original image, ltwh boxes, image and category id mapping, COCOeval -
    then has to reproduce a perfect score.
    """

    def update_metrics(self, preds, batch):
        oracle = []
        for si in range(len(preds)):
            pb = self._prepare_batch(si, batch)
            n = len(pb["cls"])
            oracle.append({"bboxes": pb["bboxes"].clone().reshape(n, 4), "conf": torch.linspace(1.0, 0.5, n),
                           "cls": pb["cls"].clone().float(), "extra": torch.zeros(n, 0)})
        super().update_metrics(oracle, batch)


# COCOeval backends ---------------------------------------------------------------------------------------------


def gt_as_predictions(gt: dict, rng: np.random.Generator | None = None) -> list[dict]:
    preds = []
    for a in gt["annotations"]:
        box = np.array(a["bbox"], float)
        score = 1.0
        if rng is not None:
            box += rng.normal(0, 0.08, 4) * box[[2, 3, 2, 3]]
            box[2:] = np.maximum(box[2:], 1.0)
            score = float(rng.uniform(0.05, 1.0))
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box.round(3).tolist(),
                      "score": round(score, 5)})
    if rng is not None:  # some false positives with wrong classes
        cats = [c["id"] for c in gt["categories"]]
        for p in list(preds[::3]):
            preds.append({**p, "category_id": cats[(cats.index(p["category_id"]) + 1) % len(cats)],
                          "score": round(float(rng.uniform(0, 0.6)), 5)})
    return preds


def test_perfect_predictions_score_one_with_both_backends(syn, tmp_path):
    gt_path = syn / "annotations" / "instances_val.json"
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(gt_as_predictions(json.loads(gt_path.read_text()))))
    for backend in ("pycocotools", "faster"):
        out = coco_eval(gt_path, pred_path, backend=backend)
        assert out["map50_95"] == pytest.approx(1.0) and out["map50"] == pytest.approx(1.0)
        assert set(out["per_class"]) == {"circle", "square", "triangle"}


def test_backends_agree_on_noisy_predictions(syn, tmp_path):
    gt_path = syn / "annotations" / "instances_val.json"
    preds = gt_as_predictions(json.loads(gt_path.read_text()), np.random.default_rng(0))
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(preds))
    slow = coco_eval(gt_path, pred_path, backend="pycocotools")
    fast = coco_eval(gt_path, pred_path, backend="faster")
    assert slow["backend"] == "pycocotools" and fast["backend"] == "faster-coco-eval"
    assert 0.05 < slow["map50_95"] < 0.95  # a non-trivial score
    for k in METRIC_KEYS:
        if slow[k] is None:
            assert fast[k] is None
        else:
            assert fast[k] == pytest.approx(slow[k], abs=1e-4), k
    for name, ap in slow["per_class"].items():
        assert fast["per_class"][name] == pytest.approx(ap, abs=1e-4)


def test_empty_predictions_score_zero(syn, tmp_path):
    (tmp_path / "pred.json").write_text("[]")
    for backend in ("pycocotools", "faster"):
        out = coco_eval(syn / "annotations" / "instances_val.json", tmp_path / "pred.json", backend=backend)
        assert out["map50_95"] == 0.0 and out["map50"] == 0.0


def test_backend_choice():
    assert ev.resolve_backend("auto") == "faster-coco-eval"  # installed in the dev environment
    assert ev.resolve_backend("pycocotools") == "pycocotools"
    with pytest.raises(UsageError, match="backend"):
        ev.resolve_backend("detectron")


# evaluate() ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_oracle_predictions_give_perfect_scores(syn, net, tmp_path, monkeypatch, fmt):
    """GT fed through the validator: rescaling and id mapping must give COCO mAP 1 (ultralytics agrees)."""
    monkeypatch.setitem(ev.VALIDATORS, "detect", OracleValidator)
    r = evaluate(net, syn / f"{fmt}.yaml", imgsz=160, batch=4, save_dir=tmp_path / "val")
    assert r.map50_95 == pytest.approx(1.0, abs=1e-6) and r.map50 == pytest.approx(1.0)
    assert r.ul_map50_95 > 0.99 and r.recall == pytest.approx(1.0)
    preds = json.loads(r.predictions_json.read_text())
    gt = json.loads(resolve_data(syn / f"{fmt}.yaml").val_json.read_text())
    assert len(preds) == len(gt["annotations"]) == r.n_predictions
    if fmt == "coco":  # the dataset's original, non-contiguous ids
        src = json.loads((syn / "annotations" / "instances_val.json").read_text())
        assert {p["category_id"] for p in preds} <= {1, 3, 7}
        assert {p["image_id"] for p in preds} <= {im["id"] for im in src["images"]}


def test_oracle_predictions_on_a_read_only_yolo_dataset(syn, net, tmp_path, monkeypatch):
    """A read-only YOLO dataset is evaluated through its cache mirror, and nothing is written into it."""
    monkeypatch.setitem(ev.VALIDATORS, "detect", OracleValidator)
    root = tmp_path / "ro"
    shutil.copytree(syn, root)
    cfg = yaml.safe_load((root / "yolo.yaml").read_text())
    (root / "yolo.yaml").write_text(yaml.safe_dump({**cfg, "path": str(root)}))
    os.chmod(root / "labels", 0o555)
    try:
        before = sorted(str(p) for p in root.rglob("*"))
        r = evaluate(net, root / "yolo.yaml", imgsz=160, batch=4)
        assert r.map50_95 == pytest.approx(1.0, abs=1e-6) and r.ul_map50_95 > 0.99
        assert sorted(str(p) for p in root.rglob("*")) == before  # no labels/*.cache in the dataset
    finally:
        os.chmod(root / "labels", 0o755)


def test_evaluate_random_model_writes_results(syn, net, tmp_path):
    out = tmp_path / "run"
    r = evaluate(net, syn / "coco.yaml", imgsz=128, batch=8, save_dir=out, backend="pycocotools")
    assert isinstance(r, ValResult) and r.backend == "pycocotools" and r.n_images == 16 and r.imgsz == 128
    assert r.predictions_json == out / "predictions.json" and r.metrics_json == out / "metrics.json"
    metrics = json.loads(r.metrics_json.read_text())
    for k in (*METRIC_KEYS, "ul_map50_95", "ul_map50", "precision", "recall", "backend", "eval_seconds",
              "n_images", "predictions_json"):
        assert k in metrics
    assert metrics["map50_95"] == r.map50_95 and metrics["n_images"] == 16
    preds = json.loads(r.predictions_json.read_text())
    assert len(preds) == r.n_predictions > 0
    src = json.loads((syn / "annotations" / "instances_val.json").read_text())
    assert {p["category_id"] for p in preds} <= {1, 3, 7}
    assert {p["image_id"] for p in preds} <= {im["id"] for im in src["images"]}
    assert all(len(p["bbox"]) == 4 and p["bbox"][2] >= 0 and 0 < p["score"] <= 1 for p in preds)
    assert "map50_95" in str(r) and "ValResult" in str(r)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.json"]


def test_evaluate_without_save_dir_keeps_no_files(syn, net):
    r = evaluate(net, syn / "yolo.yaml", imgsz=128, batch=16, backend="faster")
    assert r.save_dir is None and r.predictions_json is None and r.backend == "faster-coco-eval"
    assert r.n_images == 16 and 0.0 <= r.map50_95 <= 1.0


def test_evaluate_accepts_checkpoint_path_and_yolo_object(syn, net, tmp_path):
    from ultralytics import YOLO

    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": net, "train_args": {}}, ckpt)
    spec = resolve_data(syn / "coco.yaml")
    a = evaluate(str(ckpt), spec, imgsz=128, batch=16)
    b = evaluate(YOLO(str(ckpt)), spec, imgsz=128, batch=16)
    assert a.n_images == b.n_images == 16 and a.map50_95 == b.map50_95 and a.n_predictions == b.n_predictions


def test_evaluate_model_with_more_classes_warns(syn, tmp_path):
    from ultralytics import YOLO

    with contextlib.redirect_stdout(io.StringIO()):
        model = YOLO("yolov8n.yaml")  # random init, 80 classes
    with pytest.warns(UserWarning, match="predicts 80 classes"):
        r = evaluate(model, syn / "coco.yaml", imgsz=128, batch=16, save_dir=tmp_path / "v")
    preds = json.loads(r.predictions_json.read_text())
    assert {p["category_id"] for p in preds} <= {1, 3, 7}


def test_evaluate_bad_inputs(syn, tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    with pytest.raises(ModelLoadError, match="not found"):
        evaluate(tmp_path / "missing.pt", syn / "coco.yaml", imgsz=128)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load"):
        evaluate(tmp_path / "junk.pt", syn / "coco.yaml", imgsz=128)
    with pytest.raises(ModelLoadError, match="not an ultralytics detection model"):
        evaluate(torch.nn.Linear(2, 2), syn / "coco.yaml", imgsz=128)
    with contextlib.redirect_stdout(io.StringIO()):
        two = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    with pytest.raises(UsageError, match="predicts 2 classes"):
        evaluate(two, syn / "coco.yaml", imgsz=128)
    with pytest.raises(UsageError, match="backend"):
        evaluate(two, syn / "coco.yaml", backend="nope")


# Real weights and images (../shared/fixtures) ------------------------------------------------------------------


@pytest.mark.fixtures
@pytest.mark.skipif(not (FIXTURES / "coco128").is_dir(), reason="../shared/fixtures is absent (CI-only test data)")
def test_coco128_fixture_matches_pycocotools_and_ultralytics(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from ultralytics import YOLO

    coco128 = FIXTURES / "coco128"
    weights = FIXTURES / "weights" / "yolov8n_coco_int8rebuild.pt"
    ann = coco128 / "annotations" / "instances_train2017.json"
    data = tmp_path / "coco128-coco.yaml"  # COCO-format yaml pointing at the read-only fixture folders
    data.write_text(yaml.safe_dump({"path": str(coco128), "train": "images/train2017", "val": "images/train2017",
                                    "train_json": str(ann), "val_json": str(ann)}))
    r = evaluate(weights, data, imgsz=320, batch=16, save_dir=tmp_path / "val")
    assert r.n_images == 128

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools directly, on the original json
        gt = COCO(str(ann))
        e = COCOeval(gt, gt.loadRes(str(r.predictions_json)), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert r.map50_95 == pytest.approx(e.stats[0], abs=1e-4)
    assert r.map50 == pytest.approx(e.stats[1], abs=1e-4)

    # ultralytics' own val on the YOLO labels. ultralytics writes labels/*.cache beside the labels (as root, even
    # into read-only folders), so resolve_data mirrors a dataset without write permission into its cache and uses a
    # writable one in place. Both situations are made here on copies, whatever the permissions of ../shared: the
    # check reads the permission bits, so a chmod-ed copy is read-only for this test even when run as root.
    copies = {}
    for kind, mode in (("ro", 0o555), ("rw", 0o755)):
        root = Path(shutil.copytree(coco128, tmp_path / kind, copy_function=shutil.copyfile,
                                    ignore=shutil.ignore_patterns("annotations", "*.cache")))
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True) + [root]:
            d.chmod(mode)
        copies[kind] = root
    in_place = resolve_data(copies["rw"] / "coco128.yaml", cache_dir=tmp_path / "cache")
    assert in_place.yaml == copies["rw"] / "coco128.yaml"
    yolo_spec = resolve_data(copies["ro"] / "coco128.yaml", cache_dir=tmp_path / "cache")
    assert yolo_spec.yaml.parent == yolo_spec.cache and yolo_spec.cache.parent == tmp_path / "cache"
    assert not list(copies["ro"].rglob("*.cache"))
    ul = YOLO(str(weights)).val(data=str(yolo_spec.yaml), imgsz=320, batch=16, plots=False, verbose=False,
                                project=str(tmp_path), name="ul")
    assert abs(r.map50_95 - ul.box.map) < 0.02
    assert abs(r.map50 - ul.box.map50) < 0.02
    assert r.ul_map50_95 == pytest.approx(ul.box.map, abs=0.005)  # ultralytics on our converted labels
    y = evaluate(weights, yolo_spec, imgsz=320, batch=16)  # the YOLO-format path: COCO json made from the labels
    assert y.ul_map50_95 == pytest.approx(ul.box.map, abs=1e-6) and abs(y.map50_95 - r.map50_95) < 0.01
