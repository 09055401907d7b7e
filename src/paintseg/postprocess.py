"""Probabilities to labels: semantic classes, or instances by seeded watershed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from .config import SNAP_PIXELS
from .io import label_dtype, label_values

__all__ = [
    "semantic_labels",
    "snap_to_edges",
    "snap_planes",
    "thin_classes",
    "instances_from_probabilities",
    "filter_instances",
    "instances_per_image",
    "overlay_rgb",
]


def semantic_labels(
    probabilities: np.ndarray,
    class_values: Sequence[int],
    *,
    background_class: int | None = 1,
    image: np.ndarray | None = None,
    snap: int = 0,
) -> np.ndarray:
    """Arg-max class per pixel as its class value (the background class written as 0),
    with class borders snapped to the image's edges when ``snap`` > 0.

    Parameters
    ----------
    probabilities : ndarray, shape (K, *spatial)
    class_values : sequence of int, length K
    background_class : int or None
        Class value written as 0; None keeps every value.
    image : ndarray, shape (C, *spatial), optional
        The normalised image; needed with ``snap``.
    snap : int
        Pixels a border may move to an edge in each 2D plane (:func:`snap_planes`); 0: the
        arg-max.
    """
    lut = np.array(label_values(class_values, background_class))
    if snap > 0:
        if image is None:
            raise ValueError("snapping borders to edges needs the image")
        index = snap_planes(probabilities, image, snap=snap)
    else:
        index = _arg_max(probabilities)[0]
    return lut[index].astype(label_dtype(int(lut.max())))


# pixels whose largest class probability reaches this are never moved by snap_to_edges
SNAP_CONFIDENCE = 0.98


def snap_to_edges(
    probabilities: np.ndarray,
    image: np.ndarray,
    *,
    snap: int = SNAP_PIXELS,
    confidence: float = SNAP_CONFIDENCE,
    sigma: float = 1.0,
) -> np.ndarray:
    """Arg-max classes of one 2D plane, with the borders between classes moved to the
    image's nearest strong edge.

    Pixels at most ``snap`` pixels from a border of the arg-max classes whose class
    probability is below ``confidence`` are decided again: by a seeded watershed on the
    image's gradient magnitude, flooded from every other pixel (its arg-max class) and from
    the innermost pixel of each region wider than ``snap`` that lies wholly among them. A
    border thus moves by at most ``snap`` pixels, to where the image changes most, the
    confident parts of the result stay as they are, and no region of the arg-max wider than
    ``snap`` is erased (an unsure model's small nuclei lie wholly in the band); narrower
    specks may be. Thin classes (:func:`thin_classes`: membranes, boundaries, fibres: lines
    narrower than twice ``snap``) are never moved, nor any border within ``snap`` pixels of
    them: the watershed pulled them onto neighbouring edges, or erased them where no pixel of
    theirs was confident. A network trained on strokes learns nothing about the pixels
    between the strokes, so its arg-max border lies anywhere in the unpainted gap around an
    object; the image's edge is where a user would put it.

    Parameters
    ----------
    probabilities : ndarray, shape (K, Y, X)
        Class probabilities of one plane.
    image : ndarray, shape (C, Y, X)
        The normalised image plane (all channels' gradients are summed).
    snap : int
        Farthest distance (pixels) a border may move; 0 returns the arg-max.
    confidence : float
        Pixels whose largest class probability reaches this are never moved.
    sigma : float
        Gaussian smoothing (pixels) before the gradient.

    Returns
    -------
    ndarray of int64, shape (Y, X)
        Class indices (0..K-1).
    """
    from skimage.filters import gaussian, sobel

    if snap < 0:
        raise ValueError(f"snap must be 0 or more pixels, got {snap}")
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 3 or np.ndim(image) != 3 or \
            probabilities.shape[1:] != np.shape(image)[1:]:
        raise ValueError(f"probabilities (K, Y, X) and image (C, Y, X) of one plane expected, "
                         f"got {probabilities.shape} and {np.shape(image)}")
    index, top = _arg_max(probabilities)
    sizes = np.bincount(index.ravel(), minlength=len(probabilities))
    present = np.flatnonzero(sizes)
    if snap == 0 or len(present) < 2:
        return index
    classes = _small_labels(index, present[-1])
    rows = _row_distance(classes)
    # each pixel's distance to another class, where it is at most the snap distance
    distance = _distance_up_to(classes, rows, cap=snap)
    band = (distance <= snap) & (top < confidence)

    def distance_at(mask, cap):  # for _is_thin, which asks up to snap or 2 snap
        return distance[mask] if cap <= snap else _distance_at(classes, rows, mask, cap=cap)

    # thin classes (thin_classes), smallest first, until no band is left: every border of
    # two classes lies next to the thin one, so there one thin class ends the snap
    for k in sorted(present, key=lambda c: sizes[c]):
        if not band.any():
            return index
        if _is_thin(index == k, distance_at, snap=snap):
            if len(present) == 2:
                return index
            # nothing within the snap distance of the thin class moves
            is_k = (classes == k).view(np.uint8)
            band &= (is_k == 0) & (_distance_up_to(is_k, _row_distance(is_k), cap=snap) > snap)
    if not band.any():
        return index
    # a region lying wholly in the band keeps its innermost pixel as a seed if it is wider
    # than the snap distance: the snap moves borders and may clear specks, never erases an
    # object the network found
    band &= ~_seeds_of_enclosed_regions(index, band, distance, wider_than=snap)
    grad = np.zeros(index.shape, np.float32)
    for channel in np.asarray(image, dtype=np.float32):
        grad += sobel(gaussian(channel, sigma=sigma, preserve_range=True))
    return _flood_band(grad, index, band)


def _arg_max(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's arg-max class (the first of equal largest, as :func:`numpy.argmax` for
    finite values) and its probability, a class at a time (several times faster than
    :func:`numpy.argmax` along the first axis)."""
    top = np.array(probabilities[0], dtype=probabilities.dtype)
    index = np.zeros(top.shape, np.int64)
    for k in range(1, len(probabilities)):
        larger = probabilities[k] > top
        index[larger] = k
        np.maximum(top, probabilities[k], out=top)
    return index, top


def _small_labels(index: np.ndarray, largest: int) -> np.ndarray:
    """``index`` (its largest value ``largest``) in the smallest unsigned integer type that
    holds it."""
    return index.astype(np.min_scalar_type(largest))


def _row_distance(classes: np.ndarray) -> np.ndarray:
    """Each pixel's distance along its row (last axis) to the nearest pixel of another class,
    exact (int64; 2**31 or more where the row holds one class only)."""
    h, w = classes.shape
    big = np.int64(1) << 31
    change = classes[:, 1:] != classes[:, :-1]  # between x and x + 1
    cols = np.arange(w - 1)
    distance = np.full((h, w), big)
    # the first change at or right of x, b: the pixel b + 1 is of another class
    distance[:, :-1] = np.minimum.accumulate(np.where(change, cols, big)[:, ::-1],
                                             axis=1)[:, ::-1] + 1 - cols
    # the last change left of x, b (b + 1 <= x): the pixel b is of another class
    left = np.maximum.accumulate(np.where(change, cols, -big), axis=1)
    np.minimum(distance[:, 1:], cols + 1 - left, out=distance[:, 1:])
    return distance


def _distance_up_to(classes: np.ndarray, rows: np.ndarray, *, cap: int) -> np.ndarray:
    """Each pixel's Euclidean distance to the nearest pixel of another class (the image's
    edge does not count) where it is at most ``cap``, infinity elsewhere; ``rows``:
    :func:`_row_distance`. The nearest pixel of another class within ``cap`` lies in one of
    the ``2 cap + 1`` rows around the pixel, at its row distance there (or right above or
    below, where that pixel is of another class): the minimum over those rows is exact."""
    dtype = np.int16 if (cap + 1) ** 2 + cap**2 < np.iinfo(np.int16).max else np.int64
    row2 = (np.minimum(rows, cap + 1) ** 2).astype(dtype)
    d2 = row2.copy()
    for dy in range(1, cap + 1):
        same = classes[dy:] == classes[:-dy]
        step = dtype(dy * dy)
        np.minimum(d2[:-dy], np.where(same, row2[dy:], 0) + step, out=d2[:-dy])
        np.minimum(d2[dy:], np.where(same, row2[:-dy], 0) + step, out=d2[dy:])
    return _root_up_to(d2, cap)


def _root_up_to(d2: np.ndarray, cap: int) -> np.ndarray:
    """The square roots of squared distances ``d2`` (float64) up to ``cap``, infinity
    beyond."""
    distance = np.sqrt(d2, dtype=np.float64)
    distance[d2 > cap**2] = np.inf
    return distance


def _distance_at(classes: np.ndarray, rows: np.ndarray, mask: np.ndarray, *,
                 cap: int) -> np.ndarray:
    """:func:`_distance_up_to` at the pixels of ``mask`` only (raster order)."""
    ys, xs = np.nonzero(mask)
    own = classes[ys, xs]
    row2 = np.minimum(rows, cap + 1) ** 2
    d2 = row2[ys, xs]
    for dy in range(1, cap + 1):
        for y in (ys - dy, ys + dy):
            ok = np.flatnonzero((y >= 0) & (y < len(classes)))
            yy, xx = y[ok], xs[ok]
            cand = np.where(classes[yy, xx] == own[ok], row2[yy, xx], 0) + dy * dy
            d2[ok] = np.minimum(d2[ok], cand)
    return _root_up_to(d2, cap)


def _seeds_of_enclosed_regions(index: np.ndarray, band: np.ndarray, distance: np.ndarray,
                               *, wider_than: float) -> np.ndarray:
    """The innermost pixel (largest ``distance`` to another class) of each connected region
    of ``index``'s classes that lies wholly in ``band`` and is wider than ``wider_than``
    pixels (its innermost pixel more than half that from another class), as a mask."""
    seeds = np.zeros(index.shape, bool)
    for k in np.flatnonzero(np.bincount(index[band & (distance > wider_than / 2)])):
        regions, n = ndi.label(index == k)
        outside = np.bincount(regions[~band], minlength=n + 1)
        enclosed = np.flatnonzero(outside[1:] == 0) + 1
        if not len(enclosed):
            continue
        # each enclosed region's first pixel (raster order) of largest distance, from its
        # own pixels only (ndi.maximum_position visits the whole plane per call)
        chosen = np.zeros(n + 1, bool)
        chosen[enclosed] = True
        at = np.flatnonzero(chosen[regions])
        owner, far = regions.ravel()[at], distance.ravel()[at]
        order = np.lexsort((-far, owner))  # stable: ties keep raster order
        first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
        first = first[far[first] > wider_than / 2]
        seeds.ravel()[at[first]] = True
    return seeds


def _flood_band(grad: np.ndarray, index: np.ndarray, band: np.ndarray) -> np.ndarray:
    """``index`` with the pixels of ``band`` decided again by a seeded watershed on ``grad``,
    flooded from the other pixels' classes (``index`` is overwritten and returned).

    The flood runs in the band and the ring of pixels around it, whose classes are the
    seeds: the band is filled from them alone, exactly as a flood from every pixel outside
    the band would fill it (the others are never reached), and the rest of the plane is
    not visited."""
    ring = ndi.binary_dilation(band) & ~band
    flooded = watershed(grad, markers=np.where(ring, index + 1, 0), mask=band | ring)
    index[band] = flooded[band] - 1
    return index


def thin_classes(index: np.ndarray, *, snap: int = SNAP_PIXELS,
                 distance: np.ndarray | None = None) -> list[int]:
    """The classes of a 2D class map that are thin lines: narrower than twice ``snap`` and at
    least three times as long as wide.

    A class's width is the median, over the pixels of its regions' skeleton, of twice their
    distance to another class (the image's edge does not count): a strip's width, a disc's
    diameter. Its length is the mean number of skeleton pixels per region (of the regions of at
    least width x width pixels). Membranes (2-6 px
    wide, in networks), cell boundaries and fibres are thin; nuclei, even small ones or ones
    shrunk by a model (14 px across in DSB2018, about as long as wide), are not.

    Parameters
    ----------
    index : ndarray of int, shape (Y, X)
        Class indices.
    snap : int
        The snap distance (pixels).
    distance : ndarray, shape (Y, X), optional
        Each pixel's distance to the nearest pixel of another class (exact at least up to
        ``2 snap``), where the caller has it; computed here otherwise.

    Returns
    -------
    list of int
        The thin classes' indices (a class that fills the image is not thin).
    """
    index = np.asarray(index)
    if index.ndim != 2:
        raise ValueError(f"a 2D class map expected, got shape {index.shape}")
    present = np.flatnonzero(np.bincount(index.ravel()))
    if distance is None:
        classes = _small_labels(index, present[-1])
        rows = _row_distance(classes)

        def distance_at(mask, cap):
            return _distance_at(classes, rows, mask, cap=cap)
    else:
        def distance_at(mask, cap):
            near = distance[mask]
            return np.where(near <= cap, near, np.inf)
    return [int(c) for c in present if _is_thin(index == c, distance_at, snap=snap)]


def _is_thin(inside: np.ndarray, distance_at: Callable[[np.ndarray, int], np.ndarray], *,
             snap: int) -> bool:
    """Whether the class of mask ``inside`` is a thin line (see :func:`thin_classes`);
    ``distance_at(mask, cap)``: the distance from each pixel of ``mask`` (raster order) to
    the nearest pixel of another class, exact up to ``cap`` and infinite beyond. Distances up
    to ``snap`` decide the median width unless its two middle values straddle ``snap``; only
    then is the nearer of those beyond it measured (up to ``2 snap``: a larger one makes the
    width ``2 snap`` or more, not thin either way)."""
    from skimage.morphology import skeletonize

    if inside.all():
        return False
    skeleton = skeletonize(inside)
    near = distance_at(skeleton, snap)
    half = np.sort(near)
    if not len(half):
        return False
    low, high = half[(len(half) - 1) // 2], half[len(half) // 2]
    if np.isinf(low):
        return False
    if np.isinf(high):
        beyond = skeleton.copy()
        beyond[skeleton] = np.isinf(near)
        high = distance_at(beyond, 2 * snap).min()
    width = float(np.mean([2 * low, 2 * high]))  # the median of the widths
    if width >= 2 * snap:
        return False
    # length: skeleton pixels per region, over the regions of at least width x width
    # pixels (specks and fragments say nothing of the shape)
    regions, n = ndi.label(inside)
    big = np.flatnonzero(np.bincount(regions.ravel(), minlength=n + 1)[1:] >= width**2) + 1
    return bool(len(big)) and np.isin(regions[skeleton], big).sum() / len(big) >= 3 * width


def snap_planes(probabilities: np.ndarray, image: np.ndarray, *, snap: int = SNAP_PIXELS
                ) -> np.ndarray:
    """:func:`snap_to_edges` on every 2D plane: ``probabilities`` (K, ..., Y, X) and the
    normalised ``image`` (C, ..., Y, X); class indices (..., Y, X)."""
    index = np.empty(probabilities.shape[1:], np.int64)
    for plane in np.ndindex(*probabilities.shape[1:-2]):
        index[plane] = snap_to_edges(probabilities[(slice(None), *plane)],
                                     image[(slice(None), *plane)], snap=snap)
    return index


def filter_instances(
    instances: np.ndarray, *, min_size: int = 0, fill_holes: int = 0
) -> np.ndarray:
    """Remove objects smaller than ``min_size`` pixels, fill holes of at most ``fill_holes``
    pixels inside each object, and renumber the objects 1..N. The input is not modified."""
    out = np.asarray(instances).astype(np.int64, copy=True)
    if out.size and out.min() < 0:
        raise ValueError("instance labels must be non-negative")
    if min_size > 0:
        small = np.bincount(out.ravel()) < min_size
        small[0] = False
        out[small[out]] = 0
    if fill_holes > 0:
        for region, sl in enumerate(ndi.find_objects(out), start=1):
            if sl is None:
                continue
            sub = out[sl]
            obj = sub == region
            holes, n = ndi.label(ndi.binary_fill_holes(obj) & ~obj)
            if n:
                fill = np.bincount(holes.ravel()) <= fill_holes
                fill[0] = False
                sub[fill[holes] & (sub == 0)] = region
    values = np.unique(out[out > 0])
    lut = np.zeros(int(out.max()) + 1 if out.size else 1, dtype=np.int64)
    lut[values] = np.arange(1, len(values) + 1)
    return lut[out].astype(np.uint16 if len(values) < 65536 else np.uint32)


def instances_from_probabilities(
    probabilities: np.ndarray,
    *,
    object_index: int = 1,
    boundary_index: int | None = 2,
    threshold: float = 0.5,
    seed_threshold: float = 0.6,
    min_size: int = 8,
    fill_holes: int = 0,
) -> np.ndarray:
    """Instances from (background, object, boundary) probabilities by seeded watershed.

    Seeds are connected regions where the object probability exceeds ``seed_threshold``;
    touching nuclei are separated by the boundary class. Each seed grows by watershed on the
    object probability inside the foreground mask (object + boundary > ``threshold``).

    Parameters
    ----------
    probabilities : ndarray, shape (K, *spatial)
    object_index, boundary_index : int
        Channels of the object interior and of the object boundary (None: no boundary class).
    threshold, seed_threshold : float
        Foreground and seed probability thresholds.
    min_size, fill_holes : int
        Post-filters in pixels (see :func:`filter_instances`).

    Returns
    -------
    ndarray of uint16
        0 = background, 1..N = objects.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    obj = p[object_index]
    fg = obj + (p[boundary_index] if boundary_index is not None else 0.0)
    mask = fg > threshold
    seeds, _n = ndi.label(obj > seed_threshold)
    labels = watershed(-obj, markers=seeds, mask=mask)
    return filter_instances(labels, min_size=min_size, fill_holes=fill_holes)


def instances_per_image(
    probabilities: np.ndarray, *, dims: int, min_size: int = 30, fill_holes: int = 0
) -> np.ndarray:
    """Instances for every 2D image (or 3D volume) of a ``(K, *batch, *spatial)`` stack.

    Each image gets its own numbering 1..N (a 2D model on a stack gives per-slice instances).
    """
    p = np.asarray(probabilities)
    batch = p.shape[1 : p.ndim - dims]
    out = np.zeros(p.shape[1:], dtype=np.uint32)
    for idx in np.ndindex(*batch):
        out[idx] = instances_from_probabilities(
            p[(slice(None), *idx)], min_size=min_size, fill_holes=fill_holes
        )
    top = int(out.max()) if out.size else 0
    return out.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


def overlay_rgb(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """An 8-bit RGB picture of a 2D image with the outlines of its labels, for a quick look."""
    from skimage.segmentation import find_boundaries

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:  # channels last: show the mean
        img = img.mean(-1)
    lo, hi = np.percentile(img, (1, 99.8))
    g = (np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([g, g, g], -1)
    lab = np.asarray(labels)
    rgb[(lab > 0) & ~find_boundaries(lab, mode="inner")] //= np.array([2, 1, 2], np.uint8)
    rgb[find_boundaries(lab, mode="inner") & (lab > 0)] = (255, 200, 0)
    return rgb
