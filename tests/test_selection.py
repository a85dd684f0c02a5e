"""Model selection of the residual recipe without Ray: the validation R-precision over seen / unseen categories,
its harmonic mean, and the WiSE-FT choice of the residual scale α (clipita/stages/train.py)."""
import math

import numpy as np
import torch

from clipita.metrics import count_relevant, hits_from_ranking, rank_scores, retrieval_metrics
from clipita.metrics import harmonic_mean
from clipita.model import ClipIta, HeadConfig
from clipita.stages.train import choose_alpha, val_retrieval

DI, DT, C, N = 12, 10, 40, 600


def data(seed: int = 0):
    """Titles near their category's text vector (a zero-shot signal), categories 0..C-1, the first 30 'seen'."""
    rng = np.random.default_rng(seed)
    cats = rng.standard_normal((C, DT)).astype(np.float32)
    lab = rng.integers(0, C, N)
    val = {"image": rng.standard_normal((N, DI)).astype(np.float32),
           "title": (cats[lab] + 1.5 * rng.standard_normal((N, DT))).astype(np.float32),
           "attributes": rng.standard_normal((N, DT)).astype(np.float32), "label_all": lab}
    return val, torch.from_numpy(cats), np.arange(C) < 30


def test_val_retrieval_of_an_untrained_residual_model_is_the_zero_shot_r_precision():
    val, cats, seen = data()
    torch.manual_seed(0)
    model = ClipIta(HeadConfig("ita", DI, DT, 16, DT, residual=True)).train()
    got = val_retrieval(model, val, "all", cats, seen, batch_size=7)  # query chunks of 7: same numbers
    assert model.training  # the caller's mode is kept
    lab, q = val["label_all"], np.unique(val["label_all"])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    n_rel = count_relevant(lab, q)
    hits = hits_from_ranking(rank_scores(unit(cats.numpy()[q]) @ unit(val["title"]).T, int(n_rel.max())), lab, q)
    for name, mask in (("seen", seen[q]), ("unseen", ~seen[q])):
        want = retrieval_metrics(hits[mask], n_rel[mask])["R-prec"]
        assert math.isclose(got[name], want, abs_tol=1e-9), (name, got, want)
    s, u = got["seen"], got["unseen"]
    assert 20 < s < 100 and math.isclose(got["hm"], 2 * s * u / (s + u))
    only_seen = val_retrieval(model, val, "all", cats, np.ones(C, bool))
    assert math.isnan(only_seen["unseen"]) and only_seen["hm"] == only_seen["seen"]  # one side: its value


def test_harmonic_mean_and_its_fallbacks():
    assert harmonic_mean(60.0, 40.0, fallback=True) == 48.0 and harmonic_mean(0.0, 0.0, fallback=True) == 0.0
    nan = float("nan")
    assert harmonic_mean(nan, 30.0, fallback=True) == 30.0 and harmonic_mean(30.0, None, fallback=True) == 30.0
    assert math.isnan(harmonic_mean(nan, nan, fallback=True))


def test_choose_alpha_takes_the_best_scale_ties_to_the_smaller():
    model = ClipIta(HeadConfig("ita", DI, DT, 16, DT, residual=True))
    alpha, scores = choose_alpha(model, (1.0, 0.0, 0.5), lambda m: {0.0: 10, 0.5: 30, 1.0: 30}[m.residual_scale.item()])
    assert alpha == 0.5 and model.residual_scale.item() == 0.5 and scores == {"0.0": 10, "0.5": 30, "1.0": 30}
    alpha, _ = choose_alpha(model, (0.0, 1.0), lambda m: float("nan"))  # nothing to measure: as trained
    assert alpha == 1.0 and model.residual_scale.item() == 1.0


def test_each_ingredient_is_its_own_knob():
    """benchmarks/recipes.py's ablation: every ingredient of the residual recipe can be switched alone."""
    import pytest

    from clipita.config import ConfigError, load_config

    res, paper = load_config().train, load_config(None, {"train.recipe": "paper"}).train
    assert (res.select, paper.select) == ("retrieval", "loss") and (res.kg_weight, paper.kg_weight) == (5.0, 0.0)
    plain_residual = load_config(None, {"train.recipe": "residual", "train.tau": "1", "train.learnable_tau": "false",
                                        "train.label_mask": "false", "train.select": "loss",
                                        "train.alphas": "1.0", "train.kg_weight": "0"}).train
    assert (plain_residual.recipe, plain_residual.tau, plain_residual.learnable_tau, plain_residual.label_mask,
            plain_residual.select, plain_residual.alphas, plain_residual.kg_weight) == \
        ("residual", 1.0, False, False, "loss", (1.0,), 0.0)
    assert load_config(None, {"train.recipe": "paper", "train.select": "retrieval"}).train.select == "retrieval"
    with pytest.raises(ConfigError, match="train.select must be one of loss, retrieval, got 'auc'"):
        load_config(None, {"train.select": "auc"})
