"""Training targets from painted labels: class values of strokes, or background /
object / boundary from dense instance labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.segmentation import find_boundaries

from ..errors import InputError

IGNORE = -1
HELD_OUT = -2  # in the training targets: painted, but held out for validation

INSTANCE_CLASSES = (1, 2, 3)
INSTANCE_NAMES = ("background", "object", "boundary")
LABELS_KINDS = ("scribbles", "instances")


def _check_labels_kind(labels_kind: str) -> None:
    if labels_kind not in LABELS_KINDS:
        raise ValueError(f"labels_kind must be 'scribbles' or 'instances', got {labels_kind!r}")



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
    if labels.size and labels.dtype.kind != "u" and labels.min() < 0:
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
