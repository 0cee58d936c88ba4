"""CLI and configuration: parsing, merge order, unknown keys, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from yolo_prune import cli
from yolo_prune.config import build, parse_argv, parse_value
from yolo_prune.errors import UsageError


@pytest.mark.parametrize(
    "text, value",
    [("0.5", 0.5), ("3", 3), ("true", True), ("False", False), ("null", None), ("none", None),
     ("[1, 2]", [1, 2]), ("bn", "bn"), ("runs/x", "runs/x"), ("__import__('os')", "__import__('os')")],
)
def test_values_are_parsed_safely(text, value):
    assert parse_value(text) == value


def test_argv_split_and_bare_flags():
    mode, over = parse_argv(["prune", "model=a.pt", "ratio=0.3", "exist_ok", "--name=x"])
    assert mode == "prune"
    assert over == {"model": "a.pt", "ratio": "0.3", "exist_ok": True, "name": "x"}  # text until build() reads it
    cfg, _ = build("prune", over)
    assert cfg["ratio"] == 0.3 and cfg["exist_ok"] is True and cfg["name"] == "x"


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UsageError, match=r"unknown key 'targt_macs'.*did you mean 'target_macs'"):
        build("prune", {"targt_macs": 0.5})


def test_unknown_mode_suggests():
    with pytest.raises(UsageError, match="did you mean 'prune'"):
        parse_argv(["prun"])


def test_recipe_then_arguments_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: l1\ntarget_macs: 0.6\nsr: 0.01\nlr0: 0.002\n")
    cfg, extra = build("prune", {"cfg": str(recipe), "target_macs": 0.4})
    assert cfg["method"] == "l1"  # recipe over default
    assert cfg["target_macs"] == 0.4  # argument over recipe
    assert cfg["sr"] == 0.01
    assert extra == {"lr0": 0.002}  # ultralytics key passed through


@pytest.mark.parametrize(
    "over, match",
    [({"ratio": 1.0}, "ratio"), ({"ratio": 0}, None), ({"target_macs": 0}, "target_macs"),
     ({"target_macs": 1.2}, "target_macs"), ({"method": "l3"}, "unknown method"), ({"imgsz": -32}, "imgsz"),
     ({"device": "7"}, "device"), ({"device": "gpu"}, "device"), ({"steps": 0}, "steps"), ({"epochs": 1.5}, "epochs"),
     ({"global_pruning": "yes"}, "global_pruning"), ({"sr_schedule": "step"}, "sr_schedule")],
)
def test_bad_values(over, match):
    if match is None:
        assert build("prune", over)[0]["ratio"] == 0
    else:
        with pytest.raises(UsageError, match=match):
            build("prune", over)


def test_imgsz_rounded_up_to_32():
    assert build("prune", {"imgsz": 300})[0]["imgsz"] == 320


def test_every_default_key_is_documented():
    from yolo_prune.config import default_cfg_path

    for line in default_cfg_path().read_text().splitlines():
        if line and not line.startswith("#") and ":" in line:
            assert "  # (" in line, f"undocumented key: {line}"


@pytest.mark.parametrize(
    "argv, code, text",
    [(["prune", "model=missing.pt"], 1, "model file not found"),
     (["prune", "model=yolov8n.yaml", "ratoi=0.2"], 2, "did you mean 'ratio'"),
     (["prune", "model=yolov8n.yaml", "ratio=2"], 2, "out of range"),
     (["val", "model=yolov8n.yaml"], 2, "needs data="),
     (["frobnicate"], 2, "unknown mode")],
)
def test_cli_errors_are_one_line(argv, code, text, capsys):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_help_version_cfg(capsys):
    assert cli.main(["help"]) == 0 and "Usage: yolo-prune MODE" in capsys.readouterr().out
    assert cli.main(["version"]) == 0 and capsys.readouterr().out.strip()[0].isdigit()
    assert cli.main(["cfg"]) == 0 and "target_macs:" in capsys.readouterr().out


def test_console_script_prunes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "yolo_prune.cli", "prune", "model=yolov8n.yaml", "method=l1", "target_macs=0.5",
         "imgsz=128", f"project={tmp_path}", "name=cli"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cli" / "weights" / "pruned.pt").is_file()
    assert "GMACs" in proc.stdout


def test_tools_script_help_documents_flags():
    proc = subprocess.run([sys.executable, "tools/prune_yolo.py", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert proc.returncode == 0
    for flag in ("--model", "--data", "--target-macs", "--ratio", "--sparse-epochs", "--finetune-epochs", "--resume"):
        assert flag in proc.stdout


def test_tools_script_bad_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "tools/prune_yolo.py", "--model", str(tmp_path / "no.pt"), "--data",
                           str(tmp_path / "no.yaml"), "--project", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A pruned 3-class yolov8n checkpoint (the generated dataset has 3 classes)."""
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.stages.prune import prune

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    return prune(model, ratio=0.3, imgsz=64, project=tmp_path_factory.mktemp("c"), name="p").checkpoint


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return captured.out


def test_mode_val(small_ckpt, synthetic, tmp_path, capsys):
    out = _run(["val", f"model={small_ckpt}", f"data={synthetic / 'coco.yaml'}", "imgsz=64", "batch=4",
                f"project={tmp_path}"], capsys)
    assert "map50_95" in out
    metrics = __import__("json").loads((tmp_path / "val" / "metrics.json").read_text())
    assert {"map50_95", "map50", "map75", "map_small", "map_medium", "map_large"} <= set(metrics)
    assert (tmp_path / "val" / "predictions.json").is_file()
    assert (tmp_path / "val" / "args.yaml").is_file()


def test_mode_bench(small_ckpt, tmp_path, capsys):
    out = _run(["bench", f"model=yolov8n.yaml,{small_ckpt}", "imgsz=64", "bench_runs=2", "bench_warmup=1",
                "backends=torch", f"project={tmp_path}"], capsys)
    assert "pruned" in out and "yolov8n" in out
    assert (tmp_path / "bench" / "latency.json").is_file()


def test_mode_export(small_ckpt, tmp_path, capsys):
    _run(["export", f"model={small_ckpt}", "format=onnx", "imgsz=64", f"project={tmp_path}"], capsys)
    assert list((tmp_path / "export").glob("*.onnx"))


@pytest.mark.parametrize("mode, verbose", [("sparse", False), ("finetune", True)])
def test_mode_training(mode, verbose, small_ckpt, synthetic, tmp_path, capfd):
    """Trains and keeps the pruned shapes; shows one progress line per epoch, or ultralytics' own output if verbose."""
    import logging

    import torch
    from ultralytics.utils import LOGGER as ULTRALYTICS

    class Seen(logging.Handler):  # ultralytics' own log records (its handler's stream is not capfd's)
        text = ""

        def emit(self, record):
            self.text += record.getMessage() + "\n"

    seen = Seen()
    ULTRALYTICS.addHandler(seen)
    try:
        code = cli.main([mode, f"model={small_ckpt}", f"data={synthetic / 'yolo.yaml'}", "epochs=1", "imgsz=64",
                         "batch=4", "workers=0", f"project={tmp_path}", "mosaic=0.0", f"verbose={verbose}"])
    finally:
        ULTRALYTICS.removeHandler(seen)
    err = capfd.readouterr().err
    assert code == 0, err[-2000:]
    assert (f"{mode}: epoch 1/1  box" in err) is not verbose
    assert ("Starting training for 1 epochs" in seen.text) is verbose
    last = tmp_path / mode / "weights" / "last.pt"
    shapes = {k: v.shape for k, v in torch.load(small_ckpt, weights_only=False)["model"].state_dict().items()}
    trained = torch.load(last, weights_only=False)
    assert {k: v.shape for k, v in (trained["ema"] or trained["model"]).state_dict().items()} == shapes
