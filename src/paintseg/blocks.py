"""Cut one large image into blocks along its first axis, segment them apart, put them together.

Blocks are how one stack larger than memory (or than one machine) is segmented: each block
is a task that a Dask worker, or this process in turn, can run with bounded memory.

- *Slices*: a 2D model on a stack. Slices are independent, so a block is a range of slices,
  and the labels equal those of a whole-stack run.
- *Volume*: a 3D model on one volume. A block is a range of Z planes.
  For class labels it reads the context its tiles need from the planes around it, with the
  tiling fixed for the whole volume, so labels and probabilities equal those of a
  whole-volume run. For instance output each block is segmented as a sub-volume: its planes
  plus ``overlap`` planes on both sides (its halo), seen by the network with ``context``
  planes more; objects crossing a block border are joined where the two blocks' halos agree
  (see :func:`stitch_instances`), and small objects are removed after joining. Memory is
  set by the block, not by the volume.

Every block is normalised with the whole image's intensity range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import SegmentSettings, TileConfig
from .io import ImageData
from .model import PaintsegModel

__all__ = ["BlockPlan", "plan_blocks", "segment_block", "stitch_instances", "read_block"]

# working memory of instance output per voxel, beside the class probabilities: watershed
# markers and labels (int32) and the renumbering (int64)
_INSTANCE_BYTES = 20


@dataclass(frozen=True)
class BlockPlan:
    """How one image is cut (from :func:`plan_blocks`).

    Attributes
    ----------
    ranges : list of (int, int)
        Each block's range of the label output's first axis; together they cover it.
    intensity_range : (ndarray, ndarray)
        The whole image's normalisation range, per channel.
    volume : bool
        Blocks of one volume of a 3D model (False: independent slices of a 2D model).
    instances : bool
        Instance output.
    tiles : TileConfig or None
        For volume blocks, fixed (tile, halo, batch): the tiling of the whole volume (class
        labels), or of the largest sub-volume (instances).
    overlap : int
        For volume instances: planes segmented on each side of a block and compared with
        the neighbour's to join objects across the border.
    context : int
        For volume instances: planes beyond the overlap that the network sees (its halo).
    """

    ranges: list[tuple[int, int]]
    intensity_range: tuple[np.ndarray, np.ndarray]
    volume: bool
    instances: bool
    tiles: TileConfig | None = None
    overlap: int = 0
    context: int = 0

    def extent(self, index: int) -> tuple[int, int]:
        """Range of planes block ``index`` segments (its own plus the overlap)."""
        a, b = self.ranges[index]
        if not (self.volume and self.instances):
            return a, b
        return max(0, a - self.overlap), min(self.ranges[-1][1], b + self.overlap)


def plan_blocks(
    image: ImageData,
    model: PaintsegModel,
    *,
    axes: str,
    shape: Sequence[int],
    instances: bool,
    block_bytes: int,
    tiles: TileConfig | None = None,
    device: Any = "auto",
    name: str = "image",
) -> BlockPlan | None:
    """How to cut ``image`` into blocks, or None to segment it whole.

    A block holds at most about ``block_bytes`` of input, or of class probabilities and
    instance working memory for instance output (which needs them in memory; a volume block
    holds them for its planes and its overlap, so it is never less than three times the
    overlap deep). Images under ``block_bytes`` are not cut, nor images that are one 2D
    slice.

    Parameters
    ----------
    axes, shape : str, sequence of int
        Axes and shape of the label output (:func:`~paintseg.inference.output_spec`).
    instances : bool
        Whether instance labels are wanted.
    tiles, device
        Tiling and device of the run; volume blocks fix the tiling here, once for all.
    """
    from .inference import AxesView, _plan, model_halo, resolve_tiles
    from .normalize import percentile_range

    dims = model.config.dims
    volume = len(axes) == dims == 3
    if len(axes) <= dims and not volume:
        return None
    n = int(shape[0])
    plane = int(np.prod(shape[1:]))
    in_plane = int(np.prod(image.shape)) * np.dtype(image.data.dtype).itemsize // n
    work_plane = plane * (model.config.classes * 4 + _INSTANCE_BYTES) if instances else 0
    per_plane = max(in_plane, work_plane, 1)
    if n < 2 or n * per_plane <= block_bytes:
        return None
    view = AxesView(image.data, image.axes, "C" + axes)
    lo_hi = percentile_range(view, model.normalization, name=name)
    per = max(1, int(block_bytes // per_plane))
    if not volume:
        ranges = [(a, min(n, a + per)) for a in range(0, n, per)]
        return BlockPlan(ranges, lo_hi, volume=False, instances=instances)
    if instances:
        # each block is segmented as a sub-volume: its planes, ``overlap`` planes each side
        # (compared with the neighbours' to join objects) and ``context`` planes more that
        # only the network sees; probabilities are held for the planes and overlap only
        diameter = float(model.provenance.get("object_diameter") or 32.0)
        overlap = min(n, int(math.ceil(diameter)))
        t = tiles or TileConfig()
        context = t.halo if t.halo is not None else model_halo(model, t.mode)
        per = max(per - 2 * overlap, overlap, 1)
        if per >= n:
            return None
        ranges = [(a, min(n, a + per)) for a in range(0, n, per)]
        sub = (min(n, per + 2 * overlap + 2 * context), *shape[1:])
        fixed = resolve_tiles(sub, model, tiles, device=device)
        return BlockPlan(ranges, lo_hi, volume=True, instances=True, tiles=fixed,
                         overlap=overlap, context=context)
    # class labels: blocks of the whole volume's tiling (the same numbers as a whole run),
    # cut at tile borders so that no window is run by two blocks (except for the blend)
    fixed = resolve_tiles(shape, model, tiles, device=device)
    cuts = sorted({s for s in _plan(tuple(shape), model.config, fixed).starts[0] if 0 < s < n})
    ranges, a = [], 0
    for cut, nxt in zip(cuts, [*cuts[1:], n]):
        if nxt - a > per and cut > a:
            ranges.append((a, cut))
            a = cut
    ranges.append((a, n))
    if len(ranges) == 1:
        return None
    return BlockPlan(ranges, lo_hi, volume=True, instances=False, tiles=fixed)


def _planes(image: ImageData, axes: str, start: int, stop: int) -> np.ndarray:
    """Planes ``start:stop`` of the first output axis, channels last (read from the file)."""
    from .inference import AxesView

    view = AxesView(image.data, image.axes, "C" + axes)
    return np.moveaxis(view[(slice(None), slice(start, stop))], 0, -1)


def segment_block(
    image: ImageData,
    model: PaintsegModel,
    plan: BlockPlan,
    index: int,
    part: str | os.PathLike[str],
    settings: SegmentSettings,
    *,
    axes: str,
    device: Any = "auto",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Segment block ``index`` of ``plan`` with ``settings`` and save it to ``part`` (.npz,
    renamed into place). ``axes`` are the image's own (``image.axes`` without ``C``); volume
    blocks use the plan's tiling, plane blocks that of ``settings``.

    Returns
    -------
    int
        The largest label of the block (for volume instances, of its planes and halos; their
        voxel counts per label are saved as ``sizes``).
    """
    from .inference import segment, segment_labels

    a, b = plan.ranges[index]
    arrays: dict[str, np.ndarray] = {}
    if not plan.volume:
        labels = np.asarray(segment_labels(
            _planes(image, axes, a, b), model, settings.replace(axes=axes + "C"),
            device=device, intensity_range=plan.intensity_range, progress=progress,
            should_stop=should_stop,
        ).labels)
        top = int(labels.max(initial=0))
    elif not plan.instances:
        labels = np.asarray(segment(
            image, model, tiles=plan.tiles, device=device,
            background_class=settings.background_class, intensity_range=plan.intensity_range,
            rows=(a, b), progress=progress, should_stop=should_stop,
        ).labels)
        top = int(labels.max(initial=0))
    else:
        from .postprocess import instances_from_probabilities

        e0, e1 = plan.extent(index)
        c0, c1 = max(0, e0 - plan.context), min(plan.ranges[-1][1], e1 + plan.context)
        probs = segment(
            _planes(image, axes, c0, c1), model, axes=axes + "C", tiles=plan.tiles,
            device=device, background_class=settings.background_class,
            intensity_range=plan.intensity_range,
            rows=(e0 - c0, e1 - c0), return_probabilities=True, progress=progress,
            should_stop=should_stop,
        ).probabilities
        # small objects are removed after joining the blocks (a piece may be small)
        ext = instances_from_probabilities(probs, min_size=0)
        del probs
        labels = ext[a - e0 : b - e0]
        k = plan.overlap
        arrays.update(
            halo_lo=ext[: max(0, min(a + k, e1) - e0)],  # planes [a - k, a + k)
            halo_hi=ext[max(0, b - k - e0) :],  # planes [b - k, b + k)
            sizes=np.bincount(labels.ravel()),  # voxels per label, for stitching
        )
        top = int(ext.max(initial=0))  # the halos may hold labels the planes do not
    part = Path(part)
    tmp = part.with_name(part.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, labels=labels, **arrays)
    os.replace(tmp, part)
    return top


def read_block(part: str | os.PathLike[str], key: str = "labels") -> np.ndarray:
    """One array saved by :func:`segment_block`."""
    with np.load(part) as data:
        return data[key]


class _Joins:
    """Union-find over the labels of all blocks (block ``k``'s label ``i`` is
    ``offsets[k] + i``)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, int(self.parent[i])
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def stitch_instances(
    parts: Sequence[str | os.PathLike[str]], tops: Sequence[int], *, min_size: int = 0,
    agree: float = 0.5,
) -> tuple[list[np.ndarray], int]:
    """Number the objects of volume blocks as one volume.

    Two neighbouring blocks both segment the planes around their border (``2 * overlap``
    planes, with context on both sides); an object of one and an object of the other are the
    same object when they share more than ``agree`` of the smaller one's voxels there. Objects
    smaller than ``min_size`` voxels in total are then removed and the rest numbered 1..N in
    the order of the blocks.

    Returns
    -------
    luts : list of ndarray
        For each block, its label -> final label (apply to the block's ``labels``).
    count : int
        Number of objects.
    """
    offsets = np.concatenate([[0], np.cumsum([int(t) + 1 for t in tops])]).astype(np.int64)
    joins = _Joins(int(offsets[-1]))
    for k in range(len(parts) - 1):
        upper = read_block(parts[k], "halo_hi").astype(np.int64)
        lower = read_block(parts[k + 1], "halo_lo").astype(np.int64)
        if upper.shape != lower.shape:
            raise ValueError(f"blocks {k} and {k + 1} disagree on their shared planes: "
                             f"{upper.shape} vs {lower.shape}")
        both = (upper > 0) & (lower > 0)
        width = int(tops[k + 1]) + 1
        pairs, shared = np.unique(upper[both] * width + lower[both], return_counts=True)
        size_u = np.bincount(upper.ravel(), minlength=int(tops[k]) + 1)
        size_l = np.bincount(lower.ravel(), minlength=width)
        for pair, count in zip(pairs.tolist(), shared.tolist()):
            i, j = divmod(pair, width)
            if count > agree * min(size_u[i], size_l[j]):
                joins.union(int(offsets[k]) + i, int(offsets[k + 1]) + j)
    n = int(offsets[-1])
    sizes = np.zeros(n, dtype=np.int64)
    for k, part in enumerate(parts):
        counts = read_block(part, "sizes")
        sizes[offsets[k] : offsets[k] + len(counts)] += counts
    roots = np.array([joins.find(i) for i in range(n)], dtype=np.int64)
    total = np.bincount(roots, weights=sizes, minlength=n)
    # an object is kept under its root (its smallest member), numbered in block order
    keep = (roots == np.arange(n)) & (total >= max(min_size, 1))
    keep[offsets[:-1]] = False  # each block's background
    number = np.zeros(n, dtype=np.int64)
    number[keep] = np.arange(1, int(keep.sum()) + 1)
    final = number[roots]
    count = int(keep.sum())
    luts = [final[offsets[k] : offsets[k + 1]] for k in range(len(parts))]
    return luts, count
