"""Run reports: the before/after table as Markdown, and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path
from .results import markdown_table


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prune_report_markdown(result: Any, *, title: str = "yolo-prune report") -> str:
    """Markdown for a :class:`~yolo_prune.pruning.prune.PruneResult`-like object (has ``comparison()``)."""
    goal = getattr(result, "goal", None) or (
        f"ratio={result.ratio}" if result.ratio is not None else f"target_macs={result.target_macs}")
    prov = result.provenance or {}
    lines = [
        f"# {title}",
        "",
        f"method={result.method}, {goal}, pruning time {result.seconds:.2f} s",
        "",
        f"compensate={getattr(result, 'compensate', None)}, recalibrate={getattr(result, 'recalibrate', None) or False}, "
        f"allocation={getattr(result, 'allocation', 'global')}",
        "",
        markdown_table(result.comparison(), header=("", "before", "after", "ratio")),
        "",
        f"source: `{prov.get('source')}` (sha256 {prov.get('source_sha256')}), seed {prov.get('seed')}",
        f"versions: {', '.join(f'{k} {v}' for k, v in (prov.get('versions') or {}).items())}",
        "",
        "Per-layer output channels: `layers.csv`.",
    ]
    if getattr(result, "portable", None) is not None:
        lines += ["", "The checkpoint holds stock ultralytics classes only: it loads with `YOLO(path)` without yolo-prune "
                  "(portable=True)." if result.portable else "The checkpoint holds yolo-prune's prunable block forms "
                  "(portable=False): loading it needs yolo-prune installed."]
    lat = getattr(result, "latency", None)
    if lat:
        lines += ["", "## Latency", "", _latency_markdown(lat)]
    timings = getattr(result, "timings", None)
    if timings:
        lines += ["", "## Time per sub-step", "", timings_markdown(timings, getattr(result, "total_seconds", None))]
    return "\n".join(lines) + "\n"


def timings_markdown(timings: dict[str, float], total: float | None) -> str:
    """Wall seconds of each sub-step (longest first) and its share of ``total``, as a markdown table."""
    rows = [(name, seconds, seconds / total if total else None)
            for name, seconds in sorted(timings.items(), key=lambda kv: -kv[1])]
    if total is not None:
        rows.append(("total", total, 1.0))
    return markdown_table(rows, header=("sub-step", "seconds", "share"))


def _latency_markdown(lat: dict) -> str:
    """The latency section of a prune report: the table's setting, predicted and measured latency."""
    threads = lat.get("threads") or "default"
    int8 = " INT8" if lat.get("int8") else ""
    rows = [(f"predicted ({int8.strip() + ' ' if int8 else ''}latency table)", lat.get("dense_ms"),
             lat.get("predicted_ms"), lat.get("predicted_ratio"))]
    if lat.get("measured_ms") is not None:
        rows.append((f"measured ({'INT8 ' if int8 else ''}exported models, interleaved)", lat["measured_dense_ms"],
                     lat["measured_ms"], lat["measured_ratio"]))
    spread = lat.get("measured_spread") or {}
    text = [
        f"Runtime {lat.get('runtime')} {lat.get('runtime_version')}{int8}, {threads} thread(s), imgsz {lat.get('imgsz')}, "
        f"clock {lat.get('clock')}, CPU {lat.get('cpu')}.",
        "",
        markdown_table(rows, header=("latency (ms)", "dense", "pruned", "ratio")),
        "",
        f"Fixed part (what pruning cannot change): {lat.get('fixed_ms', 0):.1f} ms = "
        f"{100 * (lat.get('fixed_share') or 0):.0f}% of the dense latency. Target: "
        + (f"{lat['target_fraction']:.3f} of the dense latency." if lat.get("target_fraction") is not None
           else "none (the table served round_to=auto)."),
    ]
    if lat.get("measured_ms") is not None:
        text += ["", f"Measured over {lat.get('measured_runs')} interleaved runs each (medians); spread (p90-p10)/median: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in spread.items())
                 + (" (above 0.3: a busy machine, the numbers are unreliable)." if any(v > 0.3 for v in spread.values())
                    else ".")]
    v = lat.get("table_validation")
    if v:
        text += ["", f"Latency table validation on {v['n']} random pruned variants: mean |error| of the latency ratio "
                 f"{v['mean_abs_ratio_error']:.3f}, max {v['max_abs_ratio_error']:.3f}."]
    if lat.get("table"):
        text += ["", f"Table: `{lat['table']}`"]
    return "\n".join(text)


def plot_layer_channels(layers: Sequence[Any], path: str | Path) -> Path:
    """Bar chart of channels kept per prunable conv (kept over removed)."""
    plt = pyplot()
    names = [layer.name.replace("model.", "") for layer in layers]
    before = [layer.channels_before for layer in layers]
    after = [layer.channels_after for layer in layers]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.18), 4))
    x = range(len(names))
    ax.bar(x, before, color="#d9d9d9", label="removed")
    ax.bar(x, after, color="#1f77b4", label="kept")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=5)
    ax.set_ylabel("output channels")
    ax.set_title("channels kept per layer")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gamma_histograms(hists: dict[str, Sequence[float]], path: str | Path, *, threshold: float | None = None) -> Path:
    """Overlaid histograms of |BN gamma| (e.g. before and after sparsity training), log-scaled counts."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [v for vs in hists.values() for v in vs]
    hi = max(values) if values else 1.0
    for label, vs in hists.items():
        ax.hist(vs, bins=100, range=(0, hi), alpha=0.6, label=label)
    if threshold:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_yscale("log")
    ax.set_xlabel("|gamma|")
    ax.set_ylabel("channels")
    ax.set_title("BatchNorm gamma")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_map_vs_macs(points: Sequence[tuple[float, float, str]], path: str | Path) -> Path:
    """mAP50-95 against MACs kept, one point per (macs_fraction, map, label)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    ax.plot(xs, ys, "o-")
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("MACs kept (fraction of the original)")
    ax.set_ylabel("mAP50-95")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def plot_layer_sparsity(rows: Sequence[tuple[str, float]], path: str | Path, *, overall: float | None = None) -> Path:
    """Bar chart of the fraction of zero weights per layer (``rows``: (name, sparsity)), with the overall line."""
    plt = pyplot()
    names = [n.replace("model.", "") for n, _ in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.18), 4))
    x = range(len(names))
    ax.bar(x, [s for _, s in rows], color="#1f77b4")
    if overall is not None:
        ax.axhline(overall, color="k", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
        ax.legend()
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of weights = 0")
    ax.set_title("sparsity per layer")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_weight_histograms(layers: dict[str, tuple[Any, Any]], path: str | Path, *, bins: int = 101) -> Path:
    """One panel per layer: histogram of its weight values before and after (numpy arrays), log-scaled counts."""
    import numpy as np

    plt = pyplot()
    n = max(1, len(layers))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False)
    for ax, (name, (before, after)) in zip(axes[0], layers.items()):
        hi = float(max(np.abs(before).max(initial=0), np.abs(after).max(initial=0))) or 1.0
        rng = (-hi, hi)  # odd bin count: 0 sits in the middle of a bin
        ax.hist(before, bins=bins, range=rng, label=f"before ({float((before == 0).mean()):.0%} zero)",
                color="#c7c7c7")
        ax.hist(after, bins=bins, range=rng, histtype="step", linewidth=1.2, color="#1f77b4",
                label=f"after ({float((after == 0).mean()):.0%} zero)")
        ax.set_yscale("log")
        ax.set_title(name.replace("model.", ""), fontsize=8)
        ax.set_xlabel("weight")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("count (log)")
    fig.tight_layout()
    return save_figure(fig, path)
