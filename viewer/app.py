"""Composition root: builds the application, the models and the main window."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resources import demo_slide_path, model_path


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"idc-viewer: error: --size must look like 1400x900, not {text!r}") from None
    return max(320, w), max(240, h)


def load_model(path: str | None, trust_torchscript: bool = False):  # noqa: ANN201
    """The model to use: ``path`` or the shipped one; (model or None, error sentence or None)."""
    from inference.model import ModelError, load_checkpoint

    try:
        target = model_path(path)
    except ValueError as exc:
        return None, str(exc)
    if not target.exists():
        return None, f"No model file at {target}; no heatmap can be computed."
    try:
        return load_checkpoint(target, trust_torchscript=trust_torchscript), None
    except ModelError as exc:
        return None, str(exc)


def _has_display() -> bool:
    import os

    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM"))


def run_gui(args: argparse.Namespace) -> int:
    import os

    if not _has_display():
        if args.screenshot is None:
            print("idc-viewer: error: no display is available; run the headless commands "
                  "(idc-viewer predict/evaluate/export) or pass --screenshot PNG to render off-screen.",
                  file=sys.stderr)
            return 2
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # a screenshot needs no screen
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from inference.slide import SlideError, open_slide
    from viewer.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("IDC Slide Viewer")
    app.setOrganizationName("IDC Slide Viewer")
    path = Path(args.slide) if args.slide else demo_slide_path()
    screenshot = args.screenshot
    model, model_error = load_model(args.model, args.trust_torchscript)
    if model_error and (args.heatmap or args.model):
        print(f"idc-viewer: error: {model_error}", file=sys.stderr)
        if screenshot is not None:
            return 2
    window = MainWindow(interactive=screenshot is None, model=model, device=args.device)
    window.resize(*_parse_size(args.size))
    if path.is_dir():  # a folder of slides opens as the worklist
        window.show()
        window.open_folder(path)
        if screenshot is None:
            return app.exec()
        return _screenshot_when(app, window, screenshot, lambda: not window.worklist.scanner.running(),
                                window.worklist.scanner.finished)
    try:
        slide = open_slide(path, mpp=args.mpp)
    except SlideError as exc:
        print(f"idc-viewer: error: {exc}", file=sys.stderr)
        if screenshot is not None:
            return 2
        window.show()
        window.show_error("Cannot open slide", str(exc))
        return app.exec()
    window.show()
    window.set_slide(slide)
    window.remember_recent(path)
    if model_error:
        window.statusBar().showMessage(model_error, 15000)
    if args.heatmap:
        window.inference.start()
    if screenshot is None:
        return app.exec()

    def ready() -> bool:
        heatmap_pending = args.heatmap and not (window.inference.heatmap is not None
                                                and window.inference.heatmap.complete)
        return not heatmap_pending and window.view.is_sharp()

    window.inference.runner.failed.connect(lambda _msg: (window.close(), app.quit()))
    QTimer.singleShot(0, window.view.request_update)
    return _screenshot_when(app, window, screenshot, ready, window.view.became_sharp,
                            window.inference.heatmap_finished, timeout_s=600 if args.heatmap else 120)


def _screenshot_when(app, window, screenshot: str, ready, *signals, timeout_s: int = 120) -> int:  # noqa: ANN001
    """Grab the window into ``screenshot`` once ``ready()`` holds after one of ``signals``."""
    from PySide6.QtCore import QTimer

    result: dict[str, int | bool] = {"rc": 1}

    def save() -> None:
        app.processEvents()
        if window.grab().save(str(screenshot)):
            result["rc"] = 0
        else:
            print(f"idc-viewer: error: could not write {screenshot}", file=sys.stderr)
            result["rc"] = 2
        window.close()
        app.quit()

    def timeout() -> None:
        print(f"idc-viewer: error: the window did not finish rendering within {timeout_s} s", file=sys.stderr)
        window.close()
        app.quit()

    def save_when_ready(*_: object) -> None:
        if ready() and not result.get("saving"):
            result["saving"] = True
            QTimer.singleShot(50, save)

    for signal in signals:
        signal.connect(lambda *_a: QTimer.singleShot(0, save_when_ready))
    QTimer.singleShot(timeout_s * 1000, timeout)
    QTimer.singleShot(0, save_when_ready)
    app.exec()
    return result["rc"]
