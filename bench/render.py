"""Render the tables of BENCHMARKS.md from bench/results/*.json.

BENCHMARKS.md holds hand-written text around generated blocks delimited by
``<!-- BEGIN name -->`` / ``<!-- END name -->``; only the blocks are rewritten (names: ``machine``, ``targets``,
``frontier``, ``frontier:<result name>``, ``pruneonly``, ``latency``, ``latency:<result name>``, ``latency_target``,
``cost``, ``families``, ``families:<result name>``, ``distill``, ``unstructured``, ``sparsity:<result name>``,
``accuracy``, ``accuracy_targets``, ``collapse``, ``recovery``, ``portable:<result name>``,
``bccd_pipeline:<result name>``, ``int8:<result name>``, ``tasks``, ``quick``). A block whose JSON is missing says so. Run after any benchmark:

    python -m bench.render            # rewrite the blocks in BENCHMARKS.md
    python -m bench.render --print    # print the blocks instead

(from the project root; ``python bench/render.py`` does the same from anywhere).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python bench/render.py`: the same as `python -m bench.render`
    import subprocess
    import sys

    raise SystemExit(subprocess.call([sys.executable, "-m", "bench.render", *sys.argv[1:]],
                                     cwd=Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

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
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.frontier`._"
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
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.speedup`._"
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


def _finetuned(r: dict[str, Any]) -> str:
    """mAP50-95 after the fine-tune: the mean over seeds, each seed in brackets when there are several."""
    if not r.get("map_finetuned"):
        return ""
    seeds = r.get("finetunes") or {}
    each = f" ({', '.join(f(x['map50_95']) for _, x in sorted(seeds.items()))})" if len(seeds) > 1 else ""
    return f(r["map_finetuned"]["map50_95"]) + each


def _finetune_note(res: dict[str, Any]) -> str:
    """How the fine-tuned column was made (or that it is empty)."""
    infos = [r["finetune"] for e in res["datasets"].values() for st in e["settings"] for r in st["rows"]
             if r.get("finetune")]
    if not infos:
        return ". No fine-tuned column yet (`--finetune EPOCHS`)."
    epochs = sorted({i["epochs"] for i in infos})
    seeds = sorted({s for i in infos for s in i["seeds"]})
    cmds = "; ".join(f"`{c}`" for c in res.get("finetune_commands", []))
    return (f"; mAP50-95 fine-tuned: the same {'/'.join(map(str, epochs))}-epoch fine-tune of each arm "
            f"({infos[0]['recipe']}, on the train split at the mAP image size; seeds "
            f"{', '.join(map(str, seeds))}: the mean, each seed in brackets; {cmds}). Empty: arm not fine-tuned.")


def block_latency_target(name: str = "latency_target") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.speedup --compare`._"
    m = res.get("machine", {})
    out = [f"Command: {cmd(res)}. {load_note(res)}. CPU: {m.get('cpu_isa', m.get('cpu'))}; onnxruntime "
           f"{m.get('onnxruntime')}, OpenVINO {m.get('openvino')}. Pruning method `{res['method']}`, compensate "
           f"lstsq on 32 train images, no fine-tune. Latency: the exported dense and pruned models in one interleaved "
           f"run per setting ({res['runs']} runs, medians; clock: process CPU time with 1 thread, wall with 2). "
           f"ratio = pruned / dense; predicted = the latency table's prediction; mAP50-95 right after pruning"
           + _finetune_note(res)]
    for ds, entry in res["datasets"].items():
        rows = []
        notes = []
        for st in entry["settings"]:
            for r in st["rows"]:
                if r["arm"] == "dense":
                    continue
                rows.append((st["runtime"], st["threads"], ARM_TEXT.get(r["arm"], r["arm"]), f(r["ratio"]),
                             f(r["predicted_ratio"]), f(r["macs_ratio"]), f(r["map"]["map50_95"]),
                             _finetuned(r)))
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
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.cost`._"
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
    for lt in filter(None, map(common.read_result, ("latency_target", "latency_target_1thr_bccd",
                                                    "latency_target_2thr", "latency_target_2thr_fixture"))):
        for ds, entry in lt["datasets"].items():
            for st in entry["settings"]:
                by = {r["arm"]: r for r in st["rows"]}
                r, mac = by.get("latency"), by.get("macs")
                if st["runtime"] == "onnxruntime" and r:
                    rows.append((f"{ds}: onnxruntime latency ratio <= 0.55 at target_latency=0.5 "
                                 f"({st['threads']} thr)",
                                 f"{r['ratio']:.3f} (target_macs=0.5: {mac['ratio']:.3f})" if mac else f"{r['ratio']:.3f}",
                                 "met" if r["ratio"] <= 0.55 else "**missed**"))
                if r and mac and r.get("map_finetuned") and mac.get("map_finetuned"):
                    a, b = r["map_finetuned"]["map50_95"], mac["map_finetuned"]["map50_95"]
                    rows.append((f"{ds}: mAP50-95 after the same fine-tune, target_latency=0.5 ({st['runtime']}, "
                                 f"{st['threads']} thr) no worse than target_macs=0.5",
                                 f"{a:.3f} vs {b:.3f} ({r['finetune']['epochs']} epochs, "
                                 f"{len(r.get('finetunes') or [0])} seed(s))", "met" if a >= b else "**missed**"))
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
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.frontier --prune-only`._"
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


def _attention_note(fam: dict[str, Any]) -> str:
    att = fam.get("attention") or {}
    pairs = list(zip(att.get("dense", []), att.get("pruned", [])))
    if not pairs:
        return ""
    parts = [f"`{d['block']}` outer {d['outer']}->{p['outer']}, FFN hidden {d['ffn_hidden']}->{p['ffn_hidden']}, "
             f"qkv out {d['qkv_out']}->{p['qkv_out']}, heads {d['heads']}->{p['heads']}" for d, p in pairs]
    return "; ".join(parts)


def block_families(name: str = "families") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.families`._"
    out = [f"Latest command: {cmd(res)}{'' if res.get('complete') else ' - **INCOMPLETE run**'}. {load_note(res)}. "
           f"Training recipe (every run): `{res.get('recipe')}`, OMP_NUM_THREADS={res.get('threads')}."]
    for dsname, ds in res["datasets"].items():
        S, F = ds["sparse_epochs"], ds["finetune_epochs"]
        for run in ds.get("runs", []):
            la = run.get("loadavg_start")
            out.append(f"\n{dsname}: `{run['command']}` (started {run.get('started')}, {minutes(run.get('seconds'))}"
                       f"{f', load average at start {la[0]:.2f}' if la else ''}).")
        out.append(f"\n**{dsname}** - data `{Path(ds['data']).name}` at imgsz {ds['imgsz']}; dense models trained "
                   f"{ds['dense_epochs']} epochs from their yaml; pipeline: {S} sparse + {F} fine-tune epochs, "
                   f"target_macs 0.5 ({'bn ranking, one-shot lstsq, no teacher' if dsname == 'synthetic' else 'the current pruning defaults: recon, lstsq_seq, BN re-estimation, sensitivity allocation; distilled from the dense model'}); "
                   f"reference: dense + {S + F} epochs (equal budget).\n")
        rows, notes = [], []
        for fam, r in ds["families"].items():
            d, p, ft, l6 = r.get("dense", {}), r.get("pipeline", {}), r.get("dense_ft", {}), r.get("latency640", {})
            if not p:
                continue
            delta = f"{100 * (p['map50_95'] - ft['map50_95']):+.1f}" if ft else "-"
            rows.append((fam, f(d.get("map50_95")), f(ft.get("map50_95")) if ft else "-",
                         *((f(p.get("map50_95_sparse")),) if S else ()), f(p["map50_95_pruned"]),
                         f(p["map50_95"]), delta,
                         f"{d['params'] / 1e6:.2f} -> {p['params'] / 1e6:.2f}",
                         f"{d['macs'] / 1e9:.4f} -> {p['macs'] / 1e9:.4f} ({p['macs_ratio']:.3f})",
                         f"{p['prune_seconds']:.1f}", f(p.get("onnx_ratio"), 2), f(l6.get("ratio"), 2) if l6 else "-"))
            if (note := _attention_note(r)):
                notes.append(f"- {fam} attention widths, dense -> pruned: {note}.")
        stages = (f"sparse ({S} ep)", "sparse + pruned", f"pruned +{S}+{F} ep") if S else \
            ("right after pruning", f"pruned +{F} ep")
        out.append(md_table(rows, ("family", "dense mAP50-95", f"dense +{S + F} ep", *stages,
                                   f"vs dense +{S + F} ep (points)", "params (M)",
                                   f"GMACs @{ds['imgsz']} (ratio)", "prune s",
                                   f"onnx latency ratio @{ds['imgsz']}", "onnx latency ratio @640")))
        if notes:
            out.append("\n" + "\n".join(notes))
    return "\n".join(out)


DISTILL_ARMS = {"none": "no teacher", "output": "output KD", "feature": "feature KD (ultralytics)",
                "labelfree": "label-free (output KD, no labels)"}


def block_distill(name: str = "distill") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.distill`._"
    calls = res.get("invocations") or [{"command": res.get("command"), "started": res.get("started")}]
    if len(calls) == 1:
        out = [f"Command: {cmd(res)}. {load_note(res)}."]
    else:
        out = ["Commands (one result file, completed with `--resume`; total "
               f"{minutes(res.get('total_seconds'))}): " + "; ".join(f"`{c['command']}` (started {c['started']})"
                                                            for c in calls) + f". {load_note(res)}."]

    def variant(r: dict[str, Any], info: dict[str, Any]) -> str:
        diff = {k: v for k, v in (r.get("recipe") or info["recipe"]).items() if info["recipe"].get(k) != v}
        return ", ".join(f"{k}={v}" for k, v in diff.items())

    for setup, info in res.get("setups", {}).items():
        rows_all = [r for k, r in res["rows"].items() if k.startswith(f"{setup}@") and "error" not in r]
        for r in rows_all:
            r["variant"] = variant(r, info)
        variants = sorted({r["variant"] for r in rows_all})
        arms = [a for a in DISTILL_ARMS if any(r["arm"] == a for r in rows_all)]
        errors = [f"`{k}`: {r['error']}" for k, r in res["rows"].items() if k.startswith(f"{setup}@") and "error" in r]
        data = common.rel(info["data"])
        out.append(f"\n**{setup}** - data `{data}`, "
                   f"imgsz {info['imgsz']}; teacher = the dense model (mAP50-95 {f(info['dense']['map50_95'])}); "
                   f"student = `prune(method=bn, target_macs=T, data=...)` (default compensation). Recipe (every arm): "
                   f"`{info['recipe']}`. Cells: COCO mAP50-95 on val after F fine-tune epochs (train minutes).\n")
        rows = []
        for var in variants:
            for t in sorted(info["targets"], key=float, reverse=True):
                ti = info["targets"][t]
                for epochs in sorted({r["epochs"] for r in rows_all if str(r["target_macs"]) == t
                                      and r["variant"] == var}):
                    row = [t, f(ti["macs_ratio"]), var or "-", epochs, f(ti["map50_95_pruned"])]
                    for a in arms:
                        r = next((r for r in rows_all if str(r["target_macs"]) == t and r["arm"] == a
                                  and r["epochs"] == epochs and r["variant"] == var), None)
                        row.append(f"{f(r['map50_95'])} ({r['train_seconds'] / 60:.0f})" if r else "-")
                    rows.append(row)
        out.append(md_table(rows, ("target MACs", "MACs kept", "recipe variant", "F", "right after pruning",
                                   *(DISTILL_ARMS[a] for a in arms))))
        if errors:
            out.append("\nFailed arms: " + "; ".join(errors))
    return "\n".join(out)


def block_unstructured(name: str = "unstructured") -> str:
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `OMP_NUM_THREADS=1 nice -n 10 python -m bench.unstructured`._"

    def mb(b: Any) -> str:
        return "n/a" if b is None else f"{b / 1e6:.2f}"

    d = res["dense"]
    ep = res["epochs"]
    env = res.get("env") or {"OMP_NUM_THREADS": "1", "nice": 10}  # the first full run predates the record
    prefix = (f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " if env.get("OMP_NUM_THREADS") else "") + \
        (f"nice -n {env['nice']} " if env.get("nice") else "")
    out = [f"Command: `{prefix}{res.get('command', '?')}` (started {res.get('started', '?')}, "
           f"total {minutes(res.get('total_seconds'))}). {load_note(res)}.",
           f"\nFixture yolov8n ({res['weights']}), {res['data']}, imgsz {res['imgsz']}, method `l1`, "
           f"`layers=conv` (Detect's box/class output convs and DFL untouched). Dense: mAP50-95 {f(d['map50_95'])}, "
           f"mAP50 {f(d['map50'])}; {d['nonzero'] / 1e6:.2f} M non-zero of {d['params'] / 1e6:.2f} M parameters "
           f"({d['sparsity']:.1%} of the conv weights are already 0 in this INT8-rebuilt checkpoint); checkpoint "
           f"{mb(d['size'])} MB, gzip -9 {mb(d['gzip'])} MB (fp16, no optimizer, as `sparsify` writes it).",
           "\n**Right after sparsifying** (no fine-tuning). 'weights only': `sparsify` without `data=`; "
           "'+ BN': with `data=`, every BatchNorm's running statistics re-fitted on 32 train images so that its "
           "output keeps the dense model's mean and variance (the zeros are the same).\n"]
    by = {(r["scope"], r["amount"]): r for r in res.get("oneshot", [])}
    rows = []
    for amount in sorted({a for _, a in by}):
        g, l_ = by.get(("global", amount), {}), by.get(("layer", amount), {})
        rows.append((f"{amount:.0%}", f(g.get("map50_95")), f(g.get("map50_95_bn")), f(l_.get("map50_95")),
                     f(l_.get("map50_95_bn")), f(g.get("map50_bn")), f(l_.get("map50_bn")),
                     f"{g.get('nonzero', 0) / 1e6:.2f}", mb(g.get("gzip")), mb(l_.get("gzip"))))
    out.append(md_table(rows, ("conv weights = 0", "mAP50-95 global, weights only", "global + BN",
                               "per layer, weights only", "per layer + BN", "mAP50 global + BN",
                               "mAP50 per layer + BN", "non-zero params (M)", "gzip MB global", "gzip MB per layer")))
    out.append(f"\nRaw checkpoint size at every level: {mb(next(iter(by.values()), {}).get('size'))} MB "
               f"(dense {mb(d['size'])} MB): torch stores tensors uncompressed.")
    ft = res.get("finetune", [])
    if ft:
        out.append(f"\n**After a short fine-tune** ({ep} epochs on the 96 train images, `yolo-prune finetune`, "
                   f"recipe `{res['train']}`), from the BN-corrected checkpoints.\n")
        def kept_str(st: dict[str, Any]) -> str:  # the final zeros = exactly those of a one-shot cut to the amount
            ref = by.get(("global", st["amount"]))
            return "n/a" if ref is None else ("yes" if st["zeros"] == ref["zeros"] else "**no**")

        def start(r: dict[str, Any]) -> Any:  # the BN-corrected one-shot checkpoint each fine-tune starts from
            src = by.get((r["label"].split()[-1], r["amount"])) if r.get("amount") is not None else None
            return src["map50_95_bn"] if src else r["map50_95_before"]

        rows = [(r["label"], f(r["sparsity"]), f(start(r)), f(r["map50_95"]), f(r["map50"]),
                 mb(r["gzip"]), "-" if r["zeros_before"] is None else ("yes" if r["zeros_kept"] else "**no**"))
                for r in ft]
        st = res.get("steps")
        if st:
            last = st["records"][-1]
            rows.append((f"{st['amount']:.0%} global in {st['steps']} steps of {st['step_epochs']} epochs "
                         f"(`steps={st['steps']} step_epochs={st['step_epochs']}`)", f(st["sparsity"]),
                         f(last.get("map50_95_sparse")) + " (after its last step)", f(st["map50_95"]), f(st["map50"]),
                         mb(st["gzip"]), kept_str(st)))
        out.append(md_table(rows, ("model", "sparsity of conv weights", "mAP50-95 before fine-tune",
                                   f"mAP50-95 after {ep} epochs", "mAP50 after", "gzip MB", "zeros kept exactly")))
        if st:
            out.append("\nSteps: " + "; ".join(
                f"{100 * s['amount']:g}%: {f(s.get('map50_95_sparse'))} -> {f(s.get('map50_95'))}" for s in st["records"])
                + " (mAP50-95 right after each step -> after its fine-tune).")
    combo = res.get("combo", [])
    if combo:
        out.append(f"\n**Channels, then weights**: `prune(method=bn, target_macs=0.7, data=...)` (lstsq "
                   f"compensation), then `sparsify(amount=0.5, data=...)`; each model fine-tuned {ep} epochs as above.\n")
        rows = [(r["label"], f(r["macs_ratio"]), f"{r['nonzero'] / 1e6:.2f}", mb(r["size"]), mb(r["gzip"]),
                 f(r["map50_95"]), f(r.get("map50_95_tuned"))) for r in combo]
        out.append(md_table(rows, ("model", "MACs kept", "non-zero params (M)", "checkpoint MB", "gzip MB",
                                   "mAP50-95 right after", f"mAP50-95 after {ep} epochs")))
    lat = res.get("latency")
    if lat:
        ent = lat["entries"]
        rows = []
        for model in dict.fromkeys(e["model"] for e in ent):
            t = next((e for e in ent if e["model"] == model and e["backend"] == "torch"), None)
            o = next((e for e in ent if e["model"] == model and e["backend"] == "onnx"), None)
            rows.append((model, f(t and t["median_ms"], 1), f(t and t["ratio_vs_reference"]), f(o and o["median_ms"], 1),
                         f(o and o["ratio_vs_reference"])))
        out.append(f"\n**Latency** (batch 1, imgsz {res['imgsz']}, {lat['threads']} thread, {lat['runs']} interleaved "
                   "runs per model and backend; a shared machine, so read the ratios). Unstructured zeros do not make "
                   "a dense runtime faster: the tensors keep their shapes and every zero is still multiplied.\n")
        out.append(md_table(rows, ("model", "torch ms", "torch ratio", "onnxruntime ms", "onnxruntime ratio")))
    return "\n".join(out)


def block_sparsity(name: str = "sparsity_bccd") -> str:
    """Sparsity training that frees channels (bench/sparsity.py): one row per condition."""
    res = common.read_result(name)
    if not res:
        return f"_No results yet: `bench/results/{name}.json` is missing._"
    dense = res["dense"]["map"]["map50_95"]
    rows = [("dense start model (as given)", "-", "-", "-", f(dense), "-", "-", "1.000", f(dense), "-", "-")]
    for r in res["rows"]:
        o, sp, fr = r["options"], r["sparse"], r["freed"]
        opt = "SGD" if o.get("optimizer") == "SGD" else "AdamW (auto)"
        mode = o.get("sr_mode", "-") + ("+group" if o.get("sr_group") else "")
        extra = [] if o.get("sr_head", True) else ["head not penalised"]
        if o.get("sr_schedule", "constant") != "constant":
            extra.append(f"schedule {o['sr_schedule']}")
        if o.get("sr_mode") == "greg":
            extra.append(f"target {o.get('target_macs')}")
            if o.get("greg_ramp", 0.5) != 0.5:
                extra.append(f"ramp {o['greg_ramp']}")
        if o.get("prune_first"):
            mode = f"none: pruned (bn, lstsq) to {o['prune_first']} first, then trained"
        rows.append((r["name"], opt, mode + (f" ({', '.join(extra)})" if extra else ""), f"{o.get('sr'):g}",
                     f(sp["map"]["map50_95"]), f"{100 * (sp.get('gamma_zero') or 0):.1f}%",
                     f"{100 * (sp.get('free_macs') or 0):.1f}%", f(fr["macs_ratio"]), f(fr["map"]["map50_95"]),
                     f"{fr['map']['map50_95'] - dense:+.3f}",
                     f"{fr['max_abs_change_interior']:.1e} / {fr['max_abs_change']:.1e}"))
    compare = []
    for r in res["rows"]:
        for target, entries in (r.get("prune_compare") or {}).items():
            cells = {}
            for e in entries:
                key = (e["method"], e["threshold"] is not None)
                cells[key] = (f"{f(e['map']['map50_95'])} ({f(e['macs_ratio'])})" if "map" in e
                              else "out of reach")
            compare.append((r["name"], target, *(cells.get(k, "-") for k in
                                                 (("bn", True), ("bn", False), ("l1", True), ("l1", False)))))
    tail = ""
    if compare:
        tail = ("\n\nPruning the sparse `last.pt` to a MACs target, taking the free channels first (`threshold`) or "
                "ranking everything; mAP50-95 right after pruning (lstsq compensation, no fine-tuning), MACs kept in "
                "brackets:\n\n" + md_table(compare, ("condition", "target MACs", "bn, free first", "bn, ranked only",
                                                      "l1, free first", "l1, ranked only")))
    head = (f"{res.get('data')} at imgsz {res.get('imgsz')}, {res.get('epochs')} sparse epochs (batch 16, nbs 16), "
            f"gamma_threshold {res.get('threshold')}; COCO mAP50-95 of `last.pt`; head outputs compared on 4 val images, "
            f"interior = at least 4 cells from each level's border. {cmd(res)}; {load_note(res)}.\n")
    return head + "\n" + md_table(rows, ("condition", "optimizer", "mode", "sr", "mAP after sparse", "gammas = 0",
                                         "MACs free", "MACs kept after free removal", "mAP after removal (no FT)",
                                         "vs dense", "max abs change of head outputs: interior / all")) + tail


def _bccd_references(arms: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each pipeline arm of bench/bccd_pipeline.py and the dense reference trained the same epochs with the same
    ultralytics train keys (a reference's ``--set`` overrides, an arm's ``train_args``), if any."""
    def recipe(a: dict[str, Any], reference: bool) -> tuple:
        o = a.get("overrides") or {}
        return tuple(sorted((o if reference else o.get("train_args") or {}).items()))

    refs = {(a["epochs"], recipe(a, True)): a for k, a in arms.items() if k.startswith("dense_plus_")}
    return {k: refs.get((a["epochs"], recipe(a, False))) for k, a in arms.items() if not k.startswith("dense_plus_")}


def block_bccd_pipeline(name: str = "bccd_pipeline") -> str:
    """Issue 12's realistic case: the bccd-tuned yolov8n through the pipeline (bench/bccd_pipeline.py)."""
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.bccd_pipeline`._"
    arms = res["arms"]
    references = _bccd_references(arms)
    rows, cmds = [], []
    for key, a in arms.items():
        cmds.append(f"`{a['command']}` ({a['started']}, {minutes(a.get('seconds'))})")
        if key.startswith("dense_plus_"):
            continue
        ref = references[key]
        args = a.get("args") or {}
        rows.append((key, ", ".join(f"{k}={v}" for k, v in a["overrides"].items()) or "-",
                     f"method={args.get('method') or 'auto'}, compensate={args.get('compensate') or 'lstsq_seq'}, "
                     f"recalibrate={True if args.get('recalibrate') is None else args.get('recalibrate')}, allocation={args.get('allocation') or 'auto'}, "
                     + (f"sr_mode={args.get('sr_mode')}, " if args.get("sparse_epochs") else "")
                     + f"teacher={'dense' if args.get('teacher') else 'none'}",
                     a["epochs"], f(a.get("macs_ratio")), f(a.get("map50_95_dense")), f(a.get("map50_95_pruned")),
                     f(a.get("map50_95")), f(ref["map50_95"]) if ref else "-",
                     f"{100 * (a['map50_95'] - ref['map50_95']):+.1f}" if ref else "-"))
    where = {"fixture_pipeline": "coco128 split (32 val images), imgsz 320, COCO mAP50-95; the dense start is the "
                                 "COCO yolov8n fixture",
             "undertrained_pipeline": "bccd val (87 images), imgsz 416, COCO mAP50-95; the dense start is "
                                      "`common.bccd_dense(epochs=3)` (under-trained)"}.get(
        name, "bccd val (87 images), imgsz 416, COCO mAP50-95; the dense start is `common.bccd_dense()`")
    return ("Commands: " + "; ".join(cmds) + f". {where}.\n\n"
            + md_table(rows, ("arm", "overrides", "pruning / sparsity / distillation", "epochs after the dense model",
                              "MACs kept", "dense", "right after pruning", "final", "dense + same epochs",
                              "vs dense + same epochs (points)")))


def block_portable(name: str = "portable") -> str:
    """Issue 23: mAP right after pruning, portable (stock ultralytics classes) against free (bench/portable.py)."""
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.portable`._"
    rows_by_target: dict[float, dict[bool, dict[str, Any]]] = {}
    for r in res["rows"].values():
        rows_by_target.setdefault(r["target_macs"], {})[bool(r["portable"])] = r
    rows = []
    for t in sorted(rows_by_target, reverse=True):
        pair = rows_by_target[t]
        port, free = pair.get(True), pair.get(False)
        gap = f"{100 * (port['map50_95'] - free['map50_95']):+.1f}" if port and free else "-"
        for r in (port, free):
            if r:
                rows.append((t, "portable" if r["portable"] else "free", f(r["macs_ratio"]), f(r["params_ratio"]),
                             f(r["map50_95"]), gap if r is port else "", "yes" if r.get("stock_only") else "no",
                             f(r.get("prune_seconds"), 0)))
    dense = next(iter(res["rows"].values()))["map50_95_dense"]
    return (f"Command: `{res['command']}` (started {res['started']}); `{res['weights']}` on {res['data']}, imgsz "
            f"{res['imgsz']}, dense mAP50-95 {f(dense)}; pruning defaults with data (recon, sensitivity, lstsq_seq, "
            f"BN re-estimation); no fine-tune. {load_note(res)}.\n\n"
            + md_table(rows, ("target MACs", "form", "MACs kept", "params kept", "mAP50-95 right after pruning",
                              "portable - free (points)", "loads with ultralytics alone", "prune s")))


INT8_TARGETS = {"map_points": 1.5, "onnxruntime": 0.25, "openvino": 0.30}  # issue 21, on bccd


def _int8_verdicts(res: dict[str, Any], lat: dict[tuple[str, str, int], dict[str, Any]]) -> list[str]:
    """Issue 21's targets for the pruned INT8 exports: mAP50-95 within 1.5 points of dense FP32, latency ratios."""
    ex = res["exports"]
    lines = []
    for fmt, runtime in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        drop = 100 * (ex[f"dense_fp32_{fmt}"]["map50_95"] - ex[f"pruned_int8_{fmt}"]["map50_95"])
        ok = drop <= INT8_TARGETS["map_points"]
        ratios = {n: r["ratio_vs_dense_fp32"] for (k, rt, n), r in lat.items() if k == f"pruned_int8_{fmt}"}
        fast = all(v <= INT8_TARGETS[runtime] for v in ratios.values())
        shown = ", ".join(f"{v:.2f}x at {n} thread{'s' if n > 1 else ''}" for n, v in sorted(ratios.items()))
        lines.append(f"- pruned INT8, {runtime}: mAP50-95 {-drop:+.1f} points vs dense FP32 (target: at most "
                     f"{INT8_TARGETS['map_points']} below: {'met' if ok else 'missed'}); latency {shown} (target <= "
                     f"{INT8_TARGETS[runtime]:.2f}x: {'met' if fast else 'missed'})")
    return lines


def block_int8(name: str = "int8") -> str:
    """Issue 21: dense/pruned x FP32/INT8 x ONNX/OpenVINO exports, mAP, size and latency ratio (bench/int8.py)."""
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.int8`._"
    lat = {(r["export"], r["runtime"], r["threads"]): r for r in res.get("latency", [])}
    threads = sorted({n for (_, _, n) in lat})
    rows = []
    for k, e in res["exports"].items():
        model, precision, fmt = k.split("_")
        runtime = "onnxruntime" if fmt == "onnx" else "openvino"
        ref = res["exports"][f"dense_fp32_{fmt}"]["map50_95"]
        cells = [f"{lat[(k, runtime, n)]['ratio_vs_dense_fp32']:.3f} ({lat[(k, runtime, n)]['median_ms']:.1f} ms)"
                 if (k, runtime, n) in lat else "n/a" for n in threads]
        label = "INT8 acc. control" if precision == "int8ac" else precision.upper()
        rows.append((model, label, "ONNX" if fmt == "onnx" else "OpenVINO", f(e["map50_95"]),
                     f"{100 * (e['map50_95'] - ref):+.1f}", f(e["map50"]), f(e["size_mb"], 2), *cells))
    head = ("model", "precision", "format", "mAP50-95", "vs dense FP32 (points)", "mAP50", "size MB",
            *(f"latency vs dense FP32, {n} thread{'s' if n > 1 else ''}" for n in threads))
    verdicts = _int8_verdicts(res, lat) if lat and all(f"{m}_{p}_{x}" in res["exports"] for m in ("dense", "pruned")
                                                       for p in ("fp32", "int8") for x in ("onnx", "openvino")) else []
    verdicts += _int8_control_notes(res)
    return (f"Command: `{res['command']}` (started {res['started']}); dense `{res['dense']}`, pruned "
            f"`{res['pruned']}`, data {res['data']} (mAP on its val split); static imgsz {res['imgsz']}, batch 1, "
            f"{res['calib_images']} calibration images from the train split; latency: medians of {res['runs']} "
            f"interleaved rounds per runtime and thread count, OpenVINO at its default inference precision. "
            f"{load_note(res)}.{' Note: ' + res['note'] + '.' if res.get('note') else ''}\n\n" + md_table(rows, head) + ("\n\n" + "\n".join(verdicts) if verdicts else ""))


def _int8_control_notes(res: dict) -> list[str]:
    """The accuracy-controlled arm (``--max-map-drop``): its mAPs on the control's val sample and the layers it kept
    in FP32."""
    notes = []
    for k, e in res["exports"].items():
        ac = e.get("accuracy_control")
        if ac:
            kept = ", ".join(f"`{op['layer']}`" for op in ac["kept_fp32"]) or "none"
            notes.append(f"- {k}: max_map_drop={ac['max_map_drop']}; on the control's {ac['val_images']} val images "
                         f"(f32 inference) mAP50-95 FP32 {f(ac['fp32_map'])}, PTQ {f(ac['ptq_map'])}, final "
                         f"{f(ac['final_map'])}{'' if ac['reached'] else ' (drop not reached)'}; "
                         f"{len(ac['kept_fp32'])} op(s) kept in FP32: {kept}; {minutes(ac['seconds'])}.")
    return notes


def block_collapse(name: str = "collapse") -> str:
    """Issue 24: mAP right after a one-shot prune and where the removal went (bench/collapse.py)."""
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.collapse`._"
    parts = ("backbone", "neck", "head box P3", "head class P3", "head box P4", "head class P4", "head box P5",
             "head class P5")
    rows, cmds = [], []
    for key, r in res["rows"].items():
        if r["command"] not in cmds:
            cmds.append(r["command"])
        kept = r.get("kept") or {}
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "defaults"
        rows.append((r["model"], r["target_macs"], over, f(r["map50_95_dense"]), f(r["map50_95_pruned"]),
                     f"{r['map50_95_pruned'] / r['map50_95_dense']:.0%}", *(f(kept.get(p), 2) for p in parts)))
    return ("Commands: " + "; ".join(f"`{c}`" for c in cmds) + ". Channels kept: the fraction of each part's "
            "prunable channels left.\n\n"
            + md_table(rows, ("model", "target MACs", "overrides", "dense", "right after pruning", "kept",
                              *(f"kept: {p}" for p in parts))))


def block_recovery(name: str = "recovery") -> str:
    """Issue 24: fine-tune recipes on one pruned checkpoint, equal epochs (bench/recovery.py)."""
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.recovery`._"
    rows, cmds = [], []
    for key, r in res["runs"].items():
        if r["command"] not in cmds:
            cmds.append(r["command"])
        recipe = key.rsplit("/", 1)[-1].rsplit("_e", 1)[0]
        rows.append((key.split("/", 1)[0], f"`{r['pruned']}`", recipe,
                     ", ".join(f"{k}={v}" for k, v in r["recipe"].items()) or "the pipeline's",
                     r["epochs"], f(r["map50_95"]), minutes(r.get("seconds"))))
    return ("Commands: " + "; ".join(f"`{c}`" for c in cmds) + ". Every recipe distils from the input model unless "
            "it says teacher=none; mAP50-95 of `last.pt` on the val split.\n\n"
            + md_table(rows, ("dataset", "pruned checkpoint", "recipe", "keys", "epochs", "final mAP50-95",
                              "wall time")))


def block_quick() -> str:
    out = []
    for name, fn in (("frontier_quick", block_frontier), ("latency_quick", block_latency), ("cost_quick", block_cost),
                     ("families_quick", block_families), ("distill_quick", block_distill), ("tasks_quick", block_tasks),
                     ("unstructured_quick", block_unstructured), ("sparsity_fixture_quick", block_sparsity),
                     ("accuracy_quick", block_accuracy),
                     ("latency_target_quick", block_latency_target)):
        if common.read_result(name):
            out.append(f"\n#### `{name}.json`\n\n" + fn(name))
    return "\n".join(out) if out else "_No quick results yet._"


def block_accuracy(name: str = "accuracy") -> str:
    """Issue 12: mAP right after pruning and after F fine-tune epochs, row by row (bench/accuracy.py)."""
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.accuracy`._"
    dense = res["dense"]["map50_95"]
    dft = (res.get("dense_finetuned") or {}).get("final", {}).get("map50_95")
    out = [f"Command: {cmd(res)}. {load_note(res)}.",
           f"\nFixture: `{res['data']}` (96 train / 32 val), imgsz {res['imgsz']}, {res['calib_images']} calibration "
           f"images from the train split; dense mAP50-95 {f(dense)}"
           + (f", dense fine-tuned {res['epochs']} epochs {f(dft)}" if dft is not None else "")
           + f". Fine-tune recipe (every row): `{res['recipe']}`, F = {res['epochs']} epochs, `last.pt` evaluated."]
    rows_by_target: dict[float, list] = {}
    for rid, r in res["rows"].items():
        if "pruned" in r:
            rows_by_target.setdefault(r["target_macs"], []).append(r)
    table_rows = []
    for t in sorted(rows_by_target, reverse=True):
        for r in rows_by_target[t]:
            final = (r.get("final") or {}).get("map50_95")
            norecal = (r.get("pruned_no_recalibration") or {}).get("map50_95")
            ref = dft if dft is not None else dense
            table_rows.append((t, r["label"], f(r.get("macs_ratio")), f(r["pruned"]["map50_95"]),
                               f(norecal) if norecal is not None else "-", f(final) if final is not None else "-",
                               f"{100 * (final - ref):+.1f}" if final is not None else "-",
                               f(r.get("prune_seconds"), 1)))
    out.append("")
    out.append(md_table(table_rows, ("target MACs", "row", "MACs kept", "mAP50-95 right after pruning",
                                     "same, before BN re-estimation", f"after F={res['epochs']}",
                                     "vs dense fine-tuned (points)", "prune s")))
    for method, s in (res.get("sensitivity") or {}).items():
        out.append(f"\nSensitivity analysis of the dense model (ranking {method}): {s['seconds']} s; proxy vs real "
                   f"mAP50-95 drop on {len(s['validation'])} groups pruned alone at 0.5: Spearman "
                   f"{f(s['rank_correlation'])} (`{s['csv']}`).")
    return "\n".join(out)


def block_accuracy_targets(name: str = "accuracy") -> str:
    res = common.read_result(name)
    if not res:
        return "_No results yet._"
    dense = res["dense"]["map50_95"]
    rows = []
    best70 = max(((r.get("final") or {}).get("map50_95", -1), r["label"]) for r in res["rows"].values()
                 if r["target_macs"] == 0.7) if any(r["target_macs"] == 0.7 for r in res["rows"].values()) else None
    if best70 and best70[0] >= 0:
        rows.append((f"fixture at 70% MACs: >= 0.35 mAP50-95 after F={res['epochs']}", f"{best70[0]:.3f} ({best70[1]})",
                     "met" if best70[0] >= 0.35 else "**missed**"))
    best90 = [(r["pruned"]["map50_95"], r["label"]) for r in res["rows"].values() if r["target_macs"] == 0.9 and "pruned" in r]
    if best90:
        m, label = max(best90)
        rows.append(("fixture at 90% MACs, right after pruning: within 3 points of dense",
                     f"{m:.3f} vs dense {dense:.3f} ({100 * (m - dense):+.1f} points; {label})",
                     "met" if m >= dense - 0.03 else "**missed**"))
    arms = (common.read_result("bccd_pipeline") or {}).get("arms", {})
    for target, points in ((0.5, 1), (0.3, 2)):  # the best arm against its own equal-budget reference
        pairs = [(a["map50_95"] - ref["map50_95"], k, a, ref) for k, ref in _bccd_references(arms).items()
                 if ref and (a := arms[k]).get("target_macs") == target]
        if pairs:
            d, k, a, ref = max(pairs, key=lambda t: t[0])
            plural = "s" if points > 1 else ""
            rows.append((f"bccd at {target:.0%} MACs: within {points} point{plural} of the dense model at equal budget",
                         f"{a['map50_95']:.3f} vs {ref['map50_95']:.3f} ({100 * d:+.1f} points; `{k}`)",
                         "met" if d >= -points / 100 else "**missed**"))
    return md_table(rows, ("target", "measured", "verdict")) if rows else "_No results yet._"


TASK_METRIC = {"segment": "mask", "pose": "pose", "obb": "obb"}


def _widths_note(w: dict[str, Any]) -> tuple[str, str]:
    """(Proto widths, cv4 hidden widths) dense -> pruned, as table cells."""
    d, p = w.get("dense") or {}, w.get("pruned") or {}
    proto = ", ".join(f"{k} {v}->{(p.get('proto') or {}).get(k)}" for k, v in (d.get("proto") or {}).items()) or "-"
    cv4 = "; ".join(f"P{3 + i} {'/'.join(map(str, a))}->{'/'.join(map(str, b))}"
                    for i, (a, b) in enumerate(zip(d.get("cv4") or [], p.get("cv4") or []))) or "-"
    return proto, cv4


def block_tasks(name: str = "tasks") -> str:
    """Issue 22: segmentation, pose and OBB models pruned to 0.5 MACs vs dense at an equal budget (bench/tasks.py)."""
    res = common.read_result(name)
    if not res:
        return f"_No `bench/results/{name}.json` yet: run `python -m bench.tasks`._"
    c = res.get("config", {})
    la = res.get("loadavg_now")
    lr = f" except lr0={c['finetune_lr0']} for the pipeline's fine-tune and the reference" if c.get("finetune_lr0") else ""
    out = [f"Command: {cmd(res)}{'' if res.get('complete') else ' - **INCOMPLETE run**'}. {load_note(res)}"
           f"{f'; at the last step {la[0]:.2f}' if la else ''}. OMP_NUM_THREADS={res.get('threads')}. "
           f"Data: `make_synthetic(task=...)`, {c.get('n_train')} train / {c.get('n_val')} val images of "
           f"{c.get('data_imgsz')} px, trained and validated at imgsz {c.get('imgsz')}. Dense: {c.get('dense_epochs')} "
           f"epochs from the yaml; pipeline: target_macs 0.5, 0 sparse + {c.get('finetune_epochs')} fine-tune epochs "
           f"(its defaults: distilled from the dense model); reference: dense + {c.get('finetune_epochs')} epochs, same "
           f"recipe `{res.get('recipe')}`{lr}. mAP50-95 of `last.pt` on the val split."]
    for r in res.get("runs", [])[:-1] if len(res.get("runs", [])) > 1 else []:
        la0 = r.get("loadavg_start")
        out.append(f"\nEarlier run: `{r['command']}` ({', '.join(r.get('models') or [])}; started {r.get('started')}, "
                   f"{minutes(r.get('seconds'))}{f', load average at start {la0[0]:.2f}' if la0 else ''}).")
    out.append("")
    F = c.get("finetune_epochs")
    maps, sizes = [], []
    for key, r in res["models"].items():
        d, p, ft, l6 = r.get("dense", {}), r.get("pipeline"), r.get("dense_ft") or {}, r.get("latency640") or {}
        if not p:
            continue
        for metric in ("box", TASK_METRIC.get(r["task"], "")):
            k = "map50_95" if metric == "box" else f"{metric}_map50_95"
            fin, ref = p["final_maps"].get(k), ft.get(k)
            delta = f"{100 * (fin - ref):+.1f}" if fin is not None and ref is not None else "-"
            maps.append((key, metric, f(d.get(k)), f(ref), f(p["pruned"].get(k)), f(fin), delta))
        proto, cv4 = _widths_note(r.get("widths") or {})
        sizes.append((key, f"{d['params'] / 1e6:.2f} -> {p['params'] / 1e6:.2f}",
                      f"{d['macs'] / 1e9:.4f} -> {p['macs'] / 1e9:.4f} ({p['macs_ratio']:.3f})",
                      f(p.get("prune_seconds"), 1),
                      f"{f(l6.get('dense_ms'), 0)} / {f(l6.get('pruned_ms'), 0)} ({f(l6.get('ratio'), 2)})" if l6 else "-",
                      proto, cv4))
    out.append(md_table(maps, ("model", "mAP50-95", "dense", f"dense +{F} ep", "right after pruning",
                               f"pruned +{F} ep", f"vs dense +{F} ep (points)")))
    out.append("")
    out.append(md_table(sizes, ("model", "params (M)", f"GMACs @{c.get('imgsz')} (ratio)", "prune s",
                                "onnxruntime ms @640, dense / pruned (ratio)", "Proto out channels, dense->pruned",
                                "cv4 hidden convs per level, dense->pruned")))
    return "\n".join(out)


BLOCKS = {"machine": block_machine, "targets": block_targets, "frontier": block_frontier, "pruneonly": block_pruneonly, "latency": block_latency,
          "cost": block_cost, "families": block_families, "distill": block_distill, "unstructured": block_unstructured,
          "accuracy": block_accuracy, "accuracy_targets": block_accuracy_targets, "bccd_pipeline": block_bccd_pipeline, "latency_target": block_latency_target,
          "collapse": block_collapse, "recovery": block_recovery, "tasks": block_tasks,
          "quick": block_quick}


# blocks that take a result name: <!-- BEGIN frontier:NAME --> renders bench/results/NAME.json
NAMED_BLOCKS = {"frontier": block_frontier, "sparsity": block_sparsity, "latency_target": block_latency_target,
                "latency": block_latency, "families": block_families, "portable": block_portable,
                "bccd_pipeline": block_bccd_pipeline, "int8": block_int8, "tasks": block_tasks}


def render(text: str) -> str:
    for kind, fn in NAMED_BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {kind}:(\w+) -->\n).*?(<!-- END {kind}:\2 -->)", re.DOTALL)
        text = pattern.sub(lambda m, fn=fn: m.group(1) + fn(m.group(2)) + "\n" + m.group(3), text)
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.DOTALL)
        if pattern.search(text):
            body = fn()
            text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                     prog="python -m bench.render")
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
