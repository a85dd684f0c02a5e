"""Aligned towers on disk: the open_clip ``local-dir:`` checkpoint folders jobs.align writes (clipita.align's
``save_checkpoint``) and jobs.embed, the endpoint and open_clip load, with the quiet model loading both
clipita.encoders and clipita.align use. A module of its own so that neither of them imports the other's user."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zlib
from pathlib import Path

import open_clip
import torch
import torch.nn as nn

from clipita import storage

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_pytorch_model.bin"  # an aligned checkpoint folder
ALIGNED_CACHE = Path(os.environ.get("CLIPITA_CACHE", Path.home() / ".cache" / "clipita")) / "aligned"


def aligned_folder(pretrained: str) -> str | None:
    """The local folder of an aligned checkpoint (jobs.align's ``save_checkpoint``) that ``pretrained`` names, an
    object-store one copied into ALIGNED_CACHE first (keyed by its URI and the weights file's ETag, modification
    time and size: a folder written again is copied again); None when it is none."""
    if not pretrained or pretrained.startswith("pkg:"):
        return None
    if not storage.is_remote(pretrained):
        return pretrained if os.path.isfile(os.path.join(pretrained, CONFIG_FILE)) else None
    if not storage.exists(storage.join(pretrained, CONFIG_FILE)):
        return None
    fs, path = storage.filesystem(pretrained)
    fs.invalidate_cache(path)
    files = {f.rsplit("/", 1)[-1]: f for f in fs.ls(path, detail=False)}
    info = fs.info(files[WEIGHTS_FILE]) if WEIGHTS_FILE in files else {}
    version = " ".join(str(info.get(k)) for k in ("ETag", "LastModified", "size"))
    local = ALIGNED_CACHE / f"{zlib.crc32(f'{pretrained} {version}'.encode()):08x}"
    if not (local / CONFIG_FILE).exists():
        tmp = local.with_suffix(f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, f in files.items():
            (tmp / name).write_bytes(fs.cat_file(f))
        if not local.exists():  # another process may have copied it meanwhile
            os.replace(tmp, local)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs a root-logger WARNING for every model built without weights; with ``image_pretrained: ""``
    random weights are what the config asks for (the offline demo and tests), not a problem to warn about."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def quiet_load(random_init: bool):
    """Model loading without transformers' per-load "Loading weights" bar (one per encoder actor and Serve replica)
    and, for a random init asked for, without open_clip's warning about it."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    notice = _DropRandomInitNotice()
    if random_init:
        logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_transformers():
    """Without transformers' WARNING load report: open_clip builds the HF encoder without its pooling layer (the
    tower mean-pools), so the folder's pooler weights are "unexpected" by design on every build."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_checkpoint(directory: str) -> nn.Module:
    """The aligned model of a ``save_checkpoint`` folder. An HF text tower is built from the folder where it is now
    (the record names the folder it was written to), so a copied folder loads too; its tokenizer is open_clip's
    ``get_tokenizer(f"local-dir:{directory}")``."""
    mc = json.loads((Path(directory) / CONFIG_FILE).read_text())["model_cfg"]
    with quiet_load(random_init=True), quiet_transformers():
        if not mc.get("custom_text"):
            return open_clip.create_model(f"local-dir:{directory}").eval()
        folder = str(Path(directory).resolve())
        text_cfg = dict(mc["text_cfg"], hf_model_name=folder, hf_tokenizer_name=folder, hf_model_pretrained=False)
        model = open_clip.CustomTextCLIP(embed_dim=mc["embed_dim"], vision_cfg=mc["vision_cfg"], text_cfg=text_cfg)
    state = torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
