"""ClipIta heads, the training step and checkpoints (local folder and a loopback S3 bucket)."""
from __future__ import annotations

import math

import pytest
import torch

from clipita import storage
from clipita.checkpoint import CheckpointError, load_metadata, load_model, load_optimizer, save_checkpoint
from clipita.config import ConfigError
from clipita.loss import ContrastiveLoss
from clipita.model import MAX_LOGIT_SCALE, ClipIta, HeadConfig, evaluate_loss, make_optimizer, train_step

DI, DT = 12, 10  # small image / text feature widths


def small(variant: str = "ita", **kw) -> HeadConfig:
    return HeadConfig(variant=variant, image_dim=DI, text_dim=DT, hidden_dim=32, output_dim=16, **kw)


def random_batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, DI, generator=g), "title": torch.randn(n, DT, generator=g),
            "attributes": torch.randn(n, DT, generator=g), "category": torch.randn(n, DT, generator=g),
            "label": torch.randint(0, 4, (n,), generator=g)}


@pytest.mark.parametrize("variant,uses", [("i", {"image"}), ("ia", {"image", "attributes"}),
                                          ("ita", {"image", "title", "attributes"})])
def test_shapes_norms_and_inputs_per_variant(variant, uses):
    torch.manual_seed(0)
    model = ClipIta(small(variant)).eval()
    assert model.product_head.net[0].in_features == DI + (len(uses) - 1) * DT
    batch = random_batch()
    p, c = model(batch)
    assert p.shape == c.shape == (8, 16)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(c.norm(dim=1), torch.ones(8))
    for field in ("image", "title", "attributes"):
        changed = dict(batch, **{field: batch[field] + 1.0})
        assert (not torch.equal(model.encode_products(changed), p)) == (field in uses), field
    assert torch.equal(model(dict(batch, image=batch["image"] + 1))[1], c)  # the category tower reads no product


@pytest.mark.parametrize("learnable", [False, True])
def test_only_heads_and_learnable_tau_train(learnable):
    torch.manual_seed(0)
    model = ClipIta(small(tau=0.5, learnable_tau=learnable))
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    heads = {k for k in dict(model.named_parameters()) if k.startswith(("category_head.", "product_head."))}
    assert trainable == heads | ({"logit_scale"} if learnable else set())
    assert model.logit_scale.item() == pytest.approx(math.log(2))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    train_step(model, ContrastiveLoss(), make_optimizer(model, 1e-2, 0.1), random_batch())
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved == trainable


def test_optimizer_decays_only_weight_matrices():
    model = ClipIta(small(learnable_tau=True))
    decay, no_decay = make_optimizer(model, 1e-3, 0.2).param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(v): k for k, v in model.named_parameters()}
    assert {names[id(v)] for v in decay["params"]} == {
        f"{head}.net.{i}.weight" for head in ("category_head", "product_head") for i in (0, 4, 8)}
    assert "logit_scale" in {names[id(v)] for v in no_decay["params"]}


def test_logit_scale_is_clamped_to_log_100():
    model = ClipIta(small(learnable_tau=True))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    train_step(model, ContrastiveLoss(), make_optimizer(model, 1e-3, 0.0), random_batch())
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_bf16_autocast_step_matches_fp32_loss():
    torch.manual_seed(0)
    model = ClipIta(small())
    batch = random_batch()
    fp32 = evaluate_loss(model, ContrastiveLoss(), [batch])
    bf16 = train_step(model, ContrastiveLoss(), make_optimizer(model, 1e-3, 0.0), batch,
                      autocast_dtype=torch.bfloat16)
    assert bf16 == pytest.approx(fp32, abs=2e-2)


def test_evaluate_loss_is_deterministic_and_keeps_the_mode():
    torch.manual_seed(0)
    model = ClipIta(small(dropout=0.5)).train()
    batches = [random_batch(8, seed=1), random_batch(4, seed=2)]
    loss_fn = ContrastiveLoss()
    got = evaluate_loss(model, loss_fn, batches)
    assert model.training
    model.eval()
    with torch.no_grad():  # per-row mean: the batch of 8 weighs twice the batch of 4
        want = sum(loss_fn(*model(b), model.logit_scale).item() * len(b["label"]) for b in batches) / 12
    assert got == pytest.approx(want, rel=1e-6)


def test_bad_config_and_features_fail_in_one_line():
    for kw, msg in [(dict(variant="itx"), "head.variant must be one of i, ia, ita"),
                    (dict(hidden_dim=0), "head.hidden_dim must be a positive integer"),
                    (dict(tau=0.001), "head.tau must be at least 0.01"),
                    (dict(dropout=1.0), "head.dropout must be in")]:
        with pytest.raises(ConfigError, match=msg) as e:
            HeadConfig(**kw)
        assert "\n" not in str(e.value)
    model = ClipIta(small())
    with pytest.raises(ValueError, match=r"title features have shape \(8, 3\), the model expects \(batch, 10\)"):
        model(dict(random_batch(), title=torch.zeros(8, 3)))
    with pytest.raises(ValueError, match="batch has no 'attributes' features"):
        model.encode_products({"image": torch.zeros(2, DI), "title": torch.zeros(2, DT)})


def test_learns_a_synthetic_category_problem():
    """Products are noisy linear images of their category's text embedding (a different map per field): the
    heads must learn to undo the maps. Retrieval of the right category among 16 goes from chance to near 1."""
    g = torch.Generator().manual_seed(0)
    k, n_train, n_test = 16, 1024, 256
    categories = torch.randn(k, DT, generator=g)
    maps = {"image": torch.randn(DT, DI, generator=g), "title": torch.randn(DT, DT, generator=g),
            "attributes": torch.randn(DT, DT, generator=g)}

    def products(n: int) -> dict[str, torch.Tensor]:
        label = torch.randint(0, k, (n,), generator=g)
        batch = {f: categories[label] @ m + 0.5 * torch.randn(n, m.shape[1], generator=g) for f, m in maps.items()}
        return dict(batch, category=categories[label], label=label)

    train, test = products(n_train), products(n_test)
    torch.manual_seed(0)
    model = ClipIta(small())
    loss_fn = ContrastiveLoss(label_mask=True)
    optimizer = make_optimizer(model, 3e-3, 0.01)

    def top1() -> float:
        with torch.no_grad():
            scores = model.encode_products(test) @ model.encode_categories(categories).T
        return (scores.argmax(1) == test["label"]).float().mean().item()

    loss_before, acc_before = evaluate_loss(model, loss_fn, [test]), top1()
    for _ in range(300):
        rows = torch.randint(0, n_train, (64,), generator=g)
        train_step(model, loss_fn, optimizer, {f: v[rows] for f, v in train.items()})
    loss_after, acc_after = evaluate_loss(model, loss_fn, [test]), top1()
    assert acc_before < 0.3 and acc_after > 0.9, (acc_before, acc_after)  # chance: 1/16
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)


def _trained(steps: int = 3):
    torch.manual_seed(0)
    model = ClipIta(small("ia", learnable_tau=True, tau=0.1))
    optimizer = make_optimizer(model, 1e-2, 0.1)
    for s in range(steps):
        train_step(model, ContrastiveLoss(), optimizer, random_batch(seed=s))
    return model, optimizer


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_round_trip(where, tmp_path, request):
    uri = str(tmp_path / "ckpt") if where == "local" else request.getfixturevalue("s3_bucket") + "/runs/ckpt"
    model, optimizer = _trained()
    save_checkpoint(uri, model, optimizer, metadata={"epoch": 3, "val_loss": 1.25})

    loaded = load_model(uri)
    assert loaded.config == model.config and load_metadata(uri) == {"epoch": 3, "val_loss": 1.25}
    batch = random_batch(seed=9)
    model.eval()
    for a, b in zip(model(batch), loaded(batch)):
        assert torch.equal(a, b)
    loaded_opt = make_optimizer(loaded, 1e-2, 0.1)
    load_optimizer(uri, loaded_opt)
    want, got = optimizer.state_dict(), loaded_opt.state_dict()
    assert want["param_groups"] == got["param_groups"] and want["state"].keys() == got["state"].keys()
    for i, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][i][key], value), (i, key)
    # The resumed run continues exactly where the original would have gone.
    for m, o in ((model, optimizer), (loaded, loaded_opt)):
        train_step(m, ContrastiveLoss(), o, random_batch(seed=10))
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_save_that_dies_midway_leaves_no_checkpoint_to_resume(where, tmp_path, request):
    """Overwriting last/: a writer killed after the weights and before config.json must not leave the old
    config.json beside the new weights and a truncated optimizer (a resume would load them, then fail forever)."""
    uri = str(tmp_path / "last") if where == "local" else request.getfixturevalue("s3_bucket") + "/runs/last"
    model, optimizer = _trained()
    save_checkpoint(uri, model, optimizer, metadata={"epoch": 1})
    assert load_metadata(uri) == {"epoch": 1}

    class DiesWhileSaving(torch.optim.AdamW):
        def state_dict(self):
            raise RuntimeError("killed while writing optimizer.pt")

    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(uri, model, DiesWhileSaving(model.parameters()), metadata={"epoch": 2})
    assert not storage.exists(f"{uri}/config.json")  # what training's resume checks
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(uri)
    save_checkpoint(uri, model, optimizer, metadata={"epoch": 2})  # the next save completes the folder again
    assert load_metadata(uri) == {"epoch": 2}


def test_broken_checkpoints_fail_in_one_line(tmp_path):
    model, optimizer = _trained(1)
    good = str(tmp_path / "good")
    save_checkpoint(good, model, optimizer)

    def broken(name: str, edit) -> str:
        uri = str(tmp_path / name)
        for f in ("model.safetensors", "optimizer.pt", "config.json"):
            storage.write_bytes(f"{uri}/{f}", storage.read_bytes(f"{good}/{f}"))
        edit(uri)
        return uri

    other_variant = broken("variant", lambda u: storage.write_json(
        f"{u}/config.json", {"head": dict(storage.read_json(f"{u}/config.json")["head"], variant="ita")}))
    cases = [
        (lambda: load_model(str(tmp_path / "missing")), "no checkpoint at .*config.json not found"),
        (lambda: load_model(broken("garbage", lambda u: storage.write_bytes(f"{u}/model.safetensors", b"\x00" * 64))),
         "model.safetensors is corrupt"),
        (lambda: load_model(broken("truncated", lambda u: storage.write_bytes(
            f"{u}/model.safetensors", storage.read_bytes(f"{u}/model.safetensors")[:-100]))),
         "model.safetensors is corrupt"),
        (lambda: load_model(other_variant), "model.safetensors does not match config.json"),
        (lambda: load_model(broken("json", lambda u: storage.write_bytes(f"{u}/config.json", b"{not json"))),
         "config.json is not valid JSON"),
        (lambda: load_model(broken("field", lambda u: storage.write_json(
            f"{u}/config.json", {"head": {"variant": "ita", "widths": 3}}))), "unknown key head.widths"),
        (lambda: load_optimizer(good, make_optimizer(ClipIta(small("ia")), 1e-2, 0.1)),  # tau fixed: 1 group short
         "optimizer.pt cannot be loaded"),
        (lambda: load_optimizer(broken("opt", lambda u: storage.write_bytes(f"{u}/optimizer.pt", b"junk")),
                                optimizer), "optimizer.pt cannot be loaded"),
    ]
    for call, msg in cases:
        with pytest.raises(CheckpointError, match=msg) as e:
            call()
        assert "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Residual heads (train.recipe=residual, issue 12) and the paper recipe's model.

def residual(variant: str = "ita", **kw) -> HeadConfig:
    return HeadConfig(variant=variant, image_dim=DI, text_dim=DT, hidden_dim=32, output_dim=DT, residual=True, **kw)


def features(n: int, seed: int):
    """Products (random frozen features) and category queries as the rankers take them."""
    import numpy as np

    from clipita.features import Products
    from clipita.rankers import Queries

    rng = np.random.default_rng(seed)
    vec = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    products = Products(ids=np.array([f"p{i}" for i in range(n)], dtype=object), titles=np.array([""] * n),
                        images=np.array([""] * n), paths=[["A"]] * n, image=vec(n, DI), title=vec(n, DT),
                        attributes=vec(n, DT))
    return products, Queries([f"q{i}" for i in range(7)], text=vec(7, DT))


def test_an_untrained_residual_model_is_the_mpnet_zero_shot_ranker():
    import numpy as np

    from clipita.rankers import HeadRanker, load_ranker

    products, queries = features(50, 0)
    torch.manual_seed(0)
    ranker, mpnet = HeadRanker(ClipIta(residual("ita"))), load_ranker("", "mpnet")
    np.testing.assert_allclose(ranker.scores(queries, products), mpnet.scores(queries, products), atol=1e-6)
    assert np.array_equal(ranker.rank(queries, products, 50)[0], mpnet.rank(queries, products, 50)[0])
    # CLIP-IA passes its attributes vector through (it has no title)
    ia = ClipIta(residual("ia")).eval()
    with torch.no_grad():
        p = ia.encode_products({k: torch.from_numpy(v) for k, v in products.tensors().items()})
    np.testing.assert_allclose(p.numpy(), products.attributes / np.linalg.norm(products.attributes, axis=1,
                                                                                 keepdims=True), atol=1e-6)


def test_residual_heads_train_and_alpha_zero_is_zero_shot_again(tmp_path):
    import numpy as np

    from clipita.rankers import HeadRanker, load_ranker

    torch.manual_seed(0)
    model = ClipIta(residual(learnable_tau=True, tau=0.07))
    assert model.category_head.net[-1].weight.abs().sum() == 0  # the zero-initialised last Linear
    assert "residual_scale" in model.state_dict() and "residual_scale" not in dict(model.named_parameters())
    optimizer = make_optimizer(model, 1e-2, 0.01)
    for s in range(3):
        train_step(model, ContrastiveLoss(label_mask=True), optimizer, random_batch(seed=s))
    products, queries = features(50, 1)
    mpnet = load_ranker("", "mpnet").scores(queries, products)
    assert not np.allclose(HeadRanker(model).scores(queries, products), mpnet, atol=1e-3)  # it learnt something
    model.set_residual_scale(0.5)
    save_checkpoint(str(tmp_path / "best"), model, None, {"alpha": 0.5})
    loaded = load_model(str(tmp_path / "best"))  # the scale travels with the weights
    assert loaded.config.residual and loaded.residual_scale.item() == 0.5
    batch = random_batch(seed=5)
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(model(batch), loaded(batch)))
    loaded.set_residual_scale(0.0)  # WiSE-FT's α = 0: the zero-shot model
    np.testing.assert_allclose(HeadRanker(loaded).scores(queries, products), mpnet, atol=1e-6)
    with pytest.raises(ValueError, match="plain heads"):
        ClipIta(small()).set_residual_scale(0.5)


def test_residual_config_errors_are_one_line():
    for kw, msg in [(dict(variant="i"), "head.residual needs a text input to pass through: variant 'i' has none"),
                    (dict(output_dim=16), r"head.output_dim must equal head.text_dim \(10\) for residual heads"),
                    (dict(residual=False, lock_category=True), r"head.lock_category needs residual heads")]:
        with pytest.raises(ConfigError, match=msg) as e:
            HeadConfig(**{**dict(image_dim=DI, text_dim=DT, output_dim=DT, residual=True), **kw})
        assert "\n" not in str(e.value)


class _TodaysHead(torch.nn.Module):
    """A frozen copy of the plain MLPHead as it was before the residual recipe (the reference for recipe=paper)."""

    def __init__(self, in_dim, hidden, out, dropout=0.0):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out))


class _TodaysModel(torch.nn.Module):
    def __init__(self, c: HeadConfig):
        super().__init__()
        self.category_head = _TodaysHead(c.text_dim, c.hidden_dim, c.output_dim, c.dropout)
        self.product_head = _TodaysHead(c.product_dim, c.hidden_dim, c.output_dim, c.dropout)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / c.tau)), requires_grad=c.learnable_tau)


@pytest.mark.parametrize("variant", ["i", "ia", "ita"])
def test_recipe_paper_builds_todays_model(variant, tmp_path):
    from clipita.config import load_config
    from clipita.stages.train import head_config

    tc = load_config(None, {"train.recipe": "paper", "train.hidden_dim": 32, "train.output_dim": 16}).train
    head = head_config(tc, variant, DI, DT)
    assert head == HeadConfig(variant=variant, image_dim=DI, text_dim=DT, hidden_dim=32, output_dim=16, tau=1.0)
    torch.manual_seed(3)
    model = ClipIta(head)
    torch.manual_seed(3)
    want = _TodaysModel(head).state_dict()
    got = model.state_dict()
    assert list(got) == list(want)  # same names, same order
    assert all(torch.equal(got[k], want[k]) for k in want)  # same shapes, same init under the same seed
    assert not model.logit_scale.requires_grad and model.logit_scale.item() == 0.0  # τ = 1, fixed
    save_checkpoint(str(tmp_path / "c"), model)  # and the checkpoint's config.json is as it was
    assert set(storage.read_json(str(tmp_path / "c" / "config.json"))["head"]) == {
        "variant", "image_dim", "text_dim", "hidden_dim", "output_dim", "dropout", "tau", "learnable_tau"}
    # the residual recipe: residual heads in the text space for ia/ita (same hidden init), plain CLIP-I
    res = head_config(load_config(None, {"train.hidden_dim": 32, "train.output_dim": 16}).train, variant, DI, DT)
    assert res.residual == (variant != "i") and res.output_dim == (16 if variant == "i" else DT)
    assert res.tau == 0.07 and res.learnable_tau
    if res.residual:  # the first layers draw what a plain head would (the zeroed last one is drawn, then zeroed)
        torch.manual_seed(3)
        r = ClipIta(res).state_dict()
        assert torch.equal(r["category_head.net.0.weight"], got["category_head.net.0.weight"])


def test_kgcoop_regulariser_keeps_categories_near_the_zero_shot_vectors():
    from clipita.model import knowledge_distance

    batch = random_batch(16)
    untrained = ClipIta(residual())
    _, c = untrained(batch)
    assert knowledge_distance(c, batch["category"]).item() == pytest.approx(0.0, abs=1e-6)  # starts at zero-shot
    moved = {}
    for w in (0.0, 10.0):
        torch.manual_seed(0)
        model = ClipIta(residual())
        opt = make_optimizer(model, 1e-2, 0.0)
        for _ in range(20):
            train_step(model, ContrastiveLoss(), opt, batch, kg_weight=w)
        moved[w] = knowledge_distance(model(batch)[1], batch["category"]).item()
    assert moved[10.0] < moved[0.0] / 2  # the weight pulls the trained category vectors back
    torch.manual_seed(0)
    plain = ClipIta(small())
    with pytest.raises(ValueError, match="needs residual heads"):
        train_step(plain, ContrastiveLoss(), make_optimizer(plain, 1e-3, 0.0), batch, kg_weight=1.0)


def test_a_locked_category_tower_keeps_the_frozen_category_vectors(tmp_path):
    """train.lock_category (LiT): only the product tower trains; a category is its frozen text vector, unit norm."""
    batch = random_batch(16)
    torch.manual_seed(0)
    model = ClipIta(residual(lock_category=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, 1e-2, 0.01)
    for _ in range(5):
        train_step(model, ContrastiveLoss(), opt, batch, kg_weight=1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("category_head."))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("product_head."))
    model.eval()
    _, c = model(batch)
    torch.testing.assert_close(c, torch.nn.functional.normalize(batch["category"], dim=-1))
    save_checkpoint(str(tmp_path / "best"), model, None, {})
    loaded = load_model(str(tmp_path / "best"))  # resumed runs stay locked
    assert loaded.config.lock_category and not any(p.requires_grad for p in loaded.category_head.parameters())
