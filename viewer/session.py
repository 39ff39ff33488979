"""The open slide's state, as one model the panels subscribe to (napari's ViewerModel, small).

A :class:`SlideSession` holds the open slide (immutable: a new resolution is a new Slide), the
model in use, the heatmap shown and the annotation store. Panels receive the session and
subscribe to its signals; nobody else sets these, so opening a slide is one call, not an
ordered sequence of ``set_slide`` calls in the window.

Order of a switch: ``slide_closing`` (subscribers stop jobs, save, drop their layers), the new
state is set, ``slide_changed`` (subscribers load what belongs to the new slide), then the old
file is closed (after any read still in flight).
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from inference.annotations import AnnotationStore
from inference.heatmap import Heatmap
from inference.model import LoadedModel
from inference.slide import Slide


class SlideSession(QObject):
    slide_closing = Signal()  # the open slide is about to be replaced or closed
    slide_changed = Signal(object)  # Slide | None: a slide was opened or closed
    resolution_changed = Signal(object)  # Slide: the same slide at a resolution entered by hand
    model_changed = Signal(object)  # LoadedModel | None
    heatmap_changed = Signal(object)  # Heatmap | None: the map shown changed (new, finished, context)

    def __init__(self, model: LoadedModel | None = None, device: str = "auto",
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.slide: Slide | None = None
        self.model = model
        self.device = device
        self.heatmap: Heatmap | None = None
        self.store: AnnotationStore | None = None

    def open(self, slide: Slide | None) -> None:
        """Make ``slide`` the open slide (None closes it); the previous file is closed."""
        old = self.slide
        if old is not None:
            self.slide_closing.emit()
        self.slide, self.heatmap = slide, None
        self.store = AnnotationStore() if slide is not None else None
        self.slide_changed.emit(slide)
        if old is not None and (slide is None or not old.shares_file(slide)):
            old.close()

    def set_mpp(self, mpp: float) -> None:
        """The open slide at a resolution entered by hand (raises SlideError if implausible)."""
        if self.slide is None:
            return
        self.slide = self.slide.with_mpp(mpp)
        self.heatmap = None
        self.resolution_changed.emit(self.slide)

    def set_model(self, model: LoadedModel | None) -> None:
        self.model = model
        self.model_changed.emit(model)

    def set_heatmap(self, heatmap: Heatmap | None) -> None:
        """The heatmap shown (the inference panel's); emitted again when its map changes."""
        self.heatmap = heatmap
        self.heatmap_changed.emit(heatmap)
