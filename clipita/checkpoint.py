"""Model checkpoints in safe formats, in a local folder or under an object-storage prefix (clipita.storage).

    DIR/model.safetensors   the ClipIta state dict (heads + logit_scale, + residual_scale for residual heads)
    DIR/optimizer.pt        optional optimizer state: torch.save, read back with torch.load(weights_only=True)
    DIR/config.json         {"head": HeadConfig fields, "metadata": {...caller's: epoch, step, metrics...}}

config.json is written last and removed first when a folder is overwritten (``last/`` every few epochs), so a
folder whose writer died midway has no config and fails to load in one line: a resumed run starts that run
afresh instead of pairing new weights with an old config and a truncated optimizer.
Nothing here unpickles arbitrary objects: safetensors holds only tensors, and weights_only refuses code.
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from clipita import storage
from clipita.config import ConfigError, section_from_dict
from clipita.model import ClipIta, HeadConfig, unwrap

WEIGHTS, OPTIMIZER, CONFIG = "model.safetensors", "optimizer.pt", "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not match its config; one line."""


def save_checkpoint(uri: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` (optionally wrapped in DDP), the optimizer state and JSON-able ``metadata`` to ``uri``."""
    model = unwrap(model)
    storage.remove(storage.join(uri, CONFIG))  # unfinished until config.json is back
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS), safetensors.torch.save(tensors))
    if optimizer is not None:
        with storage.open_output(storage.join(uri, OPTIMIZER)) as f:  # streamed: no copy of the state in memory
            torch.save(optimizer.state_dict(), f)
    head = dataclasses.asdict(model.config)
    for key in ("residual", "lock_category"):  # left out when off: config.json as before these options existed
        if not head[key]:
            del head[key]
    storage.write_json(storage.join(uri, CONFIG), {"head": head, "metadata": metadata or {}})


def _read(uri: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(uri, name))
    except storage.StorageError:
        raise CheckpointError(f"no checkpoint at {uri}: {name} not found") from None


def _read_config(uri: str) -> dict[str, Any]:
    try:
        raw = json.loads(_read(uri, CONFIG))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {uri}: {CONFIG} is not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("head"), dict):
        raise CheckpointError(f"checkpoint {uri}: {CONFIG} has no 'head' mapping")
    return raw


def load_metadata(uri: str) -> dict[str, Any]:
    """The ``metadata`` dict saved with the checkpoint."""
    return _read_config(uri).get("metadata", {})


def load_metadata_config(uri: str) -> dict[str, Any]:
    """The HeadConfig fields saved with the checkpoint (widths, variant) without reading the weights."""
    return _read_config(uri)["head"]


def load_model(uri: str) -> ClipIta:
    """The ClipIta saved at ``uri``, rebuilt from its config.json, on CPU and in eval mode."""
    try:
        config = section_from_dict(HeadConfig, _read_config(uri)["head"], "head")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {uri}: {CONFIG}: {e}") from None
    try:
        tensors = safetensors.torch.load(_read(uri, WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated or garbage files
        raise CheckpointError(f"checkpoint {uri}: {WEIGHTS} is corrupt ({str(e).splitlines()[0]})") from None
    model = ClipIta(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[0][0]
        raise CheckpointError(f"checkpoint {uri}: {WEIGHTS} does not match {CONFIG} "
                              f"(first differing tensor: {diff})")
    model.load_state_dict(tensors)
    return model.eval()


def load_optimizer(uri: str, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer state saved at ``uri`` into ``optimizer`` (built over the loaded model)."""
    try:
        state = torch.load(io.BytesIO(_read(uri, OPTIMIZER)), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    except CheckpointError:
        raise
    except Exception as e:  # unpickling, or parameter groups that do not match this optimizer
        raise CheckpointError(f"checkpoint {uri}: {OPTIMIZER} cannot be loaded "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
