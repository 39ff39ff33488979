"""Helpers shared by the GUI tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings

from viewer.main_window import MainWindow


def show_window(qtbot: Any, tmp_path: Path, width: int, height: int, **kwargs: Any) -> MainWindow:
    """A main window with its own settings file and no dialogs, shown and exposed."""
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings=settings, interactive=False, **kwargs)
    qtbot.addWidget(w)
    w.resize(width, height)
    w.show()
    qtbot.waitExposed(w)
    return w
