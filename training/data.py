"""Patch data: Kaggle-layout folders, patient-level splits, and patient-balanced weights."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from inference.atomic import atomic_path
from inference.errors import UserError

log = logging.getLogger(__name__)

PATCH = 50
NAME_RE = re.compile(r"^(?P<patient>[^_/]+)_.*_class(?P<label>[01])\.png$", re.IGNORECASE)


class DataError(UserError):
    """Training data could not be used; one sentence for the user."""


@dataclass
class PatchSet:
    """Patches in memory: images (n, 50, 50, 3) uint8, labels (n,), group ids (patient/slide)."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> PatchSet:
        return PatchSet(self.images[mask], self.labels[mask], self.groups[mask], self.sources[mask])

    @staticmethod
    def concat(parts: Sequence[PatchSet]) -> PatchSet:
        parts = [p for p in parts if len(p)]
        if not parts:
            return empty_set()
        return PatchSet(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.groups for p in parts]),
            np.concatenate([p.sources for p in parts]),
        )

    def summary(self) -> dict[str, int]:
        """Counts per class and number of groups."""
        return {
            "patches": len(self),
            "idc": int(self.labels.sum()),
            "non_idc": int((self.labels == 0).sum()),
            "groups": len(np.unique(self.groups)),
        }


def empty_set() -> PatchSet:
    return PatchSet(np.zeros((0, PATCH, PATCH, 3), np.uint8), np.zeros(0, np.int64),
                    np.zeros(0, dtype=object), np.zeros(0, dtype=object))


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
    out.sort()
    return out


def load_patch(path: Path, size: int = PATCH) -> np.ndarray | None:
    """One patch as (size, size, 3) uint8; smaller edge patches are padded with white."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError):
        log.warning("skipping unreadable patch %s", path)
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


def _cache_path(files: Sequence[tuple[Path, str, int]]) -> Path:
    h = hashlib.sha256()
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
) -> PatchSet:
    """Load a patch folder (decoded once, then cached per user as .npz)."""
    files = find_patch_files(Path(root))
    excluded = {str(p) for p in exclude_patients}
    files = [f for f in files if f[1] not in excluded]
    if limit_per_patient:
        rng = np.random.default_rng(seed)
        by_patient: dict[str, list[tuple[Path, str, int]]] = {}
        for f in files:
            by_patient.setdefault(f[1], []).append(f)
        files = []
        for pt in sorted(by_patient):
            items = by_patient[pt]
            idx = rng.permutation(len(items))[:limit_per_patient]
            files.extend(items[i] for i in sorted(idx))
    cache = _cache_path(files)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return PatchSet(z["images"], z["labels"], z["groups"].astype(object),
                                np.full(len(z["labels"]), str(root), dtype=object))
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable patch cache %s", cache)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        arrays = list(pool.map(lambda f: load_patch(f[0]), files))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    images = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, PATCH, PATCH, 3), np.uint8)
    labels = np.array([files[i][2] for i in keep], np.int64)
    groups = np.array([files[i][1] for i in keep], dtype=object)
    try:
        with atomic_path(cache) as tmp:
            np.savez(tmp, images=images, labels=labels, groups=groups.astype(str))
    except OSError:
        log.warning("could not write patch cache %s", cache)
    return PatchSet(images, labels, groups, np.full(len(labels), str(root), dtype=object))


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
