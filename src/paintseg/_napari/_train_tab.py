"""The Train tab: paint on a labels layer, train the current model (or a new U-Net) on it."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import numpy as np
from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from ..config import PRECISIONS, TrainConfig
from ._choices import LayerChoice
from ._forms import Field, build_form
from ._jobs import Note
from ._layers import training_pair
from ._live import LiveControl
from ._model_panel import ModelPanel
from ._plot import LossPlot
from ._segment_tab import SegmentTab, image_input, is_image
from ._session import (
    EDITED,
    ROLE,
    SOURCE,
    Session,
    UserError,
    message,
    run_stop_row,
    sentence,
)

__all__ = ["TrainTab"]

#: The tab's form: the labels' kind, the budget of :class:`~paintseg.config.TrainConfig`,
#: whether to continue the current model and whether to segment afterwards.
TRAIN_FIELDS = (
    Field("labels_kind", "Labels are", kind="choice", choices=("scribbles", "instances"),
          default="scribbles",
          tooltip="scribbles: painted class values; instances: a corrected segmentation with "
                  "numbered objects"),
    Field("time_budget", "Time budget", high=24 * 3600, special="no limit", none_at_low=True,
          suffix="s", default=60),
    Field("steps", "Steps", high=10**6, special="no limit", none_at_low=True),
    Field("precision", "Precision", kind="choice", choices=PRECISIONS,
          tooltip="Number type of the U-Nets' layers in training steps, here and in Live "
                  "(the CLI's --precision): auto is bfloat16 on a CPU with bfloat16 units "
                  "(Intel AMX), float32 elsewhere; validation and the kept weights are "
                  "float32"),
    Field("continue_model", "", kind="bool", text="Continue from the current model",
          default=True,
          tooltip="On: train the current model further; where you did not paint, it is held "
                  "to its own result, so that corrections change little elsewhere.\n"
                  "Off: start a new U-Net (New U-Net settings above).\n"
                  "Set again whenever a model is loaded or 'Labels are' changes: on a bundled "
                  "model, which has not seen your data, off for scribbles (a new U-Net learns "
                  "strokes better) and on for corrected instances (fine-tuning it scored "
                  "higher); on for any other model."),
    Field("refresh", "", kind="bool", text="Segment the image when training ends",
          default=True),
)


def is_labels(layer: Any) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels)


class PaintedInput(NamedTuple):
    """What *Train* and *Live* start from (:meth:`TrainTab.painted_input`)."""

    image: Any  # the image layer
    labels_layer: Any
    img: np.ndarray  # copies of the layers' data, channels last (training_pair)
    lab: np.ndarray
    base: Any  # the model to continue, or None: a new U-Net
    dims: int
    form: dict  # the Train form's values


class TrainTab(QWidget):
    """Train on the chosen labels layer over the chosen image, with a loss / validation plot,
    Stop (the best weights are kept) and, when asked, a Segment of the image afterwards."""

    def __init__(self, session: Session, model_panel: ModelPanel, segment_tab: SegmentTab
                 ) -> None:
        super().__init__()
        self.session, self.model_panel, self.segment_tab = session, model_panel, segment_tab
        self._warning: str | None = None  # shown again when the run ends
        lay = QFormLayout(self)
        self.image = LayerChoice(session.viewer, is_image)
        lay.addRow("Image", self.image)
        row = QHBoxLayout()
        self.labels = LayerChoice(session.viewer, is_labels)
        self.labels.setToolTip("0 = not painted; 1, 2, … = classes (1 = background)")
        self.new_labels_btn = QPushButton("New labels layer")
        self.new_labels_btn.setToolTip("An empty labels layer of the image's shape, for painting")
        self.new_labels_btn.clicked.connect(lambda: self.new_labels_layer())
        row.addWidget(self.labels, 1)
        row.addWidget(self.new_labels_btn)
        lay.addRow("Labels", row)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        lay.addRow(self.legend)
        self.form = build_form(TrainConfig, TRAIN_FIELDS)
        self.form.add_rows(lay)
        self.train_btn, self.stop_btn, row = run_stop_row(session.jobs, "Train", self.train,
                                                          "Stop (keep best)")
        lay.addRow(row)
        self.live = LiveControl(session, self)
        lay.addRow(self.live)
        self.bar = QProgressBar()
        lay.addRow(self.bar)
        self.plot = LossPlot()
        lay.addRow(self.plot)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        lay.addRow(self.info)

        kind, cont = self.form["labels_kind"], self.form["continue_model"]
        kind.changed.connect(self._default_continue)
        kind.changed.connect(self._update_legend)
        cont.changed.connect(self._update_legend)
        self.image.currentTextChanged.connect(self._update_legend)
        self.labels.currentTextChanged.connect(self._update_legend)
        model_panel.classes.valueChanged.connect(self._update_legend)
        model_panel.names.textChanged.connect(self._update_legend)
        session.model_changed.connect(self._default_continue)
        session.model_changed.connect(self._update_legend)
        self._update_legend()

    # ------------------------------------------------------------------ state

    def _class_names(self) -> list[tuple[int, str]]:
        model = self.session.model
        if model is not None and self.form["continue_model"].value:
            return list(zip(model.class_values, model.class_names))
        return self.model_panel.class_names(self.model_panel.classes.value())

    def _default_continue(self, *_: Any) -> None:
        """Set *Continue from the current model* for the model and the labels' kind
        (:func:`~paintseg.training.continue_by_default`); never for another tool's network
        that has no architecture to train (a TorchScript-only BioImage.IO package)."""
        from ..training import continue_by_default

        model = self.session.model
        # another tool's network without its architecture (TorchScript only) cannot train
        frozen = model is not None and model.frozen
        self.form["continue_model"].value = not frozen and continue_by_default(
            bundled=self.session.bundled, labels_kind=self.form["labels_kind"].value)

    def _update_legend(self, *_: Any) -> None:
        if self.form["labels_kind"].value == "instances":
            # dense labels: 0 is background there, not "not painted", and values are objects
            self.legend.setText("Instances: each object its own number, 0 = background; "
                                "every pixel counts, so correct the whole image")
            return
        name, layers = self.labels.currentText(), self.session.viewer.layers
        layer = layers[name] if name in layers else None
        parts = []
        for value, cname in self._class_names():
            color = "#ffffff"
            if layer is not None:
                rgba = layer.get_color(value)
                if rgba is not None:
                    color = "#" + "".join(f"{int(255 * c):02x}" for c in rgba[:3])
            parts.append(f"<span style='color:{color}'>■</span> {value} = {cname}")
        self.legend.setText("Paint with: " + " · ".join(parts) + " (0 = not painted)")

    # ------------------------------------------------------------------ actions

    def new_labels_layer(self) -> Any:
        """An empty labels layer shaped like the chosen image, ready for painting."""
        from napari.layers import Labels

        s = self.session
        try:
            image = s.layer(self.image.currentText(), "an image layer")
            _data, _axes, lshape = image_input(image)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            s.notify(message(exc), "warning")
            return None
        classes = self._class_names()
        layer = Labels(np.zeros(lshape, np.uint8), name=s.unique_name(f"{image.name} paint"),
                       scale=tuple(image.scale[: len(lshape)]),
                       translate=tuple(image.translate[: len(lshape)]),
                       metadata={ROLE: "annotations", SOURCE: image.name})
        layer.features = {  # napari shows the class name of the label under the cursor
            "index": [0] + [v for v, _ in classes],
            "class": ["not painted"] + [n for _, n in classes],
        }
        s.viewer.add_layer(layer)
        layer.brush_size = 8
        layer.selected_label = classes[1][0] if len(classes) > 1 else 1
        layer.mode = "paint"
        self.labels.setCurrentText(layer.name)
        self._update_legend()
        return layer

    def painted_input(self) -> PaintedInput:
        """What *Train* and *Live* start from, checked before any work: the image and labels
        layers, copies of their data (:func:`training_pair`), the model to continue (None: a
        new U-Net), its dimensionality and the form's values.

        Raises
        ------
        UserError, InputError
            A layer is missing, the image is a time series, a 3D model on a 2D image, the
            labels do not fit the image, or the model to continue takes other channels.
        """
        from ..errors import InputError
        from ..training import check_channels

        s = self.session
        image = s.layer(self.image.currentText(), "an image layer")
        labels_layer = s.layer(self.labels.currentText(), "a labels layer you painted on")
        data, axes, _lshape = image_input(image)
        form = self.form.values()
        base = s.require_model() if form["continue_model"] else None
        dims = base.config.dims if base is not None else self.model_panel.new_dims()
        if "T" in axes:
            raise UserError("Training on time series is not supported yet: paint on a "
                            "single time point (duplicate it as its own layer).")
        if dims == 3 and "Z" not in axes:
            raise UserError("A 3D model trains on 3D stacks; this image is 2D.")
        img, lab = training_pair(data, labels_layer.data, rgb=bool(image.rgb))
        if base is not None:  # said here, before any work, not by the training job
            try:
                check_channels(base, img.shape[-1], model_name=f"'{s.source}'",
                               images=f"'{image.name}'")
            except InputError as exc:
                raise UserError(f"{exc}: untick 'Continue from the current model' to "
                                "train a new U-Net on it.") from None
        return PaintedInput(image, labels_layer, img, lab, base, dims, form)

    def train(self) -> bool:
        """Fine-tune on the painted labels in the background; True if started."""
        from ..devices import resolve_device
        from ..training import (
            EventKind,
            collapse_text,
            disagreement_text,
            iter_train,
            prepare_training,
        )

        s, mp = self.session, self.model_panel
        try:
            image, labels_layer, img, lab, base, dims, form = self.painted_input()
            if form["time_budget"] is None and form["steps"] is None:
                raise UserError("Set a time budget or a number of steps.")
            config = TrainConfig(time_budget=form["time_budget"], steps=form["steps"],
                                 precision=form["precision"])
            kind = form["labels_kind"]
            device = resolve_device(s.device)
            preset = mp.preset.currentText()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            s.refuse(exc)
            return False
        source, labels_name = image.name, labels_layer.name
        # names of a new U-Net's classes, for any painted value the spin box allows
        names = None if base is not None else dict(mp.class_names(mp.classes.maximum()))
        if labels_layer.metadata.get(ROLE) == "segmentation":
            # training labels now, however they were edited: never overwritten by a Segment
            labels_layer.metadata[EDITED] = True
        # the trained model is named by what it was trained from, whatever is loaded or ticked
        # by the time it ends
        base_name = (s.source or None) if base is not None else None

        def job(report, should_stop):
            # training changes the model it is given: a copy, made here (no torch on the GUI
            # thread, see _jobs.py)
            base_copy = copy.deepcopy(base) if base is not None else None
            td, model = prepare_training([(img, lab)], base=base_copy, dims=dims,
                                         class_names=names,
                                         in_channels=img.shape[-1], labels_kind=kind,
                                         preset=preset, channel_axis=-1, names=[labels_name])
            for note in td.notes:
                yield Note(note)
            warning = disagreement_text(model, td, device=device, anchor=config.anchor)
            if warning:
                yield Note(f"{sentence(warning)} Untick 'Continue from the current model' to "
                           "train a new U-Net.", warning=True)
            last = None
            for event in iter_train(model, td, config, device=device, should_stop=should_stop):
                last = event
                yield event
                if event.kind is EventKind.DONE:
                    break
            runs = model.provenance.get("training") or [{}]
            runs[-1]["data"] = f"labels '{labels_name}' on image '{source}' (napari)"
            missed = collapse_text(model, td, device=device)
            if missed:
                yield Note(sentence(missed), warning=True)
            return model, last

        self.plot.clear()
        self.bar.setMaximum(1000)
        self.bar.setValue(0)
        self._warning = None
        self.info.setText("Preparing the painted pixels…")
        s.say(f"Training on '{labels_name}' over '{source}'…")
        return s.jobs.start("train", job, on_progress=self._progress,
                            on_done=lambda res: self._trained(res, source, base_name),
                            on_error=s.failed("Training"))

    def _progress(self, item: Any) -> None:
        from ..training import EventKind

        if isinstance(item, Note):
            if item.warning:  # all of them stay on the Train tab
                self._warning = "\n".join(filter(None, (self._warning, item.text)))
            self.session.notify(item.text, "warning" if item.warning else "info")
            return
        ev = item
        self.bar.setValue(int(1000 * ev.fraction))
        if ev.kind is EventKind.STEP:
            self.plot.add_loss(ev.step, ev.loss)
        elif ev.kind is EventKind.VALIDATION and ev.validation:
            self.plot.add_validation(ev.step, ev.validation["mean_iou"], ev.best_step)
        eta = f", about {ev.eta:.0f} s left" if ev.eta else ""
        val = ""
        if self.plot.iou:
            val = f", validation IoU {self.plot.iou[-1][1]:.3f} (best at step {ev.best_step})"
        stop = " — stopping…" if self.session.jobs.stopping() else ""
        self.info.setText(f"step {ev.step}, loss {ev.loss:.4f}{val}{eta}{stop}")

    def _trained(self, result: Any, source: str, base_name: str | None) -> None:
        from ..training import kept_weights_text

        s = self.session
        model, done = result
        name = base_name or "new U-Net"
        if not name.endswith("(trained)"):
            name = f"{name} (trained)"
        s.set_model(model, name)
        stopped = " (stopped; best weights kept)" if done is not None and done.stopped else ""
        msg = (f"Training done{stopped}: {done.step} steps in {done.elapsed:.0f} s, "
               f"{kept_weights_text(done)}." if done is not None else "Training done.")
        self.bar.setValue(1000)
        if self._warning:  # kept on the Train tab: Segment's message replaces the status
            self.info.setText(f"{msg}\n{self._warning}")
            s.notify(f"{msg} {self._warning}", "warning")
        else:
            self.info.setText(msg)
            s.notify(msg)
        if self.form["refresh"].value and source in s.viewer.layers:
            s.jobs.after(lambda: self.segment_tab.segment(image_name=source))
