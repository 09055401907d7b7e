"""The Model panel: the bundled models, Open… / Save… / Export…, a new U-Net, the device."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ._session import Session, UserError, message

__all__ = ["ModelPanel", "ExportDialog", "model_summary"]

LICENSES = ("CC-BY-4.0", "CC0-1.0", "MIT", "BSD-3-Clause", "Apache-2.0")


def model_summary(model: Any, source: str) -> str:
    """The model in a few HTML lines: network, channels, classes, how it was trained."""
    from html import escape

    c = model.config
    classes = ", ".join(f"{v} {n}" for v, n in zip(model.class_values, model.class_names))
    prov = model.provenance
    card = model.package
    if model.foreign:
        trains = ("TorchScript only: does not train" if model.frozen
                  else "fine-tunes on its own classes")
        head = (f"<b>{escape(source)}</b>: another tool's {c.dims}D network, "
                f"{c.in_channels} channel(s) ({trains})")
    else:
        head = (f"<b>{escape(source)}</b>: {c.network_name}, {c.in_channels} channel(s), "
                f"depth {c.depth}, base {c.base_features}")
    lines = [head, f"classes: {escape(classes)}"]
    if card:
        lines.append(f"BioImage.IO: {escape(card.get('name', ''))}; by "
                     f"{escape(', '.join(card.get('authors') or []))}; licence "
                     f"{escape(card.get('license') or '?')}")
        if card.get("cite"):
            lines.append(f"cite: {escape('; '.join(card['cite']))}")
    if prov.get("output") == "instances":
        lines.append("output: instances (numbered objects)")
    runs = prov.get("training", [])
    if runs:
        steps = sum(r.get("steps", 0) for r in runs)
        secs = sum(r.get("seconds", 0) for r in runs)
        last = "; ".join(runs[-1].get("images") or [])
        lines.append(f"trained: {len(runs)} run(s), {steps} steps, {secs:.0f} s"
                     + (f"; last on {escape(last)}" if last else ""))
    if prov.get("note"):
        lines.append(str(prov["note"]))
    return "<br>".join(lines)


class ModelPanel(QGroupBox):
    """Choose the current model (bundled, a checkpoint, a new U-Net) and the device; save it.

    The new U-Net's settings (2D/3D, classes, names, preset) are also what Train uses when it
    starts a new U-Net.
    """

    def __init__(self, session: Session) -> None:
        super().__init__("Model")
        self.session = session
        lay = QVBoxLayout(self)
        self.info = QLabel("No model loaded.")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.info)

        row = QHBoxLayout()
        self.bundled = QComboBox()
        self.bundled.setToolTip("Models that ship with paintseg")
        self.load_btn = QPushButton("Load")
        self.load_btn.clicked.connect(lambda: self.load_model(self.bundled.currentText()))
        self.open_btn = QPushButton("Open…")
        self.open_btn.setToolTip("Open a checkpoint (.pt) saved by paintseg, or a BioImage.IO "
                                 "model package (.zip)")
        self.open_btn.clicked.connect(self._open_dialog)
        self.save_btn = QPushButton("Save…")
        self.save_btn.clicked.connect(self._save_dialog)
        self.export_btn = QPushButton("Export…")
        self.export_btn.setToolTip("Write the model as a BioImage.IO package (.zip) for Fiji "
                                   "(deepImageJ), ilastik, QuPath and bioimage.io")
        self.export_btn.clicked.connect(self._export_dialog)
        for w in (QLabel("Starter:"), self.bundled, self.load_btn, self.open_btn, self.save_btn,
                  self.export_btn):
            row.addWidget(w)
        lay.addLayout(row)

        row = QHBoxLayout()
        self.dims = QComboBox()
        self.dims.addItems(["2D", "3D"])
        self.classes = QSpinBox()
        self.classes.setRange(2, 50)
        self.classes.setValue(2)
        self.classes.setToolTip("Number of classes of a new U-Net (1 = background)")
        self.preset = QComboBox()
        self.preset.addItems(["auto", "fast", "accurate"])
        self.preset.setToolTip(
            "auto = fast: small U-Net, best from strokes on any device; accurate: larger, "
            "for a GPU")
        self.new_btn = QPushButton("New U-Net")
        self.new_btn.clicked.connect(self.new_model)
        for w in (self.dims, QLabel("classes"), self.classes, self.preset, self.new_btn):
            row.addWidget(w)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.names = QLineEdit()
        self.names.setPlaceholderText("background, class 2, … (optional)")
        self.names.setToolTip("Names of the classes 1, 2, … of a new U-Net, comma-separated "
                              "(e.g. rest, membrane, mitochondria); kept in the checkpoint")
        row.addWidget(QLabel("Class names:"))
        row.addWidget(self.names, 1)
        lay.addLayout(row)

        row = QHBoxLayout()
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device.currentTextChanged.connect(self._device_chosen)
        self.device_info = QLabel("")
        row.addWidget(QLabel("Device:"))
        row.addWidget(self.device)
        row.addWidget(self.device_info, 1)
        lay.addLayout(row)
        session.model_changed.connect(self._show_model)

    # ------------------------------------------------------------------ state

    def buttons(self) -> tuple[Any, ...]:
        """What a running job disables."""
        return (self.load_btn, self.open_btn, self.new_btn, self.save_btn, self.export_btn,
                self.device)

    def set_bundled(self, names: list[str]) -> None:
        self.bundled.clear()
        self.bundled.addItems(names)
        self.show_device()

    def _device_chosen(self, name: str) -> None:
        self.session.device = name
        self.show_device()

    def show_device(self) -> None:
        from ..devices import describe_device, describe_precision, resolve_device

        try:
            dev = resolve_device(self.device.currentText())
            text = f"{describe_device(dev)}; {describe_precision(dev)}"
        except Exception as exc:  # noqa: BLE001 - shown to the user
            text = str(exc)
        self.device_info.setText(text)

    def _show_model(self) -> None:
        s = self.session
        self.info.setText(model_summary(s.model, s.source))
        model = s.model
        if model is None or s.bundled:  # the starter's classes are not a new U-Net's
            return
        # a trained or opened model's classes (1..k) and names become the New U-Net's first
        # ones, so that the panel never shows 2 classes beside a model of 3; never fewer
        # classes or names than were set (classes typed but not painted yet stay)
        values = tuple(int(v) for v in model.class_values)
        k = len(values)
        if values != tuple(range(1, k + 1)) or k > self.classes.maximum():
            return
        from ..model import default_class_names

        typed = self._typed_names()
        names = [str(n) for n in model.class_names]
        if typed or names != list(default_class_names(values)):  # defaults stay unwritten
            self.names.setText(", ".join(names + typed[k:]))
        self.classes.setValue(max(k, self.classes.value()))

    def new_dims(self) -> int:
        return 3 if self.dims.currentText() == "3D" else 2

    def _typed_names(self) -> list[str]:
        """The names typed in the Class names box, in order ([] when it is empty)."""
        text = self.names.text()
        return [n.strip() for n in text.split(",")] if text.strip() else []

    def class_names(self, k: int) -> list[tuple[int, str]]:
        """Values 1..k of a new U-Net's classes with the names typed (or the defaults)."""
        from ..model import default_class_names

        typed = self._typed_names()
        names = [t or d for t, d in zip(typed + [""] * k, default_class_names(range(1, k + 1)))]
        return list(zip(range(1, k + 1), names))

    # ------------------------------------------------------------------ actions

    def load_model(self, spec: str | Path) -> None:
        """Load a checkpoint file or a bundled model name, in the background."""
        from ..model import bundled_models, load_model, resolve_model

        s = self.session
        name = Path(spec).name if Path(str(spec)).suffix else str(spec)
        bundled = resolve_model(spec) in bundled_models().values()

        def job(report, should_stop):
            return load_model(spec)

        def done(model: Any) -> None:
            s.set_model(model, name, bundled=bundled)
            s.say(f"Model {name} loaded.")

        s.say(f"Loading {name}…")
        s.jobs.start("load", job, on_done=done, on_error=s.failed(f"Loading {name}"))

    def save_model(self, path: str | Path) -> None:
        """Write the current model to ``path`` (atomically), in the background."""
        from ..model import save_model

        s = self.session
        try:
            model = s.require_model()
        except UserError as exc:
            s.notify(str(exc), "warning")
            return
        path = Path(path)

        def job(report, should_stop):
            return save_model(model, path)  # it writes the model without changing it

        s.jobs.start("save", job, on_done=lambda p: s.notify(f"Model saved to {p}."),
                     on_error=s.failed(f"Saving {path.name}"))

    def new_model(self) -> None:
        """A fresh U-Net from the New U-Net settings (untrained: paint, then Train)."""
        from ..model import new_model
        from ..training import preset_config

        s = self.session
        k = self.classes.value()
        try:
            cfg = preset_config(self.preset.currentText(), dims=self.new_dims(), in_channels=1,
                                classes=k)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            s.notify(message(exc), "error")
            return
        values, names = zip(*self.class_names(k))

        def job(report, should_stop):
            return new_model(cfg, class_values=values, class_names=names)

        def done(model: Any) -> None:
            s.set_model(model, f"new {model.config.network_name}")
            s.say("New U-Net: paint classes on a labels layer, then Train.")

        s.jobs.start("new", job, on_done=done, on_error=s.failed("Creating a U-Net"))

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model", "",
            "paintseg model or BioImage.IO package (*.pt *.zip);;All files (*)")
        if path:
            self.load_model(path)

    def _save_dialog(self) -> None:
        if self.session.model is None:
            self.session.notify("There is no model to save yet.", "warning")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save the model", "model.pt",
                                              "paintseg model (*.pt)")
        if path:
            self.save_model(path if path.endswith(".pt") else path + ".pt")

    def export_model(self, path: str | Path, *, sample_layer: str, **fields: Any) -> None:
        """Write the current model as a BioImage.IO package at ``path``, in the background:
        the centre of the image layer ``sample_layer`` becomes its test input and cover;
        ``fields`` are :func:`~paintseg.exchange.export_package`'s (name, description,
        authors, license, cite, cover)."""
        from ..exchange import export_package, sample_array
        from ._layers import layer_axes

        s = self.session
        try:
            model = s.require_model()
            layer = s.layer(sample_layer, "an image layer for the test input")
            axes = layer_axes(layer.data.shape, rgb=bool(getattr(layer, "rgb", False)),
                              name=layer.name)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            s.refuse(exc)
            return
        path = Path(path)
        view = SimpleNamespace(data=layer.data, axes=axes, path=layer.name)  # sample_array's

        notes: list[str] = []

        def job(report, should_stop):
            sample = sample_array(view, dims=model.config.dims)
            return export_package(model, path, sample=sample, sample_name=layer.name,
                                  notes=notes, **fields)

        def done(p: Path) -> None:
            extra = "".join(f" Note: {n}." for n in notes)
            s.notify(f"BioImage.IO package written to {p}; bioimageio's test passed.{extra}")

        s.say(f"Exporting {path.name} (the package is tested before it is written)…")
        s.jobs.start("export", job, on_done=done, on_error=s.failed(f"Exporting {path.name}"))

    def _export_dialog(self) -> None:
        s = self.session
        if s.model is None:
            s.notify("There is no model to export yet.", "warning")
            return
        images = [ly.name for ly in s.viewer.layers if ly.__class__.__name__ == "Image"]
        if not images:
            s.notify("Open an image of the kind the model is for: its centre becomes the "
                     "package's test input.", "warning")
            return
        dialog = ExportDialog(self, images=images, default_name=Path(s.source).stem)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export a BioImage.IO package",
                                              f"{dialog.values()['name'] or 'model'}.zip",
                                              "BioImage.IO package (*.zip)")
        if path:
            values = dialog.values()
            layer = values.pop("sample_layer")
            self.export_model(path if path.endswith(".zip") else path + ".zip",
                              sample_layer=layer, **values)


class ExportDialog(QDialog):
    """The fields of a BioImage.IO package: name, description, authors, licence, citations,
    the image layer its test input comes from and an optional cover."""

    def __init__(self, parent: Any = None, *, images: list[str], default_name: str = ""
                 ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export a BioImage.IO package")
        self.setMinimumWidth(520)
        form = QFormLayout(self)
        self.name = QLineEdit(default_name if len(default_name) >= 5 else "")
        self.name.setPlaceholderText("5 to 128 letters, digits, spaces, _+-()")
        self.description = QLineEdit()
        self.description.setPlaceholderText("what it segments, in which images (optional)")
        self.authors = QLineEdit()
        self.authors.setPlaceholderText("names, comma-separated")
        self.license = QComboBox()
        self.license.setEditable(True)
        self.license.addItems(LICENSES)
        self.cite = QLineEdit()
        self.cite.setPlaceholderText("DOIs or URLs, comma-separated (optional)")
        self.sample = QComboBox()
        self.sample.addItems(images)
        self.sample.setToolTip("Its centre becomes the package's test input and cover")
        self.cover = QLineEdit()
        self.cover.setPlaceholderText("a PNG or JPEG (optional; default: made from the test "
                                      "input and its result)")
        for label, w in (("Name", self.name), ("Description", self.description),
                         ("Authors", self.authors), ("Licence", self.license),
                         ("Cite", self.cite), ("Test image", self.sample),
                         ("Cover", self.cover)):
            form.addRow(label, w)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                                   | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def values(self) -> dict[str, Any]:
        """The fields as :meth:`ModelPanel.export_model` takes them."""
        def listed(text: str) -> list[str]:
            return [t.strip() for t in text.split(",") if t.strip()]

        return {"name": self.name.text().strip() or None,
                "description": self.description.text().strip() or None,
                "authors": listed(self.authors.text()),
                "license": self.license.currentText().strip() or "CC-BY-4.0",
                "cite": listed(self.cite.text()),
                "sample_layer": self.sample.currentText(),
                "cover": self.cover.text().strip() or None}
