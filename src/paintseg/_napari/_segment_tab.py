"""The Segment tab: segment an image, a slice or the field of view with the current model."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from qtpy.QtWidgets import QFormLayout, QProgressBar, QWidget

from ..config import OUTPUTS, PRECISIONS, SegmentSettings, TileConfig
from ._choices import LayerChoice
from ._forms import Field, build_form
from ._jobs import Progress
from ._layers import SCOPES, layer_axes, merge_region, scope_region, spatial_shape
from ._session import EDITED, ROLE, SOURCE, Session, UserError, run_stop_row

__all__ = ["SegmentTab", "image_input", "is_image"]

#: The tab's form: a row per setting of :class:`~paintseg.config.SegmentSettings` that a
#: Segment uses, plus what to segment (the layer and the region).
SEGMENT_FIELDS = (
    Field("scope", "Region", kind="choice", choices=SCOPES, default=SCOPES[0],
          tooltip="The whole image or stack, the slice on screen, or what the view shows"),
    Field("tiles", "Tile size", high=8192, step=64, special="auto", none_at_low=True,
          get=lambda t: t.tile or 0,
          tooltip="Tile edge in pixels; auto fits tiles to the available memory"),
    Field("output", "Output", kind="choice", choices=OUTPUTS,
          tooltip="instances: numbered objects (models trained on instances); semantic: "
                  "class values; auto follows the model"),
    Field("min_size", "Min. object size", suffix="px"),
    Field("snap", "Snap borders to edges", low=-1, high=64, special="auto", none_at_low=True,
          suffix="px",
          tooltip="Class labels of 2D models: borders may move by up to this many pixels to "
                  "the image's nearest edge where the model is not sure (the CLI's --snap; "
                  "0 = off; auto: 8 px for a model trained on strokes, off for one trained "
                  "on dense labels)"),
    Field("diameter", "Object diameter", kind="float", high=10000, special="as trained",
          none_at_low=True, suffix="px",
          tooltip="Typical object diameter in this image (models trained on instances "
                  "rescale the image to the size they learned)"),
    Field("precision", "Precision", kind="choice", choices=PRECISIONS, default="auto",
          tooltip="Number type of the U-Nets' layers (the CLI's --precision): auto is "
                  "mixed precision on a CUDA GPU (bfloat16, or float16 where the GPU lacks "
                  "bfloat16) and bfloat16 on a CPU with bfloat16 units (Intel AMX), faster, "
                  "with labels nearly all equal to float32's; float32 elsewhere"),
    Field("probabilities", "", kind="bool", text="Show class probabilities"),
)


def _summary(labels: Any, instances: bool) -> str:
    """What a result holds, in words: its number of objects, or the class values in it."""
    labels = np.asarray(labels)
    top = int(labels.max(initial=0))
    if instances:
        return f"{top} objects"
    return "classes " + ", ".join(str(v) for v in range(1, top + 1) if (labels == v).any())


def is_image(layer: Any) -> bool:
    """An image layer a user may segment or train on (not a probability paintseg made)."""
    from napari.layers import Image

    return isinstance(layer, Image) and layer.metadata.get(ROLE) != "probability"


def image_input(layer: Any) -> tuple[Any, str, tuple[int, ...]]:
    """An image layer's data (the full resolution of a multiscale one), its axes and its
    spatial shape."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    axes = layer_axes(data.shape, rgb=bool(layer.rgb), name=layer.name)
    return data, axes, spatial_shape(data.shape, rgb=bool(layer.rgb))


class SegmentTab(QWidget):
    """Segment the chosen image layer with the session's model into ``<image> segmentation``
    (and ``<image> P(class)`` probability layers when asked)."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        lay = QFormLayout(self)
        self.image = LayerChoice(session.viewer, is_image)
        lay.addRow("Image", self.image)
        self.form = build_form(SegmentSettings, SEGMENT_FIELDS)
        self.form.add_rows(lay)
        self.segment_btn, self.stop_btn, row = run_stop_row(session.jobs, "Segment",
                                                            self.segment)
        lay.addRow(row)
        self.bar = QProgressBar()
        lay.addRow(self.bar)

    def settings(self, *, axes: str | None = None) -> SegmentSettings:
        """The form as one :class:`~paintseg.config.SegmentSettings` (a Segment and the batch
        use the same)."""
        values = self.form.values()
        values.pop("scope")
        values["tiles"] = TileConfig(tile=values["tiles"], precision=values.pop("precision"))
        return SegmentSettings(**values, axes=axes)

    def segment(self, *, image_name: str | None = None) -> bool:
        """Segment the chosen image (or region) with the current model; True if started."""
        from ..inference import segment_labels, wants_instances

        s = self.session
        try:
            model = s.require_model()
            layer = s.layer(image_name or self.image.currentText(), "an image layer")
            data, axes, lshape = image_input(layer)
            if len(lshape) < model.config.dims:
                raise UserError(f"The model is {model.config.dims}D but '{layer.name}' is "
                                f"{len(lshape)}D.")
            scope = self.form["scope"].value
            current = view = None
            if scope != "whole image":
                current = layer.world_to_data(s.viewer.dims.point)
                current = np.asarray(current)[: len(lshape)]
                corners = np.asarray(layer.corner_pixels, dtype=float)
                view = corners[:, : len(lshape)]
            region = scope_region(lshape, scope=scope, model_dims=model.config.dims,
                                  current=current, view=view)
            settings = self.settings(axes=axes)
            instances = wants_instances(model, settings.output)
        except Exception as exc:  # noqa: BLE001 - every input problem is shown to the user
            s.refuse(exc)
            return False
        index = region + ((slice(None),) if layer.rgb else ())
        whole = scope == "whole image"
        device, source = s.device, layer.name

        def job(report, should_stop):
            net = copy.deepcopy(model)  # inference moves it to the device; a copy (here:
            # torch on the GUI thread would start a second team of helper threads, see _jobs.py)
            part = data if whole else np.asarray(data[index])
            result = segment_labels(
                part, net, settings, device=device,
                return_probabilities=settings.probabilities,
                progress=lambda d, t: report(Progress(d, t)), should_stop=should_stop,
            )
            return result, _summary(result.labels, instances)  # here, not on the GUI thread

        def done(out) -> None:
            self._show_result(source, *out, region, lshape, instances, model, layer)

        self.bar.setValue(0)
        s.say(f"Segmenting {source} ({scope})…")
        return s.jobs.start("segment", job, on_progress=self._progress, on_done=done,
                            on_error=self._failed)

    def _progress(self, p: Progress) -> None:
        self.bar.setMaximum(max(p.total, 1))
        self.bar.setValue(p.done)

    def _failed(self, exc: BaseException) -> None:
        from ..errors import StopRequested

        if isinstance(exc, StopRequested):
            self.session.notify("Segmentation stopped; the layers were left as they were.")
            return
        self.session.failed("Segmentation")(exc)

    # ------------------------------------------------------------------ layers

    def _output_layer(self, source: str, role: str) -> Any:
        """The paintseg layer of ``role`` for ``source`` that may be updated in place, or None."""
        for ly in self.session.viewer.layers:
            if (ly.metadata.get(ROLE) == role and ly.metadata.get(SOURCE) == source
                    and not ly.metadata.get(EDITED)):
                return ly
        return None

    def _insert_above(self, image: Any, layer: Any) -> None:
        """Add ``layer`` just above ``image`` (below the user's paint layers), keeping the
        layer the user was working on selected, so the next brush stroke still lands there."""
        layers = self.session.viewer.layers
        active = layers.selection.active
        selected = set(layers.selection)
        index = layers.index(image) + 1 if image in layers else len(layers)
        layers.insert(index, layer)
        if active is not None and active in layers:
            sel = layers.selection
            sel.clear()
            sel.update(ly for ly in selected if ly in layers)
            sel.active = active

    def _show_result(self, source: str, result: Any, what: str, region: tuple[slice, ...],
                     lshape: tuple[int, ...], instances: bool, model: Any, image: Any) -> None:
        from napari.layers import Labels

        s = self.session
        layer = self._output_layer(source, "segmentation")
        existing = np.asarray(layer.data) if layer is not None else None
        labels = merge_region(existing, result.labels, region, shape=lshape, instances=instances)
        scale = tuple(image.scale[: len(lshape)])
        translate = tuple(image.translate[: len(lshape)])
        if layer is None:
            layer = Labels(labels, name=s.unique_name(f"{source} segmentation"),
                           scale=scale, translate=translate,
                           metadata={ROLE: "segmentation", SOURCE: source})
            self._insert_above(image, layer)
        else:
            layer.data = labels
        layer.metadata["paintseg_kind"] = "instances" if instances else "semantic"
        if result.probabilities is not None:
            self._show_probabilities(source, np.asarray(result.probabilities), region, lshape,
                                     model, scale, translate)
        for msg in result.messages:
            s.notify(msg, "info")
        s.say(f"Segmented {source} in {result.seconds:.1f} s on {result.device}: "
              f"{what} → layer '{layer.name}'.")
        self.bar.setValue(self.bar.maximum())

    def _show_probabilities(self, source: str, probs: np.ndarray, region: tuple[slice, ...],
                            lshape: tuple[int, ...], model: Any, scale: tuple, translate: tuple
                            ) -> None:
        from napari.layers import Image

        viewer = self.session.viewer
        for k, (value, cname) in enumerate(zip(model.class_values, model.class_names)):
            if k == 0:
                continue  # the background's is 1 - the others
            layer = None
            for ly in viewer.layers:
                if ly.metadata.get(ROLE) == "probability" and ly.metadata.get(SOURCE) == source \
                        and ly.metadata.get("paintseg_class") == value:
                    layer = ly
            full = np.zeros(lshape, np.float32) if layer is None or layer.data.shape != lshape \
                else np.array(layer.data, dtype=np.float32)
            full[region] = probs[k].reshape(full[region].shape)
            if layer is None:
                layer = Image(full, name=self.session.unique_name(f"{source} P({cname})"),
                              colormap="magma", blending="additive", opacity=0.6,
                              contrast_limits=(0, 1), scale=scale, translate=translate,
                              metadata={ROLE: "probability", SOURCE: source,
                                        "paintseg_class": value})
                self._insert_above(viewer.layers[source], layer)
            else:
                layer.data = full

