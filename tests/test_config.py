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
