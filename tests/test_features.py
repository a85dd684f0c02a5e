"""Labels where the rows are: the per-block Labeler and the census of Ray tasks against the whole-catalogue
reference (every product in one process)."""
from collections import Counter

import numpy as np
import pytest

from clipita.features import census, labeler_for, labels_for, load_products, load_tree
from clipita.tree import SETTINGS, CategoryTree, Labeler, assign_labels, category_id


def test_a_labeler_per_row_equals_labels_of_the_whole_list():
    rng = np.random.default_rng(0)
    paths = [[f"R{rng.integers(3)}", f"C{rng.integers(4)}", f"L{rng.integers(5)}"][: 1 + rng.integers(3)]
             for _ in range(400)]
    ids = [f"p{i}" for i in range(400)]
    whole = assign_labels(ids, paths, seed=3, unseen_fraction=0.2)
    labeler = Labeler.build(CategoryTree(paths), seed=3, unseen_fraction=0.2)
    assert labeler.held  # some categories are held out
    for i in range(0, 400, 37):  # any row alone, as a Ray task over one block sees it
        assert labeler.split(ids[i], paths[i]) == whole.split[i]
        assert all(labeler.label(ids[i], paths[i], s) == whole.by_setting[s][i] for s in SETTINGS)


@pytest.mark.slow  # the embedded workdir fixture starts Ray
def test_the_tree_from_categories_parquet_holds_out_what_the_paths_would(embedded_workdir, demo_config):
    products = load_products(embedded_workdir)
    from_paths = Labeler.build(CategoryTree(products.paths), demo_config.data.seed,
                               unseen_fraction=demo_config.data.unseen_fraction)
    assert labeler_for(embedded_workdir, demo_config.data).held == from_paths.held
    tree = load_tree(embedded_workdir)
    assert {c: n.products for c, n in tree.nodes.items()} == {
        c: n.products for c, n in CategoryTree(products.paths).nodes.items()}


@pytest.mark.slow
def test_census_of_ray_tasks_equals_counting_in_one_process(ray_session, embedded_workdir, demo_config):
    products = load_products(embedded_workdir)
    labels = labels_for(products, demo_config.data)
    counts = census(embedded_workdir, labeler_for(embedded_workdir, demo_config.data))
    for split in ("train", "val", "test"):
        mask = labels.split == split
        for s in SETTINGS:
            assert counts.labels[(s, split)] == dict(Counter(labels.by_setting[s][mask].tolist())), (s, split)
        nodes = Counter(category_id(p[:d]) for p, m in zip(products.paths, mask) if m for d in range(1, len(p) + 1))
        assert counts.nodes[split] == dict(nodes)
    assert counts.split_size("test") == int((labels.split == "test").sum())
