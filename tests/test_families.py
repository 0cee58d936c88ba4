"""YOLO11, YOLO26 and the YOLOv8 P2/P6 variants: exact prunable rewrites, MACs targets for every method,
lossless removal of zeroed groups, attention and Detect outputs that never change width, checkpoints that
reload / predict / export in a fresh process, fine-tuning with YOLO26's end-to-end loss, refusals by name.

Models are random init from the ultralytics yamls (3 classes, distinct BN statistics and head biases so
that no two scores tie); pruned models are shared through a module-scoped cache to keep the file fast.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from ultralytics.nn.modules import C2PSA, C2f, C3k2, Detect
from ultralytics.nn.modules.block import Attention

from yolo_prune.errors import UnsupportedModelError
from yolo_prune.modules import C2fSplit, C2PSASplit, C2Split, C3k2Split, PrunableAttention, to_prunable
from yolo_prune.pruning import build_graph, prepare, protected_layers, prune_model
from yolo_prune.stats import count_macs

from .helpers import random_detection_model, zero_channels

FAMILIES = ["yolo11n.yaml", "yolo11s.yaml", "yolo26n.yaml", "yolo26s.yaml"]
VARIANTS = ["yolov8-p2.yaml", "yolov8-p6.yaml"]
METHODS = ["bn", "l1", "l2", "activation", "random"]
TARGETS = [0.7, 0.5, 0.35]
NC = 3
IMGSZ = 128  # a multiple of 64 (P6)
X = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(11))
CALIB = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(12))

_BASE: dict[str, nn.Module] = {}
_PRUNED: dict[str, nn.Module] = {}


def base(cfg: str) -> nn.Module:
    """A fresh copy of the random-init model of ``cfg`` (eval mode), built once per session."""
    if cfg not in _BASE:
        _BASE[cfg] = random_detection_model(cfg, NC)
    return copy.deepcopy(_BASE[cfg])


def pruned(cfg: str) -> nn.Module:
    """``cfg`` pruned hard (bn, 35% of the MACs, no width rounding), built once per session."""
    if cfg not in _PRUNED:
        model = base(cfg)
        prune_model(model, method="bn", target_macs=0.35, round_to=None, max_layer_ratio=0.9, macs_imgsz=IMGSZ)
        _PRUNED[cfg] = model.eval()
    return copy.deepcopy(_PRUNED[cfg])


def raw(model: nn.Module, x: torch.Tensor = X) -> list[torch.Tensor]:
    """Every tensor the head returns in eval mode: decoded output and each branch's box/class maps."""
    model.eval()
    with torch.no_grad():
        y, preds = model(x)
    out = [y]
    for branch in (preds["one2many"], preds["one2one"]) if "one2one" in preds else (preds,):
        out += [branch["boxes"], branch["scores"]]
    return out


def attentions(model: nn.Module) -> dict[str, Attention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


# --------------------------------------------------------------------------------------------- rewrites
@pytest.mark.parametrize("cfg", FAMILIES + VARIANTS)
def test_rewrites_are_exact(cfg):
    model = base(cfg)
    ref = raw(model)
    kinds = {type(m) for m in model.modules()}
    n = to_prunable(model)
    assert n > 0
    assert not any(type(m) in (C2f, C3k2, C2PSA, Attention) for m in model.modules())
    for m in model.modules():  # still the ultralytics classes for isinstance checks (export, fuse)
        if isinstance(m, C3k2Split):
            assert isinstance(m, C3k2) and isinstance(m, C2f) and m.forward_split == m.forward
    assert any(isinstance(m, (C2fSplit, C2Split)) for m in model.modules())
    if C2PSA in kinds:
        assert any(isinstance(m, C2PSASplit) for m in model.modules())
        assert len(attentions(model)) and all(isinstance(a, PrunableAttention) for a in attentions(model).values())
    out = raw(model)
    assert len(out) == len(ref) == (5 if cfg.startswith("yolo26") else 3)
    for a, b in zip(out, ref):
        assert (a - b).abs().max().item() == 0.0  # bit-exact, every branch
    assert to_prunable(model) == 0  # idempotent


# ---------------------------------------------------------------------------------------------- targets
def _target_cases():
    """Every method on every family; across the four families each method meets all three targets."""
    cases = [(cfg, m, TARGETS[(i + j) % 3]) for i, cfg in enumerate(FAMILIES) for j, m in enumerate(METHODS)]
    cases += [(cfg, "l1", 0.5) for cfg in VARIANTS]
    return cases


@pytest.mark.parametrize("cfg, method, target", _target_cases())
def test_targets_are_reached(cfg, method, target):
    model = base(cfg)
    macs0 = count_macs(model, imgsz=IMGSZ)
    shapes0 = [t.shape for t in raw(model)]
    prune_model(model, method=method, target_macs=target, macs_imgsz=IMGSZ, compensate="none",
                calib_images=CALIB if method == "activation" else None)
    reached = count_macs(model, imgsz=IMGSZ) / macs0
    assert abs(reached - target) <= 0.03, reached
    assert [t.shape for t in raw(model)] == shapes0


def test_macs_model_matches_thop_with_attention():
    """Attention's matrix products grow with the square of the token count: the graph's MACs model
    matches ultralytics-thop at every size (it counts them), so the target holds at the reported size."""
    model = prepare(base("yolo26n.yaml"))
    for size in (64, 320, 640):
        assert build_graph(model, macs_imgsz=size).conv_macs() == count_macs(model, imgsz=size)


# ------------------------------------------------------------------------------------- lossless removal
@pytest.mark.parametrize("cfg", FAMILIES + VARIANTS)
def test_zeroed_channels_are_removed_losslessly(cfg):
    """Zero gamma and beta of a quarter of every group's channels in all its BNs: removing exactly those
    (attention outer channels and FFN widths included) leaves every output of every branch unchanged."""
    model = prepare(base(cfg))
    zeroed, total = zero_channels(build_graph(model), seed=3)
    ref = raw(model)
    attn0 = {n: a.qkv.conv.in_channels for n, a in attentions(model).items()}
    outcome = prune_model(model, method="bn", ratio=zeroed / total, round_to=None)
    assert outcome.steps[0].channels_removed == zeroed
    for a, b in zip(raw(model), ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()  # decoded boxes are in pixels
    for n, a in attentions(model).items():
        assert a.qkv.conv.in_channels < attn0[n], n  # the attention's outer channels were pruned too


# -------------------------------------------------------------------------- what never changes width
@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo26s.yaml"])
def test_attention_inside_and_detect_outputs_keep_their_width(cfg):
    before = prepare(base(cfg))
    after = pruned(cfg)
    inner = {n: (a.num_heads, a.key_dim, a.head_dim, a.qkv.conv.out_channels, tuple(a.pe.conv.weight.shape),
                 a.proj.conv.in_channels) for n, a in attentions(before).items()}
    assert inner and inner == {
        n: (a.num_heads, a.key_dim, a.head_dim, a.qkv.conv.out_channels, tuple(a.pe.conv.weight.shape),
            a.proj.conv.in_channels) for n, a in attentions(after).items()}
    for n, a in attentions(after).items():
        assert a.qkv_channels == a.qkv.conv.out_channels and a.inner_channels == a.proj.conv.in_channels
        b = attentions(before)[n]
        assert a.qkv.conv.in_channels < b.qkv.conv.in_channels  # outer channels pruned through the graph
        assert a.proj.conv.out_channels == a.qkv.conv.in_channels  # the residual stays consistent
    ffn = [m for n, m in after.named_modules() if n.endswith("ffn.0.conv")]
    ffn0 = [m for n, m in before.named_modules() if n.endswith("ffn.0.conv")]
    assert sum(m.out_channels for m in ffn) < sum(m.out_channels for m in ffn0)  # FFN hidden width pruned
    head = after.model[-1]
    reg_max = head.reg_max
    assert reg_max == (1 if cfg.startswith("yolo26") else 16)
    for name, width in (("cv2", 4 * reg_max), ("cv3", NC), ("one2one_cv2", 4 * reg_max), ("one2one_cv3", NC)):
        for branch in getattr(head, name, None) or []:
            assert branch[-1].out_channels == width, name
    protected = {id(m) for m in protected_layers(after)}
    assert all(id(a.qkv.conv) in protected and id(a.pe.conv) in protected for a in attentions(after).values())
    assert all(torch.isfinite(t).all() for t in raw(after))


def test_mean_and_lstsq_compensation_absorb_constant_channels():
    """YOLO26 (attention, SPPF shortcut, both head branches): zero only gamma, so the chosen channels
    output a constant; folding it into their consumers (qkv, FFN, C2PSA/C3k2 cv2, both heads) must remove
    most of the shift that removing them causes."""
    model = prepare(base("yolo26n.yaml"))
    zeroed, total = zero_channels(build_graph(model), seed=4, beta=False)
    calib = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ref = raw(model, calib[:2])
    errors = {}
    for comp in ("none", "mean", "lstsq"):
        m = copy.deepcopy(model)
        prune_model(m, method="bn", ratio=zeroed / total, round_to=None, calib_images=calib, compensate=comp)
        errors[comp] = max((a - b).abs().mean().item() for a, b in zip(raw(m, calib[:2])[1:], ref[1:]))
    assert errors["none"] > 1e-3, errors
    assert errors["mean"] < 0.3 * errors["none"], errors
    assert errors["lstsq"] < 0.3 * errors["none"], errors


def test_sparsity_penalises_attention_gammas():
    """Sparsity training's L1 step reaches the BNs inside attention blocks (qkv, pe, proj, FFN)."""
    from yolo_prune.train.sparse import add_l1_subgradient, bn_layers

    model = pruned("yolo26n.yaml")
    attn_bns = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and (".attn." in n or ".ffn." in n)]
    assert len(attn_bns) >= 5 and all(any(b is m for m in bn_layers(model)) for b in attn_bns)
    for b in bn_layers(model):
        b.weight.grad = torch.zeros_like(b.weight)
    add_l1_subgradient([b.weight for b in bn_layers(model)], 0.1)
    assert all(torch.equal(b.weight.grad, 0.1 * torch.sign(b.weight.detach())) for b in attn_bns)


# ------------------------------------------------------------------------------ refused, by name
@pytest.mark.parametrize(
    "cfg, match",
    [("yolo12n.yaml", r"A2C2f \(layer 6, 8, 11, 14, 17\)"), ("yolov10n.yaml", r"SCDown .*PSA|SCDown"),
     ("yolov8-ghost.yaml", r"GhostConv .*C3Ghost")],
)
def test_unsupported_blocks_are_refused_by_name(cfg, match):
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(cfg, nc=NC, verbose=False)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        prune_model(model, target_macs=0.5)
    assert "\n" not in str(e.value) and "YOLO26" in str(e.value)


def test_unsupported_heads_and_fused_models_are_refused():
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.models import load_model

    with pytest.raises(UnsupportedModelError, match="ends in v10Detect"):
        load_model(DetectionModel("yolov10n.yaml", nc=NC, verbose=False))
    fused = base("yolo26n.yaml").fuse(verbose=False)
    with pytest.raises(UnsupportedModelError, match="fused"):
        prune_model(fused, target_macs=0.5)


# ------------------------------------------------------------------- checkpoints in a fresh process
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Pruned checkpoints of every family and variant, written as ultralytics checkpoints."""
    from yolo_prune.models import save_checkpoint

    root = tmp_path_factory.mktemp("families")
    return {cfg: save_checkpoint(pruned(cfg), root / f"{cfg.removesuffix('.yaml')}.pt") for cfg in FAMILIES + VARIANTS}


def test_fresh_process_reloads_predicts_and_exports(checkpoints, tmp_path):
    """In a new interpreter: YOLO(path) loads each pruned checkpoint with the same shapes, predicts, and the
    ONNX export matches torch in onnxruntime (YOLO26 also end-to-end, nms=False: top-k in the graph)."""
    shapes = {str(p): {n: tuple(m.weight.shape) for n, m in pruned(cfg).named_modules() if isinstance(m, nn.Conv2d)}
              for cfg, p in checkpoints.items()}
    script = f"""
import logging, numpy as np, onnxruntime as ort, torch
from ultralytics import YOLO
logging.getLogger("ultralytics").setLevel(logging.ERROR)
shapes = {shapes!r}
x = torch.rand(1, 3, {IMGSZ}, {IMGSZ}, generator=torch.Generator().manual_seed(0))
for ck, want in shapes.items():
    m = YOLO(ck)
    got = {{n: tuple(c.weight.shape) for n, c in m.model.named_modules() if isinstance(c, torch.nn.Conv2d)}}
    assert got == want, ck
    r = m.predict(np.zeros(({IMGSZ}, {IMGSZ}, 3), dtype=np.uint8), imgsz={IMGSZ}, verbose=False)
    assert len(r) == 1
    e2e = [None, False] if "yolo26n" in ck else [None]
    for nms in e2e:
        f = YOLO(ck).export(format="onnx", imgsz={IMGSZ}, nms=nms, verbose=False)
        ref_model = YOLO(ck).model.float().eval()
        ref_model.end2end = nms is False
        ref = ref_model(x)[0].detach().numpy()
        sess = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
        out = sess.run(None, {{sess.get_inputs()[0].name: x.numpy()}})[0]
        assert out.shape == ref.shape, (ck, nms, out.shape, ref.shape)
        if nms is False:  # top-k rows (box, score, class); random init ties scores, so compare as sets
            out, ref = out[0], ref[0]
            assert out.shape == (300, 6) and np.abs(np.sort(out[:, 4]) - np.sort(ref[:, 4])).max() < 1e-5
            for a, b in ((out, ref), (ref, out)):
                a = a[a[:, 4] > a[:, 4].min() + 1e-5]  # rows tied with the last kept score may differ
                assert np.abs(a[:, None] - b[None]).max(-1).min(1).max() < 1e-3, (ck, nms)
        else:
            assert out.shape[1] == 4 + {NC}, out.shape
            assert np.abs(out - ref).max() < 1e-3, (ck, nms, np.abs(out - ref).max())
    print("OK", ck)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK") == len(checkpoints), proc.stdout


# ----------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.slow
def test_finetune_keeps_shapes_with_the_end_to_end_loss(checkpoints, synthetic, tmp_path):
    """One short fine-tune of the pruned YOLO26n: ultralytics' end-to-end loss (both branches) trains the
    pruned module as it is; best.pt keeps every shape and both head branches."""
    from ultralytics import YOLO
    from ultralytics.utils.loss import E2ELoss

    from yolo_prune.train import FinetuneTrainer

    ckpt = checkpoints["yolo26n.yaml"]
    trainer = FinetuneTrainer(overrides=dict(
        model=str(ckpt), data=str(synthetic / "yolo.yaml"), epochs=1, imgsz=64, batch=4, workers=0, device="cpu",
        nbs=4, warmup_epochs=0, mosaic=0.0, plots=False, project=str(tmp_path), name="ft", verbose=False))
    trainer.train()
    assert isinstance(trainer.model.criterion, E2ELoss)  # one-to-many + one-to-one losses
    tuned = YOLO(str(trainer.best)).model
    want = {n: tuple(m.weight.shape) for n, m in YOLO(str(ckpt)).model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {n: tuple(m.weight.shape) for n, m in tuned.named_modules() if isinstance(m, nn.Conv2d)} == want
    head = tuned.model[-1]
    assert isinstance(head, Detect) and head.one2one_cv2 is not None and head.reg_max == 1
