"""e-CLIP alignment (PAPER.md "e-CLIP"): the image and text towers trained contrastively on the catalogue's own
image-title pairs, so that zero-shot category -> image search has an aligned text tower to stand on.

    model = build_model(cfg.encoders, cfg.align)          # an open_clip CLIP / CustomTextCLIP
    set_trainable(model, "lock", "partial")                # what trains, per tower (config.ALIGN_MODES)
    step = GradCacheStep(model, ContrastiveLoss(label_mask=True), chunk=64)
    loss = step(images, tokens, groups)                    # the whole batch's exact gradient, in chunks
    save_checkpoint(model, "/work/align/best", ...)        # open_clip.create_model("local-dir:/work/align/best")

The model. With an image model that has CLIP weights (an open_clip tag) its own text tower is aligned already and
alignment continues from it (``configs/production.yaml``: ViT-B-32 / laion2b, ``full`` on GPUs). With image
weights only (the offline config's ImageNet EfficientNet-Lite0, ``pkg:``), the text tower is open_clip's HF text
tower over ``encoders.text_model`` (the shipped MiniLM), both projected linearly into ``align.embed_dim``.

What trains (``lock`` / ``partial`` / ``full`` per tower): the projections and the temperature always; ``partial``
adds the trunk's last block (a timm trunk: its last stage and head conv; a ViT: its last residual block and final
norm; a transformers encoder: its last layer); ``full`` everything. BatchNorm layers keep their ImageNet
statistics in every mode (``train_mode``): a chunked pass must compute what the unchunked one does.

GradCache (Gao et al. 2021; e-CLIP's multi-stream accumulation). A contrastive batch's loss couples every pair, so
plain gradient accumulation over micro-batches changes the loss. GradCacheStep instead (1) embeds the whole batch
chunk by chunk without a graph, (2) computes the loss over all embeddings and its gradient with respect to them
(the embeddings are leaves here), (3) re-embeds each chunk with a graph and back-propagates that chunk's slice of
the embedding gradient. The chain rule makes the sum over chunks the full batch's parameter gradient exactly (up
to float summation order); only one chunk's activations are alive at a time. With torch.distributed initialised,
the loss gathers every rank's embeddings (clipita.loss) and the parameter gradients are averaged over ranks, as
DDP would: the same gradient as one worker holding the global batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clipita import pretrained as package_weights
from clipita.config import ALIGN_MODES, AlignConfig, EncoderConfig
from clipita.aligned import CONFIG_FILE, WEIGHTS_FILE, quiet_load, quiet_transformers
from clipita.aligned import load_checkpoint  # noqa: F401 - re-exported: align's API loads what it saves
from clipita.encoders import (_open_clip_configs, _sentence_transformers_layout, _text_model_folder,
                              create_image_model, image_preprocess_spec)


class AlignError(RuntimeError):
    """A model that cannot be aligned as configured; the message is one line saying why."""


def text_tower(enc: EncoderConfig, cfg: AlignConfig) -> str:
    """"own" (the image model's CLIP text tower) or "hf" (open_clip's HF tower over encoders.text_model)."""
    if cfg.text_tower != "auto":
        return cfg.text_tower
    has_clip_weights = bool(enc.image_pretrained) and not enc.image_pretrained.startswith("pkg:")
    return "own" if has_clip_weights else "hf"


def model_config(enc: EncoderConfig, cfg: AlignConfig) -> dict:
    """The open_clip architecture config of the aligned model (what ``open_clip_config.json`` records)."""
    base = open_clip.get_model_config(enc.image_model)
    if base is None:
        raise AlignError(f"cannot align {enc.image_model!r}: not an open_clip architecture (encoders.image_model)")
    if text_tower(enc, cfg) == "own":
        return base
    text_folder, _ = _sentence_transformers_layout(_text_model_folder(enc.text_model), enc.text_model)
    vision = dict(base["vision_cfg"])
    if "timm_model_name" in vision:
        vision["timm_proj"] = "linear"  # pooled trunk features -> the shared space
    return {"embed_dim": cfg.embed_dim, "custom_text": True, "vision_cfg": vision,
            "text_cfg": {"hf_model_name": str(text_folder), "hf_tokenizer_name": str(text_folder),
                         "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                         "context_length": enc.text_max_length}}


def build_model(enc: EncoderConfig, cfg: AlignConfig, seed: int = 0) -> nn.Module:
    """The model alignment starts from, with the configured pre-trained weights in both towers, in eval mode."""
    _, tag_cfg = _open_clip_configs(enc)  # checks the name and weights, one-line errors
    with torch.random.fork_rng(devices=[]), quiet_load(random_init=True), quiet_transformers():
        torch.manual_seed(seed)
        if text_tower(enc, cfg) == "own":
            model = create_image_model(enc, tag_cfg)
        else:
            mc = model_config(enc, cfg)
            model = open_clip.CustomTextCLIP(embed_dim=mc["embed_dim"], vision_cfg=mc["vision_cfg"],
                                             text_cfg=mc["text_cfg"])  # HF weights: from the folder
            if tag_cfg.get("package"):
                package_weights.load_into(model, enc.image_pretrained)
            elif enc.image_pretrained:
                raise AlignError(f"cannot align {enc.image_model!r}/{enc.image_pretrained!r} with an HF text tower: "
                                 "use align.text_tower=own for a CLIP checkpoint")
    with torch.no_grad():
        model.logit_scale.fill_(float(torch.log(torch.tensor(1.0 / cfg.tau))))
    return model.eval()  # BatchNorm on its ImageNet statistics everywhere (train_mode keeps it so in training)


# ------------------------------------------------------------------------------------------ what trains

def _trained_prefixes(model: nn.Module, side: str, mode: str) -> tuple[str, ...]:
    """Name prefixes of the parameters ``mode`` trains on one side (its projection; partial: and the last block;
    full: every parameter of the side)."""
    if mode == "full":
        return ("",)
    if side == "image":
        v = model.visual
        if hasattr(v, "trunk"):  # open_clip TimmModel: trunk -> head (pool, projection)
            proj, last = ("visual.head.",), (f"visual.trunk.blocks.{len(v.trunk.blocks) - 1}.", "visual.trunk.conv_head.",
                                              "visual.trunk.bn2.")
        else:  # open_clip VisionTransformer
            proj, last = ("visual.proj",), (f"visual.transformer.resblocks.{len(v.transformer.resblocks) - 1}.",
                                             "visual.ln_post.")
    elif hasattr(getattr(getattr(model, "text", None), "transformer", None), "encoder"):  # HFTextEncoder
        layers = model.text.transformer.encoder.layer
        proj, last = ("text.proj.",), (f"text.transformer.encoder.layer.{len(layers) - 1}.",)
    elif hasattr(model, "text_projection"):  # CLIP: the text tower's parameters sit on the model itself
        proj, last = ("text_projection",), (f"transformer.resblocks.{len(model.transformer.resblocks) - 1}.",
                                            "ln_final.")
    else:
        raise AlignError(f"cannot tell the text tower's projection in {type(model).__name__}")
    return proj if mode == "lock" else proj + last


def set_trainable(model: nn.Module, image: str, text: str) -> dict[str, int]:
    """Freeze all, then unfreeze per tower what ``image`` / ``text`` (config.ALIGN_MODES) train, and the
    temperature. Returns the trainable parameter count per tower."""
    counts = {}
    for side, mode in (("image", image), ("text", text)):
        if mode not in ALIGN_MODES:
            raise AlignError(f"align.{side}_train must be one of {', '.join(ALIGN_MODES)}, got {mode!r}")
        prefixes = _trained_prefixes(model, side, mode)
        counts[side] = 0
        for name, p in model.named_parameters():
            if name.startswith("logit_") or name.startswith("visual.") != (side == "image"):
                continue
            p.requires_grad_(name.startswith(prefixes))
            counts[side] += p.numel() if p.requires_grad else 0
    model.logit_scale.requires_grad_(True)
    return counts


def train_mode(model: nn.Module, dropout: bool = False) -> nn.Module:
    """The mode alignment trains in. BatchNorm always in eval: its running statistics stay the pre-trained ones,
    so a chunked pass normalises exactly as the whole batch would. Without ``dropout`` (the default: the towers
    are pre-trained and alignment on a catalogue's pairs is a fine-tune) that is the whole model in eval, since
    transformers' attention dropout follows its module's ``training`` flag, not an nn.Dropout; with it, GradCache
    replays each chunk's RNG state, so its second pass draws the first pass's masks."""
    if not dropout:
        return model.eval()
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def make_optimizer(model: nn.Module, cfg: AlignConfig) -> torch.optim.AdamW:
    """AdamW over what trains (set_trainable): weight decay on matrices, none on biases, norms and the temperature."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)


def train_step(model: nn.Module, step: "GradCacheStep", optimizer, images, texts, groups=None,
               autocast=None) -> float:
    """One optimisation step over a global batch: the GradCache gradient (under ``autocast`` when given), the
    optimiser's step, the temperature kept at most 100 (CLIP's clamp). Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        loss = step(images, texts, groups)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss


# ---------------------------------------------------------------------------------------------- GradCache

class GradCacheStep:
    """One optimisation step's gradient over a contrastive batch, computed ``chunk`` pairs at a time (0: the
    batch in one pass), equal to the whole batch's. ``encode_image`` / ``encode_text`` map a chunk of inputs
    (tensors, or any sliceable batch) to embeddings; by default the model's own, normalised."""

    def __init__(self, model: nn.Module, loss: nn.Module, chunk: int = 0, encode_image=None, encode_text=None):
        self.model, self.loss, self.chunk = model, loss, chunk
        self.encode_image = encode_image or (lambda x: model.encode_image(x, normalize=True))
        self.encode_text = encode_text or (lambda t: model.encode_text(t, normalize=True))

    def _chunks(self, n: int) -> list[slice]:
        size = self.chunk or n
        return [slice(s, min(n, s + size)) for s in range(0, n, size)]

    def __call__(self, images, texts, groups: torch.Tensor | None = None) -> float:
        """Accumulates the gradient into the parameters' ``.grad`` (zero them first); returns the loss."""
        n = len(groups) if groups is not None else len(images)
        chunks = self._chunks(n)
        if len(chunks) == 1:  # nothing to cache: the plain step
            loss = self.loss(self.encode_image(images), self.encode_text(texts), self.model.logit_scale, groups)
            loss.backward()
        else:
            states, img, txt = [], [], []
            with torch.no_grad():
                for c in chunks:  # each chunk's RNG state, so that dropout draws the same masks when it is re-run
                    states.append(_rng_state())
                    img.append(self.encode_image(images[c]))
                    txt.append(self.encode_text(texts[c]))
            img = torch.cat(img).requires_grad_(True)
            txt = torch.cat(txt).requires_grad_(True)
            loss = self.loss(img, txt, self.model.logit_scale, groups)
            loss.backward()  # d loss / d embeddings, and the temperature's gradient
            for c, state in zip(chunks, states):
                _set_rng_state(state)
                (self.encode_image(images[c]) * img.grad[c]).sum().backward()
                (self.encode_text(texts[c]) * txt.grad[c]).sum().backward()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
        return float(loss.detach())


def _rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def group_key(group: str | None, title: str) -> int:
    """A product's key for the false-negative mask: its catalogue ``group_id`` where it has one, else its title
    (identical titles stand in for one product listed twice). A stable 63-bit hash, so the keys of rows on
    different workers (a gathered batch) and in different parts compare as the products do."""
    key = f"g:{group}" if group else f"t:{title.strip().lower()}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def group_labels(groups: list, titles: list[str]) -> torch.Tensor:
    """``group_key`` of each row, as the labels ContrastiveLoss(label_mask=True) masks."""
    return torch.tensor([group_key(g, t) for g, t in zip(groups, titles)], dtype=torch.long)


# ------------------------------------------------------------------------- locked trunks, computed once

def cacheable(model: nn.Module, side: str, mode: str) -> bool:
    """Whether ``side`` trains only its projection on top of a trunk whose output can be computed once per run
    and cached (a timm image trunk; an HF text tower's pooled output)."""
    if mode != "lock":
        return False
    return hasattr(model.visual, "trunk") if side == "image" else hasattr(getattr(model, "text", None), "pooler")


@torch.no_grad()
def trunk_features(model: nn.Module, side: str, x: torch.Tensor) -> torch.Tensor:
    """The locked trunk's output: normalised images -> pooled trunk features; token ids -> the mean-pooled
    encoder output. ``head(model, side, trunk_features(...))`` is the model's normalised embedding."""
    if side == "image":
        return model.visual.trunk(x)
    t = model.text
    mask = (x != t.config.pad_token_id).long()
    return t.pooler(t.transformer(input_ids=x, attention_mask=mask), mask)


def trim_padding(tokens: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Token ids without the columns that are padding in every row: a masked encoder's outputs (and the mean
    pool over them) are the same, at the cost of the longest text, not of the context length."""
    used = (tokens != pad).any(dim=0).nonzero()
    return tokens[:, :int(used.max()) + 1] if len(used) else tokens[:, :1]


def head(model: nn.Module, side: str, features: torch.Tensor) -> torch.Tensor:
    out = model.visual.head(features) if side == "image" else model.text.proj(features)
    return F.normalize(out, dim=-1)


# --------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(model: nn.Module, directory: str, enc: EncoderConfig, cfg: AlignConfig,
                    extra: dict | None = None) -> str:
    """An open_clip ``local-dir:`` checkpoint: ``open_clip_config.json`` (architecture + preprocessing),
    ``open_clip_pytorch_model.bin`` and, for an HF text tower, its transformers config and tokenizer files beside
    them (open_clip's ``local-dir:`` reads an HF tokenizer from the folder itself; the architecture points at the
    folder, so it is self-contained)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    mc = model_config(enc, cfg)
    if mc.get("custom_text"):
        for f in Path(mc["text_cfg"]["hf_model_name"]).iterdir():  # config, tokenizer; the weights: the state dict
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".h5", ".onnx", ".msgpack", ".md")):
                shutil.copy(f, out / f.name)
        mc["text_cfg"].update(hf_model_name=str(out.resolve()), hf_tokenizer_name=str(out.resolve()))
    size, mean, std = image_preprocess_spec(enc)
    record = {"model_cfg": mc,
              "preprocess_cfg": {"mean": list(mean), "std": list(std), "interpolation": "bicubic",
                                 "resize_mode": "shortest", "size": size},
              "clipita": {"image_model": enc.image_model, "text_tower": text_tower(enc, cfg), **(extra or {})}}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    return str(out)


def tokenizer(enc: EncoderConfig, cfg: AlignConfig):
    """The text tokenizer of the model build_model(enc, cfg) makes."""
    mc = model_config(enc, cfg)
    if mc.get("custom_text"):
        return open_clip.tokenizer.HFTokenizer(mc["text_cfg"]["hf_tokenizer_name"],
                                               context_length=mc["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(enc.image_model)
