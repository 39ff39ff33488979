"""Patch data: Kaggle-layout folders, patient-level splits, and patient-balanced weights.

The IDC patch file names carry each patch's (x, y) in the 2.5x slide (about 4 um/px), so a
patient's patches placed at their positions give back the part of the slide the data set kept
(:func:`mosaic`, white where it kept nothing). A model with a margin (ModelMeta.margin) trains on
each patch cut from that mosaic with its neighbours' tissue around it, as the slide reader cuts
it from a slide.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from inference.atomic import atomic_path
from inference.errors import UserError
from inference.model import mpp_factor
from inference.patches import centre

log = logging.getLogger(__name__)

#: The data set's patches: 50 px at 4 um/px (40x scans downsampled 16:1), 200 um a side.
PATCH = 50
DATA_MPP = 4.0
NAME_RE = re.compile(r"^(?P<patient>[^_/]+)_.*_class(?P<label>[01])\.png$", re.IGNORECASE)
POS_RE = re.compile(r"_x(?P<x>\d+)_y(?P<y>\d+)_class[01]\.png$", re.IGNORECASE)


class DataError(UserError):
    """Training data could not be used; one sentence for the user."""


@dataclass
class PatchSet:
    """Patches in memory: images (n, 50 + 2 margin, 50 + 2 margin, 3) uint8 (each patch with
    ``margin`` px of its slide around it), labels (n,), group ids (patient/slide)."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    sources: np.ndarray
    margin: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> PatchSet:
        return PatchSet(self.images[mask], self.labels[mask], self.groups[mask], self.sources[mask], self.margin)

    def with_margin(self, margin: int) -> PatchSet:
        """The same patches with ``margin`` px around them (cropped from a wider margin)."""
        if margin == self.margin:
            return self
        if margin > self.margin:
            raise DataError(f"The model sees {margin} px around each patch but these patches were cut with "
                            f"{self.margin} px; load them for this model.")
        return PatchSet(centre(self.images, self.margin - margin), self.labels, self.groups, self.sources, margin)

    @staticmethod
    def concat(parts: Sequence[PatchSet]) -> PatchSet:
        parts = [p for p in parts if len(p)]
        if not parts:
            return empty_set()
        margin = min(p.margin for p in parts)
        parts = [p.with_margin(margin) for p in parts]
        return PatchSet(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.groups for p in parts]),
            np.concatenate([p.sources for p in parts]),
            margin,
        )

    def averaged(self, k: int) -> PatchSet:
        """The same views k times coarser: each k x k block of pixels averaged (what a slide read
        at k times the um/px holds), the margin k times fewer pixels."""
        if k == 1:
            return self
        n, h, w, c = self.images.shape
        out = np.empty((n, h // k, w // k, c), np.uint8)
        for i in range(0, n, 4096):  # in chunks: a float copy of every view at once would be large
            b = self.images[i : i + 4096].astype(np.float32)
            out[i : i + 4096] = np.rint(b.reshape(len(b), h // k, k, w // k, k, c).mean(axis=(2, 4)))
        return PatchSet(out, self.labels, self.groups, self.sources, self.margin // k)

    def summary(self) -> dict[str, int]:
        """Counts per class and number of groups."""
        return {
            "patches": len(self),
            "idc": int(self.labels.sum()),
            "non_idc": int((self.labels == 0).sum()),
            "groups": len(np.unique(self.groups)),
        }


def empty_set(margin: int = 0) -> PatchSet:
    side = PATCH + 2 * margin
    return PatchSet(np.zeros((0, side, side, 3), np.uint8), np.zeros(0, np.int64),
                    np.zeros(0, dtype=object), np.zeros(0, dtype=object), margin)


def find_patch_files(root: Path) -> list[tuple[Path, str, int]]:
    """(path, patient, label) of every ``*_class0.png`` / ``*_class1.png`` under ``root``."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of patches.")
    out = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):  # splits are often folders of symlinks
        for name in files:
            m = NAME_RE.match(name)
            if m:
                out.append((Path(dirpath) / name, m["patient"], int(m["label"])))
    if not out:
        raise DataError(f"No patches named *_class0.png or *_class1.png were found under {root}.")
    out.sort(key=lambda f: (f[0].parts, f[1], f[2]))  # the order of sorting the tuples, 5x faster
    return out


def folder_factor(mpp: float) -> int:
    """How many of a patch folder's pixels make one pixel at ``mpp`` um/px on a side: a whole
    number that divides the patches' side, so that a model there scores the data set's patches."""
    k = mpp_factor(mpp, DATA_MPP)
    if k is None or PATCH % k:
        raise DataError(f"Patch folders hold {PATCH} px patches at {DATA_MPP:g} \u00b5m/px, so a model trained "
                        f"on them works at {DATA_MPP:g} \u00b5m/px or a whole multiple of it that divides {PATCH} "
                        f"px (such as {2 * DATA_MPP:g}), not at {mpp:g}.")
    return k


def read_rgb(path: Path) -> np.ndarray | None:
    """An image file as RGB uint8, or None (with a warning) when it cannot be read."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError):
        log.warning("skipping unreadable image %s", path)
        return None


def load_patch(path: Path, size: int = PATCH) -> np.ndarray | None:
    """One patch as (size, size, 3) uint8; smaller edge patches are padded with white."""
    arr = read_rgb(path)
    if arr is None:
        return None
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    if h > size or w > size:
        arr = arr[:size, :size]
        h, w = arr.shape[:2]
    out = np.full((size, size, 3), 255, np.uint8)
    out[:h, :w] = arr
    return out


def positioned(files: Sequence[tuple[Path, str, int]]) -> dict[str, list[tuple[Path, int, int, int]]]:
    """(path, x, y, label) of every patch whose name carries its position, per patient."""
    out: dict[str, list[tuple[Path, int, int, int]]] = defaultdict(list)
    for path, patient, label in files:
        m = POS_RE.search(path.name)
        if m:
            out[patient].append((path, int(m["x"]), int(m["y"]), label))
    return dict(sorted(out.items()))


def patches_by_patient(root: Path, patients: Iterable[str] | None = None,
                       exclude: Iterable[str] = ()) -> dict[str, list[tuple[Path, int, int, int]]]:
    """(path, x, y, label) of every positioned patch under ``root``, per patient."""
    wanted = None if patients is None else {str(p) for p in patients}
    skip = {str(p) for p in exclude}
    out = {pt: items for pt, items in positioned(find_patch_files(root)).items()
           if pt not in skip and (wanted is None or pt in wanted)}
    if not out:
        raise DataError(f"No patches with x, y positions in their names were found for these patients under {root}.")
    return out


def mosaic(items: Sequence[tuple[Path, int, int, int]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One patient's patches placed at their positions (white elsewhere), at the patches'
    resolution, and each patch's (width, height) (edge patches may be smaller)."""
    placed = []
    for path, x, y, _label in items:
        with Image.open(path) as img:
            placed.append((x, y, np.asarray(img.convert("RGB"))))
    width = max(x + a.shape[1] for x, _, a in placed)
    height = max(y + a.shape[0] for _, y, a in placed)
    canvas = np.full((height, width, 3), 255, np.uint8)
    for x, y, arr in placed:
        canvas[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
    return canvas, [(a.shape[1], a.shape[0]) for _, _, a in placed]


def cut_from_mosaic(items: Sequence[tuple[Path, int, int, int]], chosen: Sequence[int], margin: int) -> np.ndarray:
    """Patches ``chosen`` (indices into one patient's ``items``) cut from the patient's mosaic
    with ``margin`` px around each: (n, 50 + 2 margin, 50 + 2 margin, 3) uint8."""
    canvas, _ = mosaic(items)
    pad = np.pad(canvas, ((margin, margin + PATCH), (margin, margin + PATCH), (0, 0)), constant_values=255)
    side = PATCH + 2 * margin
    return np.stack([pad[items[i][2] : items[i][2] + side, items[i][1] : items[i][1] + side] for i in chosen])


def _cache_path(files: Sequence[tuple[Path, str, int]], extra: str = "") -> Path:
    h = hashlib.sha256(extra.encode())
    for p, _pt, _lb in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    base = Path(os.environ.get("IDC_VIEWER_CACHE", Path.home() / ".cache" / "idc-viewer"))
    return base / "patches" / f"{h.hexdigest()[:20]}.npz"


def load_folder(
    root: str | os.PathLike[str],
    exclude_patients: Iterable[str] = (),
    limit_per_patient: int | None = None,
    seed: int = 0,
    margin: int = 0,
    patients: Iterable[str] | None = None,
) -> PatchSet:
    """Load a patch folder (decoded once, then cached per user as .npz), each patch with
    ``margin`` px of its patient's rebuilt slide around it (positioned patches only).

    ``patients`` keeps only those patients, the same patches as loading all and keeping theirs
    (each patient's draw of ``limit_per_patient`` does not depend on which are kept), without
    reading the others."""
    files = find_patch_files(Path(root))
    excluded = {str(p) for p in exclude_patients}
    files = [f for f in files if f[1] not in excluded]
    by_patient: dict[str, list[tuple[Path, str, int]]] = {}
    for f in files:
        by_patient.setdefault(f[1], []).append(f)
    rng = np.random.default_rng(seed)
    chosen = {pt: (sorted(rng.permutation(len(items))[:limit_per_patient].tolist()) if limit_per_patient
                   else list(range(len(items)))) for pt, items in sorted(by_patient.items())}
    if patients is not None:
        wanted = {str(p) for p in patients}
        by_patient = {pt: items for pt, items in by_patient.items() if pt in wanted}
        chosen = {pt: idx for pt, idx in chosen.items() if pt in wanted}
        if not by_patient:
            return empty_set(margin)
    if margin:  # a patient's mosaic is built from all its patches, so all of them key the cache
        drawn = hashlib.sha256(repr(chosen).encode()).hexdigest()  # patients in sorted order
        cache = _cache_path([f for pt in sorted(by_patient) for f in by_patient[pt]],
                            f"margin={margin};chosen={drawn}")
    else:
        files = [by_patient[pt][i] for pt in sorted(chosen) for i in chosen[pt]]
        cache = _cache_path(files)
    loaded = _read_cache(cache)
    if loaded is None:
        loaded = _cut_patients(Path(root), by_patient, chosen, margin) if margin else _decode(files)
        _write_cache(cache, *loaded)
    images, labels, groups = loaded
    return PatchSet(images, labels, groups, np.full(len(labels), str(root), dtype=object), margin)


def _decode(files: Sequence[tuple[Path, str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and patients of the readable patch files, each patch alone."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        arrays = list(pool.map(lambda f: load_patch(f[0]), files))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    images = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, PATCH, PATCH, 3), np.uint8)
    return images, np.array([files[i][2] for i in keep], np.int64), np.array([files[i][1] for i in keep], dtype=object)


def _cut_patients(root: Path, by_patient: dict[str, list[tuple[Path, str, int]]], chosen: dict[str, list[int]],
                  margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chosen patches of each patient, cut from its mosaic (built from all its patches)."""
    jobs = []  # (patient, all its positioned patches, indices of the chosen ones)
    for pt in sorted(by_patient):
        items = positioned(by_patient[pt]).get(pt, [])
        want = {by_patient[pt][i][0] for i in chosen[pt]}
        idx = [i for i, item in enumerate(items) if item[0] in want]
        if idx:
            jobs.append((pt, items, idx))
    if not jobs:
        raise DataError(f"This model sees each patch with {margin} px of its slide around it, and no patch under "
                        f"{root} carries the x, y position in its name that places it on its slide.")
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        parts = list(pool.map(lambda job: cut_from_mosaic(job[1], job[2], margin), jobs))
    labels = np.array([items[i][3] for _pt, items, idx in jobs for i in idx], np.int64)
    groups = np.array([pt for pt, _items, idx in jobs for _ in idx], dtype=object)
    skipped = sum(len(c) for c in chosen.values()) - len(labels)
    if skipped:
        log.warning("%d patches under %s carry no x, y position and were left out", skipped, root)
    return np.concatenate(parts), labels, groups


def _read_cache(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            return z["images"], z["labels"], z["groups"].astype(object)
    except (OSError, ValueError, KeyError):
        log.warning("ignoring unreadable patch cache %s", cache)
        return None


def _write_cache(cache: Path, images: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> None:
    try:
        with atomic_path(cache) as tmp:
            np.savez(tmp, images=images, labels=labels, groups=groups.astype(str))
    except OSError:
        log.warning("could not write patch cache %s", cache)


def split_groups(
    groups: np.ndarray, labels: np.ndarray, fractions: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Split by group (patient or slide), stratified by each group's IDC fraction.

    Returns one boolean mask per fraction (the first part takes the remainder). No group ever
    appears in two parts.
    """
    uniq = np.array(sorted(set(groups.tolist())), dtype=object)
    frac_idc = np.array([labels[groups == g].mean() for g in uniq])
    rng = np.random.default_rng(seed)
    # Strata of similar IDC fraction; within each, deal groups round-robin in a shuffled order.
    order = np.lexsort((rng.random(len(uniq)), frac_idc))
    n_parts = len(fractions)
    assignment = np.zeros(len(uniq), np.int64)
    weights = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    counts = np.zeros(n_parts)
    for rank, gi in enumerate(order):
        # Give the group to the part furthest below its share so far.
        deficit = weights * (rank + 1) - counts
        part = int(np.argmax(deficit))
        assignment[gi] = part
        counts[part] += 1
    lookup = dict(zip(uniq.tolist(), assignment.tolist(), strict=True))
    part_of = np.array([lookup[g] for g in groups.tolist()])
    return [part_of == k for k in range(n_parts)]


def group_weights(groups: np.ndarray, labels: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-patch weights so large groups count less (1/n**power) and both classes equally."""
    _, inv, counts = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv].astype(np.float64) ** power
    for c in (0, 1):
        m = labels == c
        if m.any():
            w[m] *= 0.5 / w[m].sum()
    return w


def evaluation_weights(groups: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Weights for metrics: a patient/slide of n patches weighs n**(1-power), not n."""
    _, inv, counts = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    return 1.0 / counts[inv].astype(np.float64) ** power
