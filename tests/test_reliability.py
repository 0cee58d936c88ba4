"""Bad input gets a clear one-line error; nothing is lost; results are reproducible."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from yolo_prune import cli
from yolo_prune.errors import DatasetError, ModelLoadError, OutputError
from yolo_prune.io import atomic_write, run_dir
from yolo_prune.models import load_model, read_provenance
from yolo_prune.pruning import prune_model
from yolo_prune.stages.prune import prune


def _one_line_error(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return code, err


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory):
    """A pruned 3-class yolov8n (the synthetic dataset's classes)."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    return prune(model, ratio=0.3, imgsz=128, project=tmp_path_factory.mktemp("p"), name="x").checkpoint


@pytest.mark.parametrize("kind", ["random", "text", "truncated", "empty"])
def test_not_a_checkpoint(kind, tmp_path, pruned_ckpt, capsys):
    path = tmp_path / "bad.pt"
    if kind == "random":
        path.write_bytes(os.urandom(2048))
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "truncated":
        data = pruned_ckpt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a|empty"):
        load_model(path)
    code, err = _one_line_error(["prune", f"model={path}", f"project={tmp_path}"], capsys)
    assert code == 1 and str(path) in err


def test_classification_checkpoint_is_refused(tmp_path, capsys):
    from ultralytics.nn.tasks import ClassificationModel

    from yolo_prune.models import save_checkpoint

    path = save_checkpoint(ClassificationModel("yolov8n-cls.yaml", verbose=False), tmp_path / "cls.pt")
    with pytest.raises(ModelLoadError, match="classify|detection"):
        load_model(path)
    code, err = _one_line_error(["prune", f"model={path}", f"project={tmp_path}"], capsys)
    assert code == 1 and "detection" in err


def test_missing_data_yaml_and_folders(tmp_path, capsys):
    code, err = _one_line_error(["val", "model=yolov8n.yaml", f"data={tmp_path / 'nope.yaml'}",
                                 f"project={tmp_path}"], capsys)
    assert code == 1 and "nope.yaml" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: ['a']\n")
    code, err = _one_line_error(["val", "model=yolov8n.yaml", f"data={bad}", f"project={tmp_path}"], capsys)
    assert code == 1 and "images" in err


@pytest.mark.parametrize(
    "arg, text",
    [("ratio=0", None), ("ratio=1", "ratio"), ("ratio=-0.2", "ratio"), ("target_macs=0", "target_macs"),
     ("target_macs=1.01", "target_macs"), ("method=entropy", "unknown method"), ("device=9", "device=9"),
     ("imgsz=0", "imgsz")],
)
def test_bad_values_exit_2(arg, text, tmp_path, capsys):
    if text is None:  # ratio=0 is valid: nothing is removed
        assert cli.main(["prune", "model=yolov8n.yaml", arg, "imgsz=64", f"project={tmp_path}"]) == 0
        return
    code, err = _one_line_error(["prune", "model=yolov8n.yaml", arg, f"project={tmp_path}"], capsys)
    assert code == 2 and text in err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the project folder should be: cannot be created, even as root
    with pytest.raises(OutputError):
        run_dir(blocker, "prune", "x")
    code, err = _one_line_error(["prune", "model=yolov8n.yaml", f"project={blocker}"], capsys)
    assert code == 1 and "cannot create run folder" in err


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(ModelLoadError):
        cli.main(["prune", "model=missing.pt", "verbose"])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "w.pt"
    target.write_bytes(b"old")

    def crash(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_input_checkpoint_unchanged_and_provenance_recorded(pruned_ckpt, tmp_path):
    from yolo_prune.io import sha256_file

    before = sha256_file(pruned_ckpt)
    result = prune(pruned_ckpt, method="l1", target_macs=0.8, imgsz=128, seed=5, project=tmp_path, name="y")
    assert sha256_file(pruned_ckpt) == before
    prov = read_provenance(result.checkpoint)
    assert prov["source_sha256"] == before and prov["seed"] == 5
    assert {"torch", "ultralytics", "torch_pruning"} <= set(prov["versions"])
    report = (result.save_dir / "report.json").read_text()
    assert before in report and '"seed": 5' in report


def _state(model: nn.Module) -> list[torch.Tensor]:
    return list(model.state_dict().values())


@pytest.mark.parametrize("method", ["random", "activation", "bn"])
def test_same_seed_same_pruned_model(v8n, method):
    calib = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = copy.deepcopy(v8n), copy.deepcopy(v8n)
    prune_model(a, method=method, target_macs=0.5, seed=3, calib_images=calib)
    prune_model(b, method=method, target_macs=0.5, seed=3, calib_images=calib)
    assert [t.shape for t in _state(a)] == [t.shape for t in _state(b)]
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b)))


def test_activation_calibration_is_seeded(synthetic, pruned_ckpt, tmp_path):
    """The calibration images are drawn from the data with the seed: same seed, same pruned checkpoint."""
    runs = [prune(pruned_ckpt, method="activation", data=synthetic / "yolo.yaml", calib_images=4, imgsz=64, seed=s,
                  project=tmp_path, name=f"s{s}") for s in (1, 1)]
    a, b = (load_model(r.checkpoint).model for r in runs)
    assert [x.channels_after for x in runs[0].layers] == [x.channels_after for x in runs[1].layers]
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b)))


def test_ultralytics_train_with_our_trainer_keeps_shapes(pruned_ckpt, synthetic, tmp_path):
    """`YOLO(pruned).train(trainer=FinetuneTrainer)` trains the pruned model itself (not a yaml rebuild)."""
    from ultralytics import YOLO

    from yolo_prune import FinetuneTrainer

    shapes = {k: v.shape for k, v in YOLO(str(pruned_ckpt)).model.state_dict().items()}
    model = YOLO(str(pruned_ckpt))
    model.train(data=str(synthetic / "yolo.yaml"), epochs=1, imgsz=64, batch=4, workers=0, plots=False,
                trainer=FinetuneTrainer, project=str(tmp_path), name="t", verbose=False, val=False)
    best = tmp_path / "t" / "weights" / "last.pt"
    assert {k: v.shape for k, v in YOLO(str(best)).model.state_dict().items()} == shapes


def test_dataset_error_is_a_yolo_prune_error():
    from yolo_prune.errors import YoloPruneError

    assert issubclass(DatasetError, YoloPruneError)


def test_run_folders_follow_ultralytics_convention(tmp_path, monkeypatch):
    """project=P name=N is exactly P/N (relative to the working folder or absolute); no project: runs/<mode>/<name>."""
    from yolo_prune.io import run_path

    monkeypatch.chdir(tmp_path)
    assert run_path("rel", "prune", "x") == tmp_path / "rel" / "x"
    assert run_path(tmp_path / "abs", "prune", None) == tmp_path / "abs" / "prune"
    assert run_path(None, "prune", None) == tmp_path / "runs" / "prune" / "prune"
    first = run_dir("rel", "prune", "x")
    second = run_dir("rel", "prune", "x")
    assert first == tmp_path / "rel" / "x" and second == tmp_path / "rel" / "x2"
    assert run_dir("rel", "prune", "x", exist_ok=True) == first
