"""What the CLI and napari tell the user about a training run: the weights kept, the
default of *Continue*, painted classes a model disagrees with or misses."""

from __future__ import annotations

import numpy as np
import torch

from ..config import TrainConfig
from ..devices import resolve_device
from ..errors import InputError
from ..model import PaintsegModel
from ..tiling import read_window
from .data import TrainingData, _in_plane, _window
from .events import TrainEvent
from .losses import holds_to_predictions


def continue_by_default(*, bundled: bool, labels_kind: str) -> bool:
    """Whether Train should continue the current model rather than start a new U-Net.

    A model trained on the user's data (or one they opened) is continued. A bundled model has
    not seen the user's data: strokes start a new U-Net (the starter, held to its own
    predictions on the unpainted pixels, learns strokes worse than a new network does), and
    corrected instances continue it (every pixel is labelled there, so nothing holds it back).
    The reasons and their figures: docs/training.md.

    Parameters
    ----------
    bundled : bool
        The current model is one that ships with paintseg.
    labels_kind : str
        ``"scribbles"`` or ``"instances"``.
    """
    if labels_kind not in ("scribbles", "instances"):
        raise InputError(f"labels kind must be scribbles or instances, got {labels_kind!r}")
    return not bundled or labels_kind == "instances"


def kept_weights_text(done: TrainEvent) -> str:
    """How a finished run's kept weights are described to the user (CLI and GUI alike)."""
    if done.best_step == 0 and done.step > 0:
        return ("no training step beat the starting weights on the held-out strokes; the "
                "starting weights are kept")
    return f"weights of step {done.best_step}"


# A continued model that gives a painted class to fewer than this share of the pixels painted
# with it disagrees with the strokes. Measured (all painted pixels, benchmarks/RESULTS.md): the
# bundled starter on inverted-contrast DSB2018 gives background to 0% of the background strokes
# in 5 of 5 draws (continued, it scores 0.47 against 0.79 for a new U-Net); on DSB2018 and the
# cells3d stack 89-100% per class; a new U-Net after a first round of 30 s, with correction
# strokes in its errors added to its strokes, 66-100% (5 draws each on cells3d and DSB2018;
# benchmarks/agreement.py)
DISAGREEMENT = 0.3


def painted_agreement(model: PaintsegModel, data: TrainingData, *,
                      device: str | torch.device = "auto", max_patches: int | None = None,
                      seed: int = 0) -> dict[int, float]:
    """Share of the painted pixels of each class that ``model`` gives that class.

    Training and held-out strokes alike are predicted in up to ``max_patches`` windows centred
    on painted pixels (drawn evenly over the painted classes); each painted pixel inside
    them counts once.

    Parameters
    ----------
    model : PaintsegModel
        Its classes must match ``data.class_values``.
    data : TrainingData
        From :func:`prepare_data` with the model's normalisation.
    device : str or torch.device
        Where to predict.
    max_patches : int, optional
        Number of windows: by default 32 of 128 pixels on a side in 2D, 8 of 32 in 3D (on
        2 CPU cores about 1 s for the fast presets; 32 of 48 in 3D took 12 s).
    seed : int
        Draws the windows.

    Returns
    -------
    dict
        ``{class value: share of its painted pixels predicted as it}`` for every painted class.
    """
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    align = model.config.align
    edge = 128 if data.dims == 2 else 32
    if max_patches is None:
        max_patches = 32 if data.dims == 2 else 8
    size = (max(align, -(-edge // align) * align),) * data.dims
    k = len(data.class_values)
    where = {c: [np.argwhere(it.targets == c) for it in data.items] for c in range(k)}
    present = [c for c in range(k) if any(len(w) for w in where[c])]
    centres: list[tuple[int, np.ndarray]] = []
    for c in present:
        n = np.array([len(w) for w in where[c]], dtype=float)
        for _ in range(max(1, max_patches // len(present))):
            i = int(rng.choice(len(n), p=n / n.sum()))
            centres.append((i, where[c][i][rng.integers(len(where[c][i]))]))
    hits, totals = np.zeros(k), np.zeros(k)
    counted = [np.zeros(it.targets.shape, bool) for it in data.items]
    net = model.network
    home = next(net.parameters()).device
    net.to_device(dev).eval()
    with torch.inference_mode():
        for i, centre in centres:
            it = data.items[i]
            plane, centre = _in_plane(data.dims, it.targets.ndim, centre)
            tgt, seen = it.targets[plane], counted[i][plane]
            start = tuple(int(v - e // 2) for v, e in zip(centre, size))
            x = read_window(it.image[(slice(None), *plane)], start, size)
            pred = net(torch.from_numpy(x[None]).to(dev)).argmax(1)[0].cpu().numpy()
            src, dst = _window(start, size, tgt.shape)
            new = (tgt[src] >= 0) & ~seen[src]
            truth, guess = tgt[src][new], pred[dst][new]
            np.add.at(totals, truth, 1)
            np.add.at(hits, truth[guess == truth], 1)
            seen[src] |= new
    net.to_device(home)
    return {int(data.class_values[c]): float(hits[c] / totals[c]) for c in range(k)
            if totals[c] > 0}


# A trained model that gives a painted class to fewer than this share of the pixels painted with
# it has not learnt that class (issue: a thin class with few strokes came out empty).
COLLAPSED = 0.5


def collapse_text(model: PaintsegModel, data: TrainingData, *,
                  device: str | torch.device = "auto",
                  threshold: float = COLLAPSED) -> str | None:
    """A warning when a trained model misses a painted class on its own strokes.

    Parameters
    ----------
    model : PaintsegModel
        The model after training on ``data``.
    data : TrainingData
        Its training data (training and held-out strokes alike are checked).
    device : str or torch.device
        Where to predict.
    threshold : float
        A painted class that the model gives to fewer than this share of its painted pixels
        (:func:`painted_agreement`) is named.

    Returns
    -------
    str or None
        The text naming each such class with its share, or None when every painted class
        reaches ``threshold``.
    """
    agree = painted_agreement(model, data, device=device)
    return missed_text(agree, dict(zip(model.class_values, model.class_names)),
                       threshold=threshold)


def agreement_in(predicted: np.ndarray, painted: np.ndarray, *,
                 min_pixels: int = 1) -> dict[int, float]:
    """Share of the painted pixels of each class that a prediction gives that class.

    Parameters
    ----------
    predicted : numpy.ndarray
        Class values, one per pixel (every class as its value: no background written as 0).
    painted : numpy.ndarray
        Labels of the same shape: 0 unpainted, else the painted class value.
    min_pixels : int
        Classes painted on fewer pixels than this are left out.

    Returns
    -------
    dict
        ``{class value: share}`` for every class painted on at least ``min_pixels`` pixels.
    """
    predicted, painted = np.asarray(predicted), np.asarray(painted)
    if predicted.shape != painted.shape:
        raise InputError(f"prediction of shape {predicted.shape} against labels of shape "
                         f"{painted.shape}")
    mask = painted > 0
    values, counts = np.unique(painted[mask], return_counts=True)
    hits = np.bincount(painted[mask & (predicted == painted)].astype(np.int64),
                       minlength=int(values.max()) + 1 if len(values) else 1)
    return {int(v): float(hits[v] / n) for v, n in zip(values, counts) if n >= min_pixels}


def missed_text(agreement: dict[int, float], names: dict[int, str], *,
                threshold: float = COLLAPSED, subject: str = "the trained model",
                where: str = "") -> str | None:
    """The warning naming each painted class that gets fewer than ``threshold`` of its
    painted pixels (``agreement`` as :func:`painted_agreement` or :func:`agreement_in` give
    it), or None. ``subject`` is what predicts; ``where`` follows "painted pixels"."""
    missed = {c: v for c, v in agreement.items() if v < threshold}
    if not missed:
        return None
    which = ", ".join(f"'{names.get(c, f'class {c}')}' (value {c}) on only {v:.0%} of its "
                      f"painted pixels{where}" for c, v in missed.items())
    it, is_ = ("it", "it is") if len(missed) == 1 else ("them", "they are")
    return (f"{subject} predicts {which}: the result will miss {it}; paint more of "
            f"{it}, where {is_} missed, or train longer")


def disagreement_text(model: PaintsegModel, data: TrainingData, *,
                      device: str | torch.device = "auto",
                      threshold: float = DISAGREEMENT,
                      anchor: float | None = None) -> str | None:
    """A warning when the model about to be continued contradicts the strokes.

    Continuing a model holds the unpainted pixels to its own predictions
    (``TrainConfig.anchor``). Where the model is wrong everywhere, as the starter model on
    data of inverted contrast, a minute of strokes does not undo that, and a new U-Net trains
    better. Strokes painted only on a model's mistakes look the same; the text says so.

    Parameters
    ----------
    model : PaintsegModel
        The model to train, before training.
    data : TrainingData
        The strokes, prepared for ``model``.
    device : str or torch.device
        Where to predict.
    threshold : float
        A painted class whose share (:func:`painted_agreement`) is below this is contradicted.
    anchor : float, optional
        The training's ``TrainConfig.anchor`` (by default its default).

    Returns
    -------
    str or None
        None when the training will not hold the unpainted pixels to the model's predictions
        (:func:`holds_to_predictions`: a new model, dense labels with nothing unpainted, or no
        anchor), or when every painted class reaches ``threshold``.
    """
    if anchor is None:
        anchor = TrainConfig().anchor
    if not holds_to_predictions(model, data, anchor=anchor):
        return None
    agree = painted_agreement(model, data, device=device)
    if all(v >= threshold for v in agree.values()):
        return None
    names = dict(zip(model.class_values, model.class_names))
    shares = ", ".join(f"{names.get(c, f'class {c}')} {v:.0%}" for c, v in agree.items())
    return (f"the model being continued contradicts the strokes (pixels painted as each "
            f"class that it predicts as that class: {shares}); continuing holds the unpainted "
            "pixels to its predictions, so on data unlike its own a new U-Net trains better, "
            "unless these strokes only correct its mistakes")
