"""Configuration: ``cfg/default.yaml`` merged with a ``cfg=recipe.yaml`` and ``key=value`` overrides.

Precedence: defaults < recipe < command line. Values are parsed with ``ast.literal_eval`` (never
``eval``); anything that is not a Python literal stays a string. Keys of ultralytics' own default
config are accepted too and passed through to its trainer and validator.
"""

from __future__ import annotations

import ast
import difflib
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UsageError

LOGGER = logging.getLogger("yolo_prune")

MODES = ("sparse", "prune", "sparsify", "sensitivity", "finetune", "val", "bench", "export", "pipeline", "demo")
COMMANDS = ("help", "cfg", "version")
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def default_cfg_path() -> Path:
    return Path(str(resources.files("yolo_prune.cfg") / "default.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of key: value pairs")
    return data


def defaults() -> dict[str, Any]:
    return load_yaml(default_cfg_path())


def ultralytics_keys() -> set[str]:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return set(DEFAULT_CFG_DICT)


def parse_value(text: str) -> Any:
    """``"0.5"`` -> 0.5, ``"true"`` -> True, ``"null"`` -> None, ``"[1,2]"`` -> [1, 2], else the string."""
    low = text.strip().lower()
    if low in _WORDS:
        return _WORDS[low]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_argv(argv: Iterable[str]) -> tuple[str, dict[str, Any]]:
    """Split ``MODE key=value ...`` into the mode and the overrides (bare ``key`` means ``key=True``)."""
    argv = list(argv)
    if not argv:
        return "help", {}
    mode, rest = argv[0], argv[1:]
    if mode.startswith("-") and mode.lstrip("-") in ("h", "help"):
        return "help", {}
    if mode.lstrip("-") == "version":
        return "version", {}
    if "=" in mode:  # `yolo-prune model=x.pt ...` without a mode
        mode, rest = "", argv
    if mode and mode not in MODES + COMMANDS:
        raise UsageError(f"unknown mode {mode!r}{_suggest(mode, MODES + COMMANDS)}; modes: {', '.join(MODES + COMMANDS)}")
    overrides: dict[str, Any] = {}
    for token in rest:
        key, sep, value = token.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise UsageError(f"cannot read argument {token!r}: expected key=value")
        overrides[key] = parse_value(value) if sep else True
    return mode or "help", overrides


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(mode: str, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge defaults, recipe and overrides; return (full config, the ultralytics keys set explicitly)."""
    overrides = dict(overrides or {})
    cfg = defaults()
    ours = set(cfg)
    recipe_path = overrides.pop("cfg", None)
    if recipe_path is None and mode == "demo":
        recipe_path = default_cfg_path().with_name("demo.yaml")
    recipe = load_yaml(recipe_path) if recipe_path else {}
    ultra = ultralytics_keys()
    passthrough: dict[str, Any] = {}
    for source, values in (("recipe " + str(recipe_path), recipe), ("argument", overrides)):
        for key, value in values.items():
            if key in ours:
                cfg[key] = value
            elif key in ultra:
                passthrough[key] = value
            else:
                raise UsageError(f"unknown key {key!r} in {source}{_suggest(key, ours | ultra)}; see 'yolo-prune cfg'")
    cfg["mode"] = mode
    return validate(cfg), passthrough


def _number(cfg: dict, key: str, kind: type, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    value = cfg.get(key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise UsageError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise UsageError(f"{key}={value} is out of range: it must be in {left}{lo}, {hi if hi is not None else 'inf'}{right}")
    cfg[key] = value


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check types and ranges of yolo-prune's own keys (in place); return ``cfg``."""
    from .pruning.importance import METHODS

    _number(cfg, "ratio", float, lo=0, hi=1, hi_open=True, optional=True)
    _number(cfg, "target_macs", float, lo=0, hi=1, lo_open=True, optional=True)
    _number(cfg, "threshold", float, lo=0, lo_open=True, optional=True)
    _number(cfg, "greg_ramp", float, lo=0, hi=1, lo_open=True)
    _number(cfg, "max_layer_ratio", float, lo=0, hi=1, lo_open=True, hi_open=True)
    _number(cfg, "tolerance", float, lo=0, hi=1, lo_open=True)
    if str(cfg.get("round_to")).lower() == "auto":
        cfg["round_to"] = "auto"
    else:
        _number(cfg, "round_to", int, lo=1, optional=True)
    _number(cfg, "target_latency", float, lo=0, hi=1, lo_open=True, optional=True)
    _number(cfg, "target_ms", float, lo=0, lo_open=True, optional=True)
    _number(cfg, "threads", int, lo=0, optional=True)
    if cfg.get("target_latency") is not None and cfg.get("target_ms") is not None:
        raise UsageError("give target_latency (a fraction of the dense latency) or target_ms, not both")
    if "runtime" in cfg:
        from .latency import RUNTIMES, _ALIASES

        name = _ALIASES.get(str(cfg["runtime"]).strip().lower(), str(cfg["runtime"]).strip().lower())
        if name not in RUNTIMES:
            raise UsageError(f"unknown runtime {cfg['runtime']!r}{_suggest(str(cfg['runtime']), RUNTIMES)}; "
                             f"choose one of {', '.join(RUNTIMES)}")
        cfg["runtime"] = name
    for key in ("steps", "batch", "bench_runs"):
        _number(cfg, key, int, lo=1)
    for key in ("epochs", "sparse_epochs", "finetune_epochs", "step_epochs", "workers", "calib_images", "bench_warmup", "seed",
                "search_candidates", "sensitivity_validate"):
        _number(cfg, key, int, lo=0)
    _number(cfg, "sr", float, lo=0)
    _number(cfg, "gamma_threshold", float, lo=0)
    _number(cfg, "max_map_drop", float, lo=0, hi=1, optional=True)
    _number(cfg, "conf", float, lo=0, hi=1)
    _number(cfg, "iou", float, lo=0, hi=1)
    _number(cfg, "imgsz", int, lo=32)
    if cfg["imgsz"] % 32:
        new = int(math.ceil(cfg["imgsz"] / 32) * 32)
        LOGGER.warning("imgsz=%s is not a multiple of 32, using imgsz=%s", cfg["imgsz"], new)
        cfg["imgsz"] = new
    _number(cfg, "amount", float, lo=0, hi=1, hi_open=True)
    # method ranks channels (prune, pipeline) or weights (sparsify); empty means the mode's first choice
    from .sparsify import LAYER_SETS, SCOPES
    from .sparsify import METHODS as WEIGHT_METHODS

    sparsify = cfg.get("mode") == "sparsify"
    methods = WEIGHT_METHODS if sparsify else METHODS
    if cfg.get("method") is None:
        cfg["method"] = methods[0]
    if cfg.get("method") not in methods:
        raise UsageError(f"unknown method {cfg.get('method')!r}{' for sparsify' if sparsify else ''}"
                         f"{_suggest(str(cfg.get('method')), methods)}; choose one of {', '.join(methods)}")
    for key, choices in (("scope", SCOPES), ("layers", LAYER_SETS)):
        if cfg.get(key) not in choices:
            raise UsageError(f"unknown {key} {cfg.get(key)!r}{_suggest(str(cfg.get(key)), choices)}; "
                             f"choose one of {', '.join(choices)}")
    if cfg.get("sr_schedule") not in ("constant", "linear", "cosine", "ramp"):
        raise UsageError(f"sr_schedule={cfg.get('sr_schedule')!r} must be constant, linear, cosine or ramp")
    if cfg.get("sr_mode") not in ("proximal", "subgradient", "greg"):
        raise UsageError(f"sr_mode={cfg.get('sr_mode')!r} must be proximal, subgradient or greg")
    if cfg.get("compensate") not in ("lstsq_seq", "lstsq", "mean", "none", True, False):
        raise UsageError(f"compensate={cfg.get('compensate')!r} must be lstsq_seq, lstsq, mean or none")
    if cfg.get("recalibrate") not in (True, False, "match", "reset", None):
        raise UsageError(f"recalibrate={cfg.get('recalibrate')!r} must be True, False, match or reset")
    from .pruning.allocation import ALLOCATIONS

    if cfg.get("allocation") not in ALLOCATIONS:
        raise UsageError(f"allocation={cfg.get('allocation')!r} must be one of {', '.join(ALLOCATIONS)}")
    _number(cfg, "distill_cls", float, lo=0)
    _number(cfg, "distill_box", float, lo=0)
    _number(cfg, "distill_temp", float, lo=0, lo_open=True)
    if cfg.get("distill") not in ("output", "feature", "both"):
        raise UsageError(f"distill={cfg.get('distill')!r} must be output, feature or both")
    if cfg.get("teacher") is False:
        cfg["teacher"] = None
    for key in ("teacher", "unlabeled"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise UsageError(f"{key}={cfg[key]!r} must be a path")
    for key in ("global_pruning", "exist_ok", "verbose", "resume", "labels", "sr_group", "sr_head"):
        if not isinstance(cfg.get(key), bool):
            raise UsageError(f"{key}={cfg.get(key)!r} must be True or False")
    check_device(cfg.get("device"))
    return cfg


def check_device(device: Any) -> None:
    """Refuse a device that does not exist here (ultralytics would fail later with a long traceback)."""
    if device is None or str(device).strip() == "":
        return
    text = str(device).strip().lower().replace("cuda:", "")
    if text in ("cpu", "mps"):
        if text == "mps":
            import torch

            if not torch.backends.mps.is_available():
                raise UsageError("device=mps is not available on this machine")
        return
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"device={device!r} is not a device: use cpu, or CUDA indices such as 0 or 0,1")
    import torch

    n = torch.cuda.device_count()
    missing = [p for p in parts if int(p) >= n]
    if missing:
        raise UsageError(f"device={device} does not exist: this machine has {n} CUDA device(s)")
