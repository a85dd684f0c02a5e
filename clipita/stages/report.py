"""The evaluation's reports: seen / unseen / harmonic mean per model, metrics.md (the paper's Table 1 layout, its
numbers beside ours) and metrics.png, from the rows jobs.evaluate computed (DESIGN.md)."""
from __future__ import annotations

import math

import numpy as np

from clipita import metrics, plots, storage
from clipita.models import MODELS
from clipita.tree import SETTINGS
from clipita.workdir import TASK_FOLDERS, metrics_file, task_metrics

METRICS = ("P@1", "P@5", "P@10", "mAP@5", "mAP@10", "R-prec")
SPLITS = ("all", "seen", "unseen")


def clean(v):
    """A metric as the rows hold it: 4 decimals, None for NaN (no query)."""
    return None if isinstance(v, float) and math.isnan(v) else (round(v, 4) if isinstance(v, float) else v)


# Table 1 of the paper (XMarket US), for reference beside our numbers.
PAPER_TABLE = {
    "all": {"bm25": (0.01, 0.01, 0.01, 0.01, 0.01, 0.01), "clip": (0.01, 0.02, 0.02, 0.03, 0.04, 0.02),
            "mpnet": (0.01, 0.06, 0.06, 0.07, 0.09, 0.05), "clip-i": (3.30, 3.80, 3.79, 6.81, 7.25, 3.67),
            "clip-ia": (2.50, 3.34, 3.29, 5.95, 6.24, 3.27), "clip-ita": (9.90, 13.27, 13.43, 20.30, 20.53, 13.42)},
    "general": {"bm25": (2.94, 4.71, 4.71, 8.33, 8.28, 4.48), "clip": (11.76, 12.35, 11.76, 16.12, 15.18, 9.47),
                "mpnet": (14.70, 15.80, 15.01, 18.44, 18.78, 9.35),
                "clip-i": (17.85, 17.14, 16.78, 19.88, 20.14, 13.02),
                "clip-ia": (21.42, 21.91, 22.78, 25.59, 26.29, 20.74),
                "clip-ita": (35.71, 30.95, 30.95, 35.51, 34.28, 25.79)},
    "specific": {"bm25": (0.02, 0.02, 0.01, 0.01, 0.01, 0.01), "clip": (11.92, 9.81, 9.23, 15.12, 14.95, 8.14),
                 "mpnet": (33.36, 28.56, 26.93, 37.43, 36.77, 25.29),
                 "clip-i": (14.06, 12.11, 11.53, 18.24, 17.90, 11.22),
                 "clip-ia": (35.30, 30.21, 29.32, 39.93, 39.27, 28.86),
                 "clip-ita": (45.85, 41.04, 40.02, 50.04, 49.87, 39.69)},
}


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


HM_METRICS = ("R-prec", "P@10")  # reported as seen / unseen / harmonic mean (base-to-new generalisation)


def add_base_to_new(rows: list[dict]) -> None:
    """Each ``all`` row gets ``base_to_new``: {metric: {"seen", "unseen", "hm"}} for HM_METRICS."""
    by_key = {(r["setting"], r["model"], r["split"]): r for r in rows}
    for r in rows:
        if r["split"] == "all":
            seen, unseen = by_key.get((r["setting"], r["model"], "seen")), by_key.get((r["setting"], r["model"],
                                                                                         "unseen"))
            r["base_to_new"] = {m: {"seen": seen and seen[m], "unseen": unseen and unseen[m],
                                    "hm": clean(metrics.harmonic_mean(seen and seen[m], unseen and unseen[m]))}
                                for m in HM_METRICS}


def _model(r: dict) -> str:
    return f"{r['model']} †" if r.get("note") else r["model"]


def alignment_rows(m: dict) -> list[dict]:
    """metrics.json's ``"task": "align"`` rows (DESIGN.md) from align/metrics.json: one per towers, aligned or not."""
    rows = []
    for name in ("aligned", "unaligned") if m.get("test_pairs") else ():
        r = m[name]
        row = {"task": "align", "model": name, "split": "test", "products": m["test_pairs"]}
        for side, key in (("title_to_image", "t2i"), ("image_to_title", "i2t")):
            row.update({f"{key}_R@{k}": r[side].get(str(k), r[side].get(k)) for k in (1, 5, 10)})
        row["zero_shot"] = {d[len("zero_shot_depth"):]: {"acc@1": v["top1"], "acc@5": v["top5"],
                                                          "categories": v["categories"], "products": v["products"]}
                            for d, v in r.items() if d.startswith("zero_shot_depth")}
        rows.append(row)
    return rows


def alignment_markdown(m: dict) -> list[str]:
    """metrics.md's "alignment" section from jobs.align's align/metrics.json."""
    if not m.get("test_pairs"):
        return ["## Alignment (jobs.align)", "", "No test products to score.", ""]
    out = ["## Alignment (jobs.align)", "",
           f"The towers after alignment (align/best) and before it, on {m['test_pairs']} test products (a pool "
           "neither trained nor chose the checkpoint). Recall@k: a title finds its product's image (or an image its "
           "title) among the k nearest of the pool; zero-shot: a product's image against the prompted names of "
           "every category of a depth.", "",
           "| towers | title→image R@1 | R@5 | R@10 | image→title R@1 | R@5 | R@10 | " +
           " | ".join(f"depth {d[len('zero_shot_depth'):]} top-1 | top-5" for d in m["aligned"]
                      if d.startswith("zero_shot_depth")) + " |"]
    depths = [d for d in m["aligned"] if d.startswith("zero_shot_depth")]
    out.append("|---|" + "---|" * (6 + 2 * len(depths)))
    for name in ("aligned", "unaligned"):
        r = m[name]
        out.append(f"| {name} | " + " | ".join(_fmt(r[side].get(str(k), r[side].get(k)))
                                              for side in ("title_to_image", "image_to_title") for k in (1, 5, 10))
                   + " | " + " | ".join(f"{_fmt(r[d]['top1'])} | {_fmt(r[d]['top5'])}" for d in depths) + " |")
    return out + [""]


def metrics_markdown(rows: list[dict], alignment: dict | None = None) -> str:
    notes = sorted({f"{r['model']}: {r['note']}" for r in rows if r.get("note")})
    out = ["# clipita evaluation", "",
           "Metrics in %. mAP@K is the paper's hits-normalised AP (PAPER.md); `_std` columns divide by min(R, K).",
           "Paper: Table 1 of CLIP-ITA (ECIR 2022) on XMarket US, for reference: different data, same protocol.", "",
           *[f"† Not a baseline here: {n}." for n in notes], *([""] if notes else []),
           "## Seen / unseen categories and their harmonic mean", "",
           "Base-to-new convention of CLIP fine-tuning research (CoOp, CoCoOp, KgCoOp): *seen* queries are categories "
           "some training product carries, *unseen* ones none does; HM = 2·seen·unseen / (seen + unseen) rewards a "
           "model only when it keeps both.", "",
           "| setting | model | " + " | ".join(f"{m} seen | {m} unseen | {m} HM" for m in HM_METRICS) + " |",
           "|---|---|" + "---|" * (3 * len(HM_METRICS))]
    for r in (r for r in rows if r["split"] == "all" and "base_to_new" in r):
        out.append(f"| {r['setting']} | {_model(r)} | " + " | ".join(
            " | ".join(_fmt(r["base_to_new"][m][k]) for k in ("seen", "unseen", "hm")) for m in HM_METRICS) + " |")
    out.append("")
    for split in SPLITS:
        out += [f"## Exact-match relevance, {split} queries", "",
                "| setting | model | queries | " + " | ".join(METRICS) + " | mAP@10_std | paper " +
                " / ".join(METRICS) + " |", "|---|---|---|" + "---|" * (len(METRICS) + 2)]
        for r in (r for r in rows if r["split"] == split):
            paper = PAPER_TABLE[r["setting"]].get(r["model"]) if split == "all" else None
            out.append(f"| {r['setting']} | {_model(r)} | {r['queries']} | " +
                       " | ".join(_fmt(r[m]) for m in METRICS) + f" | {_fmt(r['mAP@10_std'])} | " +
                       (" / ".join(f"{p:.2f}" for p in paper) if paper else "") + " |")
        out.append("")
    out += ["## Hierarchy-aware relevance (a product is relevant to every category on its path), all queries", "",
            "| setting | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for r in (r for r in rows if r["split"] == "all"):
        out.append(f"| {r['setting']} | {_model(r)} | " + " | ".join(_fmt(r["hierarchy"][m]) for m in METRICS) + " |")
    if alignment:
        out += ["", *alignment_markdown(alignment)]
    return "\n".join(out) + "\n"


def metrics_png(rows: list[dict]) -> bytes:
    plt = plots.pyplot()
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 3.8), squeeze=False)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    width = 0.8 / max(1, len(models))
    for ax, setting in zip(axes[0], settings):
        for j, model in enumerate(models):
            r = next((r for r in rows if r["setting"] == setting and r["model"] == model and r["split"] == "all"),
                     None)
            if r is None:
                continue
            ax.bar(np.arange(len(METRICS)) + j * width, [r[m] or 0 for m in METRICS], width, label=_model(r),
                   color=plt.cm.tab10(MODELS.index(model)))
        ax.set_xticks(np.arange(len(METRICS)) + 0.4 - width / 2, METRICS)
        ax.set(title=f"setting: {setting}", ylabel="%")
    axes[0][0].legend(fontsize=8)
    return plots.png(fig)


def publish(workdir: str, stage: str, rows: list[dict], markdown: str) -> None:
    """Write one stage's rows and report section (``<stage folder>/metrics.json|md``), then gather every stage's
    into metrics.json and metrics.md, so that a stage run again replaces its own rows and keeps the others'."""
    storage.write_json(task_metrics(workdir, stage), rows)
    storage.write_bytes(task_metrics(workdir, stage, "md"), markdown.encode())
    gathered, sections = [], []
    for s in TASK_FOLDERS:
        if storage.exists(task_metrics(workdir, s)):
            gathered += storage.read_json(task_metrics(workdir, s))
            sections.append(storage.read_bytes(task_metrics(workdir, s, "md")).decode().rstrip("\n"))
    storage.write_json(metrics_file(workdir), gathered)
    storage.write_bytes(metrics_file(workdir, "md"), ("\n\n".join(sections) + "\n").encode())
