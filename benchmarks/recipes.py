"""Training-recipe ablation (issue 12): each ingredient of ``train.recipe=residual`` switched on one at a time,
from the paper's recipe to the default, on an *embedded* workdir (features/ from jobs.embed).

    python benchmarks/recipes.py --embedded demo=/tmp/demo-res --out /tmp/recipes
    python benchmarks/recipes.py --embedded demo=/tmp/demo-res --embedded icons=/tmp/icons-embedded \\
        --out /tmp/recipes --variants "paper,-mask (default)" --models all --report clip-ita,clip-ia
    python benchmarks/recipes.py --embedded demo=/tmp/demo-res --out /tmp/recipes \\
        --variant "lr3e-5 train.lr=3e-5"                   # an extra variant: NAME then --set overrides

For every catalogue and variant it copies ``features/`` and ``catalog.json`` into ``OUT/<catalogue>/<variant>/``
(the embedded workdir is only read), then runs, each as its own process (each starts its own local Ray), with
``--config`` and the variant's ``--set`` overrides:

    python -m jobs.train --variant ita --setting S    for S in all, general, specific (--models ita, default)
    python -m jobs.train --all                        (--models all: the nine runs in one worker group)
    python -m jobs.index
    python -m jobs.evaluate

Logs: ``OUT/<catalogue>/<variant>/logs/<stage>.log``. A variant whose metrics.json exists is not run again (delete
its folder to redo it), so a second invocation only prints the table.

The table (markdown, printed and written to ``OUT/recipes.md``, with the raw figures in ``OUT/recipes.json``):
per catalogue, setting and variant, the *test* R-precision and P@10 of CLIP-ITA (``--report`` adds clip-ia) on
seen / unseen categories and their harmonic mean (metrics.json ``base_to_new``), the mpnet zero-shot row for
reference, the variant's wall time (train + index + evaluate), and the *validation* figures the selection used,
read from the run's ``best/`` metadata: the selected epoch, its validation R-precision seen / unseen / HM, the
residual scale α and the validation HM at that α (every α's is in the metadata). Only those validation figures
chose anything; the test figures are reported, never used to choose.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared machine.py beside this script
from machine import cpu, torch_device  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("all", "general", "specific")

# The ablation, in order: each row switches one more ingredient of the residual recipe on (clipita/config.py
# TrainConfig.RECIPES; the last row is the default config, no override at all).
OFF = ["train.tau=1", "train.learnable_tau=false", "train.label_mask=false", "train.select=loss", "train.alphas=1.0",
       "train.kg_weight=0", "train.patience=0"]
MASK = "train.label_mask=true"  # the rows between +mask and +patience keep the mask the default has dropped
VARIANTS = {
    "paper": ["train.recipe=paper"],
    "residual": ["train.recipe=residual", *OFF],
    "+tau": ["train.recipe=residual", *OFF[2:]],
    "+mask": ["train.recipe=residual", MASK, *OFF[3:]],
    "+select": ["train.recipe=residual", MASK, *OFF[4:]],
    "+alpha": ["train.recipe=residual", MASK, *OFF[5:]],
    "+kg": ["train.recipe=residual", MASK, *OFF[6:]],
    "+patience": [MASK],
    "-mask (default)": [],
}
DEFAULT = "-mask (default)"
LABELS = {  # what each row adds, for the table's legend
    "paper": "PAPER.md: plain MLP heads, τ = 1 fixed, same-category rows are negatives, best/ on val loss",
    "residual": "residual heads (zero-shot text vector + zero-initialised MLP), τ = 1 fixed, no mask, best/ on val "
                "loss, α = 1",
    "+tau": "+ learnable τ from 0.07",
    "+mask": "+ e-CLIP label mask",
    "+select": "+ best/ on val R-prec HM (seen / held-out val categories)",
    "+alpha": "+ residual scale α from train.alphas on val R-prec HM (WiSE-FT)",
    "+kg": "+ KgCoOp regulariser toward the frozen category vectors (train.kg_weight = 5)",
    "+patience": "+ early stop after 5 epochs without a better val R-prec HM (train.patience = 5)",
    "-mask (default)": "− the label mask (chosen on validation: higher val HM in 5 of 6 cells) = the default",
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "variant"


def run(cmd: list[str], log: str) -> float:
    """Run one job to completion, output to ``log``; its wall seconds. A failure ends the benchmark."""
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}).returncode
    if rc:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"recipes: {' '.join(cmd[2:4])} failed (exit {rc}); log {log}:\n{tail}")
    return time.time() - t0


def run_variant(embedded: str, workdir: str, config: str, overrides: list[str], models: str) -> dict:
    """Copy the features, train, index and evaluate; seconds per stage (or the recorded ones when already done)."""
    timing = os.path.join(workdir, "recipe_timing.json")
    if os.path.exists(os.path.join(workdir, "metrics.json")) and os.path.exists(timing):
        with open(timing) as f:
            return json.load(f)
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(os.path.join(workdir, "logs"))
    shutil.copytree(os.path.join(embedded, "features"), os.path.join(workdir, "features"))
    shutil.copy2(os.path.join(embedded, "catalog.json"), os.path.join(workdir, "catalog.json"))
    common = ["--workdir", workdir, "--config", config] + [a for o in overrides for a in ("--set", o)]
    py = [sys.executable, "-m"]
    out = {"overrides": overrides, "train": 0.0}
    if models == "all":
        out["train"] = run(py + ["jobs.train", "--all", *common], os.path.join(workdir, "logs", "train.log"))
    else:
        for s in SETTINGS:
            out["train"] += run(py + ["jobs.train", "--variant", "ita", "--setting", s, *common],
                                os.path.join(workdir, "logs", f"train-{s}.log"))
    out["index"] = run(py + ["jobs.index", *common], os.path.join(workdir, "logs", "index.log"))
    out["evaluate"] = run(py + ["jobs.evaluate", *common], os.path.join(workdir, "logs", "evaluate.log"))
    out["total"] = out["train"] + out["index"] + out["evaluate"]
    with open(timing, "w") as f:
        json.dump(out, f, indent=1)
    return out


def validation(workdir: str, variant: str, setting: str) -> dict:
    """What selected best/: its epoch and validation R-prec seen / unseen / HM, α and the HM at α (None: no α)."""
    path = os.path.join(workdir, "checkpoints", f"{variant}-{setting}", "best", "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    meta = saved["metadata"]
    h = next(h for h in meta["history"] if h["epoch"] == meta["epoch"])
    with open(os.path.join(os.path.dirname(os.path.dirname(path)), "curve.json")) as f:
        epochs = len(json.load(f))
    out = {"epoch": meta["epoch"], "epochs": epochs, "val_loss": h.get("val_loss"),
           "seen": h.get("val_rprec_seen"), "unseen": h.get("val_rprec_unseen"), "hm": h.get("val_rprec_hm"),
           "alpha": meta.get("alpha"), "tau": h.get("tau")}
    scores = meta.get("alpha_val_rprec_hm") or {}
    if out["alpha"] is not None:
        out["hm_at_alpha"] = scores.get(str(float(out["alpha"])))
        out["hm_zero_shot"] = scores.get("0.0")  # α = 0: the zero-shot text model on the same validation sample
    return out


def test_figures(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.json")) as f:
        rows = json.load(f)
    return {(r["setting"], r["model"]): r["base_to_new"] for r in rows if r["split"] == "all" and "base_to_new" in r}


def fmt(v, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(results: list[dict], report: list[str]) -> str:
    head = ("| catalogue | setting | model / variant | R-prec seen | R-prec unseen | R-prec HM | P@10 seen | "
            "P@10 unseen | P@10 HM | val: epoch, α | val R-prec seen / unseen / HM (at α) | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for cat in dict.fromkeys(r["catalogue"] for r in results):
        rows = [r for r in results if r["catalogue"] == cat]
        for s in SETTINGS:
            zs = next((r["test"].get((s, "mpnet")) for r in rows if r["test"].get((s, "mpnet"))), None)
            zs_val = next((r["val"]["ita"][s].get("hm_zero_shot") for r in rows
                           if r["val"]["ita"].get(s, {}).get("hm_zero_shot") is not None), None)
            if zs:
                lines.append(f"| {cat} | {s} | mpnet (zero-shot) | " + " | ".join(
                    fmt(zs[m][k]) for m in ("R-prec", "P@10") for k in ("seen", "unseen", "hm")) +
                    f" | – | – / – / {fmt(zs_val)} | – |")
            for r in rows:
                for model in report:
                    t = r["test"].get((s, model))
                    v = r["val"][model.removeprefix("clip-")].get(s, {})
                    if not t:
                        continue
                    sel = f"{v.get('epoch')}/{v.get('epochs')}" + (f", {v['alpha']:g}" if v.get("alpha") is not None
                                                                   else "")
                    at = f" ({fmt(v.get('hm_at_alpha'))})" if v.get("alpha") is not None else ""
                    name = r["variant"] if len(report) == 1 else f"{model} {r['variant']}"
                    lines.append(f"| {cat} | {s} | {name} | " + " | ".join(
                        fmt(t[m][k]) for m in ("R-prec", "P@10") for k in ("seen", "unseen", "hm")) +
                        f" | {sel} | {fmt(v.get('seen'))} / {fmt(v.get('unseen'))} / {fmt(v.get('hm'))}{at} | "
                        f"{r['seconds']['total']:.0f} |")
    return "\n".join(lines)


def targets(results: list[dict], default: str, paper: str) -> list[str]:
    """Issue 12's targets, checked on the test figures of the default variant (reported, never used to choose)."""
    out = []
    for cat in dict.fromkeys(r["catalogue"] for r in results):
        by = {r["variant"]: r["test"] for r in results if r["catalogue"] == cat}
        if default not in by:
            continue
        d = by[default]
        for s in SETTINGS:
            if (s, "clip-ita") not in d or (s, "mpnet") not in d:
                continue
            ita, zs = d[(s, "clip-ita")]["R-prec"], d[(s, "mpnet")]["R-prec"]
            if ita["unseen"] is None or zs["unseen"] is None:
                out.append(f"{cat} {s}: no unseen test category")
                continue
            checks = [f"unseen {ita['unseen']:.1f} ≥ mpnet {zs['unseen']:.1f}: "
                      f"{'met' if ita['unseen'] >= zs['unseen'] else 'NOT met'}"]
            if s == "specific":
                checks.append(f"HM {ita['hm']:.1f} ≥ 1.3 × mpnet {zs['hm']:.1f} = {1.3 * zs['hm']:.1f}: "
                              f"{'met' if ita['hm'] >= 1.3 * zs['hm'] else 'NOT met'}")
                if paper in by and (s, "clip-ita") in by[paper]:
                    p = by[paper][(s, "clip-ita")]["R-prec"]["seen"]
                    checks.append(f"seen {ita['seen']:.1f} ≥ paper {p:.1f} − 2 (within 2 points or above): "
                                  f"{'met' if ita['seen'] >= p - 2 else 'NOT met'}")
            out.append(f"{cat} {s}: " + "; ".join(checks))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedded", action="append", required=True, metavar="NAME=WORKDIR",
                        help="a catalogue: its name in the table and an embedded workdir (features/, catalog.json)")
    parser.add_argument("--out", required=True, help="folder of the variants' workdirs, logs and the table")
    parser.add_argument("--config", default="configs/offline.yaml")
    parser.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME KEY=VALUE ...'",
                        help="an extra variant: its name, then --set overrides (e.g. 'lr3e-5 train.lr=3e-5')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every variant (before the variant's own)")
    parser.add_argument("--models", choices=("ita", "all"), default="ita",
                        help="train CLIP-ITA only (three jobs.train runs, default) or all nine runs (--all)")
    parser.add_argument("--report", default="clip-ita", help="comma-separated trained models in the table "
                                                              "(clip-ita, clip-ia with --models all)")
    args = parser.parse_args(argv)
    variants = {k: v for k, v in VARIANTS.items()
                if not args.variants or k in args.variants.split(",")}
    if args.variants:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    for spec in args.variant:
        name, *sets = spec.split()
        variants[name] = sets
    report = args.report.split(",")
    config = os.path.abspath(args.config)
    results = []
    for spec in args.embedded:
        cat, _, embedded = spec.partition("=")
        if not embedded or not os.path.isdir(os.path.join(embedded, "features")):
            parser.error(f"--embedded {spec}: want NAME=WORKDIR with a features/ folder")
        for name, overrides in variants.items():
            workdir = os.path.join(os.path.abspath(args.out), slug(cat), slug(name))
            print(f"recipes: {cat} / {name}: {' '.join(args.set + overrides) or '(defaults)'} -> {workdir}",
                  flush=True)
            seconds = run_variant(os.path.abspath(embedded), workdir, config, args.set + overrides, args.models)
            results.append({"catalogue": cat, "variant": name, "overrides": args.set + overrides,
                            "workdir": workdir, "seconds": seconds, "test": test_figures(workdir),
                            "val": {v: {s: validation(workdir, v, s) for s in SETTINGS} for v in ("ita", "ia")}})
            print(f"recipes: {cat} / {name}: {seconds['total']:.0f} s", flush=True)
    names = list(variants)
    md = "\n".join([
        f"Machine: {cpu()}, {torch_device()}. Date: {datetime.date.today()}. Config: {args.config}"
        + (f" + {' '.join(args.set)}" if args.set else "") + ".", "",
        table(results, report), "",
        "Variants (cumulative, top to bottom):", "",
        *[f"- `{n}`: {LABELS.get(n, '')} (`{' '.join(variants[n]) or 'no override'}`)" for n in names], "",
        "Test: R-prec / P@10 (%) of the test split's queries, seen / unseen categories and their harmonic mean. "
        "val: the selected epoch / epochs trained, the residual scale α, and the *validation* R-prec of the "
        "selected epoch (seen / unseen validation categories / HM; in brackets the HM at the chosen α); mpnet's "
        "val HM is the α = 0 score (the zero-shot model) where a variant searched α. wall s: train + index + "
        "evaluate.", "",
        "Targets (issue 12; default variant, test figures):", "",
        *[f"- {t}" for t in targets(results, DEFAULT if DEFAULT in names else names[-1], "paper")],
    ])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recipes.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "recipes.json"), "w") as f:
        json.dump([{**r, "test": {f"{s}/{m}": v for (s, m), v in r["test"].items()}} for r in results], f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
