"""Pure helpers between napari layer data and the core (no Qt, no napari import).

They decide the axes of a layer's array, cut out the part of it that a user asked to segment,
and merge a result back into a full-size label array, so the widget itself only wires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import label_dtype

__all__ = [
    "SCOPES",
    "layer_axes",
    "spatial_shape",
    "scope_region",
    "merge_region",
    "training_pair",
    "most_uncertain_box",
]

SCOPES = ("whole image", "current slice", "field of view")


def layer_axes(shape: Sequence[int], *, rgb: bool, name: str = "layer") -> str:
    """Axes letters for an image layer's data: ``YX``, ``ZYX``, ``TZYX`` (plus ``C`` last for
    RGB(A) layers). A 2D model segments a ``ZYX`` stack slice by slice; a 3D model needs it."""
    ndim = len(shape) - (1 if rgb else 0)
    table = {2: "YX", 3: "ZYX", 4: "TZYX"}
    if ndim not in table:
        raise InputError(
            f"{name}: paintseg segments 2D images, 3D stacks and 3D time series; this layer "
            f"has {ndim} dimension(s) (shape {tuple(shape)})"
        )
    return table[ndim] + ("C" if rgb else "")


def spatial_shape(shape: Sequence[int], *, rgb: bool) -> tuple[int, ...]:
    """Shape of a label layer that matches an image layer (no channel axis)."""
    return tuple(int(s) for s in (shape[:-1] if rgb else shape))


def scope_region(
    label_shape: Sequence[int],
    *,
    scope: str,
    model_dims: int,
    current: Sequence[float] | None = None,
    view: Sequence[Sequence[float]] | None = None,
) -> tuple[slice, ...]:
    """Index (over the label axes) of the part of an image a user asked to segment.

    Parameters
    ----------
    label_shape : sequence of int
        Shape of the labels (the image without channels).
    scope : str
        ``"whole image"``, ``"current slice"`` (the displayed 2D plane of a stack; with a 3D
        model, the displayed volume of a time series) or ``"field of view"`` (the displayed
        plane, cropped to the visible rectangle).
    current : sequence of float
        Data coordinates of the displayed point (one per label axis).
    view : (2, ndim) array-like
        Data coordinates of the visible box's corners (napari's ``corner_pixels``).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    ndim = len(label_shape)
    full = tuple(slice(0, int(s)) for s in label_shape)
    if scope == "whole image":
        return full
    keep = model_dims  # trailing axes a single forward pass needs in full
    if current is None or len(current) != ndim:
        raise ValueError("the displayed point is needed for this scope")
    region = list(full)
    for ax in range(ndim - keep):
        i = int(np.clip(round(float(current[ax])), 0, label_shape[ax] - 1))
        region[ax] = slice(i, i + 1)
    if scope == "field of view":
        if view is None:
            raise ValueError("the visible box is needed for the field of view")
        lo, hi = np.asarray(view[0], float), np.asarray(view[1], float)
        for ax in range(ndim - 2, ndim):
            a = int(np.clip(np.floor(min(lo[ax], hi[ax])), 0, label_shape[ax] - 1))
            b = int(np.clip(np.ceil(max(lo[ax], hi[ax])) + 1, a + 1, label_shape[ax]))
            region[ax] = slice(a, b)
    return tuple(region)


def merge_region(
    existing: np.ndarray | None,
    labels: np.ndarray,
    region: tuple[slice, ...],
    *,
    shape: Sequence[int],
    instances: bool,
) -> np.ndarray:
    """A new full-size label array: ``existing`` (or zeros) with ``labels`` put at ``region``.

    ``existing`` is never modified. Instance numbers of the new part are shifted past those
    already used elsewhere, so objects keep distinct numbers.
    """
    shape = tuple(int(s) for s in shape)
    labels = np.asarray(labels)
    whole = all(sl.start == 0 and sl.stop == n for sl, n in zip(region, shape))
    if whole and labels.shape == shape:
        return labels
    base = None if existing is None or tuple(existing.shape) != shape else np.asarray(existing)
    offset = 0
    if instances and base is not None:
        outside = base.copy()
        outside[region] = 0
        offset = int(outside.max()) if outside.size else 0
    top = int(labels.max()) + offset if labels.size else offset
    dtype = np.promote_types(label_dtype(max(top, 1)),
                             base.dtype if base is not None else np.uint8)
    out = np.zeros(shape, dtype) if base is None else base.astype(dtype, copy=True)
    part = labels.astype(dtype)
    if offset:
        part = np.where(part > 0, part + offset, 0).astype(dtype)
    out[region] = part.reshape(out[region].shape)
    return out


def training_pair(image: Any, labels: Any, *, rgb: bool) -> tuple[np.ndarray, np.ndarray]:
    """Copies of an image layer's data (channels last) and a labels layer's data, ready for
    :func:`~paintseg.training.prepare_data` with ``channel_axis=-1``.

    Raises
    ------
    InputError
        The labels do not have the image's shape.
    """
    img = np.asarray(image)
    lab = np.array(labels, copy=True)  # the user's layer is never touched afterwards
    spatial = spatial_shape(img.shape, rgb=rgb)
    if lab.shape != spatial:
        raise InputError(
            f"the labels layer has shape {lab.shape} but the image's is {spatial}; paint on a "
            "labels layer made for this image (use 'New labels layer')"
        )
    return (img if rgb else img[..., None]), lab


def most_uncertain_box(uncertainty: np.ndarray, *, size: int = 64) -> tuple[slice, ...]:
    """The ``size`` x ``size`` box (over the last two axes; the others' full extent) whose
    mean uncertainty is highest: where a stroke would teach the model most.

    Parameters
    ----------
    uncertainty : numpy.ndarray
        2D, or more axes whose last two are the plane.
    size : int
        Edge of the box, in pixels (smaller where the image is smaller).
    """
    from scipy import ndimage as ndi

    u = np.asarray(uncertainty, dtype=np.float32)
    if u.ndim < 2 or u.size == 0:
        raise ValueError(f"an uncertainty map of 2 or more axes is needed, got shape {u.shape}")
    plane = u.reshape(-1, *u.shape[-2:]).mean(axis=0)
    edge = [min(size, n) for n in plane.shape]
    mean = ndi.uniform_filter(plane, size=edge, mode="nearest")
    # a box centred at (y, x) must lie inside the image
    lo = [e // 2 for e in edge]
    hi = [n - (e - e // 2) + 1 for n, e in zip(plane.shape, edge)]
    inner = mean[lo[0]:hi[0], lo[1]:hi[1]]
    y, x = np.unravel_index(int(np.argmax(inner)), inner.shape)
    y0, x0 = int(y), int(x)  # box start = centre - edge // 2 = index in ``inner``
    full = tuple(slice(0, n) for n in u.shape[:-2])
    return full + (slice(y0, y0 + edge[0]), slice(x0, x0 + edge[1]))
