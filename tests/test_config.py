import pytest

from clipita.config import ConfigError, load_config


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("encoders:\n  text_model: /models/mpnet\ndata:\n  seed: 3\n")
    cfg = load_config(str(f), {"data.test_fraction": "0.2"})
    assert cfg.encoders.text_model == "/models/mpnet"
    assert cfg.data.seed == 3 and cfg.data.test_fraction == 0.2
    assert load_config().encoders.image_model == "ViT-B-32"


@pytest.mark.parametrize("text,match", [
    ("encoders:\n  nope: 1\n", "unknown key encoders.nope"),
    ("nosection:\n  a: 1\n", "unknown config section 'nosection'"),
    ("data:\n  seed: abc\n", "data.seed must be an integer"),
    ("data:\n  val_fraction: 0.6\n  test_fraction: 0.5\n", "must be below 1"),
    ("encoders:\n  precision: fp8\n", "encoders.precision must be one of"),
    ("[1, 2]\n", "must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_is_one_line(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(str(f))
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")


def test_train_recipes_and_their_defaults():
    res, paper = load_config().train, load_config(None, {"train.recipe": "paper"}).train
    assert res.recipe == "residual" and (res.tau, res.learnable_tau, res.label_mask) == (0.07, True, False)
    assert (paper.tau, paper.learnable_tau, paper.label_mask) == (1.0, False, False)  # PAPER.md
    # explicit values win over the recipe's, from YAML or the command line (strings)
    over = load_config(None, {"train.recipe": "paper", "train.tau": "0.1", "train.label_mask": "true",
                              "train.alphas": "0,0.5"}).train
    assert (over.tau, over.learnable_tau, over.label_mask, over.alphas) == (0.1, False, True, (0.0, 0.5))
    import dataclasses

    from clipita.config import TrainConfig

    assert TrainConfig(**dataclasses.asdict(over)) == over  # what train_loop rebuilds on the workers


def test_unseen_val_fraction_defaults_to_half_of_unseen_fraction():
    assert load_config(None, {"data.unseen_fraction": 0.1}).data.val_holdout_fraction == 0.05
    off = load_config(None, {"data.unseen_fraction": 0.1, "data.unseen_val_fraction": 0})
    assert off.data.val_holdout_fraction == 0
    assert load_config().data.val_holdout_fraction == 0  # the paper: no held-out categories at all


@pytest.mark.parametrize("overrides,match", [
    ({"train.recipe": "wise"}, "train.recipe must be one of paper, residual, got 'wise'"),
    ({"train.tau": "abc"}, "train.tau must be a number"),
    ({"train.learnable_tau": "maybe"}, "train.learnable_tau has the wrong type"),
    ({"train.alphas": "0,-1"}, r"train.alphas must be in \[0.0, 10.0\]"),
    ({"data.unseen_val_fraction": 0.7}, "data.unseen_val_fraction .* must be in"),
    ({"data.unseen_fraction": 0.5, "data.unseen_val_fraction": 0.4}, "must be at most 0.75"),
])
def test_bad_recipe_and_holdout_values_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_image_batch_follows_the_device_unless_set():
    assert load_config().embed.image_batch == 8  # CPU encoders: small convnet forwards (benchmarks/history/image-tower.md)
    assert load_config(None, {"embed.batch_size": 4}).embed.image_batch == 4
    assert load_config(None, {"embed.gpus_per_actor": 1}).embed.image_batch == 64  # GPU: the product batch
    assert load_config(None, {"embed.image_batch_size": 32}).embed.image_batch == 32
    with pytest.raises(ConfigError, match="embed.image_batch_size .* must be in"):
        load_config(None, {"embed.image_batch_size": -1})
    assert load_config(None, {"encoders.image_size": "256"}).encoders.image_size == 256
    with pytest.raises(ConfigError, match="encoders.image_size"):
        load_config(None, {"encoders.image_size": "-2"})
