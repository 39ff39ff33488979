"""Rebuild each patient's slide from its patches, as a scanner would store it.

The IDC patch file names carry each patch's (x, y) in the 2.5x slide (about 4 um/px), so a
patient's patches placed at their positions give back the part of the slide the data set kept,
with white where it kept nothing. Written as a pyramidal TIFF with JPEG (YCbCr 4:2:0) tiles at
every level, it is what the viewer and `predict` meet on a real slide; the patch labels become
its ground truth (one labelled level-0 rectangle per patch).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from inference.geometry import Rect
from inference.tiff_writer import write_pyramid_from_array
from inference.truth import PatchLabel, Truth, truth_from_labels
from training.data import DataError, find_patch_files

#: Resolution of the IDC patches (40x scans downsampled 16:1).
DATA_MPP = 4.0
POS_RE = re.compile(r"_x(?P<x>\d+)_y(?P<y>\d+)_class[01]\.png$", re.IGNORECASE)


@dataclass(frozen=True)
class RebuiltSlide:
    patient: str
    path: Path
    truth: Truth
    patches: int


def patches_by_patient(root: Path, patients: Iterable[str] | None = None,
                       exclude: Iterable[str] = ()) -> dict[str, list[tuple[Path, int, int, int]]]:
    """(path, x, y, label) of every positioned patch, per patient."""
    wanted = None if patients is None else {str(p) for p in patients}
    skip = {str(p) for p in exclude}
    out: dict[str, list[tuple[Path, int, int, int]]] = defaultdict(list)
    for path, patient, label in find_patch_files(root):
        m = POS_RE.search(path.name)
        if m and patient not in skip and (wanted is None or patient in wanted):
            out[patient].append((path, int(m["x"]), int(m["y"]), label))
    if not out:
        raise DataError(f"No patches with x, y positions in their names were found for these patients under {root}.")
    return dict(sorted(out.items()))


def mosaic(items: list[tuple[Path, int, int, int]]) -> tuple[np.ndarray, list[PatchLabel]]:
    """The patient's slide at the patches' resolution (white background) and its labels."""
    images, labels = [], []
    for path, x, y, label in items:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
        images.append((x, y, arr))
        labels.append(PatchLabel(Rect(x, y, arr.shape[1], arr.shape[0]), label))
    width = max(x + a.shape[1] for x, _, a in images)
    height = max(y + a.shape[0] for _, y, a in images)
    canvas = np.full((height, width, 3), 255, np.uint8)
    for x, y, arr in images:
        canvas[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
    return canvas, labels


def rebuild_slides(root: str | Path, out_dir: str | Path, quality: int | None = 80,
                   patients: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> Iterator[RebuiltSlide]:
    """Write one pyramidal TIFF per patient into ``out_dir`` (JPEG at ``quality``, or lossless
    when None) and yield it with its truth, patient by patient."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for patient, items in patches_by_patient(Path(root), patients, exclude).items():
        canvas, labels = mosaic(items)
        path = out_dir / f"patient_{patient}.tif"
        kwargs = {"compression": "jpeg", "quality": quality, "ycbcr": True} if quality else {"compression": "zlib"}
        write_pyramid_from_array(path, canvas, DATA_MPP, downsamples=(1, 4, 16),
                                 description=f"patient {patient} rebuilt from {len(items)} IDC patches",
                                 **kwargs)  # type: ignore[arg-type]
        yield RebuiltSlide(patient, path, truth_from_labels(labels, f"patches of patient {patient}"), len(items))
