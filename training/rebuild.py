"""Rebuild each patient's slide from its patches, as a scanner would store it.

Each patient's patches placed at their recorded positions (training.data.mosaic) give back the
part of the slide the data set kept, with white where it kept nothing. Written as a pyramidal
TIFF with JPEG (YCbCr 4:2:0) tiles at every level, it is what the viewer and `predict` meet on a
real slide; the patch labels become its ground truth (one labelled level-0 rectangle per patch),
written beside it as ``<stem>.labels.csv`` so that the viewer shows the truth, the agreement and
the disagreements when the slide is opened.

With ``idc_free`` each slide is rebuilt from the patient's non-IDC patches only (white where the
IDC was): an IDC-free slide of the same tissue, scanner and stain, on which every cell called IDC
is a false call. Rebuilt rather than masked, so that no cell sees tumour in its margin. These are
the non-IDC patches of IDC patients (benign ducts, carcinoma in situ, dense stroma beside the
tumour), harder than most benign slides.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from inference.geometry import Rect
from inference.tiff_writer import write_pyramid_from_array
from inference.truth import PatchLabel, Truth, labels_path, truth_from_labels, write_labels
from training.data import DATA_MPP, mosaic, patches_by_patient


@dataclass(frozen=True)
class RebuiltSlide:
    patient: str
    path: Path
    truth: Truth
    patches: int


def rebuild_slides(root: str | Path, out_dir: str | Path, quality: int | None = 80,
                   patients: Iterable[str] | None = None, exclude: Iterable[str] = (),
                   idc_free: bool = False) -> Iterator[RebuiltSlide]:
    """Write one pyramidal TIFF per patient into ``out_dir`` (JPEG at ``quality``, or lossless
    when None) with its labels beside it, and yield it with its truth, patient by patient.

    ``idc_free``: the patients' non-IDC patches only, as ``patient_<id>_idc_free.tif``; a patient
    with none is skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for patient, items in patches_by_patient(Path(root), patients, exclude).items():
        if idc_free:
            items = [it for it in items if it[3] == 0]
            if not items:
                continue
        canvas, sizes = mosaic(items)
        labels = [PatchLabel(Rect(x, y, w, h), label) for (_, x, y, label), (w, h) in zip(items, sizes, strict=True)]
        path = out_dir / f"patient_{patient}{'_idc_free' if idc_free else ''}.tif"
        kwargs = {"compression": "jpeg", "quality": quality, "ycbcr": True} if quality else {"compression": "zlib"}
        kind = "non-IDC patches (IDC left out)" if idc_free else "IDC data set patches"
        write_pyramid_from_array(path, canvas, DATA_MPP, downsamples=(1, 4, 16),
                                 description=f"patient {patient} rebuilt from {len(items)} {kind}",
                                 **kwargs)  # type: ignore[arg-type]
        write_labels(labels_path(path), labels)
        yield RebuiltSlide(patient, path, truth_from_labels(labels, f"patches of patient {patient}"), len(items))
