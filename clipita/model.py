"""The CLIP-ITA model: two trainable projection heads over frozen pre-computed features, and its training step.

    category text --MPNet (frozen)--> category (Dt) --g_c--> c (d, unit norm)
    image         --CLIP  (frozen)--> image    (Di) -+
    title         --MPNet (frozen)--> title    (Dt) -+-concat--g_p--> p (d, unit norm)
    attributes    --MPNet (frozen)--> mean     (Dt) -+

The product head reads [image] (CLIP-I), [image, attributes] (CLIP-IA) or [image, title, attributes] (CLIP-ITA);
the category tower is the same in all three (PAPER.md "Model"). The encoders run once, in jobs.embed, so the
model here holds only the heads and the temperature: everything in it trains.

Residual heads (``HeadConfig.residual``, train.recipe=residual; issue 12): plain heads forget what the frozen text
encoder knew about categories they never saw. A residual head adds its MLP to a zero-shot text vector instead:

    c = normalize(category + s · MLP_c(category))
    p = normalize(x_zs     + s · MLP_p(concat fields))    x_zs = title (CLIP-ITA) or attributes (CLIP-IA)

so the joint space is the text encoder's own (output width = text_dim). The MLPs' last Linear starts at zero,
so an untrained model *is* the zero-shot text ranker (mpnet, for CLIP-ITA), and ``residual_scale`` s (a buffer,
saved with the weights) interpolates between it (s = 0) and the trained model (s = 1), as WiSE-FT interpolates
weights. CLIP-I has no text input to pass through: it keeps the plain head.

A batch is a dict of float32 tensors ``image`` (B, Di), ``title`` (B, Dt), ``attributes`` (B, Dt),
``category`` (B, Dt) and int64 ``label`` (B,) (equal labels = same category; used by the loss's label mask).

Single process:

    model = ClipIta(HeadConfig(variant="ita", image_dim=512, text_dim=768))
    loss_fn = ContrastiveLoss()                      # clipita.loss
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    for batch in batches:
        train_step(model, loss_fn, opt, batch)

Under Ray Train the same calls run on ``ray.train.torch.prepare_model(model)`` (a DDP wrapper); the loss
all-gathers features across workers. Nothing in this module touches torch.distributed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipita.config import ConfigError
from clipita.models import REGISTRY, VARIANTS

PRODUCT_FIELDS = {m.variant: m.reads for m in REGISTRY.values() if m.trained}  # the registry's trained heads
ZERO_SHOT_FIELD = {"ia": "attributes", "ita": "title"}  # the text vector a residual product head adds to
MAX_LOGIT_SCALE = math.log(100)  # CLIP's cap: τ never below 0.01, so logits stay in a trainable range


@dataclass(frozen=True)
class HeadConfig:
    """Architecture of the two heads (widths are not in the paper: ours, configurable)."""

    variant: str = "ita"  # i (CLIP-I: image) | ia (CLIP-IA: + attributes) | ita (CLIP-ITA: + title + attributes)
    image_dim: int = 512  # width of the frozen image embedding (open_clip ViT-B-32: 512)
    text_dim: int = 768  # width of the frozen text embeddings (all-mpnet-base-v2: 768)
    hidden_dim: int = 1024  # width of both hidden layers of each head
    output_dim: int = 512  # width of the shared embedding space (CLIP ViT-B-32's joint width)
    dropout: float = 0.0  # after each hidden GELU; the paper does not mention dropout
    tau: float = 1.0  # initial softmax temperature; the paper fixes τ = 1, CLIP learns it from 0.07
    learnable_tau: bool = False  # train logit_scale = log(1/τ) (CLIP) instead of keeping it fixed (the paper)
    residual: bool = False  # residual heads around the zero-shot text vectors (module doc); output_dim = text_dim
    lock_category: bool = False  # residual only: the category tower stays the frozen text encoder's (LiT-style)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"head.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.residual and self.variant not in ZERO_SHOT_FIELD:
            raise ConfigError(f"head.residual needs a text input to pass through: variant {self.variant!r} has none")
        if self.lock_category and not self.residual:
            raise ConfigError("head.lock_category needs residual heads (a locked plain head would stay random)")
        if self.residual and self.output_dim != self.text_dim:
            raise ConfigError(f"head.output_dim must equal head.text_dim ({self.text_dim}) for residual heads, "
                              f"got {self.output_dim!r}")
        for name in ("image_dim", "text_dim", "hidden_dim", "output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"head.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout must be in [0, 1), got {self.dropout!r}")
        if not 1 / 100 <= self.tau < math.inf:
            raise ConfigError(f"head.tau must be at least 0.01 (logit scale capped at 100), got {self.tau!r}")

    @property
    def product_dim(self) -> int:
        """Input width of the product head: the concatenated features of this variant."""
        return self.image_dim + (len(PRODUCT_FIELDS[self.variant]) - 1) * self.text_dim


class MLPHead(nn.Module):
    """Two hidden layers, each Linear -> LayerNorm -> GELU -> Dropout, then a Linear projection to the output.

    LayerNorm sits before the activation (as in most projection heads) so GELU sees zero-mean, unit-variance
    inputs whatever the scale of the frozen features: CLIP image embeddings and mean-pooled MPNet vectors
    differ in norm by an order of magnitude. The output is not normalised here: ClipIta L2-normalises it.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _features(batch: dict[str, torch.Tensor], name: str, dim: int) -> torch.Tensor:
    """One input feature, checked: features from another encoder than the config names fail in one line."""
    if name not in batch:
        raise ValueError(f"batch has no {name!r} features (has: {', '.join(sorted(batch))})")
    x = batch[name]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} features have shape {tuple(x.shape)}, the model expects (batch, {dim})")
    return x


class ClipIta(nn.Module):
    """Category head g_c and product head g_p into one unit-norm space, plus the logit scale log(1/τ)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.category_head = MLPHead(config.text_dim, config.hidden_dim, config.output_dim, config.dropout)
        self.product_head = MLPHead(config.product_dim, config.hidden_dim, config.output_dim, config.dropout)
        # A parameter even when fixed, so checkpoints and the loss treat both cases alike.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.tau)),
                                        requires_grad=config.learnable_tau)
        if config.residual:
            # After the default init (so the hidden layers draw the same numbers as a plain head's), zero the last
            # Linear: the residual starts at 0 and the untrained model is the zero-shot one. A plain model has no
            # such buffer: its state dict (and checkpoints) stay as they were.
            for head in (self.category_head, self.product_head):
                nn.init.zeros_(head.net[-1].weight)
                nn.init.zeros_(head.net[-1].bias)
            self.register_buffer("residual_scale", torch.tensor(1.0))
            if config.lock_category:  # the zero MLP never trains: c is the frozen encoder's unit vector
                self.category_head.requires_grad_(False)

    def _residual(self, base: torch.Tensor, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """normalize(base + s·head(x)) for residual heads, normalize(head(x)) for plain ones. In float32: under
        bf16 autocast the norm of a 512-wide vector loses ~3 digits, and the zero-shot base would lose more."""
        out = head(x).float()
        if self.config.residual:
            out = base.float() + self.residual_scale * out
        return F.normalize(out, dim=-1)

    def encode_products(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dims = {"image": self.config.image_dim, "title": self.config.text_dim, "attributes": self.config.text_dim}
        x = torch.cat([_features(batch, f, dims[f]) for f in PRODUCT_FIELDS[self.config.variant]], dim=1)
        base = batch[ZERO_SHOT_FIELD[self.config.variant]] if self.config.residual else None
        return self._residual(base, self.product_head, x)

    def encode_categories(self, category: torch.Tensor) -> torch.Tensor:
        x = _features({"category": category}, "category", self.config.text_dim)
        return self._residual(x, self.category_head, x)

    def set_residual_scale(self, alpha: float) -> None:
        """s of a residual model: 0 = the zero-shot text model, 1 = as trained (WiSE-FT's α)."""
        if not self.config.residual:
            raise ValueError("set_residual_scale: this model has plain heads")
        self.residual_scale.fill_(float(alpha))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(products p, categories c) of one batch, row j of each forming the positive pair j."""
        return self.encode_products(batch), self.encode_categories(batch["category"])


# ---------------------------------------------------------------------------------------------------------
# Training: the same functions run in one process and inside Ray Train's DDP workers.

def unwrap(model: nn.Module) -> ClipIta:
    """The ClipIta inside a DDP (or other ``.module``) wrapper, or the model itself."""
    return getattr(model, "module", model)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the Linear weight matrices only (LayerNorm, biases and logit_scale are
    1-/0-dimensional: decaying them pulls normalisation gains and the temperature towards 0, as in nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ], lr=lr, fused=True)  # one kernel over all parameters: ~1.5x faster steps on CPU at the paper's batch of 8


def _to_device(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _loss(model: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor],
          kg_weight: float = 0.0) -> torch.Tensor:
    # Call the wrapper itself (not .module) so DDP's forward hooks run; logit_scale is read from the inner
    # model, and DDP still averages its gradient since its hooks sit on the parameter's gradient accumulator.
    p, c = model(batch)
    loss = loss_fn(p, c, unwrap(model).logit_scale, batch.get("label"))
    if kg_weight:
        loss = loss + kg_weight * knowledge_distance(c, batch["category"])
    return loss


def knowledge_distance(c: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
    """KgCoOp's regulariser for residual heads: mean 1 - cos(trained category vector, frozen text encoder's vector
    of the same name), so the category tower stays near the zero-shot space that unseen category names live in.
    (KgCoOp uses the squared distance of unit vectors, 2 - 2 cos: the same up to a factor.)"""
    if c.shape[-1] != category.shape[-1]:
        raise ValueError("knowledge_distance needs residual heads (category vectors in the text encoder's space)")
    return (1 - (c.float() * F.normalize(category.float(), dim=-1)).sum(-1)).mean()


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               autocast_dtype: torch.dtype | None = None, kg_weight: float = 0.0) -> float:
    """One optimisation step on one batch; returns this process's loss. ``model`` may be wrapped in DDP.

    ``autocast_dtype`` (bf16, what training uses on GPU) runs the heads under autocast.
    ``kg_weight`` > 0 adds ``knowledge_distance`` (residual heads only) with that weight to the loss.
    """
    model.train()
    device = next(model.parameters()).device
    batch = _to_device(batch, device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = _loss(model, loss_fn, batch, kg_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # as open_clip's train loop: clamp after the step, so the gradient is never cut
        unwrap(model).logit_scale.clamp_(max=MAX_LOGIT_SCALE)
    return loss.item()


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: nn.Module, batches: Iterable[dict]) -> float:
    """Mean loss per row over ``batches`` (each weighted by its size), dropout off; the model's mode is kept."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, rows = 0.0, 0
    for batch in batches:
        batch = _to_device(batch, device)
        n = len(batch["category"])
        total += _loss(model, loss_fn, batch).item() * n
        rows += n
    model.train(was_training)
    if rows == 0:
        raise ValueError("evaluate_loss got no batches")
    return total / rows
