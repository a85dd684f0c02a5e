"""The frozen pre-trained encoders: an open_clip image tower (+ its text tower for zero-shot CLIP) and a
transformers sentence encoder for titles, attributes and category names.

Images are decoded and resized to uint8 ``(S, S, 3)`` by ``load_image`` in cheap CPU tasks (exactly open_clip's
eval transform: shortest side to S, bicubic, centre crop); ``ImageEncoder`` only normalises on its device, so
only uint8 travels between the two. Every ``encode`` returns float32 L2-normalised rows.

    spec = image_preprocess_spec(cfg.encoders)            # (S, mean, std) without loading weights
    pixels = np.stack([load_image(b, spec[0]) for b in blobs])
    ImageEncoder(cfg.encoders).encode(pixels)             # (N, D)
    TextEncoder(cfg.encoders).encode(["red dress", ...])  # (N, D')

Where models come from (``EncoderConfig``): ``image_model`` is an open_clip architecture (clipita registers its
own from ``clipita/model_configs/``), ``image_pretrained`` an open_clip tag, a local checkpoint file,
``pkg:MODULE`` (image-tower weights shipped inside a Python package, ``clipita.pretrained``: the offline
config's ImageNet EfficientNet-Lite0), an aligned checkpoint folder of jobs.align (``<workdir>/align/best``, local
or s3://: both towers from it), or "" for a seeded random init; ``text_model`` a hub name, a local folder, or ``pkg:MODULE`` (``MODULE.get_model_path()``,
a model shipped inside a Python package). A model that cannot be loaded raises ``EncoderLoadError``: one line
naming it and saying how to point at a local copy.
"""
from __future__ import annotations

import importlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from clipita import pretrained as package_weights
from clipita.aligned import CONFIG_FILE, aligned_folder, load_checkpoint, quiet_load
from clipita.config import EncoderConfig
from clipita.images import ImageError, load_image  # noqa: F401 - re-exported: the decode half of the image encoder

open_clip.add_model_config(Path(__file__).parent / "model_configs")

RANDOM_INIT_SEED = 0  # image_pretrained "": every load builds the same weights



class EncoderLoadError(RuntimeError):
    """An encoder that cannot be loaded; the message is one line naming it and how to point at a local copy."""


# ---------------------------------------------------------------------------------------------------- images

def image_preprocess_spec(cfg: EncoderConfig) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image_size, mean, std) of the configured open_clip model, read from its configs without loading weights."""
    model_cfg, tag_cfg = _open_clip_configs(cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise EncoderLoadError(f"cannot use image model {cfg.image_model!r}: clipita needs a square input size")
        size = size[0]
    size = cfg.image_size or size
    # load_image implements open_clip's default eval transform only; a tag trained otherwise would get skewed inputs.
    if tag_cfg.get("resize_mode", "shortest") != "shortest" or tag_cfg.get("interpolation", "bicubic") != "bicubic":
        raise EncoderLoadError(f"cannot use image weights {cfg.image_pretrained!r}: they expect "
                               f"{tag_cfg.get('resize_mode')}/{tag_cfg.get('interpolation')} preprocessing, "
                               "clipita implements shortest-side bicubic resize + centre crop")
    mean = tuple(tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(tag_cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return int(size), mean, std


def _open_clip_configs(cfg: EncoderConfig) -> tuple[dict, dict]:
    """(architecture config, pretrained-tag config or {}) for cfg, checking the name and tag/file exist."""
    name = cfg.image_model
    if ":" in name:  # hf-hub:/local-dir: schemas carry their own preprocessing, which load_image does not read
        raise EncoderLoadError(f"cannot load image model {name!r}: encoders.image_model must be an open_clip "
                               "architecture name; put a local checkpoint file in encoders.image_pretrained")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise EncoderLoadError(f"cannot load image model {name!r}: not an open_clip architecture "
                               "(encoders.image_model; see open_clip.list_models())")
    pretrained = cfg.image_pretrained
    folder = aligned_folder(pretrained)
    if folder:  # both towers from jobs.align's checkpoint, with the preprocessing it was trained with
        record = json.loads(Path(folder, CONFIG_FILE).read_text())
        trained = record.get("clipita", {}).get("image_model", name)
        if trained != name:
            raise EncoderLoadError(f"cannot load {pretrained!r} as {name!r}: it holds aligned {trained!r} towers "
                                   f"(set encoders.image_model={trained})")
        return record["model_cfg"], dict(record["preprocess_cfg"], aligned=folder)
    if pretrained.startswith("pkg:"):  # weights of the image tower only, with their own normalisation
        try:
            entry = package_weights.package_weights(pretrained)
        except package_weights.PretrainedError as e:
            raise EncoderLoadError(f"cannot load image weights {pretrained!r}: {e}") from None
        tower = model_cfg["vision_cfg"].get("timm_model_name")
        if tower != entry.timm_model:
            raise EncoderLoadError(f"cannot load image weights {pretrained!r} into {name!r}: they are "
                                   f"{entry.timm_model} weights, its tower is {tower or 'not a timm model'}")
        return model_cfg, {"mean": entry.mean, "std": entry.std, "package": entry.module}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if pretrained and not tag_cfg and not os.path.isfile(pretrained):
        raise EncoderLoadError(f"cannot load image weights {pretrained!r}: neither a pretrained tag of {name} nor "
                               "an existing file (encoders.image_pretrained: a tag, a checkpoint file, or \"\")")
    return model_cfg, tag_cfg


# ---------------------------------------------------------------------------------------------- devices

def _device(cfg: EncoderConfig, what: str) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EncoderLoadError(f"cannot load {what} on cuda: no GPU is visible (set encoders.device to auto or cpu)")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _autocast(cfg: EncoderConfig, device: torch.device) -> torch.autocast:
    """Mixed precision per cfg.precision; auto = bf16 on GPUs that have it (fp16 on older ones), fp32 on CPU."""
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
    if cfg.precision == "auto" and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _normalized(x: torch.Tensor) -> np.ndarray:
    # Normalise in fp32: the norm of a bf16 vector is only good to ~3 digits.
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


# ---------------------------------------------------------------------------------------------- encoders



def create_image_model(cfg: EncoderConfig, tag_cfg: dict) -> torch.nn.Module:
    """The configured open_clip model with its weights (a tag's, a file's, a package's image trunk, or the seeded
    random init); ``tag_cfg`` as ``_open_clip_configs`` returns it. Errors are one-line EncoderLoadErrors."""
    if tag_cfg.get("aligned"):
        return load_checkpoint(tag_cfg["aligned"])
    package = tag_cfg.get("package")
    checkpoint = "" if package else cfg.image_pretrained
    if tag_cfg and not package:
        try:  # fetched here rather than by create_model, which logs a page-long error before raising
            checkpoint = open_clip.download_pretrained(tag_cfg)
        except Exception:  # noqa: BLE001 - hub, network and cache failures all mean: no local copy
            raise EncoderLoadError(
                f"cannot load image weights {cfg.image_model!r}/{cfg.image_pretrained!r} (no network?): download "
                "them where there is network and set encoders.image_pretrained to the checkpoint file") from None
    try:
        # seeded init without touching the caller's RNG
        with torch.random.fork_rng(devices=[]), quiet_load(random_init=not checkpoint):
            torch.manual_seed(RANDOM_INIT_SEED)
            # A tag trained with QuickGELU needs it in the architecture too (open_clip only warns).
            model = open_clip.create_model(cfg.image_model, pretrained=checkpoint or None,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                                           force_image_size=cfg.image_size or None)
            if package:  # the image trunk from the package's file; the rest stays the seeded init
                package_weights.load_into(model, cfg.image_pretrained)
    except Exception as e:  # noqa: BLE001 - unreadable or mismatched checkpoint files end here
        raise EncoderLoadError(f"cannot load image weights {cfg.image_pretrained!r} into {cfg.image_model!r}: "
                               f"{str(e).splitlines()[0][:200]}") from None
    return model


class PixelNormalizer:
    """uint8 ``(B, S, S, 3)`` pixels (a tensor) -> the image tower's float input: the same float ops as open_clip's
    ToTensor + Normalize, on ``device`` rather than in the CPU task that decoded them."""

    def __init__(self, cfg: EncoderConfig, device: torch.device | str = "cpu"):
        _, mean, std = image_preprocess_spec(cfg)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.permute(0, 3, 1, 2).float().div(255) - self.mean) / self.std


class ImageEncoder:
    """Frozen open_clip model: images (uint8 from ``load_image``) and, for zero-shot CLIP, texts."""

    def __init__(self, cfg: EncoderConfig):
        model_cfg, tag_cfg = _open_clip_configs(cfg)
        self.image_size, mean, std = image_preprocess_spec(cfg)
        self.dim: int = int(model_cfg["embed_dim"])
        self.device = _device(cfg, f"image model {cfg.image_model!r}")
        self.cfg = cfg
        model = create_image_model(cfg, tag_cfg)
        text_cfg = model_cfg.get("text_cfg", {})
        self.tokenizer = (open_clip.tokenizer.HFTokenizer(tag_cfg["aligned"], context_length=text_cfg["context_length"])
                          if tag_cfg.get("aligned") and model_cfg.get("custom_text") else
                          open_clip.get_tokenizer(cfg.image_model))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.normalize = PixelNormalizer(cfg, self.device)
        self.mean, self.std = self.normalize.mean, self.normalize.std  # (1, 3, 1, 1): what it normalises with

    @torch.inference_mode()
    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 ``(B, S, S, 3)`` -> float32 ``(B, dim)``, L2-normalised."""
        s = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 images of shape (B, {s}, {s}, 3), got {images.dtype} {images.shape}")
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), batch_size):
            # torch.tensor copies: Ray Data hands over read-only arrays, which torch.from_numpy warns about.
            x = self.normalize(torch.tensor(images[i:i + batch_size], device=self.device))
            with _autocast(self.cfg, self.device):
                out.append(_normalized(self.model.encode_image(x)))
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_trunk(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Outputs of a timm tower's trunk (jobs.align's cache of a locked trunk) through its head: what ``encode``
        returns for the images they were computed from, without the trunk."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(features), batch_size):
            x = torch.tensor(features[i:i + batch_size], device=self.device)
            out.append(_normalized(self.model.visual.head(x)))
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts through the CLIP text tower (zero-shot CLIP) -> float32 ``(T, dim)``, L2-normalised."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with _autocast(self.cfg, self.device):
                out.append(_normalized(self.model.encode_text(tokens)))
        return np.concatenate(out)


class TextEncoder:
    """Frozen sentence encoder run with plain transformers, pooled as its sentence-transformers config says
    (mean pooling when the folder has none), L2-normalised."""

    def __init__(self, cfg: EncoderConfig):
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        folder = _text_model_folder(cfg.text_model)
        transformer_dir, self.pooling = _sentence_transformers_layout(folder, cfg.text_model)
        self.device = _device(cfg, f"text model {cfg.text_model!r}")
        try:
            with quiet_load(random_init=False):
                self.tokenizer = AutoTokenizer.from_pretrained(transformer_dir)
                model = AutoModel.from_pretrained(transformer_dir)
        except (OSError, ValueError, KeyError) as e:
            if folder == cfg.text_model and not os.path.isdir(folder):
                raise EncoderLoadError(
                    f"cannot load text model {cfg.text_model!r} (no network, or not a model name): download it where "
                    "there is network and set encoders.text_model to its local folder") from None
            raise EncoderLoadError(f"cannot load text model {cfg.text_model!r}: not a transformers model folder "
                                   f"({str(e).splitlines()[0][:200]})") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim: int = int(model.config.hidden_size)
        self.max_length = min(cfg.text_max_length, self.tokenizer.model_max_length)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> float32 ``(N, dim)``, L2-normalised; truncated at ``encoders.text_max_length`` tokens."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        # Longest first, so each batch pads to similar lengths (titles vary from 2 to 60 tokens).
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            batch = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with _autocast(self.cfg, self.device):
                tokens = self.model(**batch).last_hidden_state
            out[idx] = _normalized(_pool(tokens.float(), batch["attention_mask"], self.pooling))
        return out

    def encode_attributes(self, products: Sequence[Sequence[str] | None], batch_size: int = 256) -> np.ndarray:
        """Per product, the mean of its attribute embeddings -> float32 ``(N, dim)`` (zeros: no attributes).
        Each distinct attribute string is encoded once (attributes repeat a lot across a catalogue)."""
        lists = [[] if attrs is None else list(attrs) for attrs in products]
        distinct = list(dict.fromkeys(a for attrs in lists for a in attrs))
        emb = self.encode(distinct, batch_size)
        where = {a: i for i, a in enumerate(distinct)}
        out = np.zeros((len(lists), self.dim), np.float32)
        for row, attrs in enumerate(lists):
            if attrs:
                out[row] = emb[[where[a] for a in attrs]].mean(axis=0)
        return out


def _pool(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling for the modes clipita supports."""
    if mode == "cls":
        return tokens[:, 0]
    m = mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "max":
        return tokens.masked_fill(m == 0, float("-inf")).max(dim=1).values
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _text_model_folder(name: str) -> str:
    """A local folder for pkg:MODULE and paths, or the hub name unchanged."""
    if name.startswith("pkg:"):
        module = name[len("pkg:"):]
        try:
            return str(importlib.import_module(module).get_model_path())
        except (ImportError, AttributeError):
            raise EncoderLoadError(f"cannot load text model {name!r}: no installed package {module!r} with "
                                   "get_model_path(); install it or set encoders.text_model to a local folder") from None
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise EncoderLoadError(f"cannot load text model {name!r}: folder not found (encoders.text_model)")
    return os.path.expanduser(name)


def _sentence_transformers_layout(folder: str, name: str) -> tuple[str, str]:
    """(transformer folder, pooling mode) from a sentence-transformers folder's modules.json; (folder, "mean")
    for a plain transformers folder or a hub name."""
    modules_file = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_file):
        return folder, "mean"
    transformer_dir, mode = folder, "mean"
    for module in json.loads(Path(modules_file).read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        path = os.path.join(folder, module.get("path", ""))
        if kind == "Transformer":
            transformer_dir = path
        elif kind == "Pooling":
            mode = _pooling_mode(json.loads(Path(path, "config.json").read_text()))
        elif kind != "Normalize":  # outputs are always normalised
            raise EncoderLoadError(f"cannot load text model {name!r}: it has a sentence-transformers {kind} "
                                   "module, clipita runs Transformer + Pooling + Normalize only")
    if mode not in ("mean", "cls", "max"):
        raise EncoderLoadError(f"cannot load text model {name!r}: pooling {mode!r} is not supported "
                               "(mean, cls, max)")
    return transformer_dir, mode


def _pooling_mode(config: dict) -> str:
    if "pooling_mode" in config:  # sentence-transformers >= 5 writes one key
        mode = config["pooling_mode"]
        return mode if isinstance(mode, str) else "+".join(mode)
    legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
              "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
              "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
    modes = [mode for key, mode in legacy.items() if config.get(key)]
    return "+".join(modes) or "mean"
