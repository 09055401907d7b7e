"""Fine-tune a U-Net on what the user painted.

Painted labels: 0 = not annotated (never in the loss), 1..K = class value. A dense instance
segmentation becomes background / object / boundary targets (the U-Net paper's way of
separating touching objects), from which :mod:`paintseg.postprocess` recovers instances.

:func:`iter_train` is a generator: it yields :class:`TrainEvent` objects (step, loss,
validation, elapsed, ETA) and honours a stop request between steps, so the same loop serves the
CLI, the napari thread worker and the tests. Training validates on held-out painted pixels,
the starting weights included, and ends (or stops) with the latest weights unless earlier ones
were clearly better there (see :func:`_clearly_beaten`), so a retrain cannot silently return
something worse than what it started from. Continuing a trained model also holds it to its own
predictions on the unpainted pixels (:func:`anchor_loss`), so that correction strokes change the
result where they are painted and little elsewhere.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import find_boundaries

from .config import STROKES_INTENSITY_SHIFT, ModelConfig, NormConfig, TrainConfig
from .devices import flush_denormals, resolve_device
from .errors import InputError
from .model import PaintsegModel, default_class_names, new_model
from .normalize import percentile_range
from .tiling import read_window

__all__ = [
    "EventKind",
    "TrainEvent",
    "TrainingData",
    "scribble_targets",
    "instance_targets",
    "prepare_data",
    "masked_loss",
    "anchor_loss",
    "continues_training",
    "iter_train",
    "train",
    "PRESETS",
    "STROKES_2D",
    "preset_config",
    "classes_to_continue",
    "model_for_training",
    "prepare_training",
    "median_diameter",
    "kept_weights_text",
    "check_channels",
    "disagreement_text",
    "holds_to_predictions",
    "painted_agreement",
    "collapse_text",
]

IGNORE = -1
HELD_OUT = -2  # in the training targets: painted, but held out for validation
# An earlier validation must beat the latest weights by more than this mean IoU on held-out
# painted pixels, and have a lower loss, for the earlier weights to be kept. A few held-out
# strokes give a noisy score: with 0.02 and IoU alone, 30 s runs on DSB2018 kept weights from
# step 28 of 159 (IoU 0.64 on the unpainted half, against 0.76 for the final weights).
_BEST_TOLERANCE = 0.05
# provenance key set while a model's output layer is new (untrained)
_NEW_OUTPUT_LAYER = "new_output_layer"
INSTANCE_CLASSES = (1, 2, 3)
INSTANCE_NAMES = ("background", "object", "boundary")
LABELS_KINDS = ("scribbles", "instances")


def _check_labels_kind(labels_kind: str) -> None:
    if labels_kind not in LABELS_KINDS:
        raise ValueError(f"labels_kind must be 'scribbles' or 'instances', got {labels_kind!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # 2D, 2 CPU cores: a step on 16 patches of 64^2 takes ~0.2 s. No normalisation layers:
    # the per-pixel layer norm made the network blind to absolute brightness, and dim
    # out-of-focus haze came out as nuclei (cells3d strokes, held-out IoU 0.77 -> 0.83 with EMA)
    "fast": {"depth": 3, "base_features": 16, "features": (1.0, 2.0, 4.0, 8.0, 16.0),
             "norm": "none"},
    "accurate": {"depth": 4, "base_features": 32, "features": (1.0, 2.0, 4.0, 8.0, 16.0)},
}
# Brightness alone separates the painted classes when one channel's histogram of normalised
# intensity gives this share of their painted pixels their class (class-balanced): midway
# between nuclei, whose strokes score 0.94 (bars across their edges) to 0.999, and the other
# kinds of data of benchmarks/interactive.py, at most 0.89 (EM membranes).
BRIGHTNESS_SEPARATES = 0.92
# The fast preset's derivative gain for strokes where brightness separates the classes, and
# where it does not (shape and texture then tell them apart).
STROKES_DERIVATIVE_GAIN = (0.1, 0.3)

# What the 2D presets change for strokes (sparse labels; dense labels keep the preset as is).
# Derivative channels x0.1: the network then starts from brightness, as the forest does; 60 s
# of strokes, 5 seeds: cells3d stack IoU 0.881 (was 0.820), DSB2018 0.804 (was 0.816), forest
# 0.871 / 0.795. 3 U-Nets of base 8 trained side by side (a step costs about what one of base
# 16 costs) and averaged: one network's guess where nothing is painted varies much from one
# start to the next; 5 seeds, a slower CPU: cells3d 0.859 (one base-16 U-Net 0.830; its worst
# draw 0.793 against 0.673), DSB2018 0.791 (0.795); forest 0.871 / 0.795 (benchmarks/RESULTS.md).
# Filter scales 1..8 (no sigma 16), paired with 1..16 in one process, 60 s: cells3d seeds 0-4
# 0.900 / 0.886, seeds 5-9 0.842 / 0.799, DSB2018 seeds 0-9 0.812 / 0.806; forest 0.871 /
# 0.864 / 0.791 (benchmarks/RESULTS.md). It also runs ~8% more steps a minute, and the exact
# tiling halo drops from 104 to 80 pixels.
# Leaky ReLUs: with ReLUs, one of the 3 small U-Nets often went silent for good (its last
# layer's 8 channels negative everywhere; it then predicts one constant), which capped the
# average's confidence at about 0.86, so that the snap re-decided every border pixel and a
# third of the work was lost (cells3d draw 1: one member's logits had std 0.16, the others'
# 11 and 13; benchmarks/RESULTS.md, "A silent member").
STROKES_2D: dict[str, dict[str, Any]] = {
    "fast": {"derivative_gain": STROKES_DERIVATIVE_GAIN[0], "base_features": 8, "members": 3,
             "features": (1.0, 2.0, 4.0, 8.0), "activation": "leaky_relu"},
}
# 3D: the filter bank pads a patch by 3 sigma on every side (sigma 16: a 32^3 patch became
# 128^3), so filter scales stop at 4; base 8. A step on 4 patches of 32^3 takes ~0.3 s on
# 2 CPU cores (was 4.4 s with the 2D preset on 16 patches).
PRESETS_3D: dict[str, dict[str, Any]] = {
    "fast": {"depth": 3, "base_features": 8, "features": (1.0, 2.0, 4.0), "norm": "none"},
    "accurate": {"depth": 3, "base_features": 16, "features": (1.0, 2.0, 4.0, 8.0)},
}


def preset_config(preset: str, *, dims: int, in_channels: int, classes: int,
                  labels_kind: str = "scribbles") -> ModelConfig:
    """Architecture of a new model: ``"fast"``, ``"accurate"`` or ``"auto"`` (= fast).

    For strokes, the 2D fast preset damps the filter bank's derivative channels (x0.1),
    averages 3 U-Nets of base 8 with leaky ReLUs and stops its filter scales at sigma 8
    (:data:`STROKES_2D`).
    ``labels_kind="instances"`` (dense labels) keeps one U-Net of base 16 with the derivative
    channels at full strength and scales up to sigma 16: the x0.1 helps sparse strokes but cost
    dense training on the DSB2018 top half AP@0.5 0.573 -> 0.513 (``benchmarks/dense.py
    --budget 120``); members and scales were not measured on dense labels.

    ``auto`` is the fast preset on every device. Measured on an H100 (strokes on 2 slices,
    10 s of training, 5 seeds, ``benchmarks/interactive.py``, before the fast preset damped its
    derivative channels): held-out IoU on the cells3d
    stack 0.823 fast, 0.700 accurate; on DSB2018 0.824 fast, 0.845 accurate. The larger model
    gains little where it wins and loses much on the stack, so it is a choice, not a default.
    With the damping, the 2D fast preset reached 0.828-0.876 on the stack and 0.807 on DSB2018
    there; the 3D fast preset keeps its derivative channels (damped, it collapsed on one of 5
    draws of strokes: 0.630 against 0.818).
    """
    if preset == "auto":
        preset = "fast"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use fast, accurate or auto")
    _check_labels_kind(labels_kind)
    arch = dict((PRESETS_3D if dims == 3 else PRESETS)[preset])
    arch.update(_strokes_2d(preset, dims=dims, labels_kind=labels_kind))
    return ModelConfig(dims=dims, in_channels=in_channels, classes=classes, **arch)


def _strokes_2d(preset: str, *, dims: int, labels_kind: str) -> dict[str, Any]:
    """What :data:`STROKES_2D` changes in ``preset`` (``auto`` = fast) for these labels."""
    if labels_kind != "scribbles" or dims != 2:
        return {}
    return STROKES_2D.get("fast" if preset == "auto" else preset, {})


class EventKind(enum.Enum):
    """What a :class:`TrainEvent` reports."""

    STEP = "step"
    VALIDATION = "validation"
    DONE = "done"


@dataclass
class TrainEvent:
    """Progress of :func:`iter_train`.

    Attributes
    ----------
    kind : EventKind
    step : int
        Optimisation steps done.
    loss : float
        Training loss of the last step on the painted pixels (mean over the last few for
        DONE); the anchor's term (``TrainConfig.anchor``) is not in it, so that a continued
        run's loss compares with the first run's.
    elapsed : float
        Seconds since the start.
    eta : float or None
        Seconds left (time budget or steps).
    fraction : float
        Share of the budget used, 0..1.
    validation : dict or None
        ``{"loss", "mean_iou", "iou": {class value: IoU}}`` on held-out painted pixels.
    best_step : int or None
        Step whose weights are kept (0: the starting weights).
    stopped : bool
        DONE only: the user stopped the run.
    """

    kind: EventKind
    step: int
    loss: float
    elapsed: float
    eta: float | None
    fraction: float
    validation: dict[str, Any] | None = None
    best_step: int | None = None
    stopped: bool = False


# ---------------------------------------------------------------------------- targets


def _check_labels(labels: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise InputError(
            f"{name}: labels have shape {labels.shape} but the image has spatial shape {shape}"
        )
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.all(labels == np.round(labels)):
            raise InputError(f"{name}: labels must be whole numbers (got {labels.dtype} values)")
    elif labels.dtype.kind not in "biu":
        raise InputError(f"{name}: labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError(f"{name}: labels must be >= 0 (0 = not painted), found {labels.min()}")
    return labels


def scribble_targets(
    labels: np.ndarray, class_values: Sequence[int]
) -> np.ndarray:
    """Class-index targets from painted labels: painted value -> its index, 0 -> ignored (-1).

    A copy is returned; ``labels`` is never modified.
    """
    lut = np.full(int(max(int(labels.max()), max(class_values))) + 1, IGNORE, dtype=np.int64)
    for i, v in enumerate(class_values):
        lut[int(v)] = i
    return lut[np.asarray(labels).astype(np.int64)]


def instance_targets(instances: np.ndarray) -> np.ndarray:
    """Background (0) / object (1) / boundary (2) targets from a dense instance image.

    Boundaries are the object pixels touching another object or the background, so that
    touching objects are separated. Every pixel is annotated.
    """
    inst = np.asarray(instances)
    targets = (inst > 0).astype(np.int64)
    if inst.ndim == 3:  # a stack of 2D instance images: boundaries per slice
        bounds = np.stack([find_boundaries(s, mode="inner") for s in inst])
    else:
        bounds = find_boundaries(inst, mode="inner")
    targets[bounds & (inst > 0)] = 2
    return targets


# ---------------------------------------------------------------------------- data


@dataclass
class _Item:
    image: np.ndarray  # (C, *spatial) float32, normalised
    targets: np.ndarray  # (*spatial) int64, -1 ignored
    val_mask: np.ndarray  # (*spatial) bool: held out
    train_targets: np.ndarray  # targets with the held-out pixels ignored
    coords: list[np.ndarray]  # per class: (n, ndim) training coordinates


@dataclass
class TrainingData:
    """Images and targets ready for sampling.

    Attributes
    ----------
    items : list
        One per image.
    class_values, class_names : tuple
        Classes of the model to train.
    dims : int
        Spatial dimensions of the patches (2 for a 2D model, also on stacks).
    counts : ndarray
        Painted training pixels per class.
    has_validation : bool
        Whether held-out pixels exist for every painted class.
    """

    items: list[_Item]
    class_values: tuple[int, ...]
    class_names: tuple[str, ...]
    dims: int
    counts: np.ndarray
    has_validation: bool
    notes: list[str] = field(default_factory=list)
    object_diameter: float | None = None


def _normalised(image: np.ndarray, channel_axis: int | None, norm: NormConfig,
                name: str) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype.kind not in "buif":
        raise InputError(f"{name}: unsupported pixel type {img.dtype}")
    img = img[np.newaxis] if channel_axis is None else np.moveaxis(img, channel_axis, 0)
    img = img.astype(np.float32)
    if not np.isfinite(img).all():
        raise InputError(f"{name}: image contains NaN or infinite values")
    lo, hi = percentile_range(img, norm, name=name)
    scale = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    shape = (-1,) + (1,) * (img.ndim - 1)
    return (img - lo.reshape(shape)) / scale.reshape(shape)


def _split_blocks(
    targets: np.ndarray, fraction: float, rng: np.random.Generator, block: int, dims: int
) -> np.ndarray:
    """Hold out whole blocks of the image for validation, drawn per class so that every class
    painted in at least two blocks has held-out pixels (for a stack and a 2D model, blocks are
    per slice)."""
    if fraction <= 0:
        return np.zeros(targets.shape, dtype=bool)
    per_slice = dims == 2 and targets.ndim == 3
    scale = np.array([1 if (per_slice and a == 0) else block for a in range(targets.ndim)])
    grid = tuple(int(math.ceil(s / b)) for s, b in zip(targets.shape, scale))
    idx = np.nonzero(targets >= 0)
    flat = np.ravel_multi_index(tuple(i // b for i, b in zip(idx, scale)), grid)
    cls = targets[idx]
    chosen = np.zeros(int(np.prod(grid)), dtype=bool)
    for k in np.unique(cls):
        blocks = np.unique(flat[cls == k])
        if len(blocks) < 2:
            continue
        already = int(chosen[blocks].sum())
        want = max(1, int(round(fraction * len(blocks)))) - already
        free = blocks[~chosen[blocks]]
        if want > 0 and len(free) > 1:
            chosen[rng.choice(free, size=min(want, len(free) - 1), replace=False)] = True
    mask = np.zeros(targets.shape, dtype=bool)
    mask[idx] = chosen[flat]
    return mask


def prepare_data(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    dims: int,
    labels_kind: str = "scribbles",
    class_values: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    channel_axis: int | None = None,
    normalization: NormConfig | None = None,
    validation_fraction: float = 0.15,
    validation_block: int = 64,
    seed: int | None = None,
    names: Sequence[str] | None = None,
) -> TrainingData:
    """Check image / label pairs and turn them into normalised images and targets.

    Parameters
    ----------
    pairs : sequence of (image, labels)
        Labels have the image's spatial shape (no channel axis). Never modified.
    dims : int
        2 (2D model; a 3D stack is used slice by slice) or 3 (3D model, needs ZYX).
    labels_kind : str
        ``"scribbles"`` (0 = unpainted, values = classes) or ``"instances"``.
    class_values, class_names : sequence, optional
        Classes of the model (e.g. those of a model to continue); default: the painted values.
    channel_axis : int, optional
        Channel axis of the images, if any.

    Raises
    ------
    InputError
        Shape mismatch, nothing painted, a single class, negative or fractional labels.
    """
    if not pairs:
        raise InputError("no image / labels pairs were given")
    _check_labels_kind(labels_kind)
    norm = normalization or NormConfig()
    rng = np.random.default_rng(seed)
    names = list(names) if names else [f"image {i + 1}" for i in range(len(pairs))]
    items: list[_Item] = []
    painted_values: set[int] = set()
    raw: list[tuple[np.ndarray, np.ndarray, str]] = []
    for (image, labels), name in zip(pairs, names):
        img = _normalised(image, channel_axis, norm, name)
        spatial = img.shape[1:]
        if len(spatial) not in (2, 3):
            raise InputError(f"{name}: image must be 2D or 3D (+ channels), got {np.shape(image)}")
        if dims == 3 and len(spatial) != 3:
            raise InputError(f"{name}: a 3D model needs a 3D stack, got shape {np.shape(image)}")
        lab = _check_labels(labels, spatial, name)
        if labels_kind == "instances":
            tgt = instance_targets(lab)
        else:
            values = set(int(v) for v in np.unique(lab)) - {0}
            if not values:
                raise InputError(f"{name}: nothing is painted (all labels are 0)")
            painted_values |= values
            tgt = lab  # scribbles, converted once all class values are known
        raw.append((img, tgt, name))
    diameter = None
    if labels_kind == "instances":
        cvals, cnames = INSTANCE_CLASSES, INSTANCE_NAMES
        diameter = median_diameter([np.asarray(lab) for _, lab in pairs], dims=dims)
    else:
        cvals = tuple(sorted(class_values)) if class_values else tuple(sorted(painted_values))
        extra = painted_values - set(cvals)
        if extra:
            raise InputError(
                f"painted values {sorted(extra)} are not classes of the model ({list(cvals)})"
            )
        if len(painted_values) < 2:
            raise InputError(
                f"only one class is painted (value {min(painted_values)}); paint at least two "
                "classes, e.g. 1 = background and 2 = object"
            )
        cnames = tuple(class_names) if class_names else default_class_names(cvals)
        if len(cnames) != len(cvals):
            raise InputError(f"{len(cnames)} class names {list(cnames)} for {len(cvals)} "
                             f"classes {list(cvals)}")
    counts = np.zeros(len(cvals), dtype=np.int64)
    val_counts = np.zeros(len(cvals), dtype=np.int64)
    for img, tgt, _name in raw:
        targets = scribble_targets(tgt, cvals) if labels_kind == "scribbles" else tgt
        val = _split_blocks(targets, validation_fraction, rng, validation_block, dims)
        train_t = np.where(val, HELD_OUT, targets)
        coords = [np.argwhere(train_t == k) for k in range(len(cvals))]
        counts += [len(c) for c in coords]
        val_counts += np.bincount(targets[val & (targets >= 0)], minlength=len(cvals))
        items.append(_Item(img, targets, val, train_t, coords))
    notes = []
    painted = counts + val_counts
    has_val = bool(
        validation_fraction > 0
        and np.all(val_counts[painted > 0] > 0)
        and np.all(counts[painted > 0] > 0)
    )
    if validation_fraction > 0 and not has_val:
        notes.append("too few painted regions to hold some out: keeping the last weights")
        for it in items:  # give the held-out pixels back to training
            it.val_mask[:] = False
            it.train_targets = it.targets
            it.coords = [np.argwhere(it.targets == k) for k in range(len(cvals))]
        counts = painted
    return TrainingData(items, tuple(int(v) for v in cvals), tuple(cnames), dims, counts,
                        has_val, notes, diameter)


def median_diameter(instance_images: Sequence[np.ndarray], *, dims: int) -> float | None:
    """Median equivalent diameter (pixels) of the objects; per 2D slice for a 2D model."""
    sizes = []
    for inst in instance_images:
        planes = [inst] if (dims == 3 or inst.ndim == 2) else list(inst)
        for plane in planes:
            counts = np.bincount(plane.ravel().astype(np.int64))[1:]
            sizes.extend(counts[counts > 0].tolist())
    if not sizes:
        return None
    area = float(np.median(sizes))
    if dims == 2:
        return float(2 * (area / np.pi) ** 0.5)
    return float(2 * (3 * area / (4 * np.pi)) ** (1 / 3))


# ---------------------------------------------------------------------------- sampling


def _in_plane(dims: int, targets_ndim: int, centre: np.ndarray
              ) -> tuple[tuple[int, ...], np.ndarray]:
    """Where a patch of ``dims`` dimensions around ``centre`` lies: for a 2D patch of a stack,
    the index of its slice and the centre within it; otherwise ``()`` and ``centre``."""
    if dims == 2 and targets_ndim == 3:
        return (int(centre[0]),), centre[1:]
    return (), centre


def _window(start: tuple[int, ...], size: tuple[int, ...], shape: tuple[int, ...]
            ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of a window (``start``, ``size``) inside an array of ``shape``: its slices in
    the array and in the window."""
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    return src, dst


def _crop_pair(img: np.ndarray, tgt: np.ndarray, start: tuple[int, ...],
               size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Image window (reflected at the borders) and targets (unannotated outside the image)."""
    x = read_window(img, start, size)
    y = np.full(size, IGNORE, dtype=np.int64)
    src, dst = _window(start, size, tgt.shape)
    y[dst] = tgt[src]
    return x, y


def _crop(item: _Item, centre: np.ndarray, size: tuple[int, ...], rng: np.random.Generator,
          dims: int) -> tuple[np.ndarray, np.ndarray]:
    plane, centre = _in_plane(dims, item.targets.ndim, centre)
    img, tgt = item.image[(slice(None), *plane)], item.train_targets[plane]
    jitter = rng.integers(-(np.array(size) // 4), np.array(size) // 4 + 1)
    start = tuple(int(c - s // 2 + j) for c, s, j in zip(centre, size, jitter))
    return _crop_pair(img, tgt, start, size)


def _sample_batch(data: TrainingData, batch: int, size: tuple[int, ...],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Patches centred near painted pixels, classes drawn uniformly (balanced)."""
    present = [k for k in range(len(data.class_values)) if data.counts[k] > 0]
    xs, ys = [], []
    for _ in range(batch):
        k = present[rng.integers(len(present))]
        weights = np.array([len(it.coords[k]) for it in data.items], dtype=float)
        item = data.items[rng.choice(len(data.items), p=weights / weights.sum())]
        centre = item.coords[k][rng.integers(len(item.coords[k]))]
        x, y = _crop(item, centre, size, rng, data.dims)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)


# ---------------------------------------------------------------------------- augmentation


def _augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, *, full: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random flips, 90-degree rotations and elastic warp for image and targets; intensity
    scale, shift, gamma-like curve and noise for the image only."""
    n, nd = x.shape[0], x.ndim - 2
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(dev)

    xs, ys = [], []
    for i in range(n):
        xi, yi = x[i], y[i]
        # flips and rotations are drawn and read on the CPU: reading a number back from the
        # device would wait for the GPU, up to 48 times a step
        for axis in range(nd):
            if torch.rand(1, generator=gen).item() < 0.5:
                xi, yi = xi.flip(axis + 1), yi.flip(axis)
        if xi.shape[-1] == xi.shape[-2]:
            k = int(torch.rand(1, generator=gen).item() * 4)
            xi, yi = torch.rot90(xi, k, (-2, -1)), torch.rot90(yi, k, (-2, -1))
        xs.append(xi)
        ys.append(yi)
    x, y = torch.stack(xs), torch.stack(ys)
    if not full:
        return x, y
    # elastic deformation on half of the batch: smooth random displacement of a coarse grid
    if nd == 2:
        warp_cpu = torch.rand(n, generator=gen) < 0.5
        if warp_cpu.any():
            warp = warp_cpu.to(dev)
            h, w = x.shape[-2:]
            coarse = (rand(n, 2, 5, 5) - 0.5) * (2 * 0.08)  # up to ~8% of the patch
            flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
            base_y, base_x = torch.meshgrid(
                torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev),
                indexing="ij",
            )
            grid = torch.stack([base_x, base_y], -1).expand(n, h, w, 2) + flow.permute(0, 2, 3, 1)
            xw = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                               align_corners=True)
            yw = F.grid_sample((y + 1).unsqueeze(1).float(), grid, mode="nearest",
                               padding_mode="zeros", align_corners=True).squeeze(1).long() - 1
            sel = warp.view(n, *([1] * (x.ndim - 1)))
            x = torch.where(sel, xw, x)
            y = torch.where(warp.view(n, *([1] * (y.ndim - 1))), yw, y)
    # intensity
    shape = (n,) + (1,) * (x.ndim - 1)
    scale = 0.75 + 0.5 * rand(*shape)
    shift = (rand(*shape) - 0.5) * 0.3
    x = x * scale + shift
    noise = rand(*shape) * 0.08
    x = x + noise * torch.randn(x.shape, generator=gen).to(dev)
    return x, y


def _shift_intensity(x: torch.Tensor, gen: torch.Generator, width: float) -> torch.Tensor:
    """``x`` plus an offset drawn uniformly from ``[-width, width]`` for each patch and channel
    (drawn on the CPU generator, so that seeded runs agree on every device)."""
    offset = (torch.rand(*x.shape[:2], generator=gen) * 2 - 1) * width
    return x + offset.to(x.device, x.dtype).view(*x.shape[:2], *([1] * (x.ndim - 2)))


# ---------------------------------------------------------------------------- loss


def masked_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Class-weighted cross-entropy plus soft Dice, both over annotated pixels only.

    Pixels with target -1 contribute nothing to the loss nor to its gradient.
    """
    # no test of the values on the host (``if valid.any()``, boolean indexing): on a GPU each
    # would wait for the device; with nothing annotated every sum is 0 and the loss is 0
    valid = targets >= 0
    t = targets.clamp_min(0)
    ce = F.cross_entropy(logits, t, weight=class_weights, reduction="none") * valid
    total = (class_weights[t] * valid).sum() if class_weights is not None else valid.sum()
    ce = ce.sum() / total.float().clamp_min(1e-8)
    if dice_weight <= 0:
        return ce
    probs = torch.softmax(logits, 1)
    k = logits.shape[1]
    onehot = F.one_hot(t, k).movedim(-1, 1).float()
    m = valid.unsqueeze(1).float()
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot * m).sum(dims)
    denom = ((probs + onehot) * m).sum(dims)
    present = ((onehot * m).sum(dims) > 0).float()  # classes annotated in this batch
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    dice_loss = ((1 - dice) * present).sum() / present.sum().clamp_min(1)
    return ce + dice_weight * dice_loss


def anchor_loss(logits: torch.Tensor, start_probs: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the starting weights' probabilities, over unpainted pixels only.

    Parameters
    ----------
    logits : Tensor
        The network's output, (N, K, *spatial).
    start_probs : Tensor
        The starting weights' class probabilities on the same input, (N, K, *spatial).
    targets : Tensor
        Training targets, (N, *spatial): a class index where painted, -2 where painted but
        held out for validation, -1 where not painted. Only -1 pixels count.

    Returns
    -------
    Tensor
        The mean over the unpainted pixels (0 if there are none). Painted pixels, held-out
        ones included, contribute nothing to it nor to its gradient.
    """
    free = (targets == IGNORE).float()
    ce = -(start_probs * torch.log_softmax(logits, 1)).sum(1)
    return (ce * free).sum() / free.sum().clamp_min(1)


def _has_unpainted(data: TrainingData) -> bool:
    """Whether any pixel of the training images is unpainted (dense instance labels have none:
    there, the anchor would only see the reflected margins of patches at the image border)."""
    return any(bool((it.targets == IGNORE).any()) for it in data.items)


def intensity_shift(config: TrainConfig, data: TrainingData, *, anchored: bool = False) -> float:
    """The brightness offset's half-width a run uses.

    Parameters
    ----------
    config : TrainConfig
        The run's settings; a set ``config.intensity_shift`` is used as it is.
    data : TrainingData
        Its training data.
    anchored : bool
        Whether the run holds the unpainted pixels to the starting model's predictions
        (:func:`holds_to_predictions`).

    Returns
    -------
    float
        Where ``config.intensity_shift`` is None:
        :data:`~paintseg.config.STROKES_INTENSITY_SHIFT` for strokes (some pixel unpainted) on
        a run that is not anchored, and 0 for dense labels and for anchored runs (correction
        rounds: there the starting model has decided the unpainted gap, and the offset lowered
        the rounds' gains).
    """
    if config.intensity_shift is not None:
        return float(config.intensity_shift)
    return STROKES_INTENSITY_SHIFT if not anchored and _has_unpainted(data) else 0.0


def continues_training(model: PaintsegModel) -> bool:
    """Whether ``model`` was trained before with its current output layer (its provenance
    lists a training run and :func:`adapt_model` has not given it a new output layer since):
    then training it again anchors it to its own predictions (``TrainConfig.anchor``)."""
    return bool(model.provenance.get("training")) and not model.provenance.get(
        _NEW_OUTPUT_LAYER)


def holds_to_predictions(model: PaintsegModel, data: TrainingData, *,
                         anchor: float) -> bool:
    """Whether training ``model`` on ``data`` holds the unpainted pixels to its predictions.

    Parameters
    ----------
    model : PaintsegModel
        The model about to be trained.
    data : TrainingData
        Its training data.
    anchor : float
        ``TrainConfig.anchor``, the weight of :func:`anchor_loss`.

    Returns
    -------
    bool
        True when ``anchor`` is positive, the model continues a training run
        (:func:`continues_training`) and some training pixel is unpainted.
    """
    return anchor > 0 and continues_training(model) and _has_unpainted(data)


# ---------------------------------------------------------------------------- loop


def _val_batches(data: TrainingData, size: tuple[int, ...], rng: np.random.Generator,
                 max_patches: int = 16) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Fixed patches over the held-out pixels (targets outside the hold-out ignored), their
    centres drawn evenly over the classes with held-out pixels, so that a class painted little
    is scored too; and the number of distinct held-out pixels of each class inside them."""
    k = len(data.class_values)
    where = {c: [np.argwhere(it.val_mask & (it.targets == c)) for it in data.items]
             for c in range(k)}
    present = [c for c in range(k) if any(len(w) for w in where[c])]
    covered = [np.zeros(it.targets.shape, bool) for it in data.items]
    out = []
    for c in present:
        n = np.array([len(w) for w in where[c]], dtype=float)
        for _ in range(max(1, max_patches // len(present))):
            i = int(rng.choice(len(n), p=n / n.sum()))
            it = data.items[i]
            centre = where[c][i][rng.integers(int(n[i]))]
            plane, cc = _in_plane(data.dims, it.targets.ndim, centre)
            start = tuple(int(v - s // 2) for v, s in zip(cc, size))
            val_t = np.where(it.val_mask[plane], it.targets[plane], IGNORE)
            out.append(_crop_pair(it.image[(slice(None), *plane)], val_t, start, size))
            src, _ = _window(start, size, val_t.shape)
            covered[i][plane][src] |= val_t[src] >= 0
    held = np.zeros(k, dtype=np.int64)
    for it, cov in zip(data.items, covered):
        held += np.bincount(it.targets[cov], minlength=k)
    return out, held


def _validate(net: torch.nn.Module, batches: list[tuple[np.ndarray, np.ndarray]],
              device: torch.device, classes: int, class_values: tuple[int, ...],
              weights: torch.Tensor) -> dict[str, Any]:
    net.eval()
    inter = np.zeros(classes)
    union = np.zeros(classes)
    held = np.zeros(classes)  # held-out pixels per class
    losses = []
    with torch.inference_mode():
        for k in range(0, len(batches), 8):
            xb = torch.from_numpy(np.stack([b[0] for b in batches[k : k + 8]])).to(device)
            yb = torch.from_numpy(np.stack([b[1] for b in batches[k : k + 8]])).to(device)
            logits = net(xb)
            losses.append(float(masked_loss(logits, yb, class_weights=weights)))
            pred = logits.argmax(1)
            valid = yb >= 0
            for c in range(classes):
                p, g = (pred == c) & valid, (yb == c) & valid
                inter[c] += float((p & g).sum())
                union[c] += float((p | g).sum())
                held[c] += float(g.sum())
    net.train()
    # only the classes with held-out pixels: a class nobody painted (the starter model's
    # boundary) scored 0 wherever it was predicted, and its 0 in the mean made the starting
    # weights (1.0 without any) look clearly better than any later step that predicts it
    iou = {int(class_values[c]): inter[c] / union[c] for c in range(classes) if held[c] > 0}
    return {"loss": float(np.mean(losses)), "mean_iou": float(np.mean(list(iou.values()))),
            "iou": iou}


# The keep-best rule (:func:`_clearly_beaten`) decides only where every painted class has at
# least this many distinct held-out pixels in the validation patches; with fewer, one stroke
# more or less moves a class's IoU by more than the rule's tolerance, and the latest weights
# are kept.
MIN_HELD_OUT = 200


def _clearly_beaten(mean_iou: float, loss: float, history: Iterable[tuple[float, float]],
                    *, tolerance: float = _BEST_TOLERANCE) -> bool:
    """Whether an earlier validation was clearly better than the latest one.

    Parameters
    ----------
    mean_iou, loss : float
        The latest validation's mean IoU and loss on held-out painted pixels.
    history : iterable of (float, float)
        Earlier validations' ``(mean_iou, loss)``.
    tolerance : float
        How much higher the earlier mean IoU must be.

    Returns
    -------
    bool
        True when some earlier validation had a mean IoU more than ``tolerance`` higher *and*
        a lower loss; the latest weights are then not kept.
    """
    return any(m > mean_iou + tolerance and lo < loss for m, lo in history)


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
    missed = {c: v for c, v in agree.items() if v < threshold}
    if not missed:
        return None
    names = dict(zip(model.class_values, model.class_names))
    which = ", ".join(f"'{names.get(c, f'class {c}')}' (value {c}) on only {v:.0%} of its "
                      "painted pixels" for c, v in missed.items())
    it, is_ = ("it", "it is") if len(missed) == 1 else ("them", "they are")
    return (f"the trained model predicts {which}: the result will miss {it}; paint more of "
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


def iter_train(
    model: PaintsegModel,
    data: TrainingData,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    should_stop: Callable[[], bool] | None = None,
    step_every: float = 0.5,
) -> Iterator[TrainEvent]:
    """Train ``model`` in place on ``data``, yielding progress events.

    Parameters
    ----------
    model : PaintsegModel
        Its classes must match ``data.class_values`` (see :func:`adapt_model`).
    data : TrainingData
        From :func:`prepare_data`.
    config : TrainConfig
        Budget, batch, learning rate, validation, seed.
    device : str or torch.device
        Where to train.
    should_stop : callable, optional
        Polled between steps; True ends the run early (best weights kept, DONE has
        ``stopped=True``).
    step_every : float
        Seconds between STEP events (every step is run; only the reporting is thinned).

    Yields
    ------
    TrainEvent
        STEP and VALIDATION events, then one DONE event.
    """
    with flush_denormals():
        yield from _train(model, data, config, device=device, should_stop=should_stop,
                          step_every=step_every)


def _train(
    model: PaintsegModel,
    data: TrainingData,
    config: TrainConfig | None,
    *,
    device: str | torch.device,
    should_stop: Callable[[], bool] | None,
    step_every: float,
) -> Iterator[TrainEvent]:
    """The body of :func:`iter_train`."""
    cfg = config or TrainConfig()
    seconds, steps = cfg.budget
    dev = resolve_device(device)
    if tuple(model.class_values) != tuple(data.class_values):
        raise InputError(
            f"the model's classes {list(model.class_values)} differ from the painted classes "
            f"{list(data.class_values)}; adapt the model first"
        )
    if model.config.dims != data.dims:
        raise InputError(f"a {model.config.dims}D model cannot train on {data.dims}D patches")
    check_channels(model, data.items[0].image.shape[0])
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    psize = cfg.patch_size or (64 if data.dims == 2 else 32)
    batch = cfg.batch_size or (16 if data.dims == 2 else 4)
    align = model.config.align
    psize = max(align, int(math.ceil(psize / align) * align))
    size = (psize,) * data.dims
    net = model.network.to_device(dev)
    net.train()
    k = len(data.class_values)
    freq = data.counts.astype(np.float64) + 1.0
    weights_np = (1.0 / np.sqrt(freq))
    weights_np = weights_np / weights_np.mean()
    weights = torch.tensor(weights_np, dtype=torch.float32, device=dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    val, held = _val_batches(data, size, np.random.default_rng(
        0 if cfg.seed is None else cfg.seed)) if data.has_validation else ([], np.zeros(0))
    # the keep-best rule decides only on enough held-out pixels of every painted class; a
    # model that was never trained (a new U-Net, or one with a new output layer) never
    # returns its starting weights
    decides = bool(val) and bool(np.all(held[data.counts > 0] >= MIN_HELD_OUT))
    fresh = not continues_training(model)
    best_state = copy.deepcopy({kk: v.detach().cpu() for kk, v in net.state_dict().items()})
    ema_net = copy.deepcopy(net) if cfg.ema > 0 else None
    # continuing a trained model: its own predictions on the unpainted pixels are a soft
    # target, so that new strokes change the result where they must and little elsewhere;
    # with every pixel painted there is nothing to hold, and its forward pass is skipped
    teacher = copy.deepcopy(net).eval() if holds_to_predictions(model, data, anchor=cfg.anchor) \
        else None
    shift = intensity_shift(cfg, data, anchored=teacher is not None)
    eval_net = ema_net if ema_net is not None else net
    best_step = 0
    history: dict[int, tuple[float, float]] = {}  # step -> (mean IoU, loss) of its validation
    t0 = time.perf_counter()
    last_report = last_val = t0
    step = 0
    # the last losses, left on the device and read only when reported: reading each step's
    # would make the host wait for the GPU every step
    recent: collections.deque[torch.Tensor] = collections.deque(maxlen=10)
    stopped = False
    warmup = 10

    def recent_loss() -> float:
        return float(torch.stack(tuple(recent)).mean()) if recent else 0.0

    def fraction() -> float:
        parts = []
        if seconds is not None:
            parts.append((time.perf_counter() - t0) / seconds)
        if steps is not None:
            parts.append(step / steps)
        return min(1.0, max(parts))

    def eta() -> float | None:
        f = fraction()
        el = time.perf_counter() - t0
        return el / f - el if f > 0 else None

    def validate_now() -> TrainEvent:
        nonlocal best_step, best_state
        result = _validate(eval_net, val, dev, k, data.class_values, weights)
        earlier = history.values() if decides else ()
        if not _clearly_beaten(result["mean_iou"], result["loss"], earlier):
            best_step = step
            if step > 0:  # step 0: best_state already holds the starting weights
                best_state = {kk: v.detach().cpu().clone()
                              for kk, v in eval_net.state_dict().items()}
        if step > 0 or not fresh:  # a new U-Net's starting weights are never a candidate
            history[step] = (result["mean_iou"], result["loss"])
        return TrainEvent(EventKind.VALIDATION, step, recent_loss(),
                          time.perf_counter() - t0, eta(), fraction(), result, best_step)

    if val:  # score the starting weights: a retrain must beat them
        yield validate_now()
    try:
        while fraction() < 1.0:
            if should_stop is not None and should_stop():
                stopped = True
                break
            f = fraction()
            lr = (cfg.learning_rate * min(1.0, (step + 1) / warmup)
                  * 0.5 * (1 + math.cos(math.pi * f)))
            for group in opt.param_groups:
                group["lr"] = max(lr, cfg.learning_rate * 0.02)
            xb_np, yb_np = _sample_batch(data, batch, size, rng)
            xb = torch.from_numpy(xb_np).to(dev)
            yb = torch.from_numpy(yb_np).to(dev)
            if cfg.augment != "none":
                xb, yb = _augment(xb, yb, gen, full=cfg.augment == "full")
            # the network sees the patch with a brightness offset; the anchor's starting model
            # the patch as it is, so the anchor keeps what the start predicts on the image
            shown = _shift_intensity(xb, gen, shift) if shift > 0 else xb
            # each member of the network fits the targets on its own (one member: the U-Net)
            members = net.member_logits(shown)
            painted_loss = sum(masked_loss(logits, yb, class_weights=weights,
                                           dice_weight=cfg.dice_weight)
                               for logits in members) / len(members)
            loss = painted_loss
            if teacher is not None:
                with torch.no_grad():
                    start_probs = torch.softmax(teacher(xb), 1)
                loss = loss + cfg.anchor * sum(anchor_loss(logits, start_probs, yb)
                                               for logits in members) / len(members)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema_net is not None:
                with torch.no_grad():
                    decay = min(cfg.ema, (1 + step) / (10 + step))
                    for pe, pn in zip(ema_net.parameters(), net.parameters()):
                        pe.lerp_(pn, 1 - decay)
                    # buffers (batch-norm statistics) are not averaged but follow the network;
                    # only the training network runs in train mode and updates them
                    for be, bn in zip(ema_net.buffers(), net.buffers()):
                        be.copy_(bn)
            step += 1
            recent.append(painted_loss.detach())  # reported: comparable across runs
            now = time.perf_counter()
            if now - last_report >= step_every:
                last_report = now
                yield TrainEvent(EventKind.STEP, step, float(recent[-1]), now - t0, eta(),
                                 fraction(), best_step=best_step if val else None)
            if val and now - last_val >= cfg.validate_every:
                last_val = now
                yield validate_now()
    finally:
        net.train(False)
    if val and step not in history and (not stopped or (fresh and best_step == 0 and step > 0)):
        yield validate_now()  # the last weights, unless just scored (or stopped, where a new
        # U-Net has nothing better kept)
    if val:
        net.load_state_dict(best_state)
    elif ema_net is not None and step > 0:
        net.load_state_dict(ema_net.state_dict())
    elif stopped and step == 0:
        net.load_state_dict(best_state)
    net.eval()
    net.to_device("cpu")
    model.provenance.setdefault("training", []).append({
        "steps": step,
        "seconds": round(time.perf_counter() - t0, 1),
        "best_step": best_step if val else step,
        "stopped": stopped,
        "patch": psize,
        "batch": batch,
        "device": str(dev),
        "painted_pixels": [int(c) for c in data.counts],
        "anchor": cfg.anchor if teacher is not None else 0.0,
        "intensity_shift": shift,
        "validation_iou": round(history[best_step][0], 4) if best_step in history else None,
    })
    if step > 0:
        model.provenance.pop(_NEW_OUTPUT_LAYER, None)  # trained now
    if data.object_diameter is not None:
        model.provenance["object_diameter"] = round(data.object_diameter, 2)
    yield TrainEvent(EventKind.DONE, step, recent_loss(),
                     time.perf_counter() - t0, 0.0, 1.0, None,
                     best_step if val else step, stopped)


def adapt_model(
    model: PaintsegModel,
    class_values: Sequence[int],
    class_names: Sequence[str] | None = None,
    *,
    seed: int | None = None,
) -> PaintsegModel:
    """A copy of ``model`` for other classes: same weights, a new output layer if the class
    count differs (the encoder and decoder are kept: warm start)."""
    class_values = tuple(int(v) for v in class_values)
    names = tuple(class_names) if class_names else None
    if tuple(model.class_values) == class_values:
        out = copy.deepcopy(model)
        if names:
            out.class_names = names
        return out
    cfg = ModelConfig(**{**model.config.__dict__, "classes": len(class_values)})
    fresh = new_model(cfg, class_values=class_values, class_names=names,
                      normalization=model.normalization, seed=seed)
    state = {k: v for k, v in model.network.state_dict().items()
             if not (k.startswith("head.") or ".head." in k)}  # every member's output layer
    fresh.network.load_state_dict(state, strict=False)
    fresh.provenance = copy.deepcopy(model.provenance)
    fresh.provenance.setdefault("notes", []).append(
        f"output layer re-initialised for classes {list(class_values)}"
    )
    fresh.provenance[_NEW_OUTPUT_LAYER] = True  # until it is trained: nothing to anchor to
    return fresh


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
    :data:`BRIGHTNESS_SEPARATES`: nuclei), and by x0.3 elsewhere (cells in phase contrast,
    membranes, boundaries)."""
    if base is not None:
        model = adapt_model(base, data.class_values, data.class_names, seed=seed)
    else:
        cfg = preset_config(preset, dims=data.dims, in_channels=in_channels,
                            classes=len(data.class_values), labels_kind=labels_kind)
        if "derivative_gain" in _strokes_2d(preset, dims=data.dims, labels_kind=labels_kind):
            damped, shaped = STROKES_DERIVATIVE_GAIN
            gain = damped if brightness_separability(data) >= BRIGHTNESS_SEPARATES else shaped
            cfg = dataclasses.replace(cfg, derivative_gain=gain)
        model = new_model(cfg, class_values=data.class_values, class_names=data.class_names,
                          seed=seed)
    if labels_kind == "instances":
        model.provenance["output"] = "instances"
    return model


def check_channels(model: PaintsegModel, channels: int, *, model_name: str = "the model",
                   images: str = "the images") -> None:
    """Refuse to continue ``model`` on images of another channel count, before any work.

    Parameters
    ----------
    model : PaintsegModel
        The model to continue.
    channels : int
        Channels of the training images.
    model_name, images : str
        How the message names the model and the images.

    Raises
    ------
    InputError
        ``model`` takes another number of channels, e.g. "nuclei expects 1 channel(s) but got
        3 from the images".
    """
    if model.config.in_channels != channels:
        raise InputError(f"{model_name} expects {model.config.in_channels} channel(s) but got "
                         f"{channels} from {images}")


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
