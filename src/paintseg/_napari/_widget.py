"""The paintseg dock widget: Model, Segment, Train and Batch.

Every computation (loading a model, inference, training, batch) runs in a napari thread worker
through :class:`~paintseg._napari._jobs.JobRunner`; layers change only in the GUI-thread
handlers here. Progress shows in the widget's own bars: napari's activity progress bar animates
continuously, and on a 2-core machine that animation halved the training speed (measured).
The widget holds no segmentation logic of its own: it calls
:func:`~paintseg.inference.segment_labels`, :func:`~paintseg.training.iter_train` and
:func:`~paintseg.batch.iter_batch`, the functions the CLI uses.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..config import SNAP_PIXELS
from ..errors import PaintsegError
from ._jobs import JobRunner
from ._layers import SCOPES, layer_axes, merge_region, scope_region, spatial_shape, training_pair
from ._plot import LossPlot

__all__ = ["PaintsegWidget"]

log = logging.getLogger(__name__)

ROLE = "paintseg_role"  # layer.metadata key: "segmentation", "probability" or "annotations"
SOURCE = "paintseg_source"  # name of the image layer a paintseg layer belongs to
EDITED = "paintseg_user_edited"  # set when the user paints on a segmentation layer


def _message(exc: BaseException) -> str:
    """What a biologist reads when a job fails or an input is refused."""
    if isinstance(exc, PaintsegError):  # _UserError too
        return str(exc)
    if isinstance(exc, MemoryError):
        return ("Out of memory. Try a smaller tile size, 'current slice' or 'field of view', "
                "or close other programs.")
    if isinstance(exc, (ValueError, OSError)):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}: {exc}); details are in the log."


def _first_use_of_torch() -> None:
    """One tiny training step: torch's first forward / backward / optimiser step in a process
    holds the interpreter lock for ~250 ms (measured); paying it while the widget opens keeps
    that stall out of the user's first Train."""
    import torch

    from ..config import ModelConfig
    from ..model import new_model

    net = new_model(ModelConfig(dims=2, depth=1, base_features=2, features=(1.0,)),
                    seed=0).network
    opt = torch.optim.AdamW(net.parameters())
    net(torch.zeros(2, 1, 16, 16)).sum().backward()
    opt.step()


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
        self.model: Any = None
        self.model_source = ""
        self._model_bundled = False
        self.jobs = JobRunner(self)
        self.jobs.busy_changed.connect(self._set_busy)
        self._t_train = 0.0
        self._train_warning: str | None = None  # shown again when the run ends

        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        root.addWidget(self._build_model_box())
        self.tabs = QTabWidget()
        self.tabs.addTab(self._build_segment_tab(), "Segment")
        self.tabs.addTab(self._build_train_tab(), "Train")
        self.tabs.addTab(self._build_batch_tab(), "Batch")
        root.addWidget(self.tabs)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)

        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layer_choices)
        events.removed.connect(self._refresh_layer_choices)
        events.moved.connect(self._refresh_layer_choices)
        events.inserted.connect(self._watch_layer)
        for layer in self.viewer.layers:
            self._watch_layer(layer)
        self._refresh_layer_choices()
        self._set_busy(False)
        self._warm_up(load_starter)

    # ------------------------------------------------------------------ building

    def _warm_up(self, load_starter: bool) -> None:
        """Import torch and the core, list the bundled models and load the starter model, in
        the background: importing them takes seconds, which would freeze napari if done on
        the GUI thread at the first click."""

        def job(report, should_stop):
            from .. import batch, inference, training  # noqa: F401 - imported for later
            from ..model import bundled_models, load_model

            names = list(bundled_models())
            model = load_model("nuclei") if load_starter and "nuclei" in names else None
            _first_use_of_torch()
            return names, model

        def ready(result) -> None:
            names, model = result
            self.bundled.clear()
            self.bundled.addItems(names)
            self._show_device()
            if model is not None:
                self._set_model(model, "nuclei", bundled=True)
                self.status.setText("Starter model 'nuclei' loaded. Choose an image and click "
                                    "Segment, or paint and Train (strokes train a new U-Net, "
                                    "corrected instances fine-tune the starter; Continue "
                                    "chooses).")
            else:
                self.status.setText("Ready.")

        self.status.setText("Loading paintseg…")
        self.jobs.start("prepare", job, on_done=ready, on_error=self._failed("Starting paintseg"))

    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        lay = QVBoxLayout(box)
        self.model_info = QLabel("No model loaded.")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.model_info)

        row = QHBoxLayout()
        self.bundled = QComboBox()
        self.bundled.setToolTip("Models that ship with paintseg")
        self.load_bundled_btn = QPushButton("Load")
        self.load_bundled_btn.clicked.connect(lambda: self.load_model(self.bundled.currentText()))
        self.open_btn = QPushButton("Open…")
        self.open_btn.setToolTip("Open a checkpoint (.pt) saved by paintseg")
        self.open_btn.clicked.connect(self._open_dialog)
        self.save_btn = QPushButton("Save…")
        self.save_btn.clicked.connect(self._save_dialog)
        for w in (QLabel("Starter:"), self.bundled, self.load_bundled_btn, self.open_btn,
                  self.save_btn):
            row.addWidget(w)
        lay.addLayout(row)

        row = QHBoxLayout()
        self.new_dims = QComboBox()
        self.new_dims.addItems(["2D", "3D"])
        self.new_classes = QSpinBox()
        self.new_classes.setRange(2, 50)
        self.new_classes.setValue(2)
        self.new_classes.setToolTip("Number of classes of a new U-Net (1 = background)")
        self.new_classes.valueChanged.connect(self._update_legend)
        self.new_preset = QComboBox()
        self.new_preset.addItems(["auto", "fast", "accurate"])
        self.new_preset.setToolTip(
            "auto = fast: small U-Net, best from strokes on any device; accurate: larger, "
            "for a GPU")
        self.new_btn = QPushButton("New U-Net")
        self.new_btn.clicked.connect(self.new_model)
        for w in (self.new_dims, QLabel("classes"), self.new_classes, self.new_preset,
                  self.new_btn):
            row.addWidget(w)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.new_names = QLineEdit()
        self.new_names.setPlaceholderText("background, class 2, … (optional)")
        self.new_names.setToolTip("Names of the classes 1, 2, … of a new U-Net, comma-separated "
                                  "(e.g. rest, membrane, mitochondria); kept in the checkpoint")
        self.new_names.textChanged.connect(self._update_legend)
        row.addWidget(QLabel("Class names:"))
        row.addWidget(self.new_names, 1)
        lay.addLayout(row)

        row = QHBoxLayout()
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device.currentTextChanged.connect(self._show_device)
        self.device_info = QLabel("")
        row.addWidget(QLabel("Device:"))
        row.addWidget(self.device)
        row.addWidget(self.device_info, 1)
        lay.addLayout(row)
        return box

    def _build_segment_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        self.seg_image = QComboBox()
        form.addRow("Image", self.seg_image)
        self.seg_scope = QComboBox()
        self.seg_scope.addItems(list(SCOPES))
        form.addRow("Region", self.seg_scope)
        self.seg_tile = QSpinBox()
        self.seg_tile.setRange(0, 8192)
        self.seg_tile.setSingleStep(64)
        self.seg_tile.setSpecialValueText("auto")
        self.seg_tile.setToolTip("Tile edge in pixels; auto fits tiles to the available memory")
        form.addRow("Tile size", self.seg_tile)
        self.seg_output = QComboBox()
        self.seg_output.addItems(["auto", "semantic", "instances"])
        self.seg_output.setToolTip("instances: numbered objects (models trained on instances); "
                                   "semantic: class values; auto follows the model")
        form.addRow("Output", self.seg_output)
        self.seg_min_size = QSpinBox()
        self.seg_min_size.setRange(0, 10**7)
        self.seg_min_size.setValue(30)
        self.seg_min_size.setSuffix(" px")
        form.addRow("Min. object size", self.seg_min_size)
        self.seg_snap = QSpinBox()
        self.seg_snap.setRange(0, 64)
        self.seg_snap.setValue(SNAP_PIXELS)
        self.seg_snap.setSuffix(" px")
        self.seg_snap.setSpecialValueText("off")
        self.seg_snap.setToolTip("Class labels of 2D models: borders may move by up to this many "
                                 "pixels to the image's nearest edge where the model is not "
                                 "sure (the CLI's --snap)")
        form.addRow("Snap borders to edges", self.seg_snap)
        self.seg_diameter = QDoubleSpinBox()
        self.seg_diameter.setRange(0, 10000)
        self.seg_diameter.setSpecialValueText("as trained")
        self.seg_diameter.setSuffix(" px")
        self.seg_diameter.setToolTip("Typical object diameter in this image (models trained on "
                                     "instances rescale the image to the size they learned)")
        form.addRow("Object diameter", self.seg_diameter)
        self.seg_probs = QCheckBox("Show class probabilities")
        form.addRow(self.seg_probs)
        row = QHBoxLayout()
        self.segment_btn = QPushButton("Segment")
        self.segment_btn.clicked.connect(self.segment)
        self.seg_stop = QPushButton("Stop")
        self.seg_stop.clicked.connect(self.jobs.stop)
        row.addWidget(self.segment_btn)
        row.addWidget(self.seg_stop)
        form.addRow(row)
        self.seg_bar = QProgressBar()
        form.addRow(self.seg_bar)
        return tab

    def _build_train_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        self.train_image = QComboBox()
        form.addRow("Image", self.train_image)
        row = QHBoxLayout()
        self.train_labels = QComboBox()
        self.train_labels.setToolTip("0 = not painted; 1, 2, … = classes (1 = background)")
        self.new_labels_btn = QPushButton("New labels layer")
        self.new_labels_btn.setToolTip("An empty labels layer of the image's shape, for painting")
        self.new_labels_btn.clicked.connect(self.new_labels_layer)
        row.addWidget(self.train_labels, 1)
        row.addWidget(self.new_labels_btn)
        form.addRow("Labels", row)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        form.addRow(self.legend)
        self.labels_kind = QComboBox()
        self.labels_kind.addItems(["scribbles", "instances"])
        self.labels_kind.setToolTip("scribbles: painted class values; instances: a corrected "
                                    "segmentation with numbered objects")
        form.addRow("Labels are", self.labels_kind)
        self.labels_kind.currentTextChanged.connect(self._default_continue)
        self.labels_kind.currentTextChanged.connect(self._update_legend)
        self.train_seconds = QSpinBox()
        self.train_seconds.setRange(0, 24 * 3600)
        self.train_seconds.setValue(60)
        self.train_seconds.setSuffix(" s")
        self.train_seconds.setSpecialValueText("no limit")
        form.addRow("Time budget", self.train_seconds)
        self.train_steps = QSpinBox()
        self.train_steps.setRange(0, 10**6)
        self.train_steps.setSpecialValueText("no limit")
        form.addRow("Steps", self.train_steps)
        self.train_continue = QCheckBox("Continue from the current model")
        self.train_continue.setChecked(True)
        self.train_continue.setToolTip(
            "On: train the current model further; where you did not paint, it is held to its "
            "own result, so that corrections change little elsewhere.\n"
            "Off: start a new U-Net (New U-Net settings above).\n"
            "Set again whenever a model is loaded or 'Labels are' changes: on a bundled model, "
            "which has not seen your data, off for scribbles (a new U-Net learns strokes "
            "better) and on for corrected instances (fine-tuning it scored higher); on for any "
            "other model.")
        self.train_continue.toggled.connect(self._update_legend)
        form.addRow(self.train_continue)
        self.train_refresh = QCheckBox("Segment the image when training ends")
        self.train_refresh.setChecked(True)
        form.addRow(self.train_refresh)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train")
        self.train_btn.clicked.connect(self.train)
        self.train_stop = QPushButton("Stop (keep best)")
        self.train_stop.clicked.connect(self.jobs.stop)
        row.addWidget(self.train_btn)
        row.addWidget(self.train_stop)
        form.addRow(row)
        self.train_bar = QProgressBar()
        form.addRow(self.train_bar)
        self.plot = LossPlot()
        form.addRow(self.plot)
        self.train_info = QLabel("")
        self.train_info.setWordWrap(True)
        form.addRow(self.train_info)
        self.train_image.currentTextChanged.connect(self._update_legend)
        self.train_labels.currentTextChanged.connect(self._update_legend)
        return tab

    def _build_batch_tab(self) -> QWidget:
        tab = QWidget()
        form = QFormLayout(tab)
        self.batch_in = QLineEdit()
        self.batch_in.setPlaceholderText("folder of TIFF images")
        form.addRow("Input folder", self._with_browse(self.batch_in))
        self.batch_out = QLineEdit()
        self.batch_out.setPlaceholderText("where the labels go")
        form.addRow("Output folder", self._with_browse(self.batch_out))
        self.batch_pattern = QLineEdit("*.tif*")
        form.addRow("Pattern", self.batch_pattern)
        self.batch_overwrite = QCheckBox("Redo files that are already done")
        form.addRow(self.batch_overwrite)
        form.addRow(QLabel("Uses the Segment tab's tile size, output and sizes."))
        row = QHBoxLayout()
        self.batch_btn = QPushButton("Run batch")
        self.batch_btn.clicked.connect(self.run_batch)
        self.batch_stop = QPushButton("Stop")
        self.batch_stop.clicked.connect(self.jobs.stop)
        row.addWidget(self.batch_btn)
        row.addWidget(self.batch_stop)
        form.addRow(row)
        self.batch_files_bar = QProgressBar()
        self.batch_files_bar.setFormat("files %v/%m")
        form.addRow(self.batch_files_bar)
        self.batch_tiles_bar = QProgressBar()
        self.batch_tiles_bar.setFormat("tiles %p%")
        form.addRow(self.batch_tiles_bar)
        self.batch_table = QTableWidget(0, 3)
        self.batch_table.setHorizontalHeaderLabels(["File", "Result", "Details"])
        self.batch_table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.batch_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.batch_table.setMinimumHeight(140)
        form.addRow(self.batch_table)
        return tab

    def _with_browse(self, edit: QLineEdit) -> QWidget:
        w = QWidget()
        row = QHBoxLayout(w)
        row.setContentsMargins(0, 0, 0, 0)
        btn = QPushButton("…")
        btn.setMaximumWidth(30)
        btn.clicked.connect(lambda: self._browse_folder(edit))
        row.addWidget(edit, 1)
        row.addWidget(btn)
        return w

    def _browse_folder(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text())
        if folder:
            edit.setText(folder)

    # ------------------------------------------------------------------ state

    def _set_busy(self, busy: bool) -> None:
        for b in (self.segment_btn, self.train_btn, self.batch_btn, self.load_bundled_btn,
                  self.open_btn, self.new_btn, self.save_btn, self.device):
            b.setEnabled(not busy)
        for b in (self.seg_stop, self.train_stop, self.batch_stop):
            b.setEnabled(busy)

    def _show_device(self) -> None:
        from ..devices import describe_device, resolve_device

        try:
            text = describe_device(resolve_device(self.device.currentText()))
        except Exception as exc:  # noqa: BLE001 - shown to the user
            text = str(exc)
        self.device_info.setText(text)

    def _device(self) -> str:
        return self.device.currentText()

    def _notify(self, text: str, level: str = "info") -> None:
        from napari.utils import notifications

        self.status.setText(text)
        {"info": notifications.show_info, "warning": notifications.show_warning,
         "error": notifications.show_error}[level](text)

    def _failed(self, what: str):
        def handler(exc: BaseException) -> None:
            log.error("paintseg: %s failed", what, exc_info=exc)
            self._notify(f"{what} failed: {_message(exc)}", "error")

        return handler

    def _refresh_layer_choices(self, *_: Any) -> None:
        from napari.layers import Image, Labels

        images = [ly.name for ly in self.viewer.layers if isinstance(ly, Image)
                  and ly.metadata.get(ROLE) != "probability"]
        labels = [ly.name for ly in self.viewer.layers if isinstance(ly, Labels)]
        for combo, names in ((self.seg_image, images), (self.train_image, images),
                             (self.train_labels, labels)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._update_legend()

    def _watch_layer(self, event_or_layer: Any) -> None:
        layer = getattr(event_or_layer, "value", event_or_layer)
        layer.events.name.connect(self._refresh_layer_choices)
        if hasattr(layer.events, "paint"):
            layer.events.paint.connect(lambda _e, ly=layer: self._painted(ly))

    def _painted(self, layer: Any) -> None:
        if layer.metadata.get(ROLE) == "segmentation" and not layer.metadata.get(EDITED):
            layer.metadata[EDITED] = True
            self.status.setText(
                f"'{layer.name}' now holds your edits: paintseg will not overwrite it (a new "
                "segmentation goes into a new layer). Use it as painted labels to train."
            )

    def _layer(self, name: str, kind: str) -> Any:
        if not name or name not in self.viewer.layers:
            raise _UserError(f"Choose {kind} first (open an image: File > Open, or File > Open "
                             "Sample > paintseg).")
        return self.viewer.layers[name]

    def _require_model(self) -> Any:
        if self.model is None:
            raise _UserError("Load a model first: the starter model, Open…, or New U-Net.")
        return self.model

    # ------------------------------------------------------------------ model

    def _set_model(self, model: Any, source: str, *, bundled: bool = False) -> None:
        self.model, self.model_source = model, source
        self._model_bundled = bundled
        self._default_continue()
        c = model.config
        classes = ", ".join(f"{v} {n}" for v, n in zip(model.class_values, model.class_names))
        lines = [f"<b>{source}</b>: {c.network_name}, {c.in_channels} channel(s), depth "
                 f"{c.depth}, base {c.base_features}", f"classes: {classes}"]
        prov = model.provenance
        if prov.get("output") == "instances":
            lines.append("output: instances (numbered objects)")
        runs = prov.get("training", [])
        if runs:
            steps = sum(r.get("steps", 0) for r in runs)
            secs = sum(r.get("seconds", 0) for r in runs)
            lines.append(f"trained: {len(runs)} run(s), {steps} steps, {secs:.0f} s"
                         + (f"; last on {runs[-1]['data']}" if runs[-1].get("data") else ""))
        if prov.get("note"):
            lines.append(str(prov["note"]))
        self.model_info.setText("<br>".join(lines))
        self._update_legend()

    def load_model(self, spec: str | Path) -> None:
        """Load a checkpoint file or a bundled model name, in the background."""
        from ..model import bundled_models, load_model, resolve_model

        name = Path(spec).name if Path(str(spec)).suffix else str(spec)
        bundled = resolve_model(spec) in bundled_models().values()

        def job(report, should_stop):
            return load_model(spec)

        self.status.setText(f"Loading {name}…")
        self.jobs.start("load", job,
                        on_done=lambda m: (self._set_model(m, name, bundled=bundled),
                                           self.status.setText(f"Model {name} loaded.")),
                        on_error=self._failed(f"Loading {name}"))

    def save_model(self, path: str | Path) -> None:
        """Write the current model to ``path`` (atomically), in the background."""
        from ..model import save_model

        try:
            model = copy.deepcopy(self._require_model())
        except _UserError as exc:
            self._notify(str(exc), "warning")
            return
        path = Path(path)

        def job(report, should_stop):
            return save_model(model, path)

        self.jobs.start("save", job,
                        on_done=lambda p: self._notify(f"Model saved to {p}."),
                        on_error=self._failed(f"Saving {path.name}"))

    def new_model(self) -> None:
        """A fresh U-Net from the New U-Net settings (untrained: paint, then Train)."""
        from ..model import new_model
        from ..training import preset_config

        dims = 3 if self.new_dims.currentText() == "3D" else 2
        k = self.new_classes.value()
        try:
            cfg = preset_config(self.new_preset.currentText(), dims=dims, in_channels=1,
                                classes=k)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._notify(_message(exc), "error")
            return
        values, names = zip(*self._new_class_names(k))

        def job(report, should_stop):
            return new_model(cfg, class_values=values, class_names=names)

        self.jobs.start("new", job,
                        on_done=lambda m: (self._set_model(m, f"new {m.config.network_name}"),
                                           self.status.setText(
                                               "New U-Net: paint classes on a labels layer, "
                                               "then Train.")),
                        on_error=self._failed("Creating a U-Net"))

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a paintseg model", "",
                                              "paintseg model (*.pt);;All files (*)")
        if path:
            self.load_model(path)

    def _save_dialog(self) -> None:
        if self.model is None:
            self._notify("There is no model to save yet.", "warning")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save the model", "model.pt",
                                              "paintseg model (*.pt)")
        if path:
            self.save_model(path if path.endswith(".pt") else path + ".pt")

    # ------------------------------------------------------------------ segment

    def _image_input(self, layer: Any) -> tuple[Any, str, tuple[int, ...]]:
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        axes = layer_axes(data.shape, rgb=bool(layer.rgb), name=layer.name)
        return data, axes, spatial_shape(data.shape, rgb=bool(layer.rgb))

    def segment(self, *, image_name: str | None = None) -> bool:
        """Segment the chosen image (or region) with the current model; True if started."""
        from ..config import TileConfig
        from ..inference import segment_labels, wants_instances

        try:
            model = self._require_model()
            layer = self._layer(image_name or self.seg_image.currentText(), "an image layer")
            data, axes, lshape = self._image_input(layer)
            if len(lshape) < model.config.dims:
                raise _UserError(f"The model is {model.config.dims}D but '{layer.name}' is "
                                 f"{len(lshape)}D.")
            scope = self.seg_scope.currentText()
            current = view = None
            if scope != "whole image":
                current = layer.world_to_data(self.viewer.dims.point)
                current = np.asarray(current)[: len(lshape)]
                corners = np.asarray(layer.corner_pixels, dtype=float)
                view = corners[:, : len(lshape)]
            region = scope_region(lshape, scope=scope, model_dims=model.config.dims,
                                  current=current, view=view)
            instances = wants_instances(model, self.seg_output.currentText())
        except Exception as exc:  # noqa: BLE001 - every input problem is shown to the user
            self._notify(_message(exc), "warning" if isinstance(exc, _UserError) else "error")
            return False
        tiles = TileConfig(tile=self.seg_tile.value() or None)
        output, min_size = self.seg_output.currentText(), self.seg_min_size.value()
        snap = self.seg_snap.value()
        diameter = self.seg_diameter.value() or None
        want_probs = self.seg_probs.isChecked()
        rgb = bool(layer.rgb)
        index = region + ((slice(None),) if rgb else ())
        whole = scope == "whole image"
        device = self._device()
        source = layer.name
        net = copy.deepcopy(model)  # the model may be replaced while this runs

        def job(report, should_stop):
            part = data if whole else np.asarray(data[index])
            result = segment_labels(
                part, net, output=output, min_size=min_size, snap=snap, diameter=diameter,
                axes=axes, tiles=tiles, device=device, return_probabilities=want_probs,
                progress=lambda d, t: report((d, t)), should_stop=should_stop,
            )
            return result

        def done(result) -> None:
            self._show_result(source, result, region, lshape, instances, net, layer)

        self.seg_bar.setValue(0)
        self.status.setText(f"Segmenting {source} ({scope})…")
        return self.jobs.start("segment", job, on_progress=self._seg_progress, on_done=done,
                               on_error=self._seg_failed)

    def _seg_progress(self, value: Any) -> None:
        done, total = value
        self.seg_bar.setMaximum(max(total, 1))
        self.seg_bar.setValue(done)

    def _seg_failed(self, exc: BaseException) -> None:
        from ..errors import StopRequested

        if isinstance(exc, StopRequested):
            self._notify("Segmentation stopped; the layers were left as they were.")
            return
        self._failed("Segmentation")(exc)

    def _output_layer(self, source: str, role: str) -> Any:
        """The paintseg layer of ``role`` for ``source`` that may be updated in place, or None."""
        for ly in self.viewer.layers:
            if (ly.metadata.get(ROLE) == role and ly.metadata.get(SOURCE) == source
                    and not ly.metadata.get(EDITED)):
                return ly
        return None

    def _unique_name(self, name: str) -> str:
        if name not in self.viewer.layers:
            return name
        k = 2
        while f"{name} [{k}]" in self.viewer.layers:
            k += 1
        return f"{name} [{k}]"

    def _insert_above(self, image: Any, layer: Any) -> None:
        """Add ``layer`` just above ``image`` (below the user's paint layers), keeping the
        layer the user was working on selected, so the next brush stroke still lands there."""
        active = self.viewer.layers.selection.active
        selected = set(self.viewer.layers.selection)
        index = self.viewer.layers.index(image) + 1 if image in self.viewer.layers else \
            len(self.viewer.layers)
        self.viewer.layers.insert(index, layer)
        if active is not None and active in self.viewer.layers:
            sel = self.viewer.layers.selection
            sel.clear()
            sel.update(ly for ly in selected if ly in self.viewer.layers)
            sel.active = active

    def _show_result(self, source: str, result: Any, region: tuple[slice, ...],
                     lshape: tuple[int, ...], instances: bool, model: Any, image: Any) -> None:
        from napari.layers import Labels

        layer = self._output_layer(source, "segmentation")
        existing = np.asarray(layer.data) if layer is not None else None
        labels = merge_region(existing, result.labels, region, shape=lshape, instances=instances)
        scale = tuple(image.scale[: len(lshape)])
        translate = tuple(image.translate[: len(lshape)])
        if layer is None:
            layer = Labels(labels, name=self._unique_name(f"{source} segmentation"),
                           scale=scale, translate=translate,
                           metadata={ROLE: "segmentation", SOURCE: source})
            self._insert_above(image, layer)
        else:
            layer.data = labels
        layer.metadata["paintseg_kind"] = "instances" if instances else "semantic"
        if result.probabilities is not None:
            self._show_probabilities(source, np.asarray(result.probabilities), region, lshape,
                                     model, scale, translate)
        what = (f"{int(np.asarray(result.labels).max())} objects" if instances
                else "classes " + ", ".join(str(v) for v in np.unique(result.labels) if v))
        for msg in result.messages:
            self._notify(msg, "info")
        self.status.setText(f"Segmented {source} in {result.seconds:.1f} s on {result.device}: "
                            f"{what} → layer '{layer.name}'.")
        self.seg_bar.setValue(self.seg_bar.maximum())

    def _show_probabilities(self, source: str, probs: np.ndarray, region: tuple[slice, ...],
                            lshape: tuple[int, ...], model: Any, scale: tuple, translate: tuple
                            ) -> None:
        from napari.layers import Image

        for k, (value, cname) in enumerate(zip(model.class_values, model.class_names)):
            if k == 0:
                continue  # the background's is 1 - the others
            layer = None
            for ly in self.viewer.layers:
                if ly.metadata.get(ROLE) == "probability" and ly.metadata.get(SOURCE) == source \
                        and ly.metadata.get("paintseg_class") == value:
                    layer = ly
            full = np.zeros(lshape, np.float32) if layer is None or layer.data.shape != lshape \
                else np.array(layer.data, dtype=np.float32)
            full[region] = probs[k].reshape(full[region].shape)
            if layer is None:
                layer = Image(full, name=self._unique_name(f"{source} P({cname})"),
                              colormap="magma", blending="additive", opacity=0.6,
                              contrast_limits=(0, 1), scale=scale, translate=translate,
                              metadata={ROLE: "probability", SOURCE: source,
                                        "paintseg_class": value})
                self._insert_above(self.viewer.layers[source], layer)
            else:
                layer.data = full

    # ------------------------------------------------------------------ train

    def _class_names(self) -> list[tuple[int, str]]:
        if self.model is not None and self.train_continue.isChecked():
            return list(zip(self.model.class_values, self.model.class_names))
        return self._new_class_names(self.new_classes.value())

    def _new_class_names(self, k: int) -> list[tuple[int, str]]:
        """Values 1..k of a new U-Net's classes with the names typed (or the defaults)."""
        from ..model import default_class_names

        typed = [n.strip() for n in self.new_names.text().split(",")]
        names = [t or d for t, d in zip(typed + [""] * k, default_class_names(range(1, k + 1)))]
        return list(zip(range(1, k + 1), names))

    def _default_continue(self, *_: Any) -> None:
        """Set *Continue from the current model* for the loaded model and the labels kind.

        Train continues a model trained on the user's data (or one they chose). On a bundled
        model it starts a new U-Net for strokes: continuing the starter, held to its
        predictions on data it never saw, scored below a new U-Net in 60 s
        (benchmarks/RESULTS.md, "Starting from the starter model"). For corrected instances
        it continues the starter: with nothing unpainted there is no such hold, and on cells3d
        slices it never saw, fine-tuning it beat a new U-Net on every draw (AP@0.5 0.74
        against 0.63 in 20 s, 0.73 against 0.68 in 60 s; benchmarks/dense.py
        --dataset nuclei3d-slices).
        """
        if not hasattr(self, "train_continue"):
            return
        self.train_continue.setChecked(not self._model_bundled
                                       or self.labels_kind.currentText() == "instances")

    def _update_legend(self, *_: Any) -> None:
        if not hasattr(self, "labels_kind"):  # still being built
            return
        if self.labels_kind.currentText() == "instances":
            # dense labels: 0 is background there, not "not painted", and values are objects
            self.legend.setText("Instances: each object its own number, 0 = background; "
                                "every pixel counts, so correct the whole image")
            return
        name = self.train_labels.currentText()
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        parts = []
        for value, cname in self._class_names():
            color = "#ffffff"
            if layer is not None and hasattr(layer, "get_color"):
                rgba = layer.get_color(value)
                if rgba is not None:
                    color = "#" + "".join(f"{int(255 * c):02x}" for c in rgba[:3])
            parts.append(f"<span style='color:{color}'>■</span> {value} = {cname}")
        self.legend.setText("Paint with: " + " · ".join(parts) + " (0 = not painted)")

    def new_labels_layer(self) -> Any:
        """An empty labels layer shaped like the chosen image, ready for painting."""
        from napari.layers import Labels

        try:
            image = self._layer(self.train_image.currentText(), "an image layer")
            _data, _axes, lshape = self._image_input(image)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._notify(_message(exc), "warning")
            return None
        classes = self._class_names()
        layer = Labels(np.zeros(lshape, np.uint8), name=self._unique_name(f"{image.name} paint"),
                       scale=tuple(image.scale[: len(lshape)]),
                       translate=tuple(image.translate[: len(lshape)]),
                       metadata={ROLE: "annotations", SOURCE: image.name})
        layer.features = {  # napari shows the class name of the label under the cursor
            "index": [0] + [v for v, _ in classes],
            "class": ["not painted"] + [n for _, n in classes],
        }
        self.viewer.add_layer(layer)
        layer.brush_size = 8
        layer.selected_label = classes[1][0] if len(classes) > 1 else 1
        layer.mode = "paint"
        self.train_labels.setCurrentText(layer.name)
        self._update_legend()
        return layer

    def train(self) -> bool:
        """Fine-tune on the painted labels in the background; True if started."""
        from ..config import TrainConfig
        from ..devices import resolve_device
        from ..errors import InputError
        from ..training import (
            EventKind,
            check_channels,
            collapse_text,
            disagreement_text,
            iter_train,
            prepare_training,
        )

        try:
            image = self._layer(self.train_image.currentText(), "an image layer")
            labels_layer = self._layer(self.train_labels.currentText(),
                                       "a labels layer you painted on")
            data, axes, lshape = self._image_input(image)
            rgb = bool(image.rgb)
            continuing = self.train_continue.isChecked()
            base = self._require_model() if continuing else None
            dims = base.config.dims if base is not None else (
                3 if self.new_dims.currentText() == "3D" else 2)
            if "T" in axes:
                raise _UserError("Training on time series is not supported yet: paint on a "
                                 "single time point (duplicate it as its own layer).")
            if dims == 3 and "Z" not in axes:
                raise _UserError("A 3D model trains on 3D stacks; this image is 2D.")
            img, lab = training_pair(data, labels_layer.data, rgb=rgb)
            if base is not None:  # said here, before any work, not by the training job
                try:
                    check_channels(base, img.shape[-1], model_name=f"'{self.model_source}'",
                                   images=f"'{image.name}'")
                except InputError as exc:
                    raise _UserError(f"{exc}: untick 'Continue from the current model' to "
                                     "train a new U-Net on it.") from None
            seconds = self.train_seconds.value() or None
            steps = self.train_steps.value() or None
            if seconds is None and steps is None:
                raise _UserError("Set a time budget or a number of steps.")
            config = TrainConfig(time_budget=seconds, steps=steps)
            kind = self.labels_kind.currentText()
            device = resolve_device(self._device())
            preset = self.new_preset.currentText()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._notify(_message(exc), "warning" if isinstance(exc, _UserError) else "error")
            return False
        source, labels_name = image.name, labels_layer.name
        # names of a new U-Net's classes, for any painted value the spin box allows
        names = None if base is not None else dict(
            self._new_class_names(self.new_classes.maximum()))
        if labels_layer.metadata.get(ROLE) == "segmentation":
            # training labels now, however they were edited: never overwritten by a Segment
            labels_layer.metadata[EDITED] = True
        # the trained model is named by what it was trained from, whatever is loaded or ticked
        # by the time it ends
        base_name = (self.model_source or None) if base is not None else None
        base_copy = copy.deepcopy(base) if base is not None else None

        def job(report, should_stop):
            td, model = prepare_training([(img, lab)], base=base_copy, dims=dims,
                                         class_names=names,
                                         in_channels=img.shape[-1], labels_kind=kind,
                                         preset=preset, channel_axis=-1, names=[labels_name])
            for note in td.notes:
                yield ("note", note)
            warning = disagreement_text(model, td, device=device, anchor=config.anchor)
            if warning:
                yield ("warning", f"{warning[0].upper()}{warning[1:]}. Untick 'Continue from "
                                  "the current model' to train a new U-Net.")
            last = None
            for event in iter_train(model, td, config, device=device, should_stop=should_stop):
                last = event
                yield ("event", event)
                if event.kind is EventKind.DONE:
                    break
            runs = model.provenance.get("training") or [{}]
            runs[-1]["data"] = f"labels '{labels_name}' on image '{source}' (napari)"
            missed = collapse_text(model, td, device=device)
            if missed:
                yield ("warning", f"{missed[0].upper()}{missed[1:]}.")
            return model, last

        self.plot.clear()
        self.train_bar.setMaximum(1000)
        self.train_bar.setValue(0)
        self._t_train = time.perf_counter()
        self._train_warning = None
        self.train_info.setText("Preparing the painted pixels…")
        self.status.setText(f"Training on '{labels_name}' over '{source}'…")
        return self.jobs.start("train", job, on_progress=self._train_progress,
                               on_done=lambda res: self._trained(res, source, base_name),
                               on_error=self._failed("Training"))

    def _train_progress(self, item: Any) -> None:
        from ..training import EventKind

        what, value = item
        if what in ("note", "warning"):
            if what == "warning":  # all of them stay on the Train tab
                self._train_warning = "\n".join(filter(None, (self._train_warning, value)))
            self._notify(value, "info" if what == "note" else "warning")
            return
        ev = value
        self.train_bar.setValue(int(1000 * ev.fraction))
        if ev.kind is EventKind.STEP:
            self.plot.add_loss(ev.step, ev.loss)
        elif ev.kind is EventKind.VALIDATION and ev.validation:
            self.plot.add_validation(ev.step, ev.validation["mean_iou"], ev.best_step)
        eta = f", about {ev.eta:.0f} s left" if ev.eta else ""
        val = ""
        if self.plot.iou:
            val = f", validation IoU {self.plot.iou[-1][1]:.3f} (best at step {ev.best_step})"
        stop = " — stopping…" if self.jobs.stopping() else ""
        self.train_info.setText(f"step {ev.step}, loss {ev.loss:.4f}{val}{eta}{stop}")

    def _trained(self, result: Any, source: str, base_name: str | None) -> None:
        from ..training import kept_weights_text

        model, done = result
        name = base_name or "new U-Net"
        if not name.endswith("(trained)"):
            name = f"{name} (trained)"
        self._set_model(model, name)
        stopped = " (stopped; best weights kept)" if done is not None and done.stopped else ""
        msg = (f"Training done{stopped}: {done.step} steps in {done.elapsed:.0f} s, "
               f"{kept_weights_text(done)}." if done is not None else "Training done.")
        self.train_bar.setValue(1000)
        if self._train_warning:  # kept on the Train tab: Segment's message replaces the status
            self.train_info.setText(f"{msg}\n{self._train_warning}")
            self._notify(f"{msg} {self._train_warning}", "warning")
        else:
            self.train_info.setText(msg)
            self._notify(msg)
        if self.train_refresh.isChecked() and source in self.viewer.layers:
            self.jobs.after(lambda: self.segment(image_name=source))

    # ------------------------------------------------------------------ batch

    def run_batch(self) -> bool:
        """Segment every matching file of the input folder into the output folder."""
        from ..batch import SegmentSettings, collect_inputs, iter_batch
        from ..config import TileConfig
        from ..io import check_output_folder

        try:
            model = self._require_model()
            src, dst = self.batch_in.text().strip(), self.batch_out.text().strip()
            if not src or not Path(src).is_dir():
                raise _UserError(f"Choose an input folder (got {src!r}).")
            if not dst:
                raise _UserError("Choose an output folder.")
            jobs = collect_inputs([src], pattern=self.batch_pattern.text().strip() or "*.tif*")
            out_dir = check_output_folder(dst)
            settings = SegmentSettings(
                output=self.seg_output.currentText(), min_size=self.seg_min_size.value(),
                snap=self.seg_snap.value(), diameter=self.seg_diameter.value() or None,
                tiles=TileConfig(tile=self.seg_tile.value() or None),
            )
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._notify(_message(exc), "warning" if isinstance(exc, _UserError) else "error")
            return False
        net = copy.deepcopy(model)
        device, overwrite = self._device(), self.batch_overwrite.isChecked()
        self.batch_table.setRowCount(0)
        self.batch_files_bar.setMaximum(len(jobs))
        self.batch_files_bar.setValue(0)
        self.batch_tiles_bar.setValue(0)
        self._batch_results: list[Any] = []

        def job(report, should_stop):
            results = []
            for r in iter_batch(jobs, net, out_dir=out_dir, settings=settings, device=device,
                                overwrite=overwrite, should_stop=should_stop,
                                progress=lambda d, t: report(("tiles", d, t))):
                results.append(r)
                yield ("file", r)
            return results

        self.status.setText(f"Batch: {len(jobs)} file(s) from {src}…")
        return self.jobs.start("batch", job, on_progress=self._batch_progress,
                               on_done=lambda res: self._batch_done(res, len(jobs)),
                               on_error=self._failed("Batch"))

    def _batch_progress(self, item: Any) -> None:
        if item[0] == "tiles":
            _, d, t = item
            self.batch_tiles_bar.setMaximum(max(t, 1))
            self.batch_tiles_bar.setValue(d)
            return
        r = item[1]
        self._batch_results.append(r)
        row = self.batch_table.rowCount()
        self.batch_table.insertRow(row)
        reason = r.reason[len(r.source) + 2:] if r.reason.startswith(f"{r.source}: ") \
            else r.reason  # the file is in the first column
        detail = reason or (f"{r.objects} objects, " if r.objects is not None else "") + \
            f"{r.seconds:.1f} s"
        for col, text in enumerate((Path(r.source).name, r.status, detail)):
            cell = QTableWidgetItem(text)
            cell.setToolTip(r.source if col == 0 else r.reason or text)
            self.batch_table.setItem(row, col, cell)
        self.batch_files_bar.setValue(row + 1)

    def _batch_done(self, results: list[Any], total: int) -> None:
        counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
        left = total - len(results)
        msg = (f"Batch finished: {counts['done']} written, {counts['skipped']} already done, "
               f"{counts['failed']} failed" + (f", {left} not started (stopped)" if left else "")
               + ".")
        self._notify(msg, "warning" if counts["failed"] else "info")


class _UserError(PaintsegError):
    """Something the user should do first (shown as a warning, not an error), in words meant
    for the user: shown as is."""
