"""From painted images to a model ready to train: the network for the labels (new or
adapted), the data, and :func:`train` for a whole run in one call."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..config import DENSE_SHARE, ModelConfig, TrainConfig
from ..errors import InputError
from ..model import PaintsegModel, default_class_names, new_model
from .data import TrainingData, check_channels, painted_share, prepare_data
from .events import EventKind, TrainEvent
from .loop import iter_train
from .losses import _NEW_OUTPUT_LAYER
from .presets import (
    BRIGHTNESS_SEPARATES,
    STROKES_DERIVATIVE_GAIN,
    _strokes_2d,
    _strokes_members,
    members_for_classes,
    preset_config,
)


def adapt_model(
    model: PaintsegModel,
    class_values: Sequence[int],
    class_names: Sequence[str] | None = None,
    *,
    seed: int | None = None,
) -> PaintsegModel:
    """A copy of ``model`` for other classes: same weights, a new output layer if the class
    count differs (the encoder and decoder are kept: warm start). Averaged U-Nets that now
    have :data:`~.presets.STROKES_ONE_MEMBER_FROM` classes or more go on as their first U-Net
    alone, as a new U-Net for that many classes would be one
    (:func:`~.presets.members_for_classes`)."""
    class_values = tuple(int(v) for v in class_values)
    names = tuple(class_names) if class_names else None
    if model.foreign:
        return _foreign_for_training(model, class_values, names)
    if tuple(model.class_values) == class_values:
        out = copy.deepcopy(model)
        if names:
            out.class_names = names
        return out
    # the first member's weights go on where it is one now (the others' are not loaded)
    members = members_for_classes(model.config.members, classes=len(class_values))
    cfg = ModelConfig(**{**model.config.__dict__, "classes": len(class_values),
                         "members": members})
    fresh = new_model(cfg, class_values=class_values, class_names=names,
                      normalization=model.normalization, seed=seed)
    state = {k: v for k, v in model.network.state_dict().items()
             if not (k.startswith("head.") or ".head." in k)}  # every member's output layer
    fresh.network.load_state_dict(state, strict=False)
    fresh.provenance = copy.deepcopy(model.provenance)
    fresh.provenance.setdefault("notes", []).append(
        f"output layer re-initialised for classes {list(class_values)}"
        + (f"; the first of {model.config.members} averaged U-Nets kept"
           if members < model.config.members else ""))
    fresh.provenance[_NEW_OUTPUT_LAYER] = True  # until it is trained: nothing to anchor to
    return fresh


def _foreign_for_training(model: PaintsegModel, class_values: tuple[int, ...],
                          names: tuple[str, ...] | None) -> PaintsegModel:
    """Another tool's network from a BioImage.IO package, loaded with its architecture and
    state dict so that it trains; its classes cannot change."""
    from ..exchange import load_package

    if class_values != tuple(model.class_values):
        listed = ", ".join(f"{v} {n}" for v, n in zip(model.class_values, model.class_names))
        raise InputError(
            f"another tool's network has the classes {listed}: paint only those (paintseg "
            "cannot add an output to it)")
    out = load_package(model.package["file"], trainable=True)
    out.provenance["training"] = copy.deepcopy(model.provenance.get("training") or [])
    if names:
        out.class_names = names
    return out


def classes_to_continue(
    model: PaintsegModel, painted: Iterable[int]
) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
    """Classes to continue training ``model`` on scribbles with the ``painted`` values.

    The model's own classes and names when every painted value is one of them (the output
    layer is kept); otherwise their union with the painted values (a new output layer, names
    by default).
    """
    painted = {int(v) for v in painted}
    if painted <= set(model.class_values):
        return tuple(model.class_values), tuple(model.class_names)
    return tuple(sorted(painted | set(model.class_values))), None


def brightness_separability(data: TrainingData, *, bins: int = 64) -> float:
    """How well brightness alone tells the painted classes apart.

    Parameters
    ----------
    data : TrainingData
        The painted pixels (training and held-out) of its normalised images.
    bins : int
        Histogram bins over normalised intensities -0.5..1.5 (outside: the end bins).

    Returns
    -------
    float
        Over the channels, the best class-balanced accuracy of a classifier that gives each
        intensity bin its most frequent class (1 / K: no separation; 1: full).
    """
    k = len(data.class_values)
    best = 0.0
    for ch in range(data.items[0].image.shape[0]):
        hist = np.zeros((k, bins))
        for it in data.items:
            painted = it.targets >= 0
            v = np.clip(it.image[ch][painted], -0.5, 1.5)
            np.add.at(hist, (it.targets[painted], ((v + 0.5) / 2 * (bins - 1)).astype(int)), 1)
        share = hist / hist.sum(1, keepdims=True).clip(1)
        present = hist.sum(1) > 0
        best = max(best, float(share[present].max(0).sum() / present.sum()))
    return best


def model_for_training(
    base: PaintsegModel | None,
    data: TrainingData,
    *,
    in_channels: int,
    labels_kind: str = "scribbles",
    preset: str = "auto",
    seed: int | None = None,
) -> PaintsegModel:
    """The model to train on ``data``: ``base`` adapted to its classes (warm start), or a new
    U-Net of ``preset`` when ``base`` is None. A model trained on instances records it, so
    that segmenting with it gives instances by default.

    A new 2D fast U-Net for strokes damps its derivative channels by x0.1 where brightness
    alone separates the painted classes (:func:`brightness_separability` at least
    :data:`BRIGHTNESS_SEPARATES`: nuclei). Elsewhere (cells in phase contrast, membranes,
    boundaries) it trains one U-Net at full strength (x1) where it trains one U-Net anyway:
    three or more painted classes (:func:`preset_config`), and scribbles that cover their
    planes (dense labels: :func:`painted_share` at least :data:`~paintseg.config.DENSE_SHARE`;
    one U-Net instead of three averaged then, more steps a second to learn shape and texture
    from every pixel). One U-Net standardises its convolutions' weights
    (:data:`~.presets.STROKES_ONE_MEMBER_NORM`). Two classes of strokes keep three averaged
    U-Nets damped x0.3, with plain convolutions; when a
    class added to such a model leaves its first U-Net to go on alone (:func:`adapt_model`),
    that U-Net goes on at full strength too (:meth:`~paintseg.network.UNet.set_derivative_gain`:
    the same function, its first layer rescaled), with its trained plain convolutions."""
    if base is not None:
        model = adapt_model(base, data.class_values, data.class_names, seed=seed)
        if (model.config.members < base.config.members and model.config.derivative_gain != 1
                and model.config.dims == 2 and labels_kind == "scribbles"
                and _strokes_gain(data, members=1) == (1.0, 1)):
            # averaged U-Nets gone on as one (a class added): full strength, as a new U-Net
            # for these classes would have; the same function, trained faster on shape
            model.network.set_derivative_gain(1.0)
            model.config = model.network.config
            model.provenance["notes"][-1] += "; derivative channels at full strength"
    else:
        cfg = preset_config(preset, dims=data.dims, in_channels=in_channels,
                            classes=len(data.class_values), labels_kind=labels_kind)
        if "derivative_gain" in _strokes_2d(preset, dims=data.dims, labels_kind=labels_kind):
            gain, members = _strokes_gain(data, members=cfg.members)
            cfg = _strokes_members(dataclasses.replace(cfg, derivative_gain=gain), members)
        model = new_model(cfg, class_values=data.class_values, class_names=data.class_names,
                          seed=seed)
    if labels_kind == "instances":
        model.provenance["output"] = "instances"
    return model


def _strokes_gain(data: TrainingData, *, members: int) -> tuple[float, int]:
    """The derivative gain and the number of averaged U-Nets of a 2D fast U-Net of ``members``
    for the scribbles of ``data`` (see :func:`model_for_training`)."""
    damped, shaped = STROKES_DERIVATIVE_GAIN
    if brightness_separability(data) >= BRIGHTNESS_SEPARATES:
        return damped, members
    if painted_share(data) >= DENSE_SHARE:
        # shape and texture from every pixel: full strength, and one U-Net (more steps; no
        # unpainted pixels for the average to be steady on)
        return 1.0, 1
    # many classes (one U-Net): shape and texture tell the dark (or bright) ones apart;
    # damped, one U-Net could leave a thin class unlearnt, even on its own strokes
    return (1.0, 1) if members == 1 else (shaped, members)


def prepare_training(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    base: PaintsegModel | None,
    dims: int,
    in_channels: int,
    labels_kind: str = "scribbles",
    preset: str = "auto",
    seed: int | None = None,
    class_names: Mapping[int, str] | None = None,
    **prepare_options: Any,
) -> tuple[TrainingData, PaintsegModel]:
    """The training data and the model to train, as ``paintseg train``, the napari widget
    and the benchmarks set them up.

    Parameters
    ----------
    pairs : sequence of (image, labels)
        As for :func:`prepare_data`.
    base : PaintsegModel or None
        A model to continue (its dimensionality and normalisation are kept; on scribbles its
        classes too, see :func:`classes_to_continue`), or None for a new U-Net.
    dims : int
        Dimensionality of a new U-Net (ignored when continuing ``base``).
    in_channels : int
        Image channels of a new U-Net.
    labels_kind, preset, seed
        As for :func:`prepare_data` and :func:`model_for_training`.
    class_names : mapping, optional
        Names of the classes by value (``{1: "rest", 2: "membrane"}``), kept in the
        checkpoint; classes not named, and those of a continued model, keep their names.
    **prepare_options
        Further options of :func:`prepare_data` (``channel_axis``, ``names``, ...).

    Returns
    -------
    (TrainingData, PaintsegModel)
    """
    class_values = names = None
    painted: set[int] = set()
    if labels_kind == "scribbles" and (base is not None or class_names):
        painted = set().union(*(np.unique(lab).tolist() for _, lab in pairs)) - {0}
    if base is not None:
        check_channels(base, in_channels)
        dims = base.config.dims
        if labels_kind == "scribbles":
            class_values, names = classes_to_continue(base, painted)
    if class_names and names is None and labels_kind == "scribbles":
        if class_values is None:
            class_values = tuple(sorted(painted))
        defaults = default_class_names(class_values)
        names = tuple(str(class_names.get(v, d)) for v, d in zip(class_values, defaults))
    data = prepare_data(pairs, dims=dims, labels_kind=labels_kind, class_values=class_values,
                        class_names=names, seed=seed,
                        normalization=base.normalization if base is not None else None,
                        **prepare_options)
    model = model_for_training(base, data, in_channels=in_channels, labels_kind=labels_kind,
                               preset=preset, seed=seed)
    return data, model


def train(
    model: PaintsegModel,
    data: TrainingData,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    should_stop: Callable[[], bool] | None = None,
    on_event: Callable[[TrainEvent], None] | None = None,
) -> TrainEvent:
    """Run :func:`iter_train` to the end; returns the DONE event."""
    last: TrainEvent | None = None
    for event in iter_train(model, data, config, device=device, should_stop=should_stop):
        if on_event is not None:
            on_event(event)
        last = event
    assert last is not None and last.kind is EventKind.DONE
    return last
