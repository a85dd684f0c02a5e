"""Two or more workdirs' metrics.json side by side: R-precision (or another metric) seen / unseen / HM per setting
and model, one markdown table for benchmarks/RESULTS.md (the before / after of a change of encoders or recipe).

    python benchmarks/compare_metrics.py before=/tmp/demo-before after=/tmp/demo-after [--metric P@10]

Each argument is LABEL=WORKDIR (or a metrics.json path). Rows with a ``note`` (a model that is no baseline under
its encoders, e.g. zero-shot clip without an aligned text tower) are marked †.
"""
from __future__ import annotations

import argparse
import json
import os


def load(path: str) -> list[dict]:
    file = path if path.endswith(".json") else os.path.join(path, "metrics.json")
    with open(file) as f:
        return [r for r in json.load(f) if r.get("task", "retrieve") == "retrieve"]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def table(runs: dict[str, list[dict]], metric: str) -> str:
    labels = list(runs)
    head = "| setting | model | " + " | ".join(f"{label} seen / unseen / HM" for label in labels) + " |"
    out = [head, "|---|---|" + "---|" * len(labels)]
    keys = list(dict.fromkeys((r["setting"], r["model"]) for rows in runs.values() for r in rows if r["split"] == "all"))
    for setting, model in keys:
        cells, noted = [], False
        for label in labels:
            r = next((r for r in runs[label] if (r["setting"], r["model"], r["split"]) == (setting, model, "all")), None)
            if r is None:
                cells.append("")
                continue
            noted |= bool(r.get("note"))
            b = r["base_to_new"][metric] if metric in r.get("base_to_new", {}) else {
                "seen": _split(runs[label], setting, model, "seen", metric),
                "unseen": _split(runs[label], setting, model, "unseen", metric), "hm": None}
            cells.append(" / ".join(_fmt(b[k]) for k in ("seen", "unseen", "hm")))
        out.append(f"| {setting} | {model}{' †' if noted else ''} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _split(rows: list[dict], setting: str, model: str, split: str, metric: str):
    r = next((r for r in rows if (r["setting"], r["model"], r["split"]) == (setting, model, split)), None)
    return None if r is None else r.get(metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR or LABEL=metrics.json")
    parser.add_argument("--metric", default="R-prec", help="metric (default R-prec)")
    args = parser.parse_args()
    runs = {}
    for arg in args.runs:
        label, _, path = arg.partition("=")
        if not path:
            parser.error(f"expected LABEL=WORKDIR, got {arg!r}")
        runs[label] = load(path)
    print(table(runs, args.metric))


if __name__ == "__main__":
    main()
