"""Bidirectional InfoNCE between products and categories (PAPER.md "Loss"), optionally gathered across workers.

    logits_pc = exp(logit_scale) · p @ c.T          row j: product j against every category in the batch
    logits_cp = exp(logit_scale) · c @ p.T          row j: category j against every product
    L = mean_j [ λ · CE(logits_pc[j], j) + (1 − λ) · CE(logits_cp[j], j) ]

With ``label_mask`` (e-CLIP's fix for false negatives), another row of the same label is the same category, so
it is left out of the softmax (logit −inf) instead of being pushed away; the positive pair itself stays.

Distributed (open_clip's ClipLoss with ``local_loss=True, gather_with_grad=True``): when torch.distributed is
initialised with world size R > 1, each rank all-gathers p, c (with gradients) and the labels, and computes the
loss of its own B rows against all N = R·B columns, the positive of local row i sitting at global column
rank·B + i. Why this trains the same model as one worker with the whole batch of N:
- value: the full-batch loss is (1/N) Σ_j ℓ_j over all rows; rank r computes L_r = (1/B) Σ_{j ∈ r} ℓ_j with the
  same columns, so mean_r L_r = (1/(R·B)) Σ_j ℓ_j = the full-batch loss.
- gradient: the backward of the all-gather sums, onto the rank that owns a row, the gradients that every rank's
  L_r sends to that row's features, so rank s back-propagates ∂(Σ_r L_r)/∂(its features) into its replica of
  the heads; DDP then averages over ranks: (1/R) Σ_s ∂(Σ_r L_r)/∂θ via rank s's rows = ∂(mean_r L_r)/∂θ, the
  full-batch gradient. logit_scale is not gathered: each rank's ∂L_r/∂scale, averaged by DDP, is ∂L/∂scale.
Local batches must have the same size on every rank (all_gather needs equal shapes, and the targets assume
rank·B offsets): the trainer drops the last, uneven batch of each epoch.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F

# torch 2.14 marks this public autograd all_gather deprecated in favour of a private module; it is the call
# open_clip makes and works on gloo and NCCL alike, so keep it and keep its warning out of every training log.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks, differentiable: gradients flow back to the rank that owns each row."""
    return torch.cat(dist_nn.all_gather(x), dim=0)


def _gather_labels(labels: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(out, labels.contiguous())
    return torch.cat(out, dim=0)


class ContrastiveLoss(nn.Module):
    def __init__(self, lam: float = 0.5, label_mask: bool = False, gather: bool = True):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        self.lam = lam  # weight of the product -> category direction (the paper: 0.5)
        self.label_mask = label_mask  # drop same-label rows from the negatives (e-CLIP)
        self.gather = gather  # use every rank's rows as negatives when running distributed

    def forward(self, p: torch.Tensor, c: torch.Tensor, logit_scale: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of this rank's rows: p, c (B, d) unit-norm pairs, logit_scale = log(1/τ), labels (B,) int."""
        if self.label_mask and labels is None:
            raise ValueError("ContrastiveLoss(label_mask=True) needs the batch labels")
        # Logits and softmax in float32 whatever the autocast dtype: with B·R columns a bf16 logsumexp is off
        # by more than the loss differences late in training.
        p, c = p.float(), c.float()
        n_local = p.shape[0]
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            all_p, all_c = _gather(p), _gather(c)
            all_labels = _gather_labels(labels) if self.label_mask else None
            offset = dist.get_rank() * n_local
        else:
            all_p, all_c, all_labels, offset = p, c, labels, 0
        targets = torch.arange(n_local, device=p.device) + offset
        scale = logit_scale.float().exp()
        logits_pc = scale * p @ all_c.T
        logits_cp = scale * c @ all_p.T
        if self.label_mask:
            same = labels[:, None] == all_labels[None, :]
            same[torch.arange(n_local, device=p.device), targets] = False  # the positive stays
            logits_pc = logits_pc.masked_fill(same, float("-inf"))
            logits_cp = logits_cp.masked_fill(same, float("-inf"))
        return (self.lam * F.cross_entropy(logits_pc, targets)
                + (1 - self.lam) * F.cross_entropy(logits_cp, targets))
