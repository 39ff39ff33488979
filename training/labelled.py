"""Labelled-image folders (PatchCamelyon and the like): class folders or a Kaggle id,label CSV.

Two layouts are read:

- class folders: ``ROOT/<label>/*.{tif,png,jpg}`` or, with a patient (slide) level,
  ``ROOT/<patient>/<label>/*``; ``<label>`` is 0 or 1;
- the Kaggle layout: ``ROOT/<id>.tif`` (or .png, .jpg) and one CSV in ``ROOT`` with ``id`` and
  ``label`` columns (other columns, such as a pandas index, are ignored).

Each image is one patch of the task's data set (inference.tasks: the metastasis task's is 96 px,
the labelled 32 px centre and a 32 px ring). A patch is its own group unless a patient level
names one; identical images are kept once.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from inference.tasks import Task
from training.data import DataError, PatchSet, _cache_path, _read_cache, _write_cache, read_rgb

log = logging.getLogger(__name__)

EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABELS = {"0": 0, "1": 1}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _label_csv(root: Path) -> Path | None:
    found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if len(found) > 1:
        raise DataError(f"{root} holds {len(found)} CSV files; keep one with id and label columns.")
    return found[0] if found else None


def read_label_csv(path: Path) -> dict[str, int]:
    """``id -> label`` from a CSV with ``id`` and ``label`` columns (labels 0 or 1)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path.name} could not be read as a CSV file ({exc}).") from exc
    if not rows:
        raise DataError(f"{path.name} is empty; it needs a header with id and label columns.")
    header = [h.strip().lower() for h in rows[0]]
    if "id" not in header or "label" not in header:
        raise DataError(f"{path.name} needs a header with id and label columns, not {', '.join(rows[0]) or 'none'}.")
    i_id, i_label = header.index("id"), header.index("label")
    out: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(i_id, i_label):
            raise DataError(f"{path.name} line {line} has {len(row)} fields, fewer than its header.")
        label = row[i_label].strip()
        if label not in LABELS:
            raise DataError(f"{path.name} line {line}: the label must be 0 or 1, not {label!r}.")
        out[row[i_id].strip()] = LABELS[label]
    if not out:
        raise DataError(f"{path.name} lists no images.")
    return out


def find_labelled_images(root: str | os.PathLike[str]) -> list[tuple[Path, str, int]]:
    """(path, group, label) of every image under ``root`` in either layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of labelled images.")
    out: list[tuple[Path, str, int]] = []
    table = _label_csv(root)
    if table is not None:
        labels = read_label_csv(table)
        files = {p.stem: p for p in _images(root)}
        missing = [i for i in labels if i not in files]
        if len(missing) == len(labels):
            raise DataError(f"None of the {len(labels)} images listed in {table.name} is in {root}.")
        if missing:
            log.warning("%d images listed in %s are not in %s", len(missing), table.name, root)
        out = [(files[i], i, label) for i, label in sorted(labels.items()) if i in files]
    else:
        def class_folders(folder: Path, group: str | None) -> None:
            for name, label in LABELS.items():
                if (folder / name).is_dir():
                    out.extend((p, group or p.stem, label) for p in _images(folder / name))

        class_folders(root, None)
        if not out:
            for sub in sorted(p for p in root.iterdir() if p.is_dir()):
                class_folders(sub, sub.name)
    if not out:
        raise DataError(f"No labelled images were found under {root}: use {root}/0 and {root}/1 (optionally a level "
                        "per patient above them), or images beside a CSV with id and label columns.")
    return out


def _read(path: Path, side: int) -> np.ndarray | None:
    arr = read_rgb(path)
    if arr is None:
        return None
    if arr.shape[:2] != (side, side):
        log.warning("skipping %s: %d x %d px, not %d x %d", path, arr.shape[1], arr.shape[0], side, side)
        return None
    return arr


def load_labelled(root: str | os.PathLike[str], task: Task) -> PatchSet:
    """The images under ``root`` as the task's patches (cached per user as .npz like patch folders);
    images of another size are skipped with a warning, duplicates kept once."""
    files = find_labelled_images(root)
    side = task.patch_size + 2 * task.margin
    cache = _cache_path(files, f"labelled;side={side}")
    loaded = _read_cache(cache)
    if loaded is None:
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            arrays = list(pool.map(lambda f: _read(f[0], side), files))
        seen: set[bytes] = set()
        keep = []
        for i, a in enumerate(arrays):
            if a is None:
                continue
            digest = hashlib.sha1(a.tobytes()).digest()
            if digest not in seen:
                seen.add(digest)
                keep.append(i)
        if len(keep) < sum(a is not None for a in arrays):
            log.info("%d duplicate images under %s kept once", sum(a is not None for a in arrays) - len(keep), root)
        if not keep:
            raise DataError(f"No image under {root} is {side} x {side} px, the size of the {task.name} task's patches.")
        loaded = (np.stack([arrays[i] for i in keep]), np.array([files[i][2] for i in keep], np.int64),
                  np.array([files[i][1] for i in keep], dtype=object))
        _write_cache(cache, *loaded)
    images, labels, groups = loaded
    return PatchSet(images, labels, groups, np.full(len(labels), str(root), dtype=object), task.margin)
