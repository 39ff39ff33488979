"""Background work: the tile thread pool, and one QThread that drives a core generator.

Only immutable requests and numpy arrays cross threads; QPixmap is made on the GUI thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, QRunnable, QThread, QThreadPool, Signal, Slot

from inference.slide import Slide
from inference.tiles import TileGrid, TileKey

log = logging.getLogger(__name__)


class _TileSignals(QObject):
    loaded = Signal(object, object, int)  # TileKey, np.ndarray (h, w, 3) uint8, generation
    failed = Signal(object, str, int)


class _TileTask(QRunnable):
    def __init__(self, loader: TileLoader, key: TileKey, generation: int) -> None:
        super().__init__()
        self.loader, self.key, self.generation = loader, key, generation
        self.setAutoDelete(True)

    def run(self) -> None:
        loader = self.loader
        if self.generation != loader.generation and self.key.level != loader.grid.coarsest:
            loader._forget(self.key)  # stale: the user zoomed on before we started
            return
        try:
            arr = loader.slide.read(loader.grid.rect(self.key), loader.grid.out_size(self.key))
        except Exception as exc:  # reported once to the GUI; the tile stays at coarser level
            log.warning("tile %s failed: %s", self.key, exc)
            loader._forget(self.key)
            loader.signals.failed.emit(self.key, str(exc), self.generation)
            return
        loader._forget(self.key)
        loader.signals.loaded.emit(self.key, np.ascontiguousarray(arr), self.generation)


class TileLoader(QObject):
    """Reads display tiles of one slide in a thread pool; duplicate requests are merged."""

    tile_loaded = Signal(object, object)  # TileKey, np.ndarray
    tile_failed = Signal(object, str)

    def __init__(self, slide: Slide, grid: TileGrid, threads: int | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.slide, self.grid = slide, grid
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(threads or max(2, QThreadPool.globalInstance().maxThreadCount()))
        self.generation = 0
        self._in_flight: set[TileKey] = set()
        self._lock = threading.Lock()
        self.signals = _TileSignals()
        self.signals.loaded.connect(self._on_task_loaded)
        self.signals.failed.connect(self._on_task_failed)

    def new_generation(self) -> int:
        """Mark all queued requests stale (they are dropped before reading)."""
        self.generation += 1
        return self.generation

    def request(self, key: TileKey) -> bool:
        """Queue a tile unless it is already in flight; True if a new read was queued."""
        with self._lock:
            if key in self._in_flight:
                return False
            self._in_flight.add(key)
        # Coarser tiles first: they are what the user sees while finer ones load.
        self.pool.start(_TileTask(self, key, self.generation), priority=key.level)
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def _forget(self, key: TileKey) -> None:
        with self._lock:
            self._in_flight.discard(key)

    @Slot(object, object, int)
    def _on_task_loaded(self, key: TileKey, arr: np.ndarray, generation: int) -> None:
        self.tile_loaded.emit(key, arr)

    @Slot(object, str, int)
    def _on_task_failed(self, key: TileKey, message: str, generation: int) -> None:
        self.tile_failed.emit(key, message)

    def shutdown(self) -> None:
        """Drop queued reads and wait for running ones; call before closing the slide."""
        self.new_generation()
        self.pool.clear()
        self.pool.waitForDone()
        with self._lock:
            self._in_flight.clear()


class GeneratorWorker(QObject):
    """Runs a core generator on its own QThread, emitting each yielded report.

    Stopping is closing the generator (its ``finally`` blocks run on the worker thread).
    """

    report = Signal(object)
    failed = Signal(str)
    finished = Signal(bool)  # True when the generator ran to its end

    def __init__(self, make_generator: Callable[[], Iterator[Any]]) -> None:
        super().__init__()
        self._make = make_generator
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @Slot()
    def run(self) -> None:
        completed = False
        gen: Iterator[Any] | None = None
        try:
            gen = self._make()
            for item in gen:
                if self._stop.is_set():
                    break
                self.report.emit(item)
            else:
                completed = True
        except Exception as exc:
            log.exception("background job failed")
            self.failed.emit(str(exc) or type(exc).__name__)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()
            self.finished.emit(completed)


class JobRunner(QObject):
    """Owns the single QThread of a long job (inference or training).

    ``finished`` is emitted once the thread itself has finished, never while it still runs.
    """

    report = Signal(object)
    failed = Signal(str)
    finished = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.thread: QThread | None = None
        self.worker: GeneratorWorker | None = None
        self._completed = False

    def running(self) -> bool:
        return self.thread is not None and self.thread.isRunning()

    def start(self, make_generator: Callable[[], Iterator[Any]]) -> None:
        self.stop()
        self.thread = QThread()
        self.worker = GeneratorWorker(make_generator)
        self.worker.moveToThread(self.thread)
        self.thread.started.connect(self.worker.run)
        self.worker.report.connect(self._on_worker_report)
        self.worker.failed.connect(self._on_worker_failed)
        self.worker.finished.connect(self._on_worker_finished)
        self.worker.finished.connect(self.thread.quit)
        self.thread.finished.connect(self._on_thread_finished)
        self._completed = False
        self.thread.start()

    def stop(self) -> None:
        """Ask the job to stop and wait for its thread to finish."""
        if self.worker is not None:
            self.worker.stop()
        if self.thread is not None:
            self.thread.finished.disconnect(self._on_thread_finished)
            self.thread.requestInterruption()
            self.thread.quit()
            self.thread.wait()
        self.thread, self.worker = None, None

    @Slot(object)
    def _on_worker_report(self, item: object) -> None:
        self.report.emit(item)

    @Slot(str)
    def _on_worker_failed(self, message: str) -> None:
        self.failed.emit(message)

    @Slot(bool)
    def _on_worker_finished(self, completed: bool) -> None:
        self._completed = completed

    @Slot()
    def _on_thread_finished(self) -> None:
        self.thread, self.worker = None, None
        self.finished.emit(self._completed)
