"""WSInfer's model format (what QuPath's WSInfer extension and the `wsinfer` package run): a folder
of ``config.json`` (the wsinfer-zoo model-config schema, spec 1.0) and ``torchscript_model.pt``.

Export: the network with its input scaling written as TorchScript, two logits (0 and ours, so
that WSInfer's softmax gives our probability), the patch as the network sees it (cell and margin
together: WSInfer tiles those edge to edge) at the model's resolution. What the format cannot
carry: the margin as a ring around a smaller cell (WSInfer's patches do not overlap, so its grid
is the input size), the context map, thresholds, the slide score and call, the domain check.

Import: a WSInfer folder runs as a model of the viewer (its class names, spacing and patch size).
TorchScript is code, so it loads only when the caller says it trusts the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.atomic import write_bytes
from inference.model import TORCHSCRIPT_FAMILY, Architecture, LoadedModel, ModelError, ModelMeta
from inference.tasks import EXTERNAL

CONFIG, TORCHSCRIPT = "config.json", "torchscript_model.pt"


class _TwoLogits(nn.Module):
    """Our one-logit network as WSInfer expects a classifier: (n, 3, h, w) normalised -> (n, 2)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.net(x).reshape(-1, 1)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


class _OneLogit(nn.Module):
    """A WSInfer classifier as ours: the positive class's logit against the others (softmax)."""

    def __init__(self, module: torch.jit.ScriptModule, positive: int) -> None:
        super().__init__()
        self.module, self.positive = module, positive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.module(x)
        if logits.shape[1] == 1:
            return logits[:, 0]
        others = torch.cat([logits[:, : self.positive], logits[:, self.positive + 1 :]], dim=1)
        return logits[:, self.positive] - torch.logsumexp(others, dim=1)


def config_for(meta: ModelMeta, name: str) -> dict[str, Any]:
    """The wsinfer-zoo model config of ``meta``."""
    return {
        "spec_version": "1.0",
        "architecture": f"idc-viewer {name}: {meta.name}",
        "num_classes": 2,
        "patch_size_pixels": meta.input_px,
        "spacing_um_px": meta.mpp,
        "class_names": list(meta.classes),
        "transform": [
            {"name": "Resize", "arguments": {"size": meta.input_px}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(meta.mean), "std": list(meta.std)}},
        ],
    }


def export(model: LoadedModel, out: str | os.PathLike[str], name: str) -> list[Path]:
    """Write ``model`` into the folder ``out`` as WSInfer's format; returns the two files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = model.meta
    wrapped = _TwoLogits(model.net.cpu().eval()).eval()
    example = torch.rand(2, 3, meta.input_px, meta.input_px)
    with torch.inference_mode():
        script = torch.jit.trace(wrapped, example, check_trace=False)
        script = torch.jit.freeze(script)
    buf = io.BytesIO()
    torch.jit.save(script, buf)
    ts = write_bytes(out / TORCHSCRIPT, buf.getvalue())
    cfg = write_bytes(out / CONFIG, (json.dumps(config_for(meta, name), indent=2) + "\n").encode())
    return [cfg, ts]


def is_wsinfer_folder(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and (p / TORCHSCRIPT).is_file()


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, checked for what the viewer needs (one sentence if not)."""
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{folder / CONFIG} is not readable JSON ({exc}).") from None
    try:
        names = [str(c) for c in cfg["class_names"]]
        size, spacing = int(cfg["patch_size_pixels"]), float(cfg["spacing_um_px"])
        transforms = {t["name"]: t.get("arguments", {}) for t in cfg["transform"]}
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{folder / CONFIG} is not a WSInfer model config (class_names, patch_size_pixels, "
                         "spacing_um_px and transform are needed).") from None
    if len(names) < 2 or int(cfg.get("num_classes", len(names))) != len(names) or not spacing > 0 or size < 8:
        raise ModelError(f"{folder / CONFIG} must name two or more classes, a patch size and a spacing above 0.")
    resize = transforms.get("Resize", {}).get("size", size)
    if resize not in (size, [size, size]):
        raise ModelError(f"{folder / CONFIG} resizes its {size} px patches to {resize}; the viewer reads patches "
                         "at the model's own size only.")
    return cfg


def load_wsinfer(folder: str | os.PathLike[str], trust_code: bool = False,
                 device: torch.device | str = "cpu") -> LoadedModel:
    """A WSInfer model folder as a viewer model: its last class is the one it finds, the others
    are its negative. TorchScript is code: refused unless ``trust_code``."""
    folder = Path(folder)
    cfg = read_config(folder)
    if not trust_code:
        raise ModelError(f"{folder} is a WSInfer model: its TorchScript is code that runs on this computer, so "
                         "load it only from a source you trust (the dialog asks; on the command line add "
                         "--trust-torchscript).")
    try:
        module = torch.jit.load(str(folder / TORCHSCRIPT), map_location=device)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelError(f"{folder / TORCHSCRIPT} is not a TorchScript model ({str(exc).splitlines()[0]}).") from None
    names = cfg["class_names"]
    norm = {t["name"]: t.get("arguments", {}) for t in cfg["transform"]}.get("Normalize", {})
    meta = ModelMeta(arch=Architecture(family=TORCHSCRIPT_FAMILY), patch_size=int(cfg["patch_size_pixels"]), mpp=float(cfg["spacing_um_px"]), margin=0,
                     mean=tuple(norm.get("mean", (0.0, 0.0, 0.0))), std=tuple(norm.get("std", (1.0, 1.0, 1.0))),
                     classes=(" / ".join(names[:-1]), names[-1]), task=EXTERNAL.name, threshold=0.5,
                     provenance={"wsinfer_folder": str(folder), "architecture": str(cfg.get("architecture", ""))})
    net = _OneLogit(module, len(names) - 1).eval()
    sha = hashlib.sha256((folder / TORCHSCRIPT).read_bytes() + (folder / CONFIG).read_bytes()).hexdigest()
    return LoadedModel(net, meta, sha, folder)  # type: ignore[arg-type]
