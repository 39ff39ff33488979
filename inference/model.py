"""WideResNet for 50x50 H&E patches (or EfficientNet-Lite0 / -Lite2, inference.efficientnet, or an
ensemble of such networks), and checkpoints that never unpickle arbitrary objects.

A checkpoint is a ``torch.save`` of ``{"format": str, "meta": str (JSON), "state_dict": tensors}``
and is loaded with ``torch.load(weights_only=True)``, which refuses any pickled class.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from inference.atomic import write_bytes
from inference.calls import SlideCallPolicy
from inference.context import ThresholdAdapt
from inference.efficientnet import EfficientNetLite, ScanLite0, scan_shape_error
from inference.errors import UserError
from inference.tasks import TASKS

FORMAT = "idc-viewer-checkpoint/1"


class ModelError(UserError):
    """A model file could not be used; the message is one sentence for the user."""


#: Network families a checkpoint may declare for one network (an ensemble's family is ENSEMBLE).
FAMILIES = ("wrn", "efficientnet-lite0", "efficientnet-lite2", "scan-lite0")
#: The network that scans a region cell by cell (inference.efficientnet.ScanLite0).
SCAN_FAMILY = "scan-lite0"
ENSEMBLE = "ensemble"
#: A network given as TorchScript (a WSInfer model folder, inference.wsinfer): never built here.
TORCHSCRIPT_FAMILY = "torchscript"
#: The input scaling (mean, std) of an ensemble, whose members scale their own views.
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Architecture:
    """The network: a WRN-depth-widen, or EfficientNet-Lite0 / -Lite2 (depth, widen and base unused)."""

    depth: int = 16
    widen: int = 2
    dropout: float = 0.0
    in_channels: int = 3
    base: int = 16
    family: str = "wrn"
    #: EfficientNet only: 2 as trained on ImageNet; 1 keeps the first layer at the patch's
    #: full resolution (as if the 50x50 patch were enlarged twice), for about 4x the compute.
    stem_stride: int = 2
    #: scan-lite0 only: the side of a block (the model's cell, px) and the patch's blocks a side
    #: (1 + 2 margin / cell).
    block: int = 0
    side: int = 0

    def __post_init__(self) -> None:
        if self.family not in (*FAMILIES, ENSEMBLE, TORCHSCRIPT_FAMILY):
            raise ModelError(f"Unknown network {self.family!r}; use {' or '.join(FAMILIES)}.")
        if self.stem_stride not in (1, 2):
            raise ModelError(f"The stem stride must be 1 or 2, not {self.stem_stride}.")
        problem = scan_shape_error(self.block, self.side) if self.family == SCAN_FAMILY else None
        if problem:
            raise ModelError(problem)
        if self.family != "wrn":
            return
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ModelError(f"WideResNet depth must be 6n+4 (10, 16, 22...), not {self.depth}.")
        if not 1 <= self.widen <= 16:
            raise ModelError(f"WideResNet widen factor must be 1 to 16, not {self.widen}.")

    @property
    def variant(self) -> str | None:
        """The EfficientNet variant ("lite0", "lite2", a key of efficientnet.STAGES), else None."""
        return self.family.removeprefix("efficientnet-") if self.family.startswith("efficientnet-") else None

    @property
    def name(self) -> str:
        if self.family == ENSEMBLE:
            return "Ensemble"
        if self.family == TORCHSCRIPT_FAMILY:
            return "TorchScript"
        if self.family == SCAN_FAMILY:
            return "ScanNet-Lite0"
        if self.variant:
            return f"EfficientNet-{self.variant.capitalize()}" + ("-S1" if self.stem_stride == 1 else "")
        return f"WRN-{self.depth}-{self.widen}"


@dataclass(frozen=True)
class Member:
    """One network of an ensemble: its own metadata (architecture, margin, input scaling) and the
    weight of its logit in the ensemble's."""

    weight: float
    meta: ModelMeta


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to use a checkpoint correctly, stored beside its weights."""

    arch: Architecture = field(default_factory=Architecture)
    patch_size: int = 50
    mpp: float = 4.0
    #: Wider field of view: the network sees each patch with this many pixels (at ``mpp``) of the
    #: slide around it on every side, and scores the patch in the middle; 0: the patch alone.
    #: The cell grid, its alignment and what a cell's probability describes do not change.
    margin: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    classes: tuple[str, str] = ("Non-IDC", "IDC")
    #: What the model finds (inference.tasks): "idc", "metastasis".
    task: str = "idc"
    threshold: float = 0.5
    #: Tissue context (inference.context): Gaussian neighbourhood in cells and the threshold of
    #: that map, both chosen on validation slides; 0 means the per-patch map only.
    context_sigma: float = 0.0
    context_threshold: float | None = None
    #: Slide-adaptive threshold (inference.context.ThresholdAdapt as a dict), chosen on
    #: validation slides; {} means the thresholds above hold on every slide.
    threshold_adapt: dict[str, float] = field(default_factory=dict)
    #: The slide score and call (inference.calls.SlideCallPolicy as a dict), chosen on validation
    #: slides with IDC and IDC-free ones; {} means no slide-level answer.
    slide_call: dict[str, float] = field(default_factory=dict)
    #: What the training slides looked like (inference.domain): the training patients' colour
    #: statistics and the score above which a slide is outside that domain; {} if unknown.
    domain: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: An ensemble (arch.family ENSEMBLE): its networks, whose weighted logits are its logit. The
    #: ensemble's input is the widest member's view in [0, 1] (mean 0, std 1, margin the widest);
    #: each member crops and scales it as it was trained to see it. () for one network.
    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.margin <= 4 * self.patch_size:
            raise ModelError(f"The margin around each patch must be 0 to {4 * self.patch_size} px, not {self.margin}.")
        if self.task not in TASKS:
            raise ModelError(f"The model's task {self.task!r} is not one this viewer knows ({', '.join(TASKS)}).")
        if (self.arch.family == ENSEMBLE) != bool(self.members):
            raise ModelError("An ensemble's metadata must list its networks, and only an ensemble's may.")
        if not self.members:
            return
        if len(self.members) < 2 or any(m.meta.members for m in self.members):
            raise ModelError("An ensemble needs two or more single networks.")
        if any(not m.weight > 0 for m in self.members):
            raise ModelError("Every network of an ensemble needs a weight above 0.")
        factors = [view_factor(self, m.meta) for m in self.members]
        if None in factors or self.mpp != min(m.meta.mpp for m in self.members):
            raise ModelError("The networks of an ensemble must score the same patches, each at the finest "
                             "network's resolution or a whole multiple of it.")
        if self.margin != max(m.meta.margin * k for m, k in zip(self.members, factors, strict=True)) \
                or (self.mean, self.std) != IDENTITY:
            raise ModelError("An ensemble's input must be its widest network's view, unscaled.")

    @property
    def input_px(self) -> int:
        """Side of the network's input: the patch and its margin on both sides."""
        return self.patch_size + 2 * self.margin

    @property
    def adapt(self) -> ThresholdAdapt | None:
        return ThresholdAdapt(**self.threshold_adapt) if self.threshold_adapt else None

    @property
    def call_policy(self) -> SlideCallPolicy | None:
        return SlideCallPolicy(**self.slide_call) if self.slide_call else None  # type: ignore[arg-type]

    @property
    def positive_class(self) -> str:
        """The name of the class the model finds ("IDC", "Metastasis")."""
        return self.classes[1]

    @property
    def shares(self) -> tuple[float, ...]:
        """Each member's share of an ensemble's logit: its weight over the sum of the weights."""
        total = sum(m.weight for m in self.members)
        return tuple(m.weight / total for m in self.members)

    @property
    def name(self) -> str:
        """The network, or an ensemble's networks joined by '+'."""
        return "+".join(m.meta.arch.name for m in self.members) if self.members else self.arch.name

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        try:
            return cls._from_dict(json.loads(text))
        except ModelError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelError("The model file's metadata is malformed.") from exc

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        arch = Architecture(**d.pop("arch"))
        d["mean"], d["std"], d["classes"] = tuple(d["mean"]), tuple(d["std"]), tuple(d["classes"])
        d["members"] = tuple(Member(float(m["weight"]), cls._from_dict(m["meta"])) for m in d.get("members", ()))
        meta = cls(arch=arch, **d)
        _ = meta.adapt, meta.call_policy  # malformed calibration fails here, not in the middle of a slide
        return meta


class _Block(nn.Module):
    """Pre-activation wide residual block."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout:
            y = F.dropout(y, self.dropout, self.training)
        y = self.conv2(y)
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis 2016) with one output logit (IDC)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        n = (arch.depth - 4) // 6
        widths = [arch.base, arch.base * arch.widen, 2 * arch.base * arch.widen, 4 * arch.base * arch.widen]
        self.stem = nn.Conv2d(arch.in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(_Block(c_in, widths[g + 1], stride if i == 0 else 1, arch.dropout))
                c_in = widths[g + 1]
        self.trunk = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.head = nn.Linear(c_in, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(self.stem(x))
        x = F.relu(self.bn(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


class Ensemble(nn.Module):
    """Networks whose weighted logits are one logit (ModelMeta.members).

    The input is the widest member's view at the finest member's resolution, in [0, 1]; each
    member takes its own view out of the middle (sub_view: cropped, and averaged down to its
    resolution where that is coarser) and scales it with its own mean and std, so every member
    sees exactly what it was trained on.
    """

    def __init__(self, meta: ModelMeta) -> None:
        super().__init__()
        self.members = nn.ModuleList(build(m.meta.arch) for m in meta.members)
        self.weights = meta.shares
        self.outer = meta
        self.views = [m.meta for m in meta.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for net, weight, view in zip(self.members, self.weights, self.views, strict=True):
            logit = weight * net(_scale(sub_view(x, self.outer, view), view.mean, view.std))
            out = logit if out is None else out + logit
        assert out is not None
        return out


def ensemble(models: list[LoadedModel], weights: list[float]) -> tuple[Ensemble, ModelMeta]:
    """One model of ``models`` whose logit is their ``weights``-weighted logit; its threshold,
    context and domain are to be calibrated (idc-viewer calibrate). The members must have been
    validated on the same patients, so that the ensemble can be judged on patients none of
    them saw."""
    if len(models) != len(weights):
        raise ModelError(f"Give one weight per network ({len(models)} networks, {len(weights)} weights).")
    splits = {json.dumps([m.meta.provenance.get(k) for k in ("val_patients", "test_patients")]) for m in models}
    if len(splits) > 1:
        raise ModelError("These networks were validated on different patients; train them with the same "
                         "--split-from before joining them.")
    first = models[0].meta
    finest = min((m.meta for m in models), key=lambda meta: meta.mpp)
    members = tuple(Member(float(w), m.meta) for m, w in zip(models, weights, strict=True))
    factors = [view_factor(finest, m.meta, any_margin=True) for m in models]
    if None in factors:
        raise ModelError("These networks score different patches: each must score the finest network's "
                         f"patches ({finest.patch_size} px at {finest.mpp:g} \u00b5m/px) at that resolution "
                         "or a whole multiple of it.")
    provenance = {k: first.provenance[k] for k in ("sources", "split", "split_from", "val_patients", "test_patients")
                  if k in first.provenance}
    provenance["members"] = [m.model_id for m in models]
    meta = ModelMeta(arch=Architecture(family=ENSEMBLE), patch_size=finest.patch_size, mpp=finest.mpp,
                     margin=max(m.meta.margin * k for m, k in zip(models, factors, strict=True)),  # type: ignore[operator]
                     mean=IDENTITY[0], std=IDENTITY[1],
                     classes=first.classes, task=first.task, members=members, provenance=provenance)
    net = Ensemble(meta)
    for slot, m in zip(net.members, models, strict=True):
        slot.load_state_dict(m.net.state_dict())
    return net.eval(), meta


@dataclass
class LoadedModel:
    """A network with its metadata and the hash of the file it came from."""

    net: WideResNet | EfficientNetLite | Ensemble
    meta: ModelMeta
    sha256: str
    path: Path | None = None

    @property
    def model_id(self) -> str:
        return f"{self.meta.name}-{self.sha256[:12]}"

    def normalise(self, batch_u8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, h, w, 3) uint8 RGB -> normalised float (n, 3, h, w) on ``device``."""
        return normalise(to_float(batch_u8, torch.device(device)), self.meta)


def to_float(images_u8: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, h, w, 3) uint8 RGB -> float (n, 3, h, w) in [0, 1] on ``device``."""
    t = torch.from_numpy(np.require(images_u8, requirements="W")).to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).float().div_(255)


def normalise(x: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """Float (n, 3, h, w) in [0, 1] -> the model's input, with the checkpoint's mean and std."""
    return x if (meta.mean, meta.std) == IDENTITY else _scale(x, meta.mean, meta.std)


def mpp_factor(mpp: float, finer: float) -> int | None:
    """k where ``mpp`` um/px is a whole multiple k >= 1 of ``finer``; None where it is not."""
    k = round(mpp / finer)
    return k if k >= 1 and math.isclose(mpp, k * finer, rel_tol=1e-6) else None


def view_factor(outer: ModelMeta, inner: ModelMeta, any_margin: bool = False) -> int | None:
    """How many of ``outer``'s pixels make one of ``inner``'s on a side, where ``inner`` scores the
    same patches at ``outer``'s resolution or a whole multiple of it and (unless ``any_margin``)
    sees no more around them; None where it does not."""
    k = mpp_factor(inner.mpp, outer.mpp)
    if k is None or inner.patch_size * k != outer.patch_size:
        return None
    return k if any_margin or inner.margin * k <= outer.margin else None


def sub_view(x: torch.Tensor, outer: ModelMeta, inner: ModelMeta) -> torch.Tensor:
    """``inner``'s view of a batch (n, c, h, w) of ``outer``'s views: the middle, cropped to
    ``inner``'s margin, then averaged k x k where ``inner`` works at k times ``outer``'s um/px (the
    mean of each k x k block, what a slide read at the coarser resolution holds)."""
    k = view_factor(outer, inner)
    if k is None:
        raise ModelError(f"A network working at {inner.mpp:g} \u00b5m/px on {inner.patch_size} px patches "
                         f"cannot be shown a view at {outer.mpp:g} \u00b5m/px with {outer.margin} px around "
                         f"{outer.patch_size} px patches.")
    crop = outer.margin - inner.margin * k
    if crop:
        x = x[:, :, crop : x.shape[2] - crop, crop : x.shape[3] - crop]
    return torch.nn.functional.avg_pool2d(x, k) if k > 1 else x


def _scale(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)


def build(arch: Architecture) -> WideResNet | EfficientNetLite | ScanLite0:
    """A freshly initialised single network of that architecture."""
    if arch.family == ENSEMBLE:
        raise ModelError("An ensemble is made from trained networks (idc-viewer ensemble), not trained from scratch.")
    if arch.family == SCAN_FAMILY:
        return ScanLite0(arch.block, arch.side, arch.dropout)
    if arch.variant:
        return EfficientNetLite(arch.in_channels, arch.dropout, arch.stem_stride, arch.variant)
    return WideResNet(arch)


def save_checkpoint(path: str | os.PathLike[str], net: nn.Module, meta: ModelMeta) -> str:
    """Write a checkpoint atomically; returns its sha256."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "meta": meta.to_json(), "state_dict": state}, buf)
    data = buf.getvalue()
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                    trust_torchscript: bool = False) -> LoadedModel:
    """Load a checkpoint safely; raises :class:`ModelError` with one sentence on any problem.

    A folder in WSInfer's format (inference.wsinfer) holds TorchScript, which is code: it loads
    only with ``trust_torchscript``."""
    path = Path(path)
    if path.is_dir():
        from inference.wsinfer import is_wsinfer_folder, load_wsinfer

        if not is_wsinfer_folder(path):
            raise ModelError(f"{path} is a folder without a WSInfer model (config.json and torchscript_model.pt).")
        return load_wsinfer(path, trust_torchscript, device)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"The model file {path} cannot be read.") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, zip errors...
        raise ModelError(
            f"{path.name} is not a valid model file (corrupt, or it contains code objects that are refused)."
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelError(f"{path.name} is not an IDC Slide Viewer model checkpoint.")
    meta = ModelMeta.from_json(obj.get("meta", ""))
    net = Ensemble(meta) if meta.members else build(meta.arch)
    try:
        net.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path.name} holds weights that do not match its declared architecture {meta.name}."
        ) from exc
    net.eval().to(device)
    return LoadedModel(net=net, meta=meta, sha256=hashlib.sha256(data).hexdigest(), path=path)


def inference_copy(net: nn.Module, device: torch.device) -> nn.Module:
    """The network as it scores fastest on ``device``: a copy with each batch norm that follows
    a convolution in a sequence folded into it, its activations in place and channels-last
    memory (what oneDNN and cuDNN run fastest; benchmarks.model_rate measures it). The same
    function up to float rounding; the loaded network itself is left as it is (the training tab
    fine-tunes it). A network of another kind (a WSInfer TorchScript) is only moved."""
    if not any(isinstance(m, (EfficientNetLite, ScanLite0)) for m in net.modules()):
        return net.to(device)
    out = copy.deepcopy(net).eval()
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    for m in out.modules():
        if isinstance(m, nn.ReLU6):  # each follows a convolution whose output nothing else reads
            m.inplace = True  # a fresh tensor per activation costs ten times the clamp itself
    return out.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA was requested but no CUDA GPU is available.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("MPS was requested but this machine has no Apple GPU.")
    if name not in ("cpu", "cuda", "mps"):
        raise ModelError(f"Unknown device {name!r}; use auto, cpu, cuda or mps.")
    return torch.device(name)
