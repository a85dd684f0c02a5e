"""The model registry: one entry per model, and the names on disk that older workdirs hold stay what they were."""
import numpy as np
import pytest

from clipita.features import Products
from clipita.models import BASELINES, DENSE, MODELS, REGISTRY, ROWS_GROUP, TRAINED_MODELS, VARIANTS, get
from clipita.rankers import Queries, load_ranker
from clipita.workdir import best_checkpoint


def test_registry_names_groups_and_checkpoints_as_the_workdirs_on_disk():
    assert MODELS == ("bm25", "mpnet", "clip", "clip-i", "clip-ia", "clip-ita")  # the paper's table, in order
    assert BASELINES == ("bm25", "mpnet", "clip") and TRAINED_MODELS == ("clip-i", "clip-ia", "clip-ita")
    assert VARIANTS == ("i", "ia", "ita") and ROWS_GROUP == "mpnet"
    assert [get(m).index_group("specific") for m in MODELS] == [
        None, "mpnet", "clip", "clip-i-specific", "clip-ia-specific", "clip-ita-specific"]
    assert DENSE == MODELS[1:]
    assert get("clip-ita").checkpoint("/w", "all") == best_checkpoint("/w", "ita", "all")
    assert best_checkpoint("/w", "ita", "all") == "/w/checkpoints/ita-all/best"
    with pytest.raises(ValueError, match="has no checkpoint"):
        get("mpnet").checkpoint("/w", "all")
    with pytest.raises(ValueError, match="unknown model 'clip-x': use one of bm25, mpnet"):
        get("clip-x")
    # the heads read what clipita.model feeds them, and only clip's queries come from the CLIP text tower
    from clipita.model import PRODUCT_FIELDS

    assert {m.variant: m.reads for m in REGISTRY.values() if m.trained} == PRODUCT_FIELDS
    assert [m for m in MODELS if get(m).reads_clip_text] == ["clip"]


def test_a_zero_shot_entry_ranks_by_its_fields_cosine():
    rng = np.random.default_rng(0)
    n, q = 30, 4
    title, image = rng.standard_normal((n, 8), np.float32), rng.standard_normal((n, 6), np.float32)
    products = Products(np.array([f"p{i}" for i in range(n)], object), np.array([""] * n, object),
                        np.array([""] * n, object), [["A"]] * n, image, title, np.zeros((n, 8), np.float32))
    queries = Queries(["a"] * q, rng.standard_normal((q, 8), np.float32), rng.standard_normal((q, 6), np.float32))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for name, field, side in (("mpnet", title, queries.text), ("clip", image, queries.clip)):
        ranker = load_ranker("", name)
        assert ranker.model is REGISTRY[name]
        np.testing.assert_allclose(ranker.scores(queries, products), unit(side) @ unit(field).T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ranker.query_input(queries), unit(side), rtol=1e-5)
    assert load_ranker("", "bm25").query_input(queries) == ["a"] * q  # a sparse model ranks from the words
    with pytest.raises(ValueError, match="needs the clip embeddings"):
        load_ranker("", "clip").query_vectors(Queries(["a"], queries.text[:1], None))
