"""The workdir layout (DESIGN.md): every path a stage writes and a later stage or the endpoint reads, and nothing
else. Each function takes the workdir URI (local or s3://) and returns a URI under it.

    catalog.json                         where the catalogue is (jobs.embed)
    split.json                           the categories held out of training (jobs.align, from the catalogue scan)
    align/cache/<part>.parquet|json      jobs.align's pairs (locked trunks' outputs computed once) and counts
    align/last/, align/best/             aligned towers: open_clip local-dir checkpoints; resume.pt (the state a
                                         restart goes on from), curve.png, stats.json, metrics.json beside
    features/products/<part>.parquet     product features; categories.parquet, encoders.json, stats.json beside
    quarantine/<part>.parquet            rows jobs.embed could not use, with their reasons
    checkpoints/<variant>-<setting>/     one training run: last/, best/, curve.json, curve.png, stats.json
    index/<scope>/<group>/               USearch shards + manifest.json; index/<scope>/rows/, index/stats.json
    classify/predictions/<shard>.parquet every product's top categories (jobs.classify); suspects.parquet (mis-
                                         categorised listings), clusters/, flags.json, metrics.json|md, stats.json
    match/groups/<shard>.parquet         listings of one product (jobs.match); metrics.json|md, stats.json
    evaluation/metrics.json|md           jobs.evaluate's rows and report
    metrics.json, metrics.md             every task's rows and reports together (report.publish); metrics.png,
    pipeline.json
"""
from __future__ import annotations

from clipita.storage import join


def catalog_record(workdir: str) -> str:
    return join(workdir, "catalog.json")


def split_record(workdir: str) -> str:
    return join(workdir, "split.json")


def align_dir(workdir: str, *parts: str) -> str:
    """``align/`` or a path under it: ``cache``, ``last``, ``best``, ``curve.png``, ``metrics.json``."""
    return join(workdir, "align", *parts)


def features_dir(workdir: str) -> str:
    return join(workdir, "features")


def product_features_dir(workdir: str) -> str:
    return join(workdir, "features", "products")


def categories_file(workdir: str) -> str:
    return join(workdir, "features", "categories.parquet")


def encoders_record(workdir: str) -> str:
    """The encoders the features were computed with (every later stage and the endpoint use the same)."""
    return join(workdir, "features", "encoders.json")


def quarantine_dir(workdir: str) -> str:
    return join(workdir, "quarantine")


def checkpoints_dir(workdir: str) -> str:
    return join(workdir, "checkpoints")


def run_name(variant: str, setting: str) -> str:
    return f"{variant}-{setting}"


def run_dir(workdir: str, variant: str, setting: str) -> str:
    return join(workdir, "checkpoints", run_name(variant, setting))


def best_checkpoint(workdir: str, variant: str, setting: str) -> str:
    return join(run_dir(workdir, variant, setting), "best")


def index_dir(workdir: str) -> str:
    return join(workdir, "index")


def group_dir(workdir: str, scope: str, group: str) -> str:
    """One index group (a model, and for trained heads its setting) of a scope: ``test`` or ``all`` products."""
    return join(workdir, "index", scope, group)


def classify_dir(workdir: str, *parts: str) -> str:
    """``classify/`` or a path under it: ``predictions``, ``suspects.parquet``, ``clusters``, ``flags.json``."""
    return join(workdir, "classify", *parts)


def match_dir(workdir: str, *parts: str) -> str:
    """``match/`` or a path under it: ``groups``."""
    return join(workdir, "match", *parts)


# the stages whose metrics metrics.json / metrics.md gather (report.publish), in their order there
TASK_FOLDERS = {"evaluate": "evaluation", "classify": "classify", "match": "match"}
STAGE_FOLDERS = {"align": "align", "embed": "features", "index": "index", **TASK_FOLDERS}


def metrics_file(workdir: str, kind: str = "json") -> str:
    """metrics.json (the rows), metrics.md (the report) or metrics.png."""
    return join(workdir, f"metrics.{kind}")


def task_metrics(workdir: str, stage: str, kind: str = "json") -> str:
    """One stage's own rows (``json``) or report section (``md``): evaluation/, classify/, match/."""
    return join(workdir, TASK_FOLDERS[stage], f"metrics.{kind}")


def stage_stats(workdir: str, stage: str) -> str:
    """``stats.json`` of a stage: align/, features/ (embed), index/, evaluation/, classify/, match/."""
    return join(workdir, STAGE_FOLDERS[stage], "stats.json")


def pipeline_record(workdir: str) -> str:
    return join(workdir, "pipeline.json")
