"""Percentile intensity normalisation, computed on a subsample for big stacks."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import NormConfig
from .errors import InputError

__all__ = ["percentile_range", "sample_values"]


def sample_values(image: Any, *, max_samples: int) -> np.ndarray:
    """A strided subsample of a ``(C, *rest)`` array-like, shape ``(C, n)``, n <= ~max_samples.

    Whole planes are read along the first non-channel axis (evenly spaced) and strided within
    each plane, so memory-mapped and zarr inputs are never loaded whole.
    """
    c, *rest = (int(s) for s in image.shape)
    total = int(np.prod(rest))
    if total <= max_samples:
        return np.asarray(image[...]).reshape(c, -1)
    n_planes = rest[0]
    plane_size = total // n_planes
    planes = min(n_planes, max(1, max_samples // max(1, min(plane_size, max_samples // 8))))
    idx = np.unique(np.linspace(0, n_planes - 1, planes).round().astype(int))
    per_plane = max(1, max_samples // len(idx))
    stride = max(1, int(np.floor((plane_size / per_plane) ** (1 / max(1, len(rest) - 1)))))
    chunks = []
    for i in idx:
        key = (slice(None), int(i)) + tuple(slice(None, None, stride) for _ in rest[1:])
        chunks.append(np.asarray(image[key]).reshape(c, -1))
    return np.concatenate(chunks, axis=1)


def percentile_range(
    image: Any, norm: NormConfig, *, name: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel low and high percentiles of a ``(C, *rest)`` array-like.

    Raises
    ------
    InputError
        If the sample contains NaN or infinite values.
    """
    values = sample_values(image, max_samples=norm.max_samples).astype(np.float32, copy=False)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise InputError(
            f"{name}: contains NaN or infinite values ({bad} found in a sample of "
            f"{values.size:,}); replace them before segmenting"
        )
    lo = np.percentile(values, norm.low, axis=1).astype(np.float32)
    hi = np.percentile(values, norm.high, axis=1).astype(np.float32)
    return lo, hi
