"""What the dock widget's panels share: the viewer, the one job runner, the current model,
and the status line where the user reads what happened.

The panels (:mod:`._model_panel`, :mod:`._segment_tab`, :mod:`._train_tab`,
:mod:`._batch_tab`) hold no state of their own beyond their forms; they read the model from
the session and learn of a new one from :attr:`Session.model_changed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton

from ..errors import PaintsegError
from ._jobs import JobRunner

__all__ = ["ROLE", "SOURCE", "EDITED", "UserError", "message", "Session", "run_stop_row"]

log = logging.getLogger(__name__)

ROLE = "paintseg_role"  # layer.metadata key: "segmentation", "probability" or "annotations"
SOURCE = "paintseg_source"  # name of the image layer a paintseg layer belongs to
EDITED = "paintseg_user_edited"  # set when the user paints on a segmentation layer


class UserError(PaintsegError):
    """Something the user should do first (shown as a warning, not an error), in words meant
    for them."""


def sentence(text: str) -> str:
    """A core message (lower case, no full stop, to be embedded) as a sentence of its own."""
    return f"{text[:1].upper()}{text[1:]}."


def message(exc: BaseException) -> str:
    """What a biologist reads when a job fails or an input is refused."""
    if isinstance(exc, PaintsegError):  # UserError too
        return str(exc)
    if isinstance(exc, MemoryError):
        return ("Out of memory. Try a smaller tile size, 'current slice' or 'field of view', "
                "or close other programs.")
    if isinstance(exc, (ValueError, OSError)):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}: {exc}); details are in the log."


#: What a job (by its :class:`~._jobs.JobRunner` name) does, where its name is not a verb.
_VERBS = {"new": "create a U-Net", "batch": "run a batch", "live": "train live",
          "prepare": "start"}


def run_stop_row(jobs: JobRunner, run_text: str, run: Callable[[], Any],
                 stop_text: str = "Stop") -> tuple[QPushButton, QPushButton, QHBoxLayout]:
    """A panel's action button beside a Stop button that stops the running job."""
    run_btn, stop_btn = QPushButton(run_text), QPushButton(stop_text)
    run_btn.clicked.connect(lambda: run())
    stop_btn.clicked.connect(jobs.stop)
    row = QHBoxLayout()
    row.addWidget(run_btn)
    row.addWidget(stop_btn)
    return run_btn, stop_btn, row


class Session(QObject):
    """The viewer, the job runner, the current model and the status line, shared by the panels.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    jobs : JobRunner
        Runs one background job at a time for every panel.
    status : QLabel
        The widget's status line.
    """

    #: Emitted (on the GUI thread) after the current model was replaced.
    model_changed = Signal()

    def __init__(self, viewer: Any, jobs: JobRunner, status: QLabel) -> None:
        super().__init__()
        self.viewer = viewer
        self.jobs = jobs
        self.status = status
        self.model: Any = None
        self.source = ""
        self.bundled = False
        self.device = "auto"  # the Model panel's choice
        # a job asked for from code (a button would be disabled) while another runs
        jobs.refused.connect(lambda asked, running: self.notify(
            f"Cannot {_VERBS.get(asked, asked)} now: the {running} job is still running (Stop "
            "it, or wait for it to end).", "warning"))

    def set_model(self, model: Any, source: str, *, bundled: bool = False) -> None:
        """Make ``model`` (named ``source``) the current model and tell the panels."""
        self.model, self.source, self.bundled = model, source, bundled
        self.model_changed.emit()

    def require_model(self) -> Any:
        """The current model; a :class:`UserError` when there is none yet."""
        if self.model is None:
            raise UserError("Load a model first: the starter model, Open…, or New U-Net.")
        return self.model

    def layer(self, name: str, kind: str) -> Any:
        """The layer named ``name``; a :class:`UserError` naming ``kind`` when there is none."""
        if not name or name not in self.viewer.layers:
            raise UserError(f"Choose {kind} first (open an image: File > Open, or File > Open "
                            "Sample > paintseg).")
        return self.viewer.layers[name]

    def say(self, text: str) -> None:
        """Show ``text`` on the status line."""
        self.status.setText(text)

    def notify(self, text: str, level: str = "info") -> None:
        """Show ``text`` on the status line and as a napari notification (``info``,
        ``warning`` or ``error``)."""
        from napari.utils import notifications

        self.status.setText(text)
        {"info": notifications.show_info, "warning": notifications.show_warning,
         "error": notifications.show_error}[level](text)

    def refuse(self, exc: BaseException) -> None:
        """Show why an action could not start (a warning for a :class:`UserError`)."""
        self.notify(message(exc), "warning" if isinstance(exc, UserError) else "error")

    def failed(self, what: str) -> Callable[[BaseException], None]:
        """An error handler for a job: logs the traceback and tells the user ``what`` failed."""
        def handler(exc: BaseException) -> None:
            log.error("paintseg: %s failed", what, exc_info=exc)
            self.notify(f"{what} failed: {message(exc)}", "error")

        return handler

    def unique_name(self, name: str) -> str:
        """``name``, or ``name [k]`` with the first free ``k`` when a layer has it already."""
        if name not in self.viewer.layers:
            return name
        k = 2
        while f"{name} [{k}]" in self.viewer.layers:
            k += 1
        return f"{name} [{k}]"
