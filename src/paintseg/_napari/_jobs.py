"""One background job at a time for the dock widget, run in a napari thread worker.

A job is a function ``func(report, should_stop)`` (or a generator function yielding events).
It runs off the GUI thread; ``report(obj)`` and yielded values reach the ``on_progress`` handler
on the GUI thread (through a queued Qt signal); the return value reaches ``on_done`` and an
exception ``on_error``, both on the GUI thread. Layers are changed only in those handlers.

Every job runs on one thread kept for paintseg's jobs, never on napari's shared pool:
torch's CPU parallelism (OpenMP) keeps a team of helper threads for each thread that has
computed with it; while two such threads are alive on a machine with few cores, the helpers
stop waiting for work and are woken for every operation, and training in the second thread
slows down markedly (docs/architecture.md). One thread for all jobs keeps one team.

What a job reports is typed: :class:`Progress` (work done so far), :class:`Note` (a message
for the user) and the core's own objects (:class:`~paintseg.training.TrainEvent`,
:class:`~paintseg.batch.FileResult`); handlers dispatch on the type.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QCoreApplication, QObject, QThreadPool, Signal

__all__ = ["JobRunner", "Progress", "Note"]


@dataclass(frozen=True)
class Progress:
    """Work a job has done so far (tiles of an image, files of a batch)."""

    done: int
    total: int


@dataclass(frozen=True)
class Note:
    """A message for the user from a running job; ``warning`` ones stay on the panel."""

    text: str
    warning: bool = False


_POOL: QThreadPool | None = None


def _job_pool() -> QThreadPool:
    """The process's one thread for paintseg's jobs (see the module's docstring).

    It belongs to no widget: a pool deleted with its widget would make napari's closing wait
    for a running job to end.
    """
    global _POOL
    if _POOL is None:
        _POOL = QThreadPool()
        _POOL.setMaxThreadCount(1)
    return _POOL


class _Relay(QObject):
    """Carries ``report`` calls from the worker thread to the GUI thread."""

    message = Signal(object)


class JobRunner(QObject):
    """Runs one job at a time; ``busy_changed(bool)`` tells the widget to lock its buttons,
    ``refused(asked, running)`` that a job was asked for while another runs."""

    busy_changed = Signal(bool)
    refused = Signal(str, str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._stop = threading.Event()
        self._relay = _Relay()
        self._on_progress: Callable[[Any], None] | None = None
        self._relay.message.connect(self._deliver)
        self.worker: Any = None
        self.name: str | None = None
        self._after: list[Callable[[], None]] = []
        self.pool = _job_pool()
        # no job outlives the window: closing the viewer (which deletes the widget and this
        # runner with it) or quitting the application asks the running job to stop; a live
        # session would otherwise train on, and quitting would wait for it
        self.destroyed.connect(self._stop.set)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._stop.set)

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def stop(self) -> None:
        """Ask the running job to stop at its next check (between tiles or steps)."""
        self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _deliver(self, obj: Any) -> None:
        if self._on_progress is not None:
            self._on_progress(obj)

    def start(
        self,
        name: str,
        func: Callable[..., Any],
        *,
        on_progress: Callable[[Any], None] | None = None,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> bool:
        """Start ``func`` in a worker thread; False (nothing started, :attr:`refused` emitted)
        if a job is running."""
        if self.busy:
            self.refused.emit(name, self.name or "")
            return False
        self._stop.clear()
        self._on_progress = on_progress
        report, should_stop = self._relay.message.emit, self._stop.is_set
        if inspect.isgeneratorfunction(func):
            def job():  # noqa: ANN202 - generator worker
                return (yield from func(report, should_stop))
        else:
            def job():  # noqa: ANN202 - function worker
                return func(report, should_stop)
        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        if on_progress is not None and hasattr(worker, "yielded"):
            worker.yielded.connect(on_progress)
        if on_done is not None:
            worker.returned.connect(on_done)
        if on_error is not None:
            worker.errored.connect(on_error)
        worker.finished.connect(self._finished)
        self.worker, self.name = worker, name
        self.busy_changed.emit(True)
        self.pool.start(worker)  # (worker.start() would use napari's shared pool)
        return True

    def after(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the GUI thread once the current job has finished (e.g. a follow-up
        job started from an ``on_done`` handler)."""
        self._after.append(fn)

    def _finished(self) -> None:
        self.worker, self.name = None, None
        self._on_progress = None
        self.busy_changed.emit(False)
        pending, self._after = self._after, []
        for fn in pending:
            fn()

    def wait(self, timeout_ms: int = 60_000) -> bool:
        """Run the Qt event loop until the job (and any follow-up) ends; True if it did.

        For tests, benchmarks and scripts: the GUI stays live meanwhile, as in napari.
        """
        from qtpy.QtCore import QEventLoop, QTimer

        if not self.busy:
            return True
        loop = QEventLoop()
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(loop.quit)

        def check(busy: bool) -> None:
            if not busy:
                # a follow-up job may start right after; look again once events settle
                QTimer.singleShot(0, lambda: None if self.busy else loop.quit())

        self.busy_changed.connect(check)
        timer.start(timeout_ms)
        loop.exec()
        self.busy_changed.disconnect(check)
        timer.stop()
        return not self.busy
