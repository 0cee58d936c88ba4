"""Render the tables of BENCHMARKS.md from bench/results/*.json.

BENCHMARKS.md holds hand-written text around generated blocks delimited by
``<!-- BEGIN name -->`` / ``<!-- END name -->``; only the blocks are rewritten (names: ``machine``, ``targets``,
``frontier``, ``frontier:<result name>``, ``pruneonly``, ``latency``, ``latency:<result name>``, ``latency_target``,
``cost``, ``quick``). A block whose JSON is missing says so. Run after any benchmark:

    python bench/render.py            # rewrite the blocks in BENCHMARKS.md
    python bench/render.py --print    # print the blocks instead
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DOC = common.ROOT / "BENCHMARKS.md"
ARM_LABEL = {
    "a_sparse_bn": "(a) yolo-prune: sparse_train + prune(bn)",
    "b_l1": "(b) prune(l1), no sparsity training",
    "c_random": "(c) prune(random)",
    "d_narrow": "(d) narrower YOLOv8, from scratch",
    "dense": "dense, fine-tuned (reference)",
}
ARM_ORDER = list(ARM_LABEL)


def md_table(rows: Iterable[Iterable[Any]], header: Iterable[str]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def minutes(sec: float | None) -> str:
    return "n/a" if sec is None else f"{sec / 60:.1f} min"


def cmd(res: dict[str, Any]) -> str:
    return f"`{res.get('command', '?')}` (started {res.get('started', '?')}, total {minutes(res.get('total_seconds'))})"


def load_note(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    busy = res.get("busy_processes_at_start") or []
    la = m.get("loadavg_start")
    s = f"load average at start {la[0]:.2f}" if la else ""
    if busy:
        s += "; other busy processes at start: " + "; ".join(f"`{b}`" for b in busy[:3])
    return s


# --------------------------------------------------------------------------------------------- blocks
def block_machine() -> str:
    res = next((r for r in (common.read_result(n) for n in ("frontier", "latency", "cost")) if r), None)
    m = res["machine"] if res else common.machine()
    rows = [("CPU (lscpu model name)", m["cpu"]), ("cores", m["cores"]), ("python", m["python"]),
            ("torch", m["torch"]), ("ultralytics", m["ultralytics"]), ("torch-pruning", m["torch_pruning"]),
            ("onnxruntime", m["onnxruntime"]), ("faster-coco-eval", m.get("faster_coco_eval")), ("GPU", "none (CPU only)")]
    return md_table(rows, ("", "value"))


def _frontier_rows(ds: dict[str, Any]) -> list[tuple]:
    rows = []
    dense_ft = ds["rows"].get("dense", {}).get("final", {}).get("map50_95")
    rows.append(("dense, as given", "-", "1.000", f"{ds['dense_params'] / 1e6:.2f}", f(ds["dense_map"]["map50_95"]),
                 "-", "-", "-", "-"))
    keyed = sorted(ds["rows"].values(), key=lambda r: (-(r.get("target_macs") or 2), ARM_ORDER.index(r["arm"])))
    for r in keyed:
        if "final" not in r:
            continue
        ep = r.get("epochs", {})
        epochs = " + ".join(f"{v} {k}" for k, v in ep.items())
        final = r["final"]["map50_95"]
        delta = f"{100 * (final - dense_ft):+.1f}" if dense_ft is not None and r["arm"] != "dense" else "-"
        pruned = r.get("pruned", {}).get("map50_95") if r["arm"] not in ("d_narrow", "dense") else None
        rows.append((ARM_LABEL[r["arm"]], r.get("target_macs") or "-", f(r.get("macs_ratio")),
                     f"{r['params'] / 1e6:.2f}" if r.get("params") else "n/a",
                     f(pruned) if pruned is not None else "-", f(final), delta, epochs,
                     f"{r.get('train_seconds', 0):.0f}"))
    return rows


def block_frontier(name: str = "frontier") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python bench/frontier.py`._"
    out = [(f"Command: {cmd(res)}{'' if res.get('complete') else ' - **INCOMPLETE run**'}. "
           f"{load_note(res)}.")]
    for dsname, ds in res["datasets"].items():
        out.append(f"\n**{dsname}** - data `{ds['data']}` ({ds['n_train']} train / {ds['n_val']} val images), "
                   f"imgsz {ds['imgsz']}, S = {ds['sparse_epochs']} sparse epochs, F = {ds['finetune_epochs']} "
                   f"fine-tune epochs, sr = {ds['sr']}; dense model {ds['dense_macs'] / 1e9:.3f} GMACs @{ds['imgsz']}. "
                   f"Training recipe (every arm): `{ds['train_args']}`; from scratch (d): `{ds['scratch_train_args']}`."
                   f" Wall time of this dataset: {minutes(ds.get('seconds'))}"
                   + (f" (+ {minutes(ds['dense_train_seconds'])} to train the dense model once, cached)"
                      if ds.get("dense_train_seconds") else "") + ".")
        sp = ds.get("sparse")
        if sp:
            out.append(f"\nSparsity training (a): {sp.get('epochs')} epochs, sr {sp.get('sr')}, "
                       f"{sp.get('seconds')} s; mean |gamma| {f(sp.get('gamma_mean_before'))} -> "
                       f"{f(sp.get('gamma_mean_after'))}, share of |gamma| < {sp.get('gamma_threshold')}: "
                       f"{100 * (sp.get('gamma_near_zero_before') or 0):.1f}% -> "
                       f"{100 * (sp.get('gamma_near_zero_after') or 0):.1f}%; mAP50-95 of the sparse model (before "
                       f"pruning) {f(sp['map']['map50_95'])}.")
        out.append("")
        out.append(md_table(_frontier_rows(ds), ("model", "target MACs", "MACs kept", "params (M)",
                                                  "mAP50-95 after pruning", "mAP50-95 after budget",
                                                  "vs dense fine-tuned (points)", "epochs", "train s")))
        png = common.RESULTS / f"{name}_{dsname}.png"
        if png.is_file():
            out.append(f"\n![{dsname} frontier](bench/results/{png.name})")
    return "\n".join(out)


def block_latency(name: str = "latency") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python bench/latency.py`._"
    clock = res.get("clock", "wall")
    m = res.get("machine", {})
    out = [(f"Command: {cmd(res)}. Pruning method `{res['method']}` on the fixture's COCO yolov8n, no fine-tune. "
           f"batch 1, {res['runs']} timed runs after {res['warmup']} warm-up runs per model and backend, medians; "
           f"ratio = pruned median / dense median of the same interleaved run."
           + (" Clock: process CPU time (1 thread: the latency of a quiet machine)." if clock == "cpu" else "")
           + (f" CPU: {m['cpu_isa']}." if m.get("cpu_isa") else ""))]
    labels = {"torch": "torch", "onnx": "onnxruntime", "openvino": "OpenVINO"}
    for run in res["runs_by_setting"]:
        imgsz, threads = run["imgsz"], run["threads"]
        by = {(r["model"], r["backend"]): r for r in run["rows"]}
        models = list(dict.fromkeys(r["model"] for r in run["rows"]))
        backends = [b for b in ("torch", "onnx", "openvino") if any(r["backend"] == b for r in run["rows"])]
        rows = []
        for mname in models:
            info = res["models"][mname]
            row = [mname, info["round_to"] if info["round_to"] else ("-" if mname == "dense" else "None"),
                   f(info[f"macs_ratio@{imgsz}"]), f(info["params_ratio"])]
            for backend in backends:
                r = by.get((mname, backend))
                row += [f(r["median_ms"], 1), f(r["ratio_vs_reference"])] if r else ["-", "-"]
            rows.append(row)
        busy = run.get("busy_processes_before") or []
        out.append(f"\n**imgsz {imgsz}, {threads} thread(s)** ({run['seconds']:.0f} s; 1-min load average "
                   f"{run['loadavg_1min_before']:.2f} before, {run['loadavg_1min_after']:.2f} after"
                   + (f"; busy before: {'; '.join('`' + b + '`' for b in busy[:2])}" if busy else "") + ")\n")
        head = ["model", "round_to", "MACs ratio", "params ratio"]
        for b in backends:
            head += [f"{labels[b]} ms", f"{labels[b]} ratio"]
        out.append(md_table(rows, head))
    return "\n".join(out)


ARM_TEXT = {"dense": "dense", "macs": "target_macs=0.5, round_to=8", "macs_auto": "target_macs=0.5, round_to=auto",
            "latency": "target_latency=0.5, round_to=auto", "latency_aware": "target_latency=0.5, auto, latency_aware"}


def block_latency_target(name: str = "latency_target") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python bench/latency.py --compare`._"
    m = res.get("machine", {})
    out = [f"Command: {cmd(res)}. {load_note(res)}. CPU: {m.get('cpu_isa', m.get('cpu'))}; onnxruntime "
           f"{m.get('onnxruntime')}, OpenVINO {m.get('openvino')}. Pruning method `{res['method']}`, compensate "
           f"lstsq on 32 train images, no fine-tune. Latency: the exported dense and pruned models in one interleaved "
           f"run per setting ({res['runs']} runs, medians; clock: process CPU time with 1 thread, wall with 2). "
           f"ratio = pruned / dense; predicted = the latency table's prediction; mAP50-95 right after pruning. "
           f"The column after fine-tune is left for the same fine-tune of every arm."]
    for ds, entry in res["datasets"].items():
        rows = []
        notes = []
        for st in entry["settings"]:
            for r in st["rows"]:
                if r["arm"] == "dense":
                    continue
                rows.append((st["runtime"], st["threads"], ARM_TEXT.get(r["arm"], r["arm"]), f(r["ratio"]),
                             f(r["predicted_ratio"]), f(r["macs_ratio"]), f(r["map"]["map50_95"]), ""))
            t, v = st["table"], st["table"].get("validation") or {}
            notes.append(
                f"- {st['runtime']}, {st['threads']} thread(s): dense {t['dense_ms']:.1f} ms; fixed part "
                f"{t['fixed_ms']:.1f} ms = **{100 * t['fixed_share']:.0f}%** of it; predicted floor (every layer at a "
                f"quarter of its width) {t['floor_ratio']:.3f}; table built in {t['build_seconds'] / 60:.1f} min "
                f"(in-context scale {t['scale']:.3f}, runtime-wide quantum {t['common_quantum']})"
                + (f"; validation on {v['n']} random variants: |ratio error| mean {v['mean_abs_ratio_error']:.3f}, "
                   f"max {v['max_abs_ratio_error']:.3f} (uncalibrated {v.get('uncalibrated_mean_abs_ratio_error', 0):.3f}"
                   f" / {v.get('uncalibrated_max_abs_ratio_error', 0):.3f})" if v else "")
                + f"; 1-min load average {st['loadavg_1min_before']:.1f} -> {st['loadavg_1min_after']:.1f}.")
        dm = entry["dense_map"]["map50_95"]
        out.append(f"\n**{ds}** (latency @{entry['imgsz']}, mAP @{entry['val_imgsz']}; dense mAP50-95 {f(dm)})\n")
        out.append(md_table(rows, ("runtime", "threads", "pruning", "latency ratio", "predicted", "MACs ratio",
                                   "mAP50-95 pruned", "mAP50-95 fine-tuned")))
        out.append("\n" + "\n".join(notes))
    return "\n".join(out)


def block_cost(name: str = "cost") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python bench/cost.py`._"
    out = [f"Command: {cmd(res)}. {load_note(res)}."]
    p = res.get("prune")
    if p:
        series = p.get("by_threads") or {"default": p}
        for threads, q in series.items():
            rows = [(k, f"{v['params'] / 1e6:.1f}", f(v["gmacs@640"], 2), f(v["macs_ratio"]), f(v["median_s"], 2),
                     ", ".join(f"{s:.2f}" for s in v["seconds"])) for k, v in q["models"].items()]
            busy = q.get("busy_processes_before") or []
            out.append(f"\n**Pruning wall time, {threads} torch thread(s)** (`prune_model`, method `{p['method']}`, "
                       f"target_macs {p['target_macs']}, random-init models with randomised BN; median of "
                       f"{p['repeats']}; 1-min load average before {q.get('loadavg_1min_before', float('nan')):.2f}"
                       + (f"; busy before: {'; '.join('`' + b + '`' for b in busy[:2])}" if busy else "") + ")\n")
            out.append(md_table(rows, ("model", "params (M)", "GMACs @640", "MACs kept", "median s", "runs s")))
            api = q.get("prune_api_fixture_yolov8n")
            if api:
                out.append(f"\nWhole `yolo_prune.prune()` call on the fixture yolov8n (load, stats before/after, save "
                           f"checkpoint + report + plot): median {api['median_s']:.2f} s "
                           f"(runs {', '.join(f'{s:.2f}' for s in api['seconds'])}; of which `prune_model` "
                           f"{', '.join(f'{s:.2f}' for s in api['prune_model_seconds'])} s).")
    s = res.get("sparse")
    if s:
        rows = [(k, f(s["median_epoch_s"][k], 2), f(s["median_wall_s"][k], 1),
                 "; ".join(", ".join(f"{e:.1f}" for e in run["epoch_s"]) for run in s["runs"][k])) for k in ("plain", "sparse")]
        out.append(f"\n**Sparsity-training overhead** (`finetune` vs `sparse_train(sr={s['sr']})`, {s['data']}, "
                   f"imgsz {s['imgsz']}, {s['epochs']} epochs per run, {s['pairs']} alternating pairs; epoch 1 of each "
                   f"run excluded from the per-epoch median)\n")
        out.append(md_table(rows, ("trainer", "median s / epoch", "median wall s / run", "epoch times per run (s)")))
        out.append(f"\nOverhead: **{round(s['overhead_pct_epoch'], 1) + 0.0:+.1f}%** per epoch ({s['overhead_pct_wall']:+.1f}% per "
                   f"whole run). The penalty itself (`add_l1_subgradient` over {s['bn_gamma_tensors']} BN gamma tensors, "
                   f"{s['bn_gamma_values']} values) takes {s['l1_subgradient_ms']:.2f} ms per optimizer step, against "
                   f"{s['forward_backward_b16_ms']:.0f} ms for one forward+backward of yolov8n at batch 16.")
    e = res.get("eval")
    if e:
        rows = [(k, f(v["median_s"], 3), ", ".join(f"{t:.3f}" for t in v["seconds"]), f(v["map50_95"], 4),
                 f(v["map50"], 4)) for k, v in e["backends"].items()]
        out.append(f"\n**COCO evaluation time** (`coco_eval` on {e['data']}, {e['n_predictions']} predictions of "
                   f"the fixture yolov8n at imgsz {e['imgsz']}; the validator pass that produced them took "
                   f"{e['validator_seconds']:.1f} s)\n")
        out.append(md_table(rows, ("backend", "median s", "runs s", "mAP50-95", "mAP50")))
        out.append(f"\nfaster-coco-eval is {e['speedup']:.1f}x faster; |mAP50-95 difference| = {e['map_abs_diff']:.1e}.")
    return "\n".join(out)


def block_targets() -> str:
    rows = []
    fr = common.read_result("frontier")
    if fr:
        for dsname, ds in fr["datasets"].items():
            r = ds["rows"]
            dense = r.get("dense", {}).get("final", {}).get("map50_95")
            a = r.get("a_sparse_bn@0.5", {}).get("final", {}).get("map50_95")
            others = {k: r.get(f"{k}@0.5", {}).get("final", {}).get("map50_95") for k in ("b_l1", "c_random", "d_narrow")}
            if dense is None or a is None:
                continue
            within = a >= dense - 0.01
            ahead = all(v is None or a > v for v in others.values())
            rows.append((f"{dsname}: (a) at 50% MACs within 1 point of dense fine-tuned",
                         f"(a) {a:.3f} vs dense {dense:.3f} ({100 * (a - dense):+.1f} points)",
                         "met" if within else "**missed**"))
            rows.append((f"{dsname}: (a) at 50% MACs ahead of (b), (c), (d)",
                         ", ".join(f"{k[0]} {v:.3f}" for k, v in others.items() if v is not None),
                         "met" if ahead else "**missed**"))
    lat = common.read_result("latency")
    if lat:
        for run in lat["runs_by_setting"]:
            for r in run["rows"]:
                info = lat["models"][r["model"]]
                if r["backend"] == "onnx" and info["target_macs"] == 0.5:
                    ok = r["ratio_vs_reference"] <= 0.6
                    rows.append(((f"onnxruntime latency ratio <= 0.6 at 50% MACs (imgsz {run['imgsz']}, "
                                 f"{run['threads']} thr, round_to {info['round_to']})"),
                                 f"{r['ratio_vs_reference']:.3f} (MACs ratio {r['macs_ratio']:.3f})",
                                 "met" if ok else "**missed**"))
    lt = common.read_result("latency_target")
    if lt:
        for ds, entry in lt["datasets"].items():
            for st in entry["settings"]:
                by = {r["arm"]: r for r in st["rows"]}
                if st["runtime"] == "onnxruntime" and "latency" in by:
                    r, mac = by["latency"], by.get("macs")
                    rows.append((f"{ds}: onnxruntime latency ratio <= 0.55 at target_latency=0.5 "
                                 f"({st['threads']} thr)",
                                 f"{r['ratio']:.3f} (target_macs=0.5: {mac['ratio']:.3f})" if mac else f"{r['ratio']:.3f}",
                                 "met" if r["ratio"] <= 0.55 else "**missed**"))
    cost = common.read_result("cost")
    if cost and cost.get("prune"):
        p = cost["prune"]
        for threads, q in (p.get("by_threads") or {"default": p}).items():
            v = q["models"].get("yolov8n")
            if v:
                rows.append((f"pruning yolov8n in under 3 s ({threads} torch thread(s))",
                             f"{v['median_s']:.2f} s (prune_model, median of {len(v['seconds'])})",
                             "met" if v["median_s"] < 3 else "**missed**"))
    if cost and cost.get("sparse"):
        o = cost["sparse"]["overhead_pct_epoch"]
        o = 0.0 if abs(o) < 0.05 else o
        rows.append(("sparsity-training overhead under 5%", f"{o:+.1f}% per epoch", "met" if o < 5 else "**missed**"))
    if not rows:
        return "_No results yet._"
    return md_table(rows, ("target", "measured", "verdict"))


def block_pruneonly(name: str = "frontier_pruneonly") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python bench/frontier.py --prune-only`._"
    out = [f"Command: {cmd(res)}. {load_note(res)}."]
    for dsname, ds in res["datasets"].items():
        targets = sorted({r["target_macs"] for r in ds["rows"].values()}, reverse=True)
        rows = []
        for t in targets:
            row = [t]
            for method in ("bn", "l1", "random"):
                r = ds["rows"].get(f"prune_{method}@{t}")
                row.append(f"{f(r['pruned']['map50_95'])} ({f(r['macs_ratio'])})" if r and "pruned" in r else "-")
            rows.append(row)
        out.append(f"\n**{dsname}** (imgsz {ds['imgsz']}; dense model as given: mAP50-95 "
                   f"{f(ds['dense_map']['map50_95'])}). Cells: mAP50-95 right after pruning (MACs kept).\n")
        out.append(md_table(rows, ("target MACs", "prune(bn)", "prune(l1)", "prune(random)")))
    return "\n".join(out)


def block_quick() -> str:
    out = []
    for name, fn in (("frontier_quick", block_frontier), ("latency_quick", block_latency), ("cost_quick", block_cost),
                     ("latency_target_quick", block_latency_target)):
        if common.read_result(name):
            out.append(f"\n#### `{name}.json`\n\n" + fn(name))
    return "\n".join(out) if out else "_No quick results yet._"


BLOCKS = {"machine": block_machine, "targets": block_targets, "frontier": block_frontier, "pruneonly": block_pruneonly, "latency": block_latency,
          "latency_target": block_latency_target, "cost": block_cost, "quick": block_quick}


def render(text: str) -> str:
    # parameterised frontier blocks: <!-- BEGIN frontier:NAME --> renders bench/results/NAME.json
    pattern = re.compile(r"(<!-- BEGIN frontier:(\w+) -->\n).*?(<!-- END frontier:\2 -->)", re.DOTALL)
    text = pattern.sub(lambda m: m.group(1) + block_frontier(m.group(2)) + "\n" + m.group(3), text)
    pattern = re.compile(r"(<!-- BEGIN latency:(\w+) -->\n).*?(<!-- END latency:\2 -->)", re.DOTALL)
    text = pattern.sub(lambda m: m.group(1) + block_latency(m.group(2)) + "\n" + m.group(3), text)
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.DOTALL)
        if pattern.search(text):
            body = fn()
            text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--print", action="store_true", help="print the generated blocks instead of writing")
    args = parser.parse_args(argv)
    if args.print:
        for name, fn in BLOCKS.items():
            print(f"## {name}\n{fn()}\n")
        return 0
    if not DOC.is_file():
        raise SystemExit(f"{DOC} not found")
    DOC.write_text(render(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rendered {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
