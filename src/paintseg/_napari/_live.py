"""The Train tab's *Live* mode: the U-Net learns while the user paints.

While *Live* is on, a :class:`~paintseg.training.live.LiveSession` trains as a job (on the
jobs' one thread); every finished brush stroke hands the labels to it; every
:data:`REFRESH_S` seconds, and soon after the view pans, zooms or changes slice, the visible
part of the image is predicted with the current weights into ``<image> live`` (a translucent
labels layer under the user's strokes) and, when asked, ``<image> uncertainty``.
*Where to paint next* moves the view to the most uncertain box of the current plane and
outlines it. Turning *Live* off (or Stop) makes the trained model the current one, for
*Segment* and *Save*.

The GUI thread never waits for the session: labels, predictions and the stop go to it as
requests (:meth:`~paintseg.training.live.LiveSession.submit`) and their results come back
through a queued Qt signal.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QPushButton, QWidget

from ._jobs import Note
from ._layers import most_uncertain_box, scope_region
from ._session import ROLE, SOURCE, Session, UserError, sentence

__all__ = ["LiveControl", "REFRESH_S"]

#: Seconds between two refreshes of the live prediction, at least; more where a prediction
#: of the view takes longer than a third of that (see :meth:`LiveControl.interval`).
REFRESH_S = 2.0
#: A refresh waits at least this many times the last prediction's seconds after it, so
#: that predictions take at most about a quarter of the compute and training goes on.
REFRESH_SHARE = 3.0
#: Edge of the box *Where to paint next* outlines, in pixels.
NEXT_BOX = 64


def _camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera``
    before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


class _Relay(QObject):
    """Carries a finished request (kind, future, context) to the GUI thread."""

    done = Signal(object)


class _Started:
    """Reported by the live job once its session exists."""

    def __init__(self, live: Any) -> None:
        self.live = live


class LiveControl(QWidget):
    """The *Live* toggle, *Where to paint next* and *Uncertainty* of the Train tab.

    Parameters
    ----------
    session : Session
        The widget's shared session.
    train_tab : TrainTab
        Whose image, labels, form and plot the live run uses.
    """

    def __init__(self, session: Session, train_tab: Any) -> None:
        super().__init__()
        self.session, self.tab = session, train_tab
        self.live: Any = None  # the LiveSession while Live is on
        self._image_name = ""
        self._labels: Any = None  # the labels layer Live listens to (renaming it is fine)
        self._lshape: tuple[int, ...] = ()
        self._dims = 2
        self._inflight = False  # one prediction at a time
        self._again = False  # the view changed while one was in flight
        self._asked = 0.0  # when the prediction on its way was asked for
        self._took = 0.0  # seconds the last prediction took, asked to shown
        self._missing = ""  # the last prediction's missed classes in view ('' if none)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.toggle = QPushButton("Live")
        self.toggle.setCheckable(True)
        self.toggle.setToolTip(
            "Train while you paint: each stroke joins the training within a step, and the "
            f"visible part of the image is predicted every {REFRESH_S:.0f} s into "
            "'<image> live'. Turn off to keep the model (then Segment or Save).")
        self.next_btn = QPushButton("Where to paint next")
        self.next_btn.setToolTip("Move the view to where the model is least sure on this "
                                 "plane, outlined in '<image> paint next'")
        self.next_btn.setEnabled(False)
        self.uncertain = QCheckBox("Uncertainty")
        self.uncertain.setToolTip("Show '<image> uncertainty': 1 - the margin between the two "
                                  "most likely classes (bright: unsure)")
        row.addWidget(self.toggle)
        row.addWidget(self.next_btn)
        row.addWidget(self.uncertain)
        self._relay = _Relay()
        self._relay.done.connect(self._deliver)
        self.timer = QTimer(self)  # the next periodic refresh (single shot, rescheduled)
        self.timer.setSingleShot(True)
        self.timer.setInterval(int(REFRESH_S * 1000))
        self.timer.timeout.connect(self.refresh)
        self._soon = QTimer(self)  # a refresh shortly after the view moved (debounced)
        self._soon.setSingleShot(True)
        self._soon.setInterval(150)
        self._soon.timeout.connect(self.refresh)
        self._painted = QTimer(self)  # strokes in quick succession are handed over once
        self._painted.setSingleShot(True)
        self._painted.setInterval(200)
        self._painted.timeout.connect(self._offer)
        self.toggle.toggled.connect(self._toggled)
        self.next_btn.clicked.connect(lambda: self.paint_next())
        self.uncertain.toggled.connect(self._show_uncertainty)

    # ------------------------------------------------------------------ on / off

    @property
    def active(self) -> bool:
        """Whether Live is on (its job may still be starting)."""
        return self.toggle.isChecked()

    def _toggled(self, on: bool) -> None:
        if on:
            if not self.start():
                self.toggle.blockSignals(True)
                self.toggle.setChecked(False)
                self.toggle.blockSignals(False)
        elif self.session.jobs.name == "live":
            self.session.jobs.stop()

    def start(self) -> bool:
        """Start training live on the Train tab's image and labels; True if started."""
        from ..config import TrainConfig
        from ..devices import resolve_device
        from ..training import EventKind, TrainEvent, collapse_text
        from ..training.live import LiveSession

        s, tab, mp = self.session, self.tab, self.tab.model_panel
        try:
            if s.jobs.busy:
                raise UserError("Wait for the running job to end (or stop it) first.")
            image, labels_layer, img, lab, base, dims, form = tab.painted_input()
            if form["labels_kind"] != "scribbles":
                raise UserError("Live mode learns from strokes: set 'Labels are' to "
                                "scribbles.")
            lshape = lab.shape
            device = resolve_device(s.device)
            preset = mp.preset.currentText()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            s.refuse(exc)
            return False
        names = None if base is not None else dict(mp.class_names(mp.classes.maximum()))
        labels_name = labels_layer.name

        def job(report, should_stop):
            # the session trains a copy of the base model, made here (no torch on the GUI
            # thread, see _jobs.py)
            live = LiveSession(img, lab, base=base, dims=dims, preset=preset, device=device,
                               config=TrainConfig(precision=form["precision"]),
                               class_names=names, name=f"'{labels_name}'")
            report(_Started(live))
            last = [0.0]

            def on_step(sess: Any) -> None:
                now = time.perf_counter()
                if now - last[0] >= 0.5:
                    last[0] = now
                    report(TrainEvent(EventKind.STEP, sess.step, sess.loss, sess.seconds,
                                      None, 0.0))

            live.run(should_stop=should_stop, on_step=on_step)
            if live.step == 0:
                return None, live
            model = live.model()
            runs = model.provenance.get("training") or [{}]
            runs[-1]["data"] = f"labels '{labels_name}' on image '{image.name}' (napari, live)"
            # as after a normal run: a painted class the model misses is named
            missed = collapse_text(model, live.training_data, device=device)
            if missed:
                report(Note(sentence(missed), warning=True))
            return model, live

        started = s.jobs.start("live", job, on_progress=self._progress, on_done=self._ended,
                               on_error=self._failed)
        if not started:
            return False
        self._image_name, self._labels = image.name, labels_layer
        self._lshape, self._dims = tuple(lshape), dims
        labels_layer.events.paint.connect(self._labels_changed)
        labels_layer.events.data.connect(self._labels_changed)
        viewer = s.viewer
        camera = _camera(viewer)
        camera.events.center.connect(self._view_moved)
        camera.events.zoom.connect(self._view_moved)
        viewer.dims.events.current_step.connect(self._view_moved)
        tab.plot.clear()
        tab._warning = None
        # no busy (indeterminate) bar: its animation repaints the panel all the time, which
        # cost live training half its steps under a software-rendered display
        tab.bar.setMaximum(1000)
        tab.bar.setValue(0)
        tab.bar.setFormat("live")
        tab.info.setText("Live: paint at least two classes…")
        s.say(f"Live training on '{labels_name}' over '{image.name}': paint, and watch "
              f"'{image.name} live'.")
        return True

    def _painting_on(self) -> Any:
        """The labels layer Live listens to, or None once it left the viewer."""
        layer = self._labels
        return layer if layer is not None and layer in self.session.viewer.layers else None

    def _disconnect(self) -> None:
        viewer = self.session.viewer
        if self._labels is not None:  # connected to the layer object, whatever its name
            self._labels.events.paint.disconnect(self._labels_changed)
            self._labels.events.data.disconnect(self._labels_changed)
            self._labels = None
        camera = _camera(viewer)
        camera.events.center.disconnect(self._view_moved)
        camera.events.zoom.disconnect(self._view_moved)
        viewer.dims.events.current_step.disconnect(self._view_moved)

    def _progress(self, item: Any) -> None:
        if isinstance(item, Note):
            self.tab._progress(item)  # kept on the Train tab, as after Train
            return
        if isinstance(item, _Started):
            self.live = item.live
            self.next_btn.setEnabled(True)
            self._offer()  # strokes painted while it started
            self.timer.start()
            return
        self.tab._progress(item)
        self.tab.info.setText(f"Live: step {item.step}, loss {item.loss:.4f} "
                              f"({item.elapsed:.0f} s)" + self._missing_line())

    def _finish(self) -> None:
        self.timer.stop()
        self._soon.stop()
        self._painted.stop()
        self._disconnect()
        self.live = None
        self._inflight, self._missing = False, ""
        self.next_btn.setEnabled(False)
        self.tab.bar.setFormat("%p%")
        self.toggle.blockSignals(True)
        self.toggle.setChecked(False)
        self.toggle.blockSignals(False)

    def _ended(self, result: Any) -> None:
        model, live = result
        self._finish()
        s = self.session
        if model is None:
            self.tab.info.setText("Live ended before any training step (paint at least two "
                                  "classes).")
            s.say("Live ended; the model was not changed.")
            return
        s.set_model(model, "live U-Net (trained)")
        msg = (f"Live training done: {live.step} steps in {live.seconds:.0f} s. The model is "
               "the current one: Segment the whole image, or Save it.")
        self.tab.bar.setValue(1000)
        warning = self.tab._warning
        self.tab.info.setText(f"{msg}\n{warning}" if warning else msg)
        s.notify(f"{msg} {warning}" if warning else msg, "warning" if warning else "info")

    def _failed(self, exc: BaseException) -> None:
        self._finish()
        self.session.failed("Live training")(exc)

    # ------------------------------------------------------------------ requests

    def _send(self, kind: str, fut: Future, context: Any = None) -> None:
        def relay(f: Future) -> None:
            try:
                self._relay.done.emit((kind, f, context))
            except RuntimeError:  # the widget was closed meanwhile: nothing to show it in
                pass

        fut.add_done_callback(relay)

    def _labels_changed(self, *_: Any) -> None:
        if self.live is not None:
            self._painted.start()

    def _offer(self) -> None:
        """Hand the labels as they are now to the session (it takes in the newest before its
        next step), and show what they change soon after."""
        live, layer = self.live, self._painting_on()
        if live is None or layer is None:
            return
        # the layer's own array: the session copies it on its thread when it takes it in, so
        # the GUI thread copies nothing; the user's layer is only read
        live.offer_labels(layer.data)

    def _view_moved(self, *_: Any) -> None:
        if self.live is not None:
            self._soon.start()

    def _visible_region(self) -> tuple[slice, ...]:
        viewer = self.session.viewer
        layer = self._labels
        n = len(self._lshape)
        current = np.asarray(layer.world_to_data(viewer.dims.point))[:n]
        view = np.asarray(layer.corner_pixels, dtype=float)[:, :n]
        return scope_region(self._lshape, scope="field of view", model_dims=self._dims,
                            current=current, view=view)

    def interval(self) -> float:
        """Seconds from one refresh to the next: :data:`REFRESH_S`, or
        :data:`REFRESH_SHARE` times the last prediction's seconds where that is longer."""
        return max(REFRESH_S, REFRESH_SHARE * self._took)

    def refresh(self) -> None:
        """Predict the visible region with the current weights (while a prediction is on its
        way, the next one starts when it arrives)."""
        live = self.live
        if live is None:
            return
        if self._painting_on() is None:
            self.tab.info.setText("Live: the labels layer it learns from was removed; turn "
                                  "Live off to keep the model.")
            return
        if self._inflight:
            self._again = True
            return
        if live.error or live.waiting_for:
            self.tab.info.setText(f"Live: {live.error or live.waiting_for}.")
            self.timer.start(int(REFRESH_S * 1000))
            return
        region = self._visible_region()
        self._inflight, self._again = True, False
        self._asked = time.perf_counter()
        # never computed here: a refresh asked for as the loop ends is dropped
        self._send("prediction", live.predict_async(region, inline=False), region)

    def paint_next(self) -> None:
        """Outline the most uncertain box of the current plane and centre the view on it."""
        live, layer = self.live, self._painting_on()
        if live is None or layer is None:
            return
        if live.waiting_for:
            self.session.notify(f"Live: {live.waiting_for} first.", "warning")
            return
        viewer = self.session.viewer
        n = len(self._lshape)
        current = np.asarray(layer.world_to_data(viewer.dims.point))[:n]
        region = scope_region(self._lshape, scope="current slice", model_dims=self._dims,
                              current=current)
        self._send("next", live.predict_async(region, inline=False), region)

    def _deliver(self, item: tuple[str, Future, Any]) -> None:
        kind, fut, region = item
        if kind == "prediction":
            self._inflight = False
            self._took = time.perf_counter() - self._asked
        if self.live is None:
            return
        if kind == "prediction":
            # the next periodic refresh; at once where the view moved meanwhile
            if self._again:
                self._soon.start()
            else:
                self.timer.start(int(1000 * self.interval()))
        if fut.cancelled():  # asked for as the loop ended: Live is ending
            return
        exc = fut.exception()
        if exc is not None:
            self.session.notify(f"Live: {exc}", "warning")
            return
        pred = fut.result()
        self._show(pred, region)
        if kind == "next":
            self._outline(most_uncertain_box(pred.uncertainty, size=NEXT_BOX), region)

    # ------------------------------------------------------------------ layers

    def _layer(self, role: str) -> Any:
        for ly in self.session.viewer.layers:
            if ly.metadata.get(ROLE) == role and ly.metadata.get(SOURCE) == self._image_name:
                if tuple(ly.data.shape) == self._lshape:
                    return ly
        return None

    def _new_layer(self, role: str) -> Any:
        from napari.layers import Image, Labels

        s = self.session
        image = s.viewer.layers[self._image_name]
        kw = dict(scale=tuple(image.scale[: len(self._lshape)]),
                  translate=tuple(image.translate[: len(self._lshape)]),
                  metadata={ROLE: role, SOURCE: self._image_name})
        if role == "live":
            layer = Labels(np.zeros(self._lshape, np.uint8), opacity=0.4,
                           name=s.unique_name(f"{self._image_name} live"), **kw)
        else:
            layer = Image(np.zeros(self._lshape, np.float32), colormap="magma",
                          contrast_limits=(0, 1), opacity=0.5, blending="additive",
                          visible=self.uncertain.isChecked(),
                          name=s.unique_name(f"{self._image_name} uncertainty"), **kw)
        self.tab.segment_tab._insert_above(image, layer)
        return layer

    def _show(self, pred: Any, region: tuple[slice, ...]) -> None:
        layers = self.session.viewer.layers
        if self._image_name not in layers:
            return
        live = self._layer("live") or self._new_layer("live")
        live.data[region] = pred.labels.reshape(live.data[region].shape)
        live.refresh()
        unc = self._layer("uncertainty")
        if unc is None and self.uncertain.isChecked():
            unc = self._new_layer("uncertainty")
        if unc is not None:
            unc.data[region] = pred.uncertainty.reshape(unc.data[region].shape)
            unc.refresh()
        missed = self.live.missed_text(pred) or ""
        if missed and not self._missing:  # said once each time it starts missing a class
            self.session.notify(f"Live: {missed}.", "warning")
        self._missing = missed  # kept under the status line until a prediction clears it
        self.tab.info.setText(f"Live: step {pred.step}, prediction of the view shown in "
                              f"'{live.name}'." + self._missing_line())

    def _missing_line(self) -> str:
        return f"\n{sentence(self._missing)}" if self._missing else ""

    def _show_uncertainty(self, on: bool) -> None:
        unc = self._layer("uncertainty")
        if unc is not None:
            unc.visible = on
        elif on and self.live is not None:
            self._soon.start()

    def _outline(self, box: tuple[slice, ...], region: tuple[slice, ...]) -> None:
        from napari.layers import Shapes

        s = self.session
        image = s.viewer.layers[self._image_name]
        # the box in the whole image's coordinates (the region's offset added)
        y0, x0 = box[-2].start + region[-2].start, box[-1].start + region[-1].start
        y1, x1 = box[-2].stop + region[-2].start, box[-1].stop + region[-1].start
        lead = [sl.start for sl in region[:-2]]
        rect = np.array([[*lead, y0, x0], [*lead, y0, x1], [*lead, y1, x1], [*lead, y1, x0]],
                        dtype=float)
        name = f"{self._image_name} paint next"
        if name in s.viewer.layers:
            shapes = s.viewer.layers[name]
            shapes.data = [rect]
        else:
            shapes = Shapes([rect], shape_type="rectangle", edge_color="yellow",
                            face_color="transparent", edge_width=2, name=name,
                            scale=tuple(image.scale[: len(self._lshape)]),
                            translate=tuple(image.translate[: len(self._lshape)]),
                            metadata={ROLE: "paint next", SOURCE: self._image_name})
            self.tab.segment_tab._insert_above(image, shapes)
        centre = image.data_to_world([*lead, (y0 + y1) / 2, (x0 + x1) / 2])
        _camera(s.viewer).center = tuple(np.asarray(centre)[-2:])
        s.say(f"Paint next in the outlined box of '{name}': the model is least sure there.")
