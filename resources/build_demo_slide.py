"""Rebuild the bundled demo slide from the real IDC patches of patient 8975.

The 2,212 patches of patient 8975 (Janowczyk & Madabhushi 2016) were cut from one breast
slide at 2.5x (about 4 um per pixel). Placing each at its recorded (x, y) rebuilds nearly
the whole slide; gaps (background the data set never kept) are left white. The patch labels
are written beside the slide as the pathologist's ground truth, in level-0 pixels.

Usage: python -m resources.build_demo_slide [PATCH_ROOT]   (default ../shared/data/idc_patches)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from inference.geometry import Rect
from inference.tiff_writer import write_pyramid_from_array
from inference.truth import PatchLabel, write_labels

PATIENT = "8975"
MPP = 4.0  # 40x scan (~0.25 um/px) downsampled 16:1
HERE = Path(__file__).resolve().parent
SLIDE = HERE / "demo_idc_8975.tif"
LABELS = HERE / "demo_idc_8975.labels.csv"
NAME_RE = re.compile(r"_x(\d+)_y(\d+)_class([01])\.png$")


def build(patch_root: Path) -> None:
    files = sorted((patch_root / PATIENT).glob("*/*.png"))
    if not files:
        sys.exit(f"no patches of patient {PATIENT} under {patch_root}")
    rows = []
    for f in files:
        m = NAME_RE.search(f.name)
        if m:
            rows.append((int(m[1]), int(m[2]), int(m[3]), f))
    width = max(x for x, *_ in rows) + 50
    height = max(y for _, y, *_ in rows) + 50
    canvas = np.full((height, width, 3), 255, np.uint8)
    out_rows = []
    for x, y, label, f in rows:
        patch = np.asarray(Image.open(f).convert("RGB"))
        ph, pw = patch.shape[:2]
        canvas[y : y + ph, x : x + pw] = patch
        out_rows.append(PatchLabel(Rect(x, y, pw, ph), label))
    write_pyramid_from_array(SLIDE, canvas, MPP, downsamples=(1, 4, 16), quality=90,
                             description=f"IDC demo slide, patient {PATIENT}, rebuilt from 50x50 patches")
    write_labels(LABELS, out_rows)
    print(f"wrote {SLIDE.name} ({width} x {height} px at {MPP} um/px) and {len(out_rows)} labels")


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "data" / "idc_patches"
    build(root)
