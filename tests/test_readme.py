"""The README's results are BENCHMARKS.md's: every mAP-like figure the README quotes must be one of the tables
`python -m bench.render` generates, so a re-render that changes a number fails here until the README follows.

A figure is ``0.xyz`` in the README's prose: fenced code blocks (example output) and option values (``key=0.xyz``,
e.g. in an error message) are not results.
"""

from __future__ import annotations

import re

from .helpers import ROOT

FIGURE = re.compile(r"(?<![\w.=])0\.\d{3}(?!\d)")
BLOCK = re.compile(r"<!-- BEGIN (\S+) -->(.*?)<!-- END \1 -->", re.S)


def rendered(name: str | None = None) -> str:
    """The generated tables of BENCHMARKS.md (all of them, or the block ``name``)."""
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    return "\n".join(body for block, body in BLOCK.findall(text) if name is None or block == name)


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the markdown outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((n, line))
    return out


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i].split(" ", 1)[0]) <= len(level)), len(lines))
    return "\n".join(lines[start:end])


def test_every_figure_the_readme_quotes_is_in_the_rendered_benchmarks():
    known = set(FIGURE.findall(rendered()))
    assert len(known) > 100  # the tables were found
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quoted = [(n, f) for n, line in prose(readme) for f in FIGURE.findall(line)]
    assert len(quoted) > 20  # the README's results were found
    missing = [f"README.md:{n}: {f}" for n, f in quoted if f not in known]
    assert missing == [], "figures no BENCHMARKS.md table holds (re-rendered? update the README): " + ", ".join(missing)


def test_the_bccd_summary_states_the_targets_table():
    """'How it works' sums up the bccd pipeline with the target rows of BENCHMARKS' section 7: the pruned and the
    dense model's mAP50-95 and the gap in points, at 50% and 30% of the MACs (stale once, from before nbs=batch)."""
    rows = re.findall(r"\| bccd at (\d+)% MACs[^|]*\| (0\.\d{3}) vs (0\.\d{3}) \((-?\d+\.\d) points",
                      rendered("accuracy_targets"))
    assert [pct for pct, *_ in rows] == ["50", "30"]
    how = section((ROOT / "README.md").read_text(encoding="utf-8"), "## How it works")
    bccd = how[how.index("On bccd"):]
    for pct, pruned, dense, gap in rows:
        assert pruned in bccd and dense in bccd and f"{gap} " in bccd, (pct, pruned, dense, gap)
