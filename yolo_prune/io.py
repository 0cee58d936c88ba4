"""Small file-system helpers: atomic writes, hashes and run folders.

Every file yolo-prune writes goes through :func:`atomic_write` (temporary file in the same folder,
then ``os.replace``), so a kill in the middle never leaves a truncated checkpoint or report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_yaml(path: str | Path, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(_plain(obj), sort_keys=False))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _plain(obj: Any) -> Any:
    """Convert paths and numpy scalars so that yaml.safe_dump accepts the object."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6


def run_path(project: str | Path | None, mode: str, name: str | None = None) -> Path:
    """The run folder for ``project``/``name`` as ultralytics users expect it (absolute, not created).

    ``project=P name=N`` is exactly ``P/N`` (P relative to the working folder, or absolute); without a
    project it is ``runs/<mode>/<name>``. ``name`` defaults to ``mode``.
    """
    parent = Path("runs") / mode if project in (None, "") else Path(project).expanduser()
    return Path(os.path.abspath(parent / (name or mode)))


def run_dir(project: str | Path | None, mode: str, name: str | None = None, *, exist_ok: bool = False) -> Path:
    """Create and return the run folder :func:`run_path` names (absolute).

    Like ultralytics, an existing folder is never reused unless ``exist_ok``: ``name2``, ``name3``...
    are tried instead.
    """
    base = run_path(project, mode, name)
    path = base
    if not exist_ok:
        n = 2
        while path.exists():
            path = base.with_name(f"{base.name}{n}")
            n += 1
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as e:
        raise OutputError(f"cannot create run folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise OutputError(f"run folder {path} is not writable")
    return path
