"""Experiment: does a wider field of view rank patches better within a slide?

Each patch is cut with MARGIN px of its patient's rebuilt slide around it (the neighbours'
tissue, white where the data set kept none; training.data.load_folder with a margin) and
labelled by its centre. `idc-viewer train --margin` trains the same input for the product.
EfficientNet-Lite0 is trained on that from ImageNet weights, on the training patients of the
split that --split-from recorded (validation and test patients left out). Both it and the
baseline model (50 x 50 patches) are then judged in this process on the validation patients'
patches after one JPEG q80 round trip: AUC pooled over all patients, and the mean AUC within
each patient, which is what one slide's heatmap shows (pooled AUC also rewards ranking one
patient against another, which the slide-adaptive threshold already absorbs).

    python -m benchmarks.wider_field DATA --split-from MODEL.pt [--margin 25] [--epochs 8] [--out wide.pt]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from inference import metrics as M
from inference.model import Architecture, LoadedModel, load_checkpoint
from training.augment import jpeg_batch
from training.data import PatchSet, load_folder
from training.loop import EpochReport, TrainConfig, fit, predict_patches


def aucs(model: LoadedModel, data: PatchSet) -> tuple[float, float]:
    """(pooled AUC, mean within-patient AUC) after a JPEG q80 round trip."""
    data = data.with_margin(model.meta.margin)
    p = predict_patches(model.net, model.meta, jpeg_batch(data.images, 80, 0), torch.device("cpu"))
    groups = data.groups.astype(str)
    within = [M.compute(data.labels[groups == g], p[groups == g], 0.5).auc for g in np.unique(groups)
              if 0 < data.labels[groups == g].sum() < (groups == g).sum()]
    return M.compute(data.labels, p, 0.5).auc, float(np.mean(within))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--split-from", required=True, help="the baseline model; its recorded split is used")
    ap.add_argument("--margin", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8192, help="patches per epoch")
    ap.add_argument("--out", default="wide.pt")
    args = ap.parse_args()
    base = load_checkpoint(args.split_from)
    val_p = {str(p) for p in base.meta.provenance["val_patients"]}
    held = val_p | {str(p) for p in base.meta.provenance["test_patients"]}
    wide = load_folder(args.data, exclude_patients=["8975"], margin=args.margin)
    groups = wide.groups.astype(str)
    train, val = wide.subset(np.flatnonzero(~np.isin(groups, list(held)))), wide.subset(np.flatnonzero(np.isin(groups, list(val_p))))
    config = TrainConfig(out=args.out, arch=Architecture(family="efficientnet-lite0", dropout=0.2), epochs=args.epochs,
                         samples_per_epoch=args.samples, lr=1e-3, patience=args.epochs, imagenet=True,
                         margin=args.margin)
    for r in fit(config, train, val):
        if isinstance(r, EpochReport):
            print(f"epoch {r.epoch}: val bal. acc {r.val['balanced_accuracy']:.4f}, AUC {r.val['auc']:.4f}", file=sys.stderr)
    m = args.margin
    pooled_b, within_b = aucs(base, val)
    pooled_w, within_w = aucs(load_checkpoint(args.out), val)
    print(f"validation patches ({len(val)}, {len(np.unique(val.groups.astype(str)))} patients), JPEG q80:")
    print(f"  baseline {base.model_id}, 50 x 50: pooled AUC {pooled_b:.4f}, mean within-patient AUC {within_b:.4f}")
    print(f"  EfficientNet-Lite0, {50 + 2 * m} x {50 + 2 * m}: pooled AUC {pooled_w:.4f}, "
          f"mean within-patient AUC {within_w:.4f} ({within_w - within_b:+.4f} against the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
