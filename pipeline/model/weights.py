"""Backbone initialisation weights (``model.pretrained``).

* ``none`` (or empty): ``None``, random initialisation.
* ``imagenet``: torchvision's own ``IMAGENET1K_V1`` weights for the ResNet, fetched through
  torchvision's weights mechanism (cached in ``<torch hub dir>/checkpoints/``, hash checked).
  Offline, this works only if the file is already in that cache; otherwise
  :class:`WeightsError` says where to fetch the file and how to point to it.
* a path: a torchvision ResNet state dict saved with ``torch.save`` (optionally wrapped in
  ``{"state_dict": ...}`` or ``{"model": ...}``, ``module.`` prefixes allowed), loaded with
  ``weights_only=True`` and checked against the architecture's keys and shapes (``fc.*`` may
  be absent).

The returned dict has torchvision's ResNet key names (``conv1.weight``, ``layer1.0.conv1.weight``,
..., possibly ``fc.*``).
"""
from __future__ import annotations

import os
import socket
import urllib.error
from pathlib import Path

import torch
import torchvision

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class WeightsError(RuntimeError):
    """The requested backbone weights cannot be obtained or are not a ResNet state dict."""


def _check_arch(arch: str) -> None:
    if arch not in RESNETS:
        raise WeightsError(f"unsupported backbone {arch!r}; expected one of {', '.join(RESNETS)}")


def imagenet_weights_info(arch: str) -> dict:
    """URL, file name and cache path of torchvision's ImageNet weights for ``arch``."""
    _check_arch(arch)
    w = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    name = os.path.basename(w.url)
    return {"url": w.url, "file": name, "cache": str(Path(torch.hub.get_dir()) / "checkpoints" / name)}


def _expected_shapes(arch: str) -> dict[str, tuple]:
    with torch.device("meta"):  # no memory, no init cost
        model = torchvision.models.get_model(arch, weights=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _unwrap(obj) -> dict | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(k, str) for k in obj):
            if all(k.startswith("module.") for k in obj):
                obj = {k[len("module."):]: v for k, v in obj.items()}
            return dict(obj)
    return None


def validate_state_dict(state: dict, arch: str, source: str) -> dict:
    """Check keys and shapes of a ResNet state dict; raise :class:`WeightsError` naming ``source``."""
    expected = _expected_shapes(arch)
    required = [k for k in expected if not k.startswith("fc.")]
    missing = [k for k in required if k not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise WeightsError(f"{source} is not a torchvision {arch} state dict: missing keys {shown}")
    for k in expected:
        v = state.get(k)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != expected[k]:
            raise WeightsError(f"{source} does not fit {arch}: {k!r} has shape {tuple(v.shape)}, expected "
                               f"{expected[k]} (weights of another ResNet depth?)")
    return state


def load_backbone_state_dict(spec: str, arch: str, progress: bool = True) -> dict | None:
    """Weights for a torchvision ResNet backbone from ``spec`` (``none`` / ``imagenet`` / a path)."""
    spec = (spec or "").strip()
    if spec.lower() in ("", "none"):
        return None
    _check_arch(arch)
    if spec.lower() == "imagenet":
        info = imagenet_weights_info(arch)
        w = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        try:
            state = w.get_state_dict(progress=progress, check_hash=True)
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise WeightsError(
                f"cannot fetch the ImageNet weights of {arch} ({reason}); the network is unreachable or the "
                f"download failed. Fetch {info['url']} on a machine with internet access and either set "
                f"'model.pretrained: /path/to/{info['file']}' in params.yaml, or copy the file to "
                f"{info['cache']} and keep 'model.pretrained: imagenet'.") from e
        except RuntimeError as e:  # torch.hub: hash mismatch / corrupt file
            raise WeightsError(f"the ImageNet weights of {arch} from {info['url']} failed verification ({e}); "
                               f"delete {info['cache']} and try again") from e
        return validate_state_dict(state, arch, f"torchvision's {arch} IMAGENET1K_V1 weights")

    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise WeightsError(f"model.pretrained: file not found: {path} (expected 'none', 'imagenet' or the path "
                           f"of a torchvision {arch} state dict saved with torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise WeightsError(f"model.pretrained: cannot load {path} as a torch state dict "
                           f"(weights_only=True): {type(e).__name__}: {e}") from e
    state = _unwrap(obj)
    if state is None:
        raise WeightsError(f"model.pretrained: {path} holds a {type(obj).__name__}, not a state dict "
                           f"(a mapping of parameter names to tensors) of a torchvision {arch}")
    return validate_state_dict(state, arch, f"model.pretrained file {path}")
