"""The six models behind one interface, on features of a synthetic catalogue (issue: encoders, model, baselines)."""
import numpy as np
import pytest
import torch

from clipita.features import labels_for, load_categories, load_products
from clipita.loss import ContrastiveLoss
from clipita.metrics import count_relevant, hits_from_ranking, rank_scores, retrieval_metrics
from clipita.model import ClipIta, HeadConfig, evaluate_loss, make_optimizer, train_step
from clipita.models import BASELINES, get
from clipita.rankers import BM25Ranker, HeadRanker, Queries, load_ranker, tokenize



@pytest.fixture(scope="module")
def data(embedded_workdir, demo_config):
    products, categories = load_products(embedded_workdir), load_categories(embedded_workdir)
    return products, categories, labels_for(products, demo_config.data)


def evaluate(ranker, products, categories, labels, setting="specific"):
    test = labels.split == "test"
    cand, cand_labels = products.subset(test), labels.by_setting[setting][test]
    query_ids = np.array(sorted(set(cand_labels)), dtype=object)
    ranked, scores = ranker.rank(Queries.from_categories(categories, query_ids), cand, 50)
    assert ranked.shape == scores.shape == (len(query_ids), min(50, len(cand)))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    hits = hits_from_ranking(ranked, cand_labels, query_ids)
    return retrieval_metrics(hits, count_relevant(cand_labels, query_ids))


def random_p10(products, labels, setting="specific", trials=20):
    rng = np.random.default_rng(0)
    test = labels.split == "test"
    cand_labels = labels.by_setting[setting][test]
    query_ids = np.array(sorted(set(cand_labels)), dtype=object)
    n_rel = count_relevant(cand_labels, query_ids)
    return np.mean([retrieval_metrics(hits_from_ranking(
        np.stack([rng.permutation(len(cand_labels))[:50] for _ in query_ids]), cand_labels, query_ids),
        n_rel)["P@10"] for _ in range(trials)])


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_runs_through_the_interface(data, name):
    products, categories, labels = data
    m = evaluate(load_ranker("", name), products, categories, labels)
    assert set(m) >= {"P@1", "P@5", "P@10", "mAP@5", "mAP@10", "R-prec", "mAP@10_std"}
    assert all(0 <= m[k] <= 100 for k in ("P@1", "P@10", "mAP@10", "R-prec"))
    if name in ("bm25", "mpnet"):  # titles carry category words: the text baselines beat chance clearly
        assert m["P@10"] > 2 * random_p10(products, labels)


def test_bm25_tokenisation_and_empty_titles():
    assert tokenize("Women's Boots, size 38 — Über") == ["women", "s", "boots", "size", "38", "über"]


def test_bm25_ranks_through_the_inverted_index_as_rank_bm25_scores(data):
    products, categories, _ = data
    queries = Queries.from_categories(categories, categories.ids[:40])
    ranker = BM25Ranker(get("bm25"))
    rows, scores = ranker.rank(queries, products, 25)
    dense = ranker.scores(queries, products)  # rank_bm25: every title scored
    assert np.array_equal(rows, rank_scores(dense, 25))
    assert np.array_equal(scores, np.take_along_axis(dense, rows, 1))


def test_trained_clip_ita_lowers_the_loss_and_beats_random(data):
    products, categories, labels = data
    mask = labels.split == "train"
    lab = labels.by_setting["specific"][mask]
    train = {"image": products.image[mask], "title": products.title[mask], "attributes": products.attributes[mask],
             "category": categories.text["name"][categories.index(lab)],
             "label": np.unique(lab, return_inverse=True)[1].astype(np.int64)}
    torch.manual_seed(0)
    model = ClipIta(HeadConfig("ita", image_dim=products.image.shape[1], text_dim=products.title.shape[1],
                               hidden_dim=256, output_dim=128, tau=0.1))
    loss_fn, opt = ContrastiveLoss(label_mask=True), make_optimizer(model, 1e-3, 0.01)
    batches = [{k: torch.from_numpy(v[s:s + 64]) for k, v in train.items()}
               for s in range(0, len(train["label"]) - 63, 64)]
    before = evaluate_loss(model, loss_fn, batches)
    for _ in range(15):
        for b in batches:
            train_step(model, loss_fn, opt, b)
    after = evaluate_loss(model, loss_fn, batches)
    assert after < before - 0.3
    m = evaluate(HeadRanker(model), products, categories, labels)
    assert m["P@10"] > 2 * random_p10(products, labels)
