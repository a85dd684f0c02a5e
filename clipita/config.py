"""Typed, frozen configuration: one dataclass per concern, loadable from YAML with command-line overrides.

A config file has one top-level key per section (``encoders:``, ``data:``, ...); every field has a default, so a
file only states what differs. ``configs/offline.yaml`` and ``configs/production.yaml`` ship with the project.
Errors are one line: ``ConfigError: encoders.precision must be one of ...``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from clipita import storage
from clipita.tree import val_holdout_fraction


class ConfigError(ValueError):
    """A bad config value or file; the message is one line naming the field."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """How a catalogue becomes labelled train/val/test products (PAPER.md protocol, clipita/tree.py).

    Held-out ("unseen") categories: ``unseen_fraction`` is the share of *products* whose category is held out of
    training whole (chosen per category from the tree's product counts, spread over the depths, whole subtrees):
    those products all go to the test split, so every setting has categories never seen in training.
    ``unseen_val_fraction`` holds out a second, disjoint set of categories whose products go to the validation
    split instead: model selection (train.recipe=residual) measures generalisation to unseen categories on them
    without touching the test split. Its default, -1, means half of ``unseen_fraction`` (0.05 for 0.1): enough
    categories to measure, at half the training data the test hold-out costs. Both 0 = the paper's random split.
    """

    seed: int = 0  # seeds the split, the held-out categories and the random node of the "all" setting
    val_fraction: float = 0.1  # share of the other products in the validation split (random, by product id)
    test_fraction: float = 0.1  # share of the other products in the test split (random, by product id)
    unseen_fraction: float = 0.0  # share of products under categories held out for the test split (0: the paper)
    unseen_val_fraction: float = -1.0  # share of products under categories held out for validation; -1: half of
    #                                    unseen_fraction
    query_text: str = "name"  # "name" (the paper: last path element) or "path" ("Women > Shoes > Boots")
    stream_mb: int = 256  # object-store memory a stage's product stream may fill per node (0: Ray Data's default)

    def __post_init__(self) -> None:
        _check_range("data.val_fraction", self.val_fraction, 0.0, 0.9)
        _check_range("data.stream_mb", self.stream_mb, 0, 10**7)
        _check_range("data.test_fraction", self.test_fraction, 0.0, 0.9)
        _check_range("data.unseen_fraction", self.unseen_fraction, 0.0, 0.5)
        if self.unseen_val_fraction != -1.0:
            _check_range("data.unseen_val_fraction (-1: half of unseen_fraction)", self.unseen_val_fraction, 0.0, 0.5)
        if self.unseen_fraction + self.val_holdout_fraction > 0.75:
            raise ConfigError("data.unseen_fraction + data.unseen_val_fraction must be at most 0.75")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction + data.test_fraction must be below 1")
        _check_choice("data.query_text", self.query_text, ("name", "path"))

    @property
    def val_holdout_fraction(self) -> float:
        """``unseen_val_fraction`` with its default (-1) resolved."""
        return val_holdout_fraction(self.unseen_fraction, self.unseen_val_fraction)


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen pre-trained encoders (hub names or local paths)."""

    image_model: str = "ViT-B-32"  # open_clip architecture name (or one registered by clipita)
    image_pretrained: str = "laion2b_s34b_b79k"  # open_clip tag, a local checkpoint file, or "" for random init
    text_model: str = "sentence-transformers/all-mpnet-base-v2"  # hub name or local folder of a transformers model
    text_max_length: int = 64  # tokens; titles and category names are short
    image_size: int = 0  # image input resolution in px; 0: the architecture's (a convnet takes any, a ViT
    #                      interpolates its position embeddings, as open_clip's force_image_size does)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    clip_prompt: str = "a photo of {}"  # template for CLIP zero-shot category text

    def __post_init__(self) -> None:
        _check_choice("encoders.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("encoders.precision", self.precision, ("auto", "fp32", "fp16", "bf16"))
        _check_range("encoders.image_size (0: the architecture's)", self.image_size, 0, 4096)
        if 0 < self.image_size < 32:
            raise ConfigError(f"encoders.image_size must be 0 or at least 32 px, got {self.image_size}")
        if "{}" not in self.clip_prompt:
            raise ConfigError("encoders.clip_prompt must contain {} where the category name goes")

    @property
    def zero_shot_note(self) -> str | None:
        """Why zero-shot CLIP (category text through the image model's text tower, against image vectors) is no
        baseline under these encoders; None when the text tower was trained with the image tower (an open_clip
        tag, or a checkpoint file: a CLIP model or aligned towers)."""
        if not self.image_pretrained:
            return (f"random-init {self.image_model} image and text towers (a test config): zero-shot CLIP is "
                    "chance by construction")
        if self.image_pretrained.startswith("pkg:"):
            return (f"the image tower ({self.image_model}, {self.image_pretrained}) was trained alone and its text "
                    "tower is a random init aligned with nothing: zero-shot CLIP is chance by construction, not a "
                    "baseline (CLIP-I/IA/ITA train their own category tower on these image features)")
        return None


@dataclass(frozen=True)
class EmbedConfig:
    """jobs.embed: how the catalogue streams through the encoders (Ray Data)."""

    part_rows: int = 512  # products per output part: the unit of work, of output files and of resume
    batch_size: int = 64  # products per encoder call
    image_batch_size: int = 0  # images per image-tower forward; 0: 8 on CPU (a convnet's activations then stay in
    #                            cache: 3x the images/s of 64 for EfficientNet-Lite0 on 2 cores, 1.4x in the job;
    #                            benchmarks/history/image-tower.md), on GPU batch_size
    min_actors: int = 1  # encoder actor pool autoscales between min_actors and max_actors
    max_actors: int = 1
    gpus_per_actor: float = 0.0  # 0 runs the encoders on CPU; 1 pins one GPU per actor
    cpus_per_actor: float = 1.0  # CPUs an encoder actor reserves
    torch_threads: int = 0  # torch threads of a CPU encoder; 0: the node's cores / max_actors (at least cpus_per_actor)
    read_workers: int = 4  # most read/decode actors at once
    read_cpus: float = 0.0  # CPUs a read actor reserves; 0: 1 with GPU encoders (decode feeds the GPU), else 0.25
    #                         (on CPU, reading mostly waits on storage and the encoder needs the cores)
    fetch_threads: int = 16  # concurrent image reads per read worker (hides object-storage latency)
    max_image_bytes: int = 20_000_000  # larger image files are quarantined unread
    dtype: str = "float16"  # stored embedding precision: float16 (half the bytes) or float32

    def __post_init__(self) -> None:
        for name in ("part_rows", "batch_size", "min_actors", "max_actors", "read_workers", "fetch_threads",
                     "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"embed.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_actors < self.min_actors:
            raise ConfigError("embed.max_actors must be >= embed.min_actors")
        _check_range("embed.image_batch_size (0: 8 on CPU, batch_size on GPU)", self.image_batch_size, 0, 10**6)
        _check_range("embed.gpus_per_actor", self.gpus_per_actor, 0.0, 8.0)
        _check_range("embed.cpus_per_actor", self.cpus_per_actor, 0.0, 64.0)
        _check_range("embed.read_cpus", self.read_cpus, 0.0, 64.0)
        _check_range("embed.torch_threads", self.torch_threads, 0, 1024)
        _check_choice("embed.dtype", self.dtype, ("float16", "float32"))

    @property
    def image_batch(self) -> int:
        """Images per image-tower forward: ``image_batch_size``, else 8 on CPU encoders and ``batch_size`` on GPU."""
        if self.image_batch_size:
            return self.image_batch_size
        return self.batch_size if self.gpus_per_actor > 0 else min(8, self.batch_size)


SELECTIONS = ("loss", "retrieval")  # train.select: what best/ is chosen on (validation split only)


@dataclass(frozen=True)
class TrainConfig:
    """jobs.train: contrastive training of the heads, with Ray Train. ``recipe`` picks the method (``RECIPES``):
    ``residual`` (default) or ``paper`` (PAPER.md, exactly as before the residual recipe existed). The recipe picks
    the heads (plain, or residual around the zero-shot text vectors); ``tau``, ``learnable_tau``, ``label_mask``,
    ``select`` and ``kg_weight`` default (None) to the recipe's values; set them to override, one ingredient at a
    time (the ablation of benchmarks/recipes.py). ``alphas`` only concerns residual heads; ``alphas=1.0`` keeps
    the model as trained (no WiSE-FT search)."""

    RECIPES = {  # not a field (no annotation): the recipes' defaults
        # The paper's: plain MLP heads into an output_dim space, τ fixed at 1, same-category rows are negatives,
        # best/ = the epoch of the lowest validation loss.
        "paper": {"tau": 1.0, "learnable_tau": False, "label_mask": False, "select": "loss",
                  "kg_weight": 0.0, "patience": 0},
        # Keeps the frozen text encoder's zero-shot knowledge (issue 12): residual heads around the text vectors
        # (clipita/model.py; CLIP-I, with no text input, keeps the plain head), CLIP's learnt τ from 0.07,
        # best/ = the epoch of the best validation retrieval (harmonic mean of the R-precision of seen and held-out
        # validation categories), then the residual scale α picked from ``alphas`` on it (WiSE-FT), and KgCoOp's
        # pull of the trained category vectors toward the frozen encoder's (weight 5). A run stops once 5 epochs in
        # a row have not improved its selection: with the sharp learnt τ the heads fit within a few epochs. No
        # e-CLIP label mask: without it the validation HM was higher in 5 of 6 catalogue x setting cells. Every
        # choice was made on validation figures only (benchmarks/history/recipes.md).
        "residual": {"tau": 0.07, "learnable_tau": True, "label_mask": False, "select": "retrieval",
                     "kg_weight": 5.0, "patience": 5},
    }

    recipe: str = "residual"  # residual (keeps zero-shot knowledge, issue 12) | paper (PAPER.md's recipe)
    epochs: int = 30  # the paper trains 30 epochs (at most, with patience)
    patience: int | None = None  # early stopping: a run stops after this many epochs without a better selection
    #                              (train.select); 0 = train every epoch; None: the recipe's (paper: 0; residual: 5)
    batch_size: int = 0  # per worker; 0 = the paper's: 8 for the general setting, 128 otherwise
    lr: float = 1e-4  # AdamW learning rate (not in the paper)
    weight_decay: float = 0.01  # AdamW decay on weight matrices only
    lam: float = 0.5  # λ: weight of the product->category direction of the loss
    tau: float | None = None  # τ (initial when learnt); None: the recipe's (paper: 1, a flat softmax; residual: 0.07)
    learnable_tau: bool | None = None  # learn τ as CLIP does; None: the recipe's (paper: no; residual: yes)
    label_mask: bool | None = None  # e-CLIP: same-category rows in a batch are not negatives; None: the recipe's
    select: str | None = None  # best/ = epoch of the lowest val "loss" or best val "retrieval" (R-prec HM of seen
    #                            and unseen validation categories); None: the recipe's (paper: loss; residual:
    #                            retrieval). The α search always scores the validation retrieval.
    hidden_dim: int = 1024  # width of both hidden layers of each head
    output_dim: int = 512  # width of the joint space of plain heads (residual heads output the text width)
    dropout: float = 0.0
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # residual recipe: residual scales tried after training
    kg_weight: float | None = None  # KgCoOp: weight of 1 - cos(trained, zero-shot category vector) in the training
    #                                 loss (residual heads only; the validation loss leaves it out); None: the
    #                                 recipe's (paper: 0; residual: 5)
    lock_category: bool = False  # residual heads: train the product tower only; categories keep the frozen text
    #                              encoder's vectors (LiT locks a tower the same way)
    workers: int = 1  # Ray Train workers (data parallel; the loss sees the gathered global batch); 0 = in-process
    use_gpu: bool = False  # one GPU per worker, bf16 autocast
    cpus_per_worker: float = 1.0  # CPUs a CPU worker reserves
    torch_threads: int = 0  # torch threads of a CPU worker; 0: the node's cores / its workers (at least cpus_per_worker)
    checkpoint_every: int = 5  # epochs between last/ checkpoints (model + optimizer); also after the final epoch
    cache_mb: int = 256  # a worker keeps its train shard in memory when it fits, else re-reads it every epoch (0: never)
    shuffle_rows: int = 20000  # local shuffle buffer of a streamed (uncached) shard
    val_rows: int = 8192  # most validation products (a seeded sample) worker 0 evaluates each epoch
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    seed: int = 0  # model init and per-epoch shuffling

    def __post_init__(self) -> None:
        _check_choice("train.recipe", self.recipe, tuple(self.RECIPES))
        # Resolve the recipe's defaults here, so every reader sees plain values (and asdict round-trips). The
        # fields are Optional, which the generic loader passes through unchecked: convert them here.
        for name, tp in (("tau", float), ("learnable_tau", bool), ("label_mask", bool), ("select", str),
                         ("kg_weight", float), ("patience", int)):
            value = getattr(self, name)
            value = self.RECIPES[self.recipe][name] if value is None else _coerce(f"train.{name}", tp, value)
            object.__setattr__(self, name, value)
        _check_choice("train.select", self.select, SELECTIONS)
        for name in ("epochs", "hidden_dim", "output_dim", "checkpoint_every", "shuffle_rows", "val_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        _check_range("train.workers", self.workers, 0, 10000)
        if self.batch_size < 0 or self.batch_size == 1:
            raise ConfigError(f"train.batch_size must be 0 (paper default) or at least 2, got {self.batch_size}")
        _check_range("train.lam", self.lam, 0.0, 1.0)
        _check_range("train.tau", self.tau, 0.01, 100.0)
        _check_range("train.lr", self.lr, 0.0, 1.0)
        _check_range("train.dropout", self.dropout, 0.0, 0.99)
        _check_range("train.max_failures", self.max_failures, 0, 1000)
        _check_range("train.cpus_per_worker", self.cpus_per_worker, 0.1, 1024)
        _check_range("train.torch_threads", self.torch_threads, 0, 1024)
        _check_range("train.cache_mb", self.cache_mb, 0, 10**7)
        _check_range("train.kg_weight", self.kg_weight, 0.0, 1000.0)
        _check_range("train.patience", self.patience, 0, 100000)
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if not self.alphas:
            raise ConfigError("train.alphas must name at least one residual scale")
        for a in self.alphas:
            _check_range("train.alphas", a, 0.0, 10.0)

    def batch_for(self, setting: str) -> int:
        return self.batch_size or (8 if setting == "general" else 128)


@dataclass(frozen=True)
class IndexConfig:
    """jobs.index: USearch HNSW shards of product vectors."""

    shards: int = 0  # most shard-building tasks at once; 0 = as many as the cluster's CPUs run
    builder_mb: int = 512  # vectors + graph a builder holds before it writes a shard: bounds its memory
    batch_size: int = 4096  # products per block through the vector stage
    vector_actors: int = 1  # most actors applying the models to the products (each loads every trained head)
    gpus_per_actor: float = 0.0  # GPUs per vector actor (0: CPU)
    build_threads: int = 1  # CPUs and insert threads per shard task: 1 = the same graph every build, 0 = every core
    dtype: str = "f16"  # stored vector precision: f32 | f16 | i8 (USearch quantisation); f16: half the RAM, recall
    #                     0.99+ at the ef below (benchmarks/history/index.md)
    connectivity: int = 16  # HNSW M: graph degree
    # HNSW ef at build time: 64 builds 2.4x faster than 128, and with expansion_search 128 keeps recall@10 >= 0.998 at
    # 100k and 1M (benchmarks/history/index.md, 2026-11-22 10:00)
    expansion_add: int = 64
    expansion_search: int = 128  # HNSW ef at query time (at least k); evaluation ranks exactly, serving walks the graph

    def __post_init__(self) -> None:
        for name in ("builder_mb", "batch_size", "vector_actors", "connectivity", "expansion_add",
                     "expansion_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"index.{name} must be at least 1, got {getattr(self, name)}")
        _check_range("index.shards", self.shards, 0, 4096)
        _check_range("index.build_threads", self.build_threads, 0, 1024)
        _check_range("index.gpus_per_actor", self.gpus_per_actor, 0.0, 8.0)
        _check_choice("index.dtype", self.dtype, ("f32", "f16", "i8"))


@dataclass(frozen=True)
class EvaluateConfig:
    """jobs.evaluate: exact ranking of the test split by partitions of its index shards."""

    ranker_rows: int = 60_000  # most test products one ranking actor holds (~0.5 GB): more products, more actors
    recall_queries: int = 64  # queries per (setting, model) whose HNSW walk is checked against exact ranking

    def __post_init__(self) -> None:
        _check_range("evaluate.ranker_rows", self.ranker_rows, 1, 10**9)
        _check_range("evaluate.recall_queries", self.recall_queries, 0, 10**6)


ALIGN_MODES = ("lock", "partial", "full")


@dataclass(frozen=True)
class AlignConfig:
    """e-CLIP alignment of the image and text towers on the catalogue's image-title pairs (clipita/align.py).

    What trains, per tower: ``lock`` the trunk frozen, only the projection (and the temperature) train: LiT, the
    CPU default, whose trunk features are computed once and cached; ``partial`` the trunk's last block too;
    ``full`` everything (e-CLIP, for GPU clusters). ``chunk`` > 0 computes a batch in chunks of that many pairs with
    the whole batch's exact gradient (GradCache, e-CLIP's multi-stream accumulation); 0: the batch in one pass.
    """

    enabled: bool = True  # jobs.pipeline runs align before embed; false: the paper's frozen towers
    text_tower: str = "auto"  # auto: the image model's own text tower when it has CLIP weights (an open_clip tag),
    #                           else encoders.text_model as open_clip's HF text tower | own | hf
    embed_dim: int = 1024  # the shared space, for an HF text tower (an own tower keeps its model's); 1024 had
    #                        the better demo val R@10 of 256 / 1024 (benchmarks/align_ablation.py)
    image_train: str = "lock"
    text_train: str = "lock"
    text: str = "title"  # title | title+attributes
    groups: str = "mask"  # listings of one catalogue group in a batch: mask (no negatives) | off
    batch_size: int = 256
    chunk: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.1
    tau: float = 0.07  # initial temperature (learnable)
    epochs: int = 10  # lock/lock peaks by epoch 3-9 on the demo's val pairs; best/ is the best epoch
    workers: int = 1  # Ray Train workers (the global batch is batch_size, split over them)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from align/last before the job fails
    eval_rows: int = 2000  # test products in the alignment metrics' retrieval pool (a seeded sample beyond it)

    def __post_init__(self) -> None:
        _check_choice("align.text_tower", self.text_tower, ("auto", "own", "hf"))
        _check_choice("align.image_train", self.image_train, ALIGN_MODES)
        _check_choice("align.text_train", self.text_train, ALIGN_MODES)
        _check_choice("align.text", self.text, ("title", "title+attributes"))
        _check_choice("align.groups", self.groups, ("mask", "off"))
        _check_range("align.embed_dim", self.embed_dim, 8, 8192)
        _check_range("align.batch_size", self.batch_size, 2)
        _check_range("align.chunk", self.chunk, 0)
        _check_range("align.lr", self.lr, 0.0)
        _check_range("align.tau", self.tau, 1e-3, 10.0)
        _check_range("align.epochs", self.epochs, 1)
        _check_range("align.workers", self.workers, 1)
        _check_range("align.eval_rows", self.eval_rows, 10)


@dataclass(frozen=True)
class ClassifyConfig:
    """jobs.classify (e-CLIP's downstream tasks on the product vectors, clipita/stages/classify.py): every product's
    category zero-shot and by a kNN probe, mis-categorised listings, k-means clusters, attribute values, flags."""

    model: str = ""  # the model whose predictions, suspects and flags are written; "": clip-ita when trained, else mpnet
    setting: str = "specific"  # whose trained heads (specific: leaf labels, what a product is categorised into)
    top_k: int = 5  # categories per product in classify/predictions
    probe_k: int = 20  # kNN probe: nearest train-split listings (from the index) that vote
    suspects: int = 1000  # mis-categorised listings kept, ranked by how strongly the model contradicts them
    clusters: int = 0  # k-means clusters; 0: as many as the tree has leaves
    kmeans_iterations: int = 10
    attribute_max_values: int = 32  # a key is a closed set when it has at most this many values ...
    attribute_min_products: int = 20  # ... and this many products carry it
    attribute_prompt: str = "a photo of a {} product"  # CLIP text for an attribute value
    # policy flags (e-CLIP's adult-product recognition, generalised): "NAME: Category > Path" entries, one subtree
    # each (a name may repeat: the union); a product is flagged when its predicted mass under them passes the
    # threshold chosen on validation products
    flags: tuple[str, ...] = ()
    temperature: float = 0.05  # softmax temperature over the categories' cosines (flag mass, probe vote scores)

    def __post_init__(self) -> None:
        _check_choice("classify.setting", self.setting, ("all", "general", "specific"))
        _check_range("classify.top_k", self.top_k, 1, 100)
        _check_range("classify.probe_k", self.probe_k, 1, 1000)
        _check_range("classify.suspects", self.suspects, 1, 10**6)
        _check_range("classify.clusters", self.clusters, 0, 10**6)
        _check_range("classify.kmeans_iterations", self.kmeans_iterations, 1, 1000)
        _check_range("classify.attribute_max_values", self.attribute_max_values, 2, 10**4)
        _check_range("classify.attribute_min_products", self.attribute_min_products, 1)
        _check_range("classify.temperature", self.temperature, 1e-4, 10.0)
        if "{}" not in self.attribute_prompt:
            raise ConfigError(f"classify.attribute_prompt must hold {{}} for the value, got {self.attribute_prompt!r}")
        for entry in self.flags:
            name, _, path = entry.partition(":")
            if not name.strip() or not path.strip():
                raise ConfigError(f"classify.flags entries are 'NAME: Category > Path', got {entry!r}")


@dataclass(frozen=True)
class MatchConfig:
    """jobs.match (clipita/stages/match.py): listings of the same product from the all-products index's neighbours."""

    model: str = "clip"  # whose vectors (its index/all group) find the neighbours: the image's, by default
    setting: str = "specific"  # a trained model's heads
    k: int = 10  # neighbours searched per product (candidate pairs: never all pairs)
    min_score: float = 0.5  # candidate pairs below this cosine are not kept
    threshold: float = 0.0  # pairs at or above it are one product; 0: the F1-best on validation groups
    tasks: int = 0  # search tasks at once; 0: the cluster's CPUs
    # HNSW ef of the candidate search (at least k + 1); 0: the index's expansion_search (128). At 1M products 32
    # walks 2.8-3.6x faster than 128 (match wall 0.96x jobs.index's, not 3.9x) at test recall 88.9 instead of 99.2
    # of synth's second listings (benchmarks/RESULTS.md, "match"): raise it where recall matters more than time
    ef: int = 32

    def __post_init__(self) -> None:
        _check_choice("match.setting", self.setting, ("all", "general", "specific"))
        _check_range("match.k", self.k, 1, 1000)
        _check_range("match.min_score", self.min_score, -1.0, 1.0)
        _check_range("match.threshold", self.threshold, 0.0, 1.0)
        _check_range("match.tasks", self.tasks, 0, 10**4)
        _check_range("match.ef", self.ef, 0, 10**4)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    match: MatchConfig = field(default_factory=MatchConfig)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert a YAML or command-line value to the field's declared type."""
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return out
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return "" if value is None else str(value)
        if value is None:
            return ""
    elif typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, (list, tuple)):
            (inner, *_rest) = typing.get_args(tp)
            return tuple(_coerce(name, inner, v) for v in value)
    else:
        return value
    raise ConfigError(f"{name} has the wrong type: {value!r}")


def section_from_dict(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]} (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(f"{prefix}.{k}", hints[k], v) for k, v in values.items()})


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``{"section.key": value}`` overrides."""
    raw: dict = {}
    if path:

        try:
            raw = yaml.safe_load(storage.read_bytes(path)) or {}
        except storage.StorageError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections")
    for key, value in (overrides or {}).items():
        if "." not in key:
            raise ConfigError(f"override {key!r} must be section.key")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: {', '.join(sorted(sections))})")
    hints = typing.get_type_hints(Config)
    return Config(**{k: section_from_dict(hints[k], v or {}, k) for k, v in raw.items()})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
