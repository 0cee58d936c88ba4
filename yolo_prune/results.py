"""Typed results. Each public API function returns one of these dataclasses; they print as tables."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Render rows as a plain-text table with aligned columns."""
    rows = [[format_value(c) for c in r] for r in rows]
    if header:
        rows.insert(0, list(header))
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(format_value(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


@dataclasses.dataclass
class Result:
    """Base of all result dataclasses: ``str(result)`` is a two-column table of its scalar fields.

    Subclasses may override :meth:`rows` to choose what is shown.
    """

    def rows(self) -> list[tuple[str, Any]]:
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.repr and (v is None or isinstance(v, (int, float, str, bool))):
                out.append((f.name, v))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.rows()}

    def __str__(self) -> str:
        return f"{type(self).__name__}\n" + table(self.rows())
