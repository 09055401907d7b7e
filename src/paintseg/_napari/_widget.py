"""The paintseg dock widget: the Model panel above the Segment, Train and Batch tabs.

Every computation (loading a model, inference, training, batch) runs in a napari thread worker
through :class:`~paintseg._napari._jobs.JobRunner`; layers change only in the GUI-thread
handlers of the panels. Progress shows in the widget's own bars: napari's activity progress
bar animates continuously, which slows training on a machine with few cores. The widget holds
no segmentation logic of its own: its panels call
:func:`~paintseg.inference.segment_labels`, :func:`~paintseg.training.iter_train` and
:func:`~paintseg.batch.iter_batch`, the functions the CLI uses.

The panels live in their own modules and share a :class:`~._session.Session` (the viewer, the
job runner, the current model, the status line):

- :class:`~._model_panel.ModelPanel`: bundled models, Open… / Save…, New U-Net, device;
- :class:`~._segment_tab.SegmentTab`: its form is :class:`~paintseg.config.SegmentSettings`;
- :class:`~._train_tab.TrainTab`: paint, Train, Stop, the loss plot;
- :class:`~._batch_tab.BatchTab`: a folder through the CLI's batch.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QLabel, QTabWidget, QVBoxLayout, QWidget

from ._batch_tab import BatchTab
from ._jobs import JobRunner
from ._model_panel import ModelPanel
from ._segment_tab import SegmentTab
from ._session import EDITED, ROLE, SOURCE, Session
from ._train_tab import TrainTab

__all__ = ["PaintsegWidget", "ROLE", "SOURCE", "EDITED"]


def _first_use_of_torch() -> None:
    """One tiny training step: torch's first forward / backward / optimiser step in a process
    holds the interpreter lock for a noticeable moment; paying it while the widget opens keeps
    that stall out of the user's first Train."""
    import torch

    from ..config import ModelConfig
    from ..model import new_model

    net = new_model(ModelConfig(dims=2, depth=1, base_features=2, features=(1.0,)),
                    seed=0).network
    opt = torch.optim.AdamW(net.parameters())
    net(torch.zeros(2, 1, 16, 16)).sum().backward()
    opt.step()


_HEAP_FROZEN = False


def _freeze_heap() -> None:
    """Collect once, then leave the objects alive now (napari, torch and paintseg's modules,
    classes and functions: hundreds of thousands) out of Python's future garbage collections.

    A full collection walks every tracked object while holding the interpreter lock, so with
    napari and torch loaded each one stalls the GUI thread, and any worker, at moments
    nobody chose. After the freeze, collections walk only what was made since. Done once per
    process, in the start-up worker (the freeze is process-wide, whichever thread calls it).
    """
    global _HEAP_FROZEN
    if not _HEAP_FROZEN:
        gc.collect()
        gc.freeze()
        _HEAP_FROZEN = True


class PaintsegWidget(QWidget):
    """Dock widget: choose a model, segment, paint and train, batch-process folders.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it).
    load_starter : bool
        Load the bundled starter model when the widget opens (in the background).
    """

    def __init__(self, napari_viewer: Any, *, load_starter: bool = True) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.jobs = JobRunner(self)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.session = Session(napari_viewer, self.jobs, self.status)
        self.model_panel = ModelPanel(self.session)
        self.segment_tab = SegmentTab(self.session)
        self.train_tab = TrainTab(self.session, self.model_panel, self.segment_tab)
        self.batch_tab = BatchTab(self.session, self.segment_tab)

        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        root.addWidget(self.model_panel)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.segment_tab, "Segment")
        self.tabs.addTab(self.train_tab, "Train")
        self.tabs.addTab(self.batch_tab, "Batch")
        root.addWidget(self.tabs)
        root.addWidget(self.status)
        root.addStretch(1)

        events = self.viewer.layers.events
        events.inserted.connect(self._watch_layer)
        for layer in self.viewer.layers:
            self._watch_layer(layer)
        self.jobs.busy_changed.connect(self._set_busy)
        self._set_busy(False)
        self._warm_up(load_starter)

    # ------------------------------------------------------------------ the session

    @property
    def model(self) -> Any:
        """The current model (None until one is loaded)."""
        return self.session.model

    @property
    def model_source(self) -> str:
        """The current model's name as the widget shows it."""
        return self.session.source

    def load_model(self, spec: str | Path) -> None:
        """Load a checkpoint file or a bundled model name, in the background."""
        self.model_panel.load_model(spec)

    def save_model(self, path: str | Path) -> None:
        """Write the current model to ``path`` (atomically), in the background."""
        self.model_panel.save_model(path)

    def segment(self, *, image_name: str | None = None) -> bool:
        """Segment the chosen image with the current model; True if started."""
        return self.segment_tab.segment(image_name=image_name)

    def train(self) -> bool:
        """Train on the chosen labels layer; True if started."""
        return self.train_tab.train()

    def new_labels_layer(self) -> Any:
        """An empty labels layer shaped like the Train tab's image, ready for painting."""
        return self.train_tab.new_labels_layer()

    def run_batch(self) -> bool:
        """Run the Batch tab's folder; True if started."""
        return self.batch_tab.run_batch()

    # ------------------------------------------------------------------ wiring

    def _warm_up(self, load_starter: bool) -> None:
        """Import torch and the core, list the bundled models and load the starter model, in
        the background: importing them takes seconds, which would freeze napari if done on
        the GUI thread at the first click."""
        s = self.session

        def job(report, should_stop):
            from .. import batch, inference, training  # noqa: F401 - imported for later
            from ..model import bundled_models, load_model

            names = list(bundled_models())
            model = load_model("nuclei") if load_starter and "nuclei" in names else None
            _first_use_of_torch()
            _freeze_heap()  # here, while the widget says it is loading
            return names, model

        def ready(result) -> None:
            names, model = result
            self.model_panel.set_bundled(names)
            if model is not None:
                s.set_model(model, "nuclei", bundled=True)
                s.say("Starter model 'nuclei' loaded. Choose an image and click Segment, or "
                      "paint and Train (strokes train a new U-Net, corrected instances "
                      "fine-tune the starter; Continue chooses).")
            else:
                s.say("Ready.")

        s.say("Loading paintseg…")
        self.jobs.start("prepare", job, on_done=ready, on_error=s.failed("Starting paintseg"))

    def _set_busy(self, busy: bool) -> None:
        """One job at a time: the buttons that would start another are off meanwhile."""
        starts = (self.segment_tab.segment_btn, self.train_tab.train_btn,
                  self.batch_tab.batch_btn, *self.model_panel.buttons())
        for b in starts:
            b.setEnabled(not busy)
        for b in (self.segment_tab.stop_btn, self.train_tab.stop_btn, self.batch_tab.stop_btn):
            b.setEnabled(busy)
        # Live is turned off by its own toggle; it cannot start beside another job
        self.train_tab.live.toggle.setEnabled(not busy or self.jobs.name == "live")

    def _watch_layer(self, event_or_layer: Any) -> None:
        layer = getattr(event_or_layer, "value", event_or_layer)
        if hasattr(layer.events, "paint"):  # labels layers
            layer.events.paint.connect(lambda _e, ly=layer: self._painted(ly))

    def _painted(self, layer: Any) -> None:
        """A segmentation layer the user paints on becomes theirs: never overwritten."""
        if layer.metadata.get(ROLE) == "segmentation" and not layer.metadata.get(EDITED):
            layer.metadata[EDITED] = True
            self.session.say(
                f"'{layer.name}' now holds your edits: paintseg will not overwrite it (a new "
                "segmentation goes into a new layer). Use it as painted labels to train."
            )
