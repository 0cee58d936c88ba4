"""Configuration: the schema's defaults (:mod:`yolo_prune.options`, shown as ``cfg/default.yaml``) merged with a
``cfg=recipe.yaml`` and ``key=value`` overrides.

Precedence: defaults < recipe < command line. yolo-prune's keys are read by the type the schema declares (so
``compensate=none`` stays the string ``none``); values of ultralytics keys are parsed with ``ast.literal_eval``
(never ``eval``), anything that is not a Python literal stays a string. Keys of ultralytics' own default config
are accepted and passed through to its trainer and validator.
"""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import options
from .errors import UsageError

MODES = options.MODES
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
    return options.defaults()


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
        overrides[key] = value if sep else True  # read by the key's declared type in build()
    return mode or "help", overrides


_suggest = options.suggest


def build(mode: str, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge defaults, recipe and overrides; return (full config, the ultralytics keys set explicitly).

    yolo-prune's keys are read by the type the schema declares (:mod:`yolo_prune.options`); command-line values of
    ultralytics keys are read as Python literals (:func:`parse_value`)."""
    overrides = dict(overrides or {})
    cfg = options.defaults()
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
                passthrough[key] = parse_value(value) if source == "argument" and isinstance(value, str) else value
            else:
                raise UsageError(f"unknown key {key!r} in {source}{_suggest(key, ours | ultra)}; see 'yolo-prune cfg'")
    cfg["mode"] = mode
    return validate(cfg), passthrough


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Read and check yolo-prune's own keys by the schema (in place), and the device; return ``cfg``."""
    options.check(cfg)
    if cfg.get("int8") == "auto" and cfg.get("mode") not in (None, "demo"):
        raise UsageError("int8=auto is the demo's setting: give int8=True or int8=False")
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
