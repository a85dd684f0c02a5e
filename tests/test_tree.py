import numpy as np

from clipita.tree import CategoryTree, assign_labels, category_id, label, query_text, split_of

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
    paths = [[r, m, leaf] for r in "ABCD" for m in ("x", "y", "z") for leaf in ("1", "2", "3")]
    ids = [f"p{i}" for i in range(2000)]
    prods = [paths[i % len(paths)] for i in range(2000)]
    labs = assign_labels(ids, prods, seed=0, unseen_fraction=0.1)
    for setting in ("all", "general", "specific"):
        assert labs.unseen(setting), setting
    # a held-out root takes its whole subtree out of training
    general = labs.by_setting["general"]
    held_roots = [r for r in "ABCD" if r in labs.unseen("general")]
    assert held_roots and all(set(labs.split[general == r]) == {"test"} for r in held_roots)
    assert assign_labels(ids, prods, seed=0).unseen("general") == set()  # off by default
