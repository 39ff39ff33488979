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
            arr = loader.slide.read(loader.grid.rect(self.key), loader.grid.out_size(self.key), reduced_decode=True)
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
    """Runs a core generator on its own QThread, emitting each yielded report with its job id.

    Stopping is closing the generator (its ``finally`` blocks run on the worker thread).
    """

    report = Signal(int, object)
    failed = Signal(int, str)
    finished = Signal(int, bool)  # True when the generator ran to its end

    def __init__(self, job_id: int, make_generator: Callable[[], Iterator[Any]]) -> None:
        super().__init__()
        self.job_id = job_id
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
                self.report.emit(self.job_id, item)
            else:
                completed = True
        except Exception as exc:
            if not self._stop.is_set():  # a stopped job's errors (a closed slide...) are nobody's concern
                log.exception("background job failed")
                self.failed.emit(self.job_id, str(exc) or type(exc).__name__)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing a background job failed")
            self.finished.emit(self.job_id, completed)


class JobRunner(QObject):
    """Owns the QThread of the one current long job (inference or training).

    Every job has an id; a report, failure or end of any other job is dropped where it arrives,
    so a stopped job can never touch what the GUI shows now. ``stop()`` returns at once: the
    stopped job winds down on its own thread (within one batch) and is kept referenced until
    it has; only :meth:`shutdown` (closing the window) waits for threads. ``finished`` is
    emitted once the current job's thread itself has finished.
    """

    report = Signal(object)
    failed = Signal(str)
    finished = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.thread: QThread | None = None
        self.worker: GeneratorWorker | None = None
        self.job_id = 0
        self._completed = False
        self._retired: dict[int, tuple[QThread, GeneratorWorker]] = {}
        self._job_of: dict[QThread, int] = {}

    def running(self) -> bool:
        return self.thread is not None and self.thread.isRunning()

    def start(self, make_generator: Callable[[], Iterator[Any]]) -> int:
        """Start a job (stopping the current one); returns its id."""
        self.stop()
        self.job_id += 1
        thread, worker = QThread(), GeneratorWorker(self.job_id, make_generator)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.report.connect(self._on_worker_report)
        worker.failed.connect(self._on_worker_failed)
        worker.finished.connect(self._on_worker_finished)
        worker.finished.connect(thread.quit)
        # A bound slot of this GUI-thread object (not a lambda, which would run on the worker thread).
        thread.finished.connect(self._on_thread_finished)
        self._job_of[thread] = self.job_id
        self.thread, self.worker, self._completed = thread, worker, False
        thread.start()
        return self.job_id

    def stop(self) -> None:
        """Ask the current job to stop; return at once. Its later reports are dropped."""
        if self.worker is not None and self.thread is not None:
            self.worker.stop()
            self.thread.requestInterruption()
            self.thread.quit()  # its event loop ends as soon as the worker's run() returns
            self._retired[self.worker.job_id] = (self.thread, self.worker)
        self.thread, self.worker = None, None
        self.job_id += 1  # nothing of the stopped job is current any more

    def shutdown(self) -> None:
        """Stop the current job and wait for every job's thread (closing the window)."""
        self.stop()
        for thread, _worker in list(self._retired.values()):
            thread.wait()
        self._retired.clear()
        self._job_of.clear()

    def threads(self) -> int:
        """Threads of this runner that have not finished (current and stopping)."""
        alive = [t for t, _w in self._retired.values() if not t.isFinished()]
        return len(alive) + (1 if self.running() else 0)

    @Slot(int, object)
    def _on_worker_report(self, job_id: int, item: object) -> None:
        if job_id == self.job_id:
            self.report.emit(item)

    @Slot(int, str)
    def _on_worker_failed(self, job_id: int, message: str) -> None:
        if job_id == self.job_id:
            self.failed.emit(message)

    @Slot(int, bool)
    def _on_worker_finished(self, job_id: int, completed: bool) -> None:
        if job_id == self.job_id:
            self._completed = completed

    @Slot()
    def _on_thread_finished(self) -> None:
        job_id = self._job_of.pop(self.sender(), None)  # type: ignore[arg-type]
        if job_id is None:
            return
        if self._retired.pop(job_id, None) is not None:
            return  # a stopped job has wound down; nobody waits for its end
        if self.worker is not None and job_id == self.worker.job_id:
            self.thread, self.worker = None, None
            self.finished.emit(self._completed)
