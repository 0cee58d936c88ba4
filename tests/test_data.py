"""Synthetic dataset, YOLO/COCO-format resolution, the conversion cache and bad-input handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from yolo_prune.data import DataSpec, make_synthetic, resolve_data
from yolo_prune.data.coco import DataWarning
from yolo_prune.data.synthetic import category_id
from yolo_prune.errors import DatasetError, UsageError

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=8, n_val=8, imgsz=128, nc=3, seed=0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache in tests."""
    monkeypatch.setenv("YOLO_PRUNE_CACHE", str(tmp_path / "ypcache"))


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    """A small synthetic dataset shared by the read-only tests of this module."""
    return make_synthetic(tmp_path_factory.mktemp("syn"), **SMALL)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime, to prove nothing was written there."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_dataset(src: Path, dst: Path) -> Path:
    """Copy a synthetic dataset; its yolo.yaml is pointed at the copy."""
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "yolo.yaml").read_text())
    (dst / "yolo.yaml").write_text(yaml.safe_dump({**cfg, "path": str(dst)}))
    return dst


def read_yolo(path: Path) -> np.ndarray:
    text = path.read_text().strip()
    return np.array([list(map(float, line.split())) for line in text.splitlines()]).reshape(-1, 5)


def data_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DataWarning)]


# Synthetic dataset ---------------------------------------------------------------------------------------------


def test_synthetic_layout_and_contents(syn):
    for split in ("train", "val"):
        assert len(list((syn / "images" / split).glob("*.jpg"))) == 8
        assert len(list((syn / "labels" / split).glob("*.txt"))) == 8
    cfg = yaml.safe_load((syn / "yolo.yaml").read_text())
    assert Path(cfg["path"]).is_absolute() and Path(cfg["path"]) == syn
    assert cfg["names"] == ["circle", "square", "triangle"]
    coco_cfg = yaml.safe_load((syn / "coco.yaml").read_text())
    assert coco_cfg["val_json"] == "annotations/instances_val.json" and coco_cfg["val"] == "images/val"

    coco = json.loads((syn / "annotations" / "instances_val.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 3, 7]
    ids = [im["id"] for im in coco["images"]]
    assert len(set(ids)) == 8 and ids != list(range(1, 9))  # non-contiguous image ids
    per_image = {im["id"]: 0 for im in coco["images"]}
    for a in coco["annotations"]:
        per_image[a["image_id"]] += 1
    assert 0 in per_image.values()  # background images exist
    assert len({(im["width"], im["height"]) for im in coco["images"]}) >= 1


def test_synthetic_yolo_and_coco_labels_agree(syn):
    coco = json.loads((syn / "annotations" / "instances_train.json").read_text())
    cls_of = {c["id"]: i for i, c in enumerate(coco["categories"])}
    for im in coco["images"]:
        w, h = im["width"], im["height"]
        boxes = sorted((cls_of[a["category_id"]], a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2,
                        a["bbox"][2], a["bbox"][3]) for a in coco["annotations"] if a["image_id"] == im["id"])
        yolo = read_yolo(syn / "labels" / "train" / im["file_name"].replace(".jpg", ".txt"))
        yolo_px = sorted((int(c), x * w, y * h, bw * w, bh * h) for c, x, y, bw, bh in yolo)
        assert len(boxes) == len(yolo_px)
        for a, b in zip(boxes, yolo_px):
            assert a[0] == b[0] and np.allclose(a[1:], b[1:], atol=0.02)


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic(tmp_path / "a", **SMALL)
    b = make_synthetic(tmp_path / "b", **SMALL)
    c = make_synthetic(tmp_path / "c", **{**SMALL, "seed": 1})
    files = [p.relative_to(a) for p in sorted(a.rglob("*")) if p.is_file() and p.name != "yolo.yaml"]
    assert len(files) > 30
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "images/train/train_0000.jpg").read_bytes() != (c / "images/train/train_0000.jpg").read_bytes()


def test_synthetic_reuses_complete_dataset_and_regenerates_on_new_params(tmp_path):
    root = make_synthetic(tmp_path / "d", **SMALL)
    before = snapshot(root)
    time.sleep(0.01)
    assert make_synthetic(root, **SMALL) == root
    assert snapshot(root) == before  # nothing rewritten

    make_synthetic(root, **{**SMALL, "n_val": 3})
    assert sorted(p.name for p in (root / "images" / "val").iterdir()) == [f"val_000{i}.jpg" for i in range(3)]
    assert len(json.loads((root / "annotations/instances_val.json").read_text())["images"]) == 3


def test_synthetic_defaults_are_fast(tmp_path):
    t0 = time.perf_counter()
    root = make_synthetic(tmp_path / "full")
    assert time.perf_counter() - t0 < 5
    assert len(list((root / "images" / "train").glob("*.jpg"))) == 64
    assert len(list((root / "images" / "val").glob("*.jpg"))) == 16


def test_synthetic_more_classes_use_distinct_ids(tmp_path):
    root = make_synthetic(tmp_path / "nc5", n_train=4, n_val=4, imgsz=96, nc=5)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [category_id(i) for i in range(5)] == [1, 3, 7, 15, 31]


@pytest.mark.parametrize("bad", [{"nc": 0}, {"nc": 99}, {"imgsz": 16}, {"n_val": 0}, {"seed": 1.5}])
def test_synthetic_rejects_bad_parameters(tmp_path, bad):
    with pytest.raises(UsageError):
        make_synthetic(tmp_path / "x", **{**SMALL, **bad})


def test_synthetic_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "yolo_prune.data.synthetic", str(tmp_path / "cli"), "--seed", "3",
                          "--n-train", "2", "--n-val", "2", "--imgsz", "64"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "coco.yaml" in out.stdout
    marker = json.loads((tmp_path / "cli" / "synthetic.json").read_text())
    assert marker["params"]["seed"] == 3 and (tmp_path / "cli" / "images/val/val_0001.jpg").is_file()


# resolve_data: YOLO format -------------------------------------------------------------------------------------


def test_resolve_yolo_format(syn, tmp_path):
    before = snapshot(syn)
    spec = resolve_data(syn / "yolo.yaml", cache_dir=tmp_path / "cache")
    assert isinstance(spec, DataSpec) and spec.format == "yolo"
    assert spec.yaml == syn / "yolo.yaml" and spec.source == syn / "yolo.yaml"
    assert spec.names == ["circle", "square", "triangle"] and spec.nc == 3 and spec.category_ids == [1, 2, 3]
    assert len(spec.train_images) == 8 and all(p.is_file() for p in spec.train_images)
    assert spec.cache.parent == tmp_path / "cache"

    gt = json.loads(spec.val_json.read_text())
    assert len(gt["images"]) == 8 and [c["id"] for c in gt["categories"]] == [1, 2, 3]
    n_lines = sum(len(read_yolo(p)) for p in (syn / "labels" / "val").glob("*.txt"))
    assert len(gt["annotations"]) == n_lines
    for p in spec.val_images:
        assert spec.image_id(p) in {im["id"] for im in gt["images"]}
    assert snapshot(syn) == before  # nothing written into the dataset
    assert resolve_data(spec) is spec


def test_resolve_yolo_boxes_match_the_coco_source(syn):
    """YOLO labels -> COCO json gives back the synthetic COCO boxes (up to label rounding)."""
    spec = resolve_data(syn / "yolo.yaml")
    gt = json.loads(spec.val_json.read_text())
    src = json.loads((syn / "annotations/instances_val.json").read_text())
    name_of = {im["id"]: im["file_name"] for im in src["images"]}
    want = sorted((name_of[a["image_id"]], [1, 3, 7].index(a["category_id"]), *a["bbox"]) for a in src["annotations"])
    name_of = {im["id"]: Path(im["file_name"]).name for im in gt["images"]}
    got = sorted((name_of[a["image_id"]], a["category_id"] - 1, *a["bbox"]) for a in gt["annotations"])
    assert [w[:2] for w in want] == [g[:2] for g in got]
    assert np.allclose([w[2:] for w in want], [g[2:] for g in got], atol=0.05)


# resolve_data: COCO format -------------------------------------------------------------------------------------


def test_resolve_coco_format(syn, tmp_path):
    before = snapshot(syn)
    spec = resolve_data(syn / "coco.yaml", cache_dir=tmp_path / "cache")
    assert spec.format == "coco" and spec.names == ["circle", "square", "triangle"] and spec.nc == 3
    assert spec.category_ids == [1, 3, 7]
    assert spec.yaml.parent == spec.cache and spec.cache.parent == tmp_path / "cache"
    assert len(spec.train_images) == 8 and len(spec.val_images) == 8
    cfg = yaml.safe_load(spec.yaml.read_text())
    assert cfg["names"] == spec.names and Path(cfg["path"]) == spec.cache

    # images are links to the user's files, labels equal the synthetic YOLO labels (same boxes)
    for img in spec.val_images:
        assert img.is_symlink() and img.resolve() == (syn / "images" / "val" / img.name).resolve()
        ours = read_yolo(spec.cache / "labels" / "val" / img.with_suffix(".txt").name)
        theirs = read_yolo(syn / "labels" / "val" / img.with_suffix(".txt").name)
        assert ours.shape == theirs.shape and np.allclose(np.sort(ours, 0), np.sort(theirs, 0), atol=1e-4)

    src = json.loads((syn / "annotations/instances_val.json").read_text())
    gt = json.loads(spec.val_json.read_text())
    assert {im["id"] for im in gt["images"]} == {im["id"] for im in src["images"]}
    assert len(gt["annotations"]) == len(src["annotations"])
    assert {spec.image_id(p) for p in spec.val_images} == {im["id"] for im in src["images"]}
    assert snapshot(syn) == before  # the user's dataset is untouched


def test_ultralytics_reads_the_converted_dataset(syn, tmp_path):
    from ultralytics.data.utils import check_det_dataset

    spec = resolve_data(syn / "coco.yaml", cache_dir=tmp_path / "cache")
    data = check_det_dataset(str(spec.yaml))
    assert data["nc"] == 3 and Path(data["val"]) == (spec.cache / "images" / "val").resolve()


def test_cache_is_reused_and_rebuilt_when_json_changes(tmp_path):
    root = copy_dataset(make_synthetic(tmp_path / "s", **SMALL), tmp_path / "copy")
    first = resolve_data(root / "coco.yaml")
    assert first.cache.parent == tmp_path / "ypcache" / "data"  # YOLO_PRUNE_CACHE is the root
    stamp = (first.cache / "manifest.json").stat().st_mtime_ns
    again = resolve_data(root / "coco.yaml")
    assert again.cache == first.cache and (again.cache / "manifest.json").stat().st_mtime_ns == stamp

    js = root / "annotations" / "instances_val.json"
    coco = json.loads(js.read_text())
    removed = coco["annotations"].pop()
    js.write_text(json.dumps(coco))
    changed = resolve_data(root / "coco.yaml")
    assert changed.cache != first.cache
    assert len(json.loads(changed.val_json.read_text())["annotations"]) == len(coco["annotations"])
    assert removed["id"] not in {a["id"] for a in json.loads(changed.val_json.read_text())["annotations"]}


def test_default_cache_location(tmp_path, monkeypatch):
    from yolo_prune.data.spec import cache_root

    monkeypatch.delenv("YOLO_PRUNE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "yolo_prune" / "data"
    assert cache_root(tmp_path) == tmp_path


def test_crowd_boxes_skipped_clipped_and_background_kept(tmp_path):
    root = copy_dataset(make_synthetic(tmp_path / "s", **SMALL), tmp_path / "copy")
    js = root / "annotations" / "instances_val.json"
    coco = json.loads(js.read_text())
    im = coco["images"][0]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != im["id"]]
    coco["annotations"] += [
        {"id": 900, "image_id": im["id"], "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 1},
        {"id": 901, "image_id": im["id"], "category_id": 7, "bbox": [im["width"] - 20, 5, 60, 20], "area": 1200,
         "iscrowd": 0},
    ]
    js.write_text(json.dumps(coco))
    spec = resolve_data(root / "coco.yaml")
    label = read_yolo(spec.cache / "labels" / "val" / im["file_name"].replace(".jpg", ".txt"))
    assert len(label) == 1 and label[0, 0] == 2  # the crowd box is gone; category 7 -> class 2
    cx, w = label[0, 1], label[0, 3]
    assert cx + w / 2 == pytest.approx(1.0, abs=1e-5) and w == pytest.approx(20 / im["width"], abs=1e-5)
    gt = json.loads(spec.val_json.read_text())
    assert {a["id"]: a["iscrowd"] for a in gt["annotations"] if a["image_id"] == im["id"]} == {900: 1, 901: 0}
    # images without annotations stay as background: an empty label file and an entry in val.json
    empty = [p for p in (spec.cache / "labels" / "val").glob("*.txt") if not p.read_text().strip()]
    assert empty and len(gt["images"]) == 8


# Bad input -----------------------------------------------------------------------------------------------------


def write_coco_yaml(root: Path, **over: str) -> Path:
    cfg = {"path": str(root), "train": "images/train", "val": "images/val",
           "train_json": "annotations/instances_train.json", "val_json": "annotations/instances_val.json", **over}
    path = root / "custom.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A private, writable copy of a small synthetic dataset."""
    return copy_dataset(make_synthetic(tmp_path / "s", **SMALL), tmp_path / "ds")


def test_missing_yaml(tmp_path):
    with pytest.raises(DatasetError, match="data yaml not found"):
        resolve_data(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(DatasetError, match="invalid YAML"):
        resolve_data(tmp_path / "bad.yaml")


def test_missing_json(dataset):
    with pytest.raises(DatasetError, match=r"missing\.json.*not found"):
        resolve_data(write_coco_yaml(dataset, val_json="annotations/missing.json"))


def test_missing_image_folder(dataset):
    with pytest.raises(DatasetError, match=r"images/nowhere.*image folder not found"):
        resolve_data(write_coco_yaml(dataset, val="images/nowhere"))


def test_yaml_without_val_json(dataset):
    with pytest.raises(DatasetError, match="val_json"):
        resolve_data(write_coco_yaml(dataset, val_json=None))


def test_invalid_json(dataset):
    (dataset / "annotations" / "instances_val.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"instances_val\.json: invalid JSON"):
        resolve_data(dataset / "coco.yaml")


def test_json_without_categories(dataset):
    js = dataset / "annotations" / "instances_val.json"
    coco = json.loads(js.read_text())
    del coco["categories"]
    js.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="categories"):
        resolve_data(dataset / "coco.yaml")


def test_train_and_val_categories_must_match(dataset):
    js = dataset / "annotations" / "instances_train.json"
    coco = json.loads(js.read_text())
    coco["categories"][0]["name"] = "blob"
    js.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="categories differ"):
        resolve_data(dataset / "coco.yaml")


def test_no_readable_image(dataset):
    for p in (dataset / "images" / "val").glob("*.jpg"):
        p.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="none of its 8 images can be read"):
        resolve_data(dataset / "coco.yaml")


def test_bad_annotations_are_skipped_with_one_warning(dataset):
    js = dataset / "annotations" / "instances_val.json"
    coco = json.loads(js.read_text())
    n_good = len(coco["annotations"])
    iid = coco["images"][1]["id"]
    coco["annotations"] += [
        {"id": 1001, "image_id": 424242, "category_id": 1, "bbox": [1, 1, 10, 10]},  # unknown image
        {"id": 1002, "image_id": iid, "category_id": 2, "bbox": [1, 1, 10, 10]},  # unknown category
        {"id": 1003, "image_id": iid, "category_id": 1, "bbox": [1, 1, 0, 10]},  # zero width
        {"id": 1004, "image_id": iid, "category_id": 1, "bbox": [1, 1, 10, -3]},  # negative height
    ]
    js.write_text(json.dumps(coco))
    with pytest.warns(DataWarning) as record:
        spec = resolve_data(dataset / "coco.yaml")
    msgs = data_warnings(record)
    assert len(msgs) == 1
    assert "instances_val.json: skipped 4 annotations" in msgs[0]
    assert "1 unknown image id" in msgs[0] and "1 unknown category id" in msgs[0] and "2 non-positive" in msgs[0]
    assert len(json.loads(spec.val_json.read_text())["annotations"]) == n_good


def test_undecodable_and_missing_images_are_skipped_with_one_warning(dataset):
    coco = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    broken, gone = coco["images"][0], coco["images"][1]
    (dataset / "images" / "val" / broken["file_name"]).write_bytes(b"\xff\xd8 garbage")
    (dataset / "images" / "val" / gone["file_name"]).unlink()
    with pytest.warns(DataWarning) as record:
        spec = resolve_data(dataset / "coco.yaml")
    msgs = data_warnings(record)
    assert len(msgs) == 1 and "skipped 2 images (1 missing image file, 1 unreadable image)" in msgs[0]
    gt = json.loads(spec.val_json.read_text())
    assert {broken["id"], gone["id"]}.isdisjoint(im["id"] for im in gt["images"]) and len(gt["images"]) == 6
    assert {broken["id"], gone["id"]}.isdisjoint(a["image_id"] for a in gt["annotations"])
    assert sorted(p.name for p in spec.val_images) == sorted(
        im["file_name"] for im in coco["images"][2:])
    # the cache is reused and warns again: the skip is still visible on later runs
    with pytest.warns(DataWarning):
        resolve_data(dataset / "coco.yaml")


def test_yolo_format_bad_images_and_labels_are_skipped(dataset):
    val = sorted((dataset / "images" / "val").glob("*.jpg"))
    val[0].write_bytes(b"garbage")
    (dataset / "labels" / "val" / val[1].with_suffix(".txt").name).write_text("7 0.5 0.5 0.2 0.2\n")  # class >= nc
    with pytest.warns(DataWarning) as record:
        spec = resolve_data(dataset / "yolo.yaml")
    msgs = data_warnings(record)
    assert len(msgs) == 1 and "skipped 2 images" in msgs[0] and "1 unreadable image" in msgs[0]
    assert len(spec.val_images) == 6 and val[0] not in spec.val_images


def test_read_only_yolo_dataset_is_mirrored_into_the_cache(dataset, tmp_path):
    """ultralytics writes labels/*.cache beside YOLO labels (even as root): read-only datasets must be mirrored."""
    from ultralytics.data.utils import check_det_dataset

    labels = dataset / "labels"
    writable = resolve_data(dataset / "yolo.yaml")
    assert writable.yaml == dataset / "yolo.yaml"  # a writable dataset is used in place
    os.chmod(labels, 0o555)
    try:
        before = snapshot(dataset)
        spec = resolve_data(dataset / "yolo.yaml", cache_dir=tmp_path / "cache")
        assert spec.yaml == spec.cache / "data.yaml" and spec.format == "yolo"
        assert len(spec.train_images) == 8 and all(p.is_file() for p in spec.train_images)
        for img in spec.val_images:
            assert img.is_symlink() and img.resolve().parent == (dataset / "images" / "val").resolve()
            mirrored = spec.cache / "labels" / "val" / img.with_suffix(".txt").name
            assert mirrored.read_bytes() == (labels / "val" / img.with_suffix(".txt").name).read_bytes()
        assert check_det_dataset(str(spec.yaml))["names"] == dict(enumerate(spec.names))
        assert {spec.image_id(p) for p in spec.val_images} == set(range(1, 9))
        assert snapshot(dataset) == before
    finally:
        os.chmod(labels, 0o755)


def test_yolo_format_missing_val_folder(dataset):
    cfg = yaml.safe_load((dataset / "yolo.yaml").read_text())
    cfg.update(path=str(dataset), val="images/absent")
    (dataset / "yolo.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DatasetError, match="val images not found"):
        resolve_data(dataset / "yolo.yaml")


def test_clean_dataset_gives_no_warning(syn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        specs = [resolve_data(syn / "coco.yaml"), resolve_data(syn / "yolo.yaml")]
    assert not [w for w in caught if issubclass(w.category, DataWarning)]
    assert all(spec.nc == 3 for spec in specs)


def test_png_images_are_readable(tmp_path):
    from PIL import Image as PILImage

    from yolo_prune.data.coco import image_size

    path = tmp_path / "a.png"
    PILImage.new("RGB", (30, 20)).save(path)
    assert image_size(path) == (30, 20)
