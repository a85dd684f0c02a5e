"""ContrastiveLoss against a brute-force reference, the label mask, and the gather across 2 real processes."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from clipita.loss import ContrastiveLoss
from clipita.model import ClipIta, HeadConfig, make_optimizer, train_step


def reference_loss(p, c, logit_scale, lam, labels=None) -> float:
    """The paper's formula row by row in float64 Python: λ·ℓ(p→c) + (1−λ)·ℓ(c→p), averaged over rows; with
    labels, other rows of the same label are left out of each softmax."""
    p, c, scale = p.double().tolist(), c.double().tolist(), math.exp(float(logit_scale))
    n = len(p)
    total = 0.0
    for j in range(n):
        for a, b, weight in ((p, c, lam), (c, p, 1 - lam)):
            s = [scale * sum(x * y for x, y in zip(a[j], b[k])) for k in range(n)]
            keep = [k for k in range(n) if k == j or labels is None or labels[k] != labels[j]]
            total += weight * (math.log(sum(math.exp(s[k]) for k in keep)) - s[j])
    return total / n


def unit(*shape, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("lam,tau,mask", [(0.5, 1.0, False), (0.3, 0.2, False), (0.8, 0.07, True),
                                          (0.0, 0.5, True), (1.0, 1.0, True)])
def test_matches_brute_force_reference(lam, tau, mask):
    p, c = unit(12, 16, seed=1), unit(12, 16, seed=2)
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0, 5, 6, 2, 7])  # repeats, so the mask matters
    logit_scale = torch.tensor(math.log(1 / tau))
    got = ContrastiveLoss(lam=lam, label_mask=mask)(p, c, logit_scale, labels).item()
    want = reference_loss(p, c, logit_scale, lam, labels.tolist() if mask else None)
    assert got == pytest.approx(want, rel=1e-5)


def test_label_mask_only_matters_when_labels_repeat():
    p, c, scale = unit(10, 8, seed=3), unit(10, 8, seed=4), torch.tensor(2.0)
    plain, masked = ContrastiveLoss(), ContrastiveLoss(label_mask=True)
    distinct = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked(p, c, scale, distinct), plain(p, c, scale, distinct))
    repeated = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 6, 7])
    # Dropping negatives removes positive terms from every affected softmax denominator.
    assert masked(p, c, scale, repeated).item() < plain(p, c, scale, repeated).item() - 1e-3


def test_bad_arguments_fail_in_one_line():
    with pytest.raises(ValueError, match="lam must be in"):
        ContrastiveLoss(lam=1.5)
    with pytest.raises(ValueError, match="needs the batch labels"):
        ContrastiveLoss(label_mask=True)(unit(4, 8, seed=0), unit(4, 8, seed=1), torch.tensor(0.0))


# --- distributed: 2 processes x half the batch must equal 1 process x the whole batch ---------------------

CONFIG = HeadConfig(variant="ita", image_dim=6, text_dim=5, hidden_dim=16, output_dim=8, tau=0.5,
                    learnable_tau=True)
LOSS = dict(lam=0.3, label_mask=True)


def make_batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"image": torch.randn(n, 6, generator=g), "title": torch.randn(n, 5, generator=g),
            "attributes": torch.randn(n, 5, generator=g), "category": torch.randn(n, 5, generator=g),
            # label 0 on both ranks: the mask must also see the other rank's duplicates
            "label": torch.tensor([0, 1, 2, 0, 3, 0, 4, 1])}


def grads(model) -> dict[str, torch.Tensor]:
    return {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = ClipIta(CONFIG)
        model.load_state_dict(torch.load(f"{out_dir}/init.pt", weights_only=True))
        ddp = DistributedDataParallel(model)
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in make_batch(8).items()}
        loss = train_step(ddp, ContrastiveLoss(**LOSS), make_optimizer(ddp, 1e-3, 0.1), half)
        torch.save({"loss": loss, "grads": grads(model)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_gathered_loss_over_two_processes_equals_full_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = ClipIta(CONFIG)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)

    full_loss = train_step(model, ContrastiveLoss(**LOSS), make_optimizer(model, 1e-3, 0.1), make_batch(8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(full_loss, rel=1e-5)
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"])  # each rank holds a different half
    full = grads(model)
    assert full.keys() == ranks[0]["grads"].keys() and "logit_scale" in full
    for name, g in full.items():
        # DDP has already averaged over ranks: both ranks hold the full-batch gradient.
        for r in range(2):
            torch.testing.assert_close(ranks[r]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
