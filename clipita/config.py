"""Typed, frozen configuration: one dataclass per concern, loadable from YAML with command-line overrides.

A config file has one top-level key per section (``encoders:``, ``data:``, ...); every field has a default, so a
file only states what differs. ``configs/offline.yaml`` and ``configs/production.yaml`` ship with the project.
Errors are one line: ``ConfigError: encoders.precision must be one of ...``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value or file; the message is one line naming the field."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """How a catalogue becomes labelled train/val/test products (PAPER.md protocol)."""

    seed: int = 0  # seeds the split and the random node of the "all" setting
    val_fraction: float = 0.1  # share of products in the validation split
    test_fraction: float = 0.1  # share of products in the test split
    query_text: str = "name"  # "name" (the paper: last path element) or "path" ("Women > Shoes > Boots")

    def __post_init__(self) -> None:
        _check_range("data.val_fraction", self.val_fraction, 0.0, 0.9)
        _check_range("data.test_fraction", self.test_fraction, 0.0, 0.9)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction + data.test_fraction must be below 1")
        _check_choice("data.query_text", self.query_text, ("name", "path"))


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen pre-trained encoders (hub names or local paths)."""

    image_model: str = "ViT-B-32"  # open_clip architecture name (or one registered by clipita)
    image_pretrained: str = "laion2b_s34b_b79k"  # open_clip tag, a local checkpoint file, or "" for random init
    text_model: str = "sentence-transformers/all-mpnet-base-v2"  # hub name or local folder of a transformers model
    text_max_length: int = 64  # tokens; titles and category names are short
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    clip_prompt: str = "a photo of {}"  # template for CLIP zero-shot category text

    def __post_init__(self) -> None:
        _check_choice("encoders.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("encoders.precision", self.precision, ("auto", "fp32", "fp16", "bf16"))
        if "{}" not in self.clip_prompt:
            raise ConfigError("encoders.clip_prompt must contain {} where the category name goes")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert a YAML or command-line value to the field's declared type."""
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return out
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return "" if value is None else str(value)
        if value is None:
            return ""
    elif typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, (list, tuple)):
            (inner, *_rest) = typing.get_args(tp)
            return tuple(_coerce(name, inner, v) for v in value)
    else:
        return value
    raise ConfigError(f"{name} has the wrong type: {value!r}")


def section_from_dict(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]} (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(f"{prefix}.{k}", hints[k], v) for k, v in values.items()})


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``{"section.key": value}`` overrides."""
    raw: dict = {}
    if path:
        from clipita import storage

        try:
            raw = yaml.safe_load(storage.read_bytes(path)) or {}
        except storage.StorageError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections")
    for key, value in (overrides or {}).items():
        if "." not in key:
            raise ConfigError(f"override {key!r} must be section.key")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: {', '.join(sorted(sections))})")
    hints = typing.get_type_hints(Config)
    return Config(**{k: section_from_dict(hints[k], v or {}, k) for k, v in raw.items()})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
