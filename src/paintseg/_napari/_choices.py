"""A combo box of the viewer's layers of one kind that keeps itself up to date."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QComboBox

__all__ = ["LayerChoice"]


class LayerChoice(QComboBox):
    """The names of the viewer's layers that ``accept`` (e.g. image layers), refreshed when a
    layer is added, removed, moved or renamed; the chosen name stays chosen while it exists.

    Parameters
    ----------
    viewer : napari.Viewer
        Whose layers are listed.
    accept : callable
        ``accept(layer)``: whether a layer is listed.
    """

    def __init__(self, viewer: Any, accept: Callable[[Any], bool]) -> None:
        super().__init__()
        self.viewer, self.accept = viewer, accept
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self.refresh)
        events.inserted.connect(self._watch)
        for layer in viewer.layers:
            self._watch(layer)
        self.refresh()

    def _watch(self, event_or_layer: Any) -> None:
        layer = getattr(event_or_layer, "value", event_or_layer)
        layer.events.name.connect(self.refresh)

    def refresh(self, *_: Any) -> None:
        names = [ly.name for ly in self.viewer.layers if self.accept(ly)]
        current = self.currentText()
        if names == [self.itemText(i) for i in range(self.count())]:
            return
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentTextChanged.emit(self.currentText())
