"""The tasks a model can do, and the patch geometry of each task's training data.

A checkpoint names its task (``ModelMeta.task``); the task gives the data layout a training run
reads and the words the viewer uses. The model's own resolution, cell and margin stay in its
checkpoint: the task's are those of the data set it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # what the model finds, for a person ("Invasive ductal carcinoma (breast)")
    classes: tuple[str, str]  # negative, positive
    #: The data set's patches: the labelled cell (patch_size px at mpp um/px) and the ring of
    #: unlabelled tissue around it (margin px on every side).
    mpp: float
    patch_size: int
    margin: int
    tissue: str  # the tissue the model was made for, for out-of-domain messages


IDC = Task("idc", "Invasive ductal carcinoma (breast)", ("Non-IDC", "IDC"), 4.0, 50, 0, "breast H&E")
#: PatchCamelyon: 96 px patches at 10x (0.972 um/px) labelled by their centre 32 px.
METASTASIS = Task("metastasis", "Lymph-node metastasis (PatchCamelyon)", ("Normal", "Metastasis"), 0.972, 32, 32,
                  "lymph-node H&E")
#: A model brought from elsewhere (a WSInfer folder): its classes are its own, in its checkpoint.
EXTERNAL = Task("external", "A model from a WSInfer folder", ("Negative", "Positive"), 0.0, 0, 0,
                "tissue it was trained on")
TASKS = {t.name: t for t in (IDC, METASTASIS, EXTERNAL)}


def task_of(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; the tasks are {', '.join(TASKS)}.") from None
