"""Training data: normalised images, targets with held-out blocks, patch sampling."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import NormConfig
from ..errors import InputError
from ..model import PaintsegModel, default_class_names
from ..normalize import percentile_range
from ..tiling import read_window
from .targets import (
    HELD_OUT,
    IGNORE,
    INSTANCE_CLASSES,
    INSTANCE_NAMES,
    _check_labels,
    _check_labels_kind,
    instance_targets,
    scribble_targets,
)


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
    #: The images' names (files, napari layers), for the model's training record.
    names: tuple[str, ...] = ()


def _normalised(image: np.ndarray, channel_axis: int | None, norm: NormConfig,
                name: str) -> np.ndarray:
    return _normalised_range(image, channel_axis, norm, name)[0]


def _normalised_range(image: np.ndarray, channel_axis: int | None, norm: NormConfig, name: str
                      ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The image as normalised ``(C, *spatial)`` float32, and the per-channel ``(low, high)``
    intensities it was normalised with."""
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
    return (img - lo.reshape(shape)) / scale.reshape(shape), (lo, hi)


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
    data = _assemble([(img, tgt) for img, tgt, _ in raw], labels_kind=labels_kind,
                     class_values=cvals, class_names=cnames, dims=dims, rng=rng,
                     validation_fraction=validation_fraction,
                     validation_block=validation_block, object_diameter=diameter)
    data.names = tuple(str(n) for _, _, n in raw)
    return data


def _assemble(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    labels_kind: str,
    class_values: Sequence[int],
    class_names: Sequence[str],
    dims: int,
    rng: np.random.Generator,
    validation_fraction: float,
    validation_block: int,
    object_diameter: float | None = None,
) -> TrainingData:
    """Training data from normalised ``(C, *spatial)`` images and checked labels (painted
    values, or instance targets for ``labels_kind="instances"``): targets, held-out blocks,
    the coordinates sampled from."""
    cvals, cnames, diameter = tuple(class_values), tuple(class_names), object_diameter
    items: list[_Item] = []
    counts = np.zeros(len(cvals), dtype=np.int64)
    val_counts = np.zeros(len(cvals), dtype=np.int64)
    for img, tgt in pairs:
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


def painted_share(data: TrainingData) -> float:
    """The share of pixels painted in the planes (2D models) or images (3D models) that hold
    any painted pixel: near 1 for dense labels, a few percent for strokes (0 when nothing is
    painted)."""
    painted = total = 0
    for item in data.items:
        t = item.targets != IGNORE
        planes = t.reshape(-1, int(np.prod(t.shape[-data.dims:])))
        used = planes.any(axis=1)
        painted += int(planes[used].sum())
        total += int(used.sum()) * planes.shape[1]
    return painted / total if total else 0.0


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
        3 from the images", or is another tool's network whose package holds no
        architecture to train (TorchScript weights only).
    """
    if model.frozen:
        raise InputError(
            f"{model_name} is another tool's network with TorchScript weights only: paintseg "
            "fine-tunes packages whose pytorch_state_dict weights come with their "
            "architecture; train a new model instead")
    if model.config.in_channels != channels:
        raise InputError(f"{model_name} expects {model.config.in_channels} channel(s) but got "
                         f"{channels} from {images}")
