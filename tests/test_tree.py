import numpy as np

from clipita.tree import (CategoryTree, Labeler, assign_labels, category_id, held_share, holdout_sets, label,
                          query_text, split_of)

PATHS = [["Women", "Shoes", "Boots"], ["Men", "Shoes", "Boots"], ["Men", "Tops"], ["Women", "Shoes"]]


def test_tree_structure_and_identity_by_full_path():
    tree = CategoryTree(PATHS)
    assert sorted(tree.roots) == ["Men", "Women"]
    assert sorted(tree.leaves) == ["Men > Shoes > Boots", "Men > Tops", "Women > Shoes > Boots"]
    assert tree.depth("Women > Shoes > Boots") == 3
    assert tree.parent("Women > Shoes") == "Women"
    assert tree.children("Men") == ["Men > Shoes", "Men > Tops"]
    assert tree.ancestors("Men > Shoes > Boots") == ["Men", "Men > Shoes", "Men > Shoes > Boots"]
    assert tree.nodes["Women > Shoes"].products == 2
    # the same name under two parents: two categories, found by name, one by path
    assert sorted(tree.find("boots")) == ["Men > Shoes > Boots", "Women > Shoes > Boots"]
    assert tree.find("Men>Shoes >Boots") == ["Men > Shoes > Boots"]
    assert tree.summary() == {"categories": 7, "roots": 2, "leaves": 3, "max_depth": 3}


def test_labels_per_setting():
    path = ["Women", "Shoes", "Boots"]
    assert label(path, "general", "p1") == "Women"
    assert label(path, "specific", "p1") == "Women > Shoes > Boots"
    picked = {label(path, "all", f"p{i}", seed=0) for i in range(200)}
    assert picked == {"Women", "Women > Shoes", "Women > Shoes > Boots"}  # every depth is used
    assert label(path, "all", "p7", seed=3) == label(path, "all", "p7", seed=3)  # stable
    assert query_text("Women > Shoes > Boots") == "Boots"
    assert query_text("Women > Shoes > Boots", "path") == "Women > Shoes > Boots"
    assert category_id(path) == "Women > Shoes > Boots"


def test_split_is_seeded_stable_and_close_to_fractions():
    ids = [f"id{i}" for i in range(20000)]
    s = np.array([split_of(p, seed=1) for p in ids])
    frac = {k: float(np.mean(s == k)) for k in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.02 and abs(frac["test"] - 0.1) < 0.01
    assert [split_of(p, seed=1) for p in ids[:100]] == list(s[:100])  # independent of order and batch
    assert [split_of(p, seed=2) for p in ids[:100]] != list(s[:100])
    s2 = np.array([split_of(p, seed=1, val_fraction=0.0, test_fraction=0.5) for p in ids])
    assert set(s2) == {"train", "test"}


def test_assign_labels_and_unseen():
    ids = [f"p{i}" for i in range(400)]
    paths = [PATHS[i % 3] if i < 390 else ["Garden", "Tools"] for i in range(400)]
    labs = assign_labels(ids, paths, seed=0)
    assert len(labs.by_setting["specific"]) == 400
    general = labs.by_setting["general"]
    garden_splits = set(labs.split[general == "Garden"])
    unseen = labs.unseen("general")
    assert ("Garden" in unseen) == ("train" not in garden_splits and "test" in garden_splits)
    assert "Men" not in unseen


def test_held_out_categories_are_unseen_in_every_setting():
    paths = [[r, m, leaf] for r in "ABCDEFGH" for m in ("x", "y", "z") for leaf in ("1", "2", "3")]
    ids = [f"p{i}" for i in range(2000)]
    prods = [paths[i % len(paths)] for i in range(2000)]
    labs = assign_labels(ids, prods, seed=0, unseen_fraction=0.1)
    for setting in ("all", "general", "specific"):
        assert labs.unseen(setting), setting
    # a held-out root takes its whole subtree out of training
    general = labs.by_setting["general"]
    held_roots = [r for r in "ABCDEFGH" if r in labs.unseen("general")]
    assert held_roots and all(set(labs.split[general == r]) == {"test"} for r in held_roots)
    assert assign_labels(ids, prods, seed=0).unseen("general") == set()  # off by default


def four_level_paths(seed: int = 0) -> list[list[str]]:
    """Products on a 4-level tree (10 roots x 4 x 3 x 4 leaves), Zipf-like leaf sizes: a few large, many small."""
    rng = np.random.default_rng(seed)
    leaves = [[f"R{a}", f"M{b}", f"S{c}", f"L{d}"] for a in range(10) for b in range(4) for c in range(3)
              for d in range(4)]
    sizes = rng.zipf(1.8, len(leaves)).clip(max=300)
    return [leaf for leaf, n in zip(leaves, sizes) for _ in range(n)]


def test_unseen_fraction_is_the_share_of_products_spread_over_depths():
    for tree_seed in range(3):
        paths = four_level_paths(tree_seed)
        tree = CategoryTree(paths)
        for seed in range(3):
            held, held_val = holdout_sets(tree, (0.1, 0.05), seed)
            # close to the configured share of products (the old per-depth rule held out ~40% at 0.1)
            assert abs(held_share(tree, held) - 0.1) <= 0.03, (tree_seed, seed, held_share(tree, held))
            assert abs(held_share(tree, held_val) - 0.05) <= 0.03, (tree_seed, seed, held_share(tree, held_val))
            # every depth has held-out categories: general (roots), specific (leaves) and all have unseen ones
            assert {tree.depth(c) for c in held} == {1, 2, 3, 4}
            # whole subtrees: no held node (of either set) under another one
            both = held | held_val
            assert not held & held_val
            assert all(not (set(tree.ancestors(c)[:-1]) & both) for c in both)
            # the share the tree counts is the share of products the split sends away
            labs = Labeler(seed=seed, held=frozenset(held), held_val=frozenset(held_val))
            under = np.mean([any(category_id(p[:d]) in held for d in range(1, 5)) for p in paths])
            assert abs(under - held_share(tree, held)) < 1e-12
            split = labs(range(len(paths)), paths).split
            assert np.mean(split == "test") >= under
        assert holdout_sets(tree, (0.1, 0.05), 0) == holdout_sets(tree, (0.1, 0.05), 0)  # seeded, stable
        assert holdout_sets(tree, (0.1, 0.05), 0) != holdout_sets(tree, (0.1, 0.05), 1)


def test_held_val_categories_go_to_val_and_stay_out_of_test_and_train():
    paths = four_level_paths(1)
    ids = [f"p{i}" for i in range(len(paths))]
    tree = CategoryTree(paths)
    labeler = Labeler.build(tree, 3, 0.1, 0.1, 0.1)  # the positional call features.labeler_for makes
    assert labeler.held_val and not labeler.held & labeler.held_val
    assert labeler == Labeler.build(tree, 3, 0.1, 0.1, 0.1, unseen_val_fraction=0.05)  # default: half
    assert not Labeler.build(tree, 3, 0.1, 0.1, 0.1, unseen_val_fraction=0.0).held_val
    labs = labeler(ids, paths)
    under_val = np.array([any(category_id(p[:d]) in labeler.held_val for d in range(1, len(p) + 1)) for p in paths])
    assert under_val.any() and set(labs.split[under_val]) == {"val"}
    for setting in ("all", "general", "specific"):
        lab = labs.by_setting[setting]
        val_only = set(lab[labs.split == "val"]) - set(lab[labs.split == "train"]) - set(lab[labs.split == "test"])
        assert val_only, setting  # held-out validation categories: unseen by training, absent from the test split
    assert labs.unseen("specific")  # and the test split still has its own
    assert assign_labels(ids, paths, 3, unseen_fraction=0.1).split.tolist() == labs.split.tolist()
