"""Choosing the model: the shipped models by name and any checkpoint opened, one list for the
heatmap panel, the worklist and the Model menu, all following the session's model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QComboBox, QFileDialog, QMenu, QMessageBox, QWidget

from inference.model import LoadedModel, ModelError, load_checkpoint
from inference.tasks import TASKS
from inference.wsinfer import is_wsinfer_folder
from resources import SHIPPED_MODELS, shipped_model_path
from viewer.session import SlideSession


class ModelLibrary:
    """The models the viewer has loaded, by file, so that switching back to one is instant.

    ``choices()`` lists the shipped models (loaded when first chosen) and every checkpoint the
    user opened; ``get`` loads one once."""

    def __init__(self, session: SlideSession) -> None:
        self.session = session
        self._loaded: dict[str, LoadedModel] = {}
        self._extra: list[str] = []  # checkpoints opened by the user, in order
        if session.model is not None and session.model.path is not None:
            self._remember(session.model)

    def _remember(self, model: LoadedModel) -> None:
        key = str(Path(model.path).resolve())  # type: ignore[arg-type]
        self._loaded[key] = model
        if key not in {str(shipped_model_path(n).resolve()) for n in SHIPPED_MODELS} and key not in self._extra:
            self._extra.append(key)

    def choices(self) -> list[tuple[str, str]]:
        """(label, path) of every model to offer."""
        out = []
        for name in SHIPPED_MODELS:
            path = shipped_model_path(name)
            if path.exists():
                task = TASKS.get(name)
                out.append((f"{task.title if task else name} \u2014 shipped ({name})", str(path.resolve())))
        out += [(f"{TASKS[self._loaded[p].meta.task].title} \u2014 {Path(p).name}", p) for p in self._extra]
        return out

    def get(self, path: str, trust_torchscript: bool = False) -> LoadedModel:
        """The model in ``path``, loaded once (raises ModelError with one sentence); a WSInfer
        folder only with ``trust_torchscript``."""
        key = str(Path(path).resolve())
        if key not in self._loaded:
            self._remember(load_checkpoint(key, trust_torchscript=trust_torchscript))
        return self._loaded[key]

    def add(self, model: LoadedModel) -> None:
        """A model made in the viewer (the training tab's), offered from now on."""
        if model.path is not None:
            self._remember(model)


class ModelPicker(QComboBox):
    """A combo box of the library's models that sets and follows the session's model."""

    error = Signal(str)  # one sentence, when a chosen file is not a model
    BROWSE, BROWSE_WSINFER = "browse", "browse-wsinfer"
    TRUST_TEXT = ("A WSInfer model is TorchScript: code that runs on this computer with your permissions, "
                  "unlike this viewer's own model files, which hold only weights. Load it only if you trust "
                  "where it came from.\n\nLoad {name}?")

    def __init__(self, library: ModelLibrary, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.library = library
        # Long titles must not widen the dock (and the window) beyond what the user chose.
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(16)
        self.setToolTip("The model whose heatmap is shown: each model finds one thing (its task) at its own "
                        "resolution; each slide keeps one heatmap per model.")
        self.activated.connect(self._on_activated)
        #: Asks before TorchScript runs (title, text) -> yes; the window's tests answer for the user.
        self.confirm: Callable[[str, str], bool] = self._ask
        library.session.model_changed.connect(self.refresh)
        self.refresh()

    @Slot()
    def refresh(self, *_: object) -> None:
        self.blockSignals(True)
        self.clear()
        for label, path in self.library.choices():
            self.addItem(label, path)
        self.addItem("Open a model file\u2026", self.BROWSE)
        self.addItem("Open a WSInfer model folder\u2026", self.BROWSE_WSINFER)
        current = self.library.session.model
        index = self.findData(str(Path(current.path).resolve())) if current is not None and current.path else -1
        self.setCurrentIndex(max(index, 0) if current is not None else -1)
        self.blockSignals(False)

    @Slot(int)
    def _on_activated(self, index: int) -> None:
        path = self.itemData(index)
        if path == self.BROWSE:
            path, _ = QFileDialog.getOpenFileName(self, "Open model", "", "Models (*.pt)")
        elif path == self.BROWSE_WSINFER:
            path = QFileDialog.getExistingDirectory(self, "Open a WSInfer model folder (config.json and "
                                                    "torchscript_model.pt)")
        if not path:
            self.refresh()
            return
        self.choose(path)

    def fill_menu(self, menu: QMenu) -> None:
        """The same choices as a menu (the window's Model menu): one checkable entry per model."""
        menu.clear()
        for i in range(self.count()):
            act = menu.addAction(self.itemText(i))
            act.setCheckable(i < self.count() - 2)  # the last two open a file or a folder
            act.setChecked(i == self.currentIndex())
            act.triggered.connect(lambda _=False, index=i: self.activated.emit(index))

    def _ask(self, title: str, text: str) -> bool:
        answer = QMessageBox.warning(self, title, text, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                     QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def choose(self, path: str) -> bool:
        """Make the model in ``path`` the session's model; False (and a sentence) if it is not one.
        A WSInfer folder asks first: its TorchScript is code."""
        trust = is_wsinfer_folder(path)
        if trust and not self.confirm("Load TorchScript?", self.TRUST_TEXT.format(name=Path(path).name)):
            self.refresh()
            return False
        try:
            model = self.library.get(path, trust_torchscript=trust)
        except (ModelError, OSError) as exc:
            self.error.emit(str(exc) if isinstance(exc, ModelError) else f"Cannot read {path}: {exc.strerror or exc}.")
            self.refresh()
            return False
        if model is not self.library.session.model:
            self.library.session.set_model(model)
        return True
