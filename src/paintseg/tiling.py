"""N-dimensional tiled inference for arrays of any size, larger than memory included.

The image is seen as extended to infinity by mirror reflection (numpy's ``"reflect"`` mode).
It is cut into *cores* of ``tile`` pixels per axis; each core is run through the predictor
inside a *window* that adds ``halo`` pixels of context on every side. Core origins lie on
multiples of ``align`` (the U-Net's ``2**depth``), so every window sees the same pooling grid
as a single window over the whole image.

Each window's output is weighted by a linear taper of half-width ``blend`` centred on its core
edges (the weights of two neighbours sum to one across their shared edge), accumulated, and
normalised. With ``blend=0`` the weights are a box on the core: the output is the cropped core,
and when the halo covers the receptive field the result equals untiled inference.

Only a slab of the output along the first axis is held in memory: once every window that can
touch a range of the first axis has been run, that range is normalised and handed to ``sink``,
so peak memory is set by the tile and the other axes, not by the length of the first axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import StopRequested

__all__ = ["TilePlan", "plan_tiles", "reflect_indices", "read_window", "predict_tiled",
           "WindowMerger", "ArraySink"]

Sink = Callable[[tuple[slice, ...], torch.Tensor], None]


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _per_axis(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries for {n} spatial axes")
    return out


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of an image lie.

    Attributes
    ----------
    shape : tuple of int
        Spatial shape of the image.
    tile : tuple of int
        Core size per axis.
    halo : tuple of int
        Context on each side of a core, per axis.
    blend : tuple of int
        Half-width of the linear taper at core edges, per axis (0: crop).
    starts : tuple of tuple of int
        Core origins along each axis.
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    halo: tuple[int, ...]
    blend: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @property
    def window(self) -> tuple[int, ...]:
        """Size of the array given to the predictor, per axis."""
        return tuple(t + 2 * h for t, h in zip(self.tile, self.halo))

    @property
    def n_tiles(self) -> int:
        """Number of windows."""
        return int(np.prod([len(s) for s in self.starts]))

    def tiles(self) -> Iterator[tuple[int, ...]]:
        """Core origins in C order (first axis slowest)."""
        for idx in np.ndindex(*[len(s) for s in self.starts]):
            yield tuple(self.starts[a][i] for a, i in enumerate(idx))


def plan_tiles(
    shape: Sequence[int],
    *,
    tile: int | Sequence[int],
    halo: int | Sequence[int] = 0,
    align: int | Sequence[int] = 1,
    blend: int | Sequence[int] = 0,
    inner: bool = False,
) -> TilePlan:
    """Lay a grid of tiles over an image.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the image (every entry >= 1).
    tile : int or sequence of int
        Wanted core size; rounded up to ``align`` and capped at the image (rounded up).
    halo : int or sequence of int
        Context per side; rounded up to ``align``.
    align : int or sequence of int
        Core origins and sizes are multiples of this.
    blend : int or sequence of int
        Taper half-width; capped at the halo and at half the core.
    inner : bool
        Keep windows inside the image where it is larger than one window: the first window
        starts at the image border and the outermost windows are trusted up to the border
        (as in a plain forward pass). Fewer windows than covering the image with cores; the
        border pixels then see zero padding instead of reflected context. Without it, cores
        cover the image and windows reach into the reflected extension (needed for the
        ``exact`` mode).

    Returns
    -------
    TilePlan
    """
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    if n == 0 or min(shape) < 1:
        raise ValueError(f"cannot tile an image of shape {shape}")
    tile_, halo_, align_, blend_ = (
        _per_axis(tile, n, "tile"),
        _per_axis(halo, n, "halo"),
        _per_axis(align, n, "align"),
        _per_axis(blend, n, "blend"),
    )
    tiles, halos, blends, starts = [], [], [], []
    for s, t, h, a, b in zip(shape, tile_, halo_, align_, blend_):
        if t < 1 or h < 0 or a < 1 or b < 0:
            raise ValueError(f"invalid tiling tile={t} halo={h} align={a} blend={b}")
        t = min(_round_up(t, a), _round_up(s, a))
        h = _round_up(h, a)
        b = min(b, h, t // 2)
        if s <= t or (inner and s <= t + 2 * h):
            st = [0] if s <= t else [h]
            if s > t:  # one window that spans the image: core [h, h+t) plus both halos
                t = _round_up(s - 2 * h, a) if s > 2 * h else t
                b = min(b, t // 2)
        else:
            first = h if inner else 0
            end = s - h if inner else s  # cores must reach this far
            st = list(range(first, end - t, t)) or [first]
            last = max(_round_up(end - t, a), first)
            if last > st[-1]:
                st.append(last)
        tiles.append(t)
        halos.append(h)
        blends.append(b)
        starts.append(tuple(st))
    return TilePlan(shape, tuple(tiles), tuple(halos), tuple(blends), tuple(starts))


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices into an axis of ``size`` for positions ``start..stop-1`` under mirror reflection.

    Matches ``numpy.pad(mode="reflect")`` (the edge pixel is not repeated), for any distance
    outside the axis; an axis of size 1 repeats its only pixel.
    """
    pos = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(pos)
    period = 2 * (size - 1)
    pos = np.mod(pos, period)
    return np.where(pos >= size, period - pos, pos)


def read_window(image: Any, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Read ``image[:, start:start+size]`` from a ``(C, *spatial)`` array-like, reflecting at edges.

    Only the bounding box of the needed pixels is read, so this works on memory-mapped,
    zarr and dask arrays without loading them.
    """
    spatial = image.shape[1:]
    key: list[slice] = [slice(None)]
    takes: list[tuple[int, np.ndarray] | None] = []
    for axis, (s0, n, dim) in enumerate(zip(start, size, spatial)):
        if s0 >= 0 and s0 + n <= dim:
            key.append(slice(s0, s0 + n))
            takes.append(None)
        else:
            idx = reflect_indices(s0, s0 + n, dim)
            lo, hi = int(idx.min()), int(idx.max()) + 1
            key.append(slice(lo, hi))
            takes.append((axis + 1, idx - lo))
    block = image[tuple(key)]
    if hasattr(block, "compute"):  # dask
        block = block.compute()
    block = np.asarray(block)
    for take in takes:
        if take is not None:
            block = np.take(block, take[1], axis=take[0])
    return block


def _axis_weight(t: int, h: int, b: int) -> np.ndarray:
    x = np.arange(t + 2 * h) + 0.5
    d = np.minimum(x - h, (h + t) - x)  # signed distance into the core
    if b == 0:
        return (d > 0).astype(np.float32)
    return np.clip(0.5 + d / (2 * b), 0.0, 1.0).astype(np.float32)


def _axis_weight_at(t: int, h: int, b: int, first: bool, last: bool) -> np.ndarray:
    """Taper of one axis; the outermost windows keep full weight out to the image border."""
    w = _axis_weight(t, h, b)
    if first:
        w[: h + t // 2] = np.maximum(w[: h + t // 2], 1.0)
    if last:
        w[h + t // 2 :] = np.maximum(w[h + t // 2 :], 1.0)
    return w


def window_weight(plan: TilePlan, index: Sequence[int] | None = None) -> np.ndarray:
    """Blending weight of one window: an outer product of per-axis tapers.

    ``index`` is the window's position in the grid (per axis); without it, the weight of an
    interior window.
    """
    w = np.ones((), dtype=np.float32)
    for axis, (t, h, b) in enumerate(zip(plan.tile, plan.halo, plan.blend)):
        n = len(plan.starts[axis])
        i = None if index is None else index[axis]
        first = i == 0
        last = i is not None and i == n - 1
        w = np.multiply.outer(w, _axis_weight_at(t, h, b, first, last))
    return w


def _reach(plan: TilePlan, axis: int, i: int) -> tuple[int, int]:
    """Range of image positions along ``axis`` that window ``i`` can give weight to."""
    c, t, h, b, s = (plan.starts[axis][i], plan.tile[axis], plan.halo[axis], plan.blend[axis],
                     plan.shape[axis])
    lo = c - h if i == 0 else c - b
    hi = c + t + h if i == len(plan.starts[axis]) - 1 else c + t + b
    return max(lo, 0), min(hi, s)


class ArraySink:
    """A sink that writes finished slabs into a float32 array of rows ``r0..r1`` (on the CPU).

    Parameters
    ----------
    classes : int
        Output channels.
    rows : (int, int)
        The range of the first spatial axis the array holds.
    rest : tuple of int
        The other spatial sizes.
    """

    def __init__(self, classes: int, rows: tuple[int, int], rest: tuple[int, ...]) -> None:
        self.r0 = rows[0]
        self.array = np.zeros((classes, rows[1] - rows[0], *rest), dtype=np.float32)

    def __call__(self, region: tuple[slice, ...], block: torch.Tensor) -> None:
        local = (slice(region[0].start - self.r0, region[0].stop - self.r0), *region[1:])
        self.array[(slice(None), *local)] = block.to("cpu").numpy()


class WindowMerger:
    """Blends weighted window predictions into slabs of the first spatial axis and hands each
    finished slab to a sink (MONAI's ``Merger`` does the same job with ``aggregate`` and
    ``finalize``, for a whole image in memory).

    Only the rows that windows still being run may reach are held: :meth:`flush` divides the
    rows before ``upto`` by their summed weights, sends the part inside ``rows`` to the sink
    and frees them, so memory stays bounded by a slab whatever the image's length.

    Parameters
    ----------
    plan : TilePlan
        The tiling the windows come from.
    classes : int
        Output channels of the predictions.
    device : torch.device
        Where accumulation happens.
    sink : callable
        ``sink(region, block)``, as in :func:`predict_tiled`.
    rows : (int, int)
        The range of the first spatial axis wanted (the whole axis for a whole image).
    start : int
        The first row any wanted window reaches.
    """

    def __init__(self, plan: TilePlan, *, classes: int, device: torch.device, sink: Sink,
                 rows: tuple[int, int], start: int) -> None:
        self.plan, self.classes, self.device, self.sink = plan, classes, device, sink
        self.r0, self.r1 = rows
        self.rest = plan.shape[1:]
        self.lo = start  # first row not yet flushed
        self.acc: torch.Tensor | None = None  # weighted sums of rows acc_lo..
        self.wsum: torch.Tensor | None = None  # summed weights of the same rows
        self.acc_lo = 0
        self._weights: dict[tuple[tuple[bool, bool], ...], torch.Tensor] = {}

    def _weight(self, index: tuple[int, ...]) -> torch.Tensor:
        plan = self.plan
        key = tuple((i == 0, i == len(plan.starts[a]) - 1) for a, i in enumerate(index))
        if key not in self._weights:
            self._weights[key] = torch.from_numpy(window_weight(plan, index)).to(self.device)
        return self._weights[key]

    def _ensure(self, hi: int) -> None:
        """Hold rows up to ``hi`` (exclusive)."""
        k, rest = self.classes, self.rest
        like = {"dtype": torch.float32, "device": self.device}
        if self.acc is None:
            self.acc_lo = self.lo
            self.acc = torch.zeros((k, hi - self.lo, *rest), **like)
            self.wsum = torch.zeros((hi - self.lo, *rest), **like)
        elif self.acc_lo + self.acc.shape[1] < hi:
            assert self.wsum is not None
            extra = hi - (self.acc_lo + self.acc.shape[1])
            self.acc = torch.cat([self.acc, torch.zeros((k, extra, *rest), **like)], 1)
            self.wsum = torch.cat([self.wsum, torch.zeros((extra, *rest), **like)], 0)

    def aggregate(self, pred: torch.Tensor, index: tuple[int, ...]) -> None:
        """Add the prediction ``(classes, *window)`` of window ``index``, weighted."""
        plan = self.plan
        # window coordinates -> image coordinates, clipped to the image and to the part
        # where the weight can be non-zero
        src, dst = [], []
        for a, (i, h) in enumerate(zip(index, plan.halo)):
            c = plan.starts[a][i]
            g0, g1 = _reach(plan, a, i)
            src.append(slice(g0 - (c - h), g1 - (c - h)))
            dst.append((g0, g1))
        self._ensure(dst[0][1])
        assert self.acc is not None and self.wsum is not None
        w = self._weight(index)[tuple(src)]
        region = (slice(dst[0][0] - self.acc_lo, dst[0][1] - self.acc_lo),) + tuple(
            slice(g0, g1) for g0, g1 in dst[1:]
        )
        self.acc[(slice(None), *region)] += pred[(slice(None), *src)].float() * w
        self.wsum[region] += w

    def flush(self, upto: int) -> None:
        """Finish the rows before ``upto``: no window still to come reaches them."""
        if upto <= self.lo or self.acc is None:
            return
        assert self.wsum is not None
        n = upto - self.acc_lo
        e0, e1 = max(self.acc_lo, self.r0), min(upto, self.r1)  # the wanted part of them
        if e0 < e1:
            a, b = e0 - self.acc_lo, e1 - self.acc_lo
            block = self.acc[:, a:b] / self.wsum[a:b].clamp_min(1e-12)
            self.sink((slice(e0, e1), *(slice(0, s) for s in self.rest)), block)
        self.acc = self.acc[:, n:].clone() if n < self.acc.shape[1] else None
        self.wsum = self.wsum[n:].clone() if self.acc is not None else None
        self.acc_lo = self.lo = upto

    def finalize(self) -> None:
        """Finish every wanted row."""
        self.flush(self.r1)


def predict_tiled(
    image: Any,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    classes: int,
    plan: TilePlan,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    transform: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = None,
    sink: Sink | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    rows: tuple[int, int] | None = None,
) -> np.ndarray | None:
    """Run ``predictor`` over an image window by window and blend the results.

    Parameters
    ----------
    image : array-like
        ``(C, *spatial)``: numpy array, memory map, zarr or dask array. Never modified.
    predictor : callable
        Takes a float32 tensor ``(B, C, *window)`` on ``device`` and returns per-class
        values ``(B, classes, *window)`` (probabilities, typically).
    classes : int
        Number of output channels of ``predictor``.
    plan : TilePlan
        From :func:`plan_tiles` for ``image.shape[1:]``.
    batch_size : int
        Windows per call of ``predictor``.
    device : str or torch.device
        Where windows are sent and where blending happens.
    transform : callable, optional
        Applied to each window (float32 numpy ``(C, *window)``) and its origin before it is
        sent to the device (normalisation, validation).
    sink : callable, optional
        Called as ``sink(region, block)`` with ``region`` a tuple of slices into the spatial
        axes and ``block`` a ``(classes, *region)`` tensor on ``device``, once per finished
        slab. If omitted, a ``(classes, *spatial)`` float32 numpy array is returned.
    progress : callable, optional
        Called as ``progress(done, total)`` in windows after every batch.
    should_stop : callable, optional
        Polled between batches; when it returns True, :class:`StopRequested` is raised.
    rows : (start, stop), optional
        Compute only this range of the first spatial axis (a block of a larger image, e.g.
        one task of a cluster). The windows are those of the whole image's ``plan``, run in
        the same batches, so the block equals the same range of a whole-image run. Regions
        given to ``sink`` are in whole-image coordinates; the returned array holds the range.

    Returns
    -------
    numpy.ndarray or None
        The blended output when no ``sink`` is given.
    """
    device = torch.device(device)
    spatial = tuple(int(s) for s in image.shape[1:])
    if spatial != plan.shape:
        raise ValueError(f"plan is for shape {plan.shape}, image has spatial shape {spatial}")
    r0, r1 = (0, spatial[0]) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 < r1 <= spatial[0]:
        raise ValueError(f"rows {rows} are not a range inside 0..{spatial[0]}")
    array_sink = ArraySink(classes, (r0, r1), spatial[1:]) if sink is None else None
    window = plan.window
    done = 0
    use_pinned = device.type == "cuda"

    def load(indices: list[tuple[int, ...]]) -> torch.Tensor:
        arrays = []
        for index in indices:
            start = tuple(plan.starts[a][i] - h for a, (i, h) in enumerate(zip(index, plan.halo)))
            win = read_window(image, start, window).astype(np.float32, copy=False)
            if transform is not None:
                win = transform(win, start)
            arrays.append(win)
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
        if use_pinned:
            batch = batch.pin_memory()
        return batch

    # Windows in C order (rows along the first axis), cut into batches that may span rows
    # (slices of a stack are batched together). Reading the next batch overlaps with the
    # predictor on the current one. For a block (``rows``), the batches of the whole image
    # that hold a window reaching into the block are run whole (the same batches give the
    # same numbers); only the windows reaching into the block are accumulated.
    n_rows = len(plan.starts[0])
    all_indices = [tuple(i) for i in np.ndindex(*[len(st) for st in plan.starts])]
    per_row = len(all_indices) // n_rows
    reach = [_reach(plan, 0, r) for r in range(n_rows)]
    wanted = [r for r in range(n_rows) if reach[r][0] < r1 and reach[r][1] > r0]
    first_row, last_row = wanted[0], wanted[-1]
    batches = []
    for k in range(0, len(all_indices), batch_size):
        chunk = all_indices[k : k + batch_size]
        if chunk[-1][0] >= first_row and chunk[0][0] <= last_row:
            batches.append(chunk)
    total = per_row * len(wanted)

    merger = WindowMerger(plan, classes=classes, device=device,
                          sink=array_sink if sink is None else sink, rows=(r0, r1),
                          start=reach[first_row][0])

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paintseg-read")
    try:
        pending: Future[torch.Tensor] | None = None
        if batches:
            pending = executor.submit(load, batches[0])
        for bi, indices in enumerate(batches):
            if should_stop is not None and should_stop():
                raise StopRequested("stopped by the user")
            assert pending is not None
            batch = pending.result()
            if bi + 1 < len(batches):
                pending = executor.submit(load, batches[bi + 1])
            out = predictor(batch.to(device, non_blocking=True))
            if out.shape[:2] != (len(indices), classes) or tuple(out.shape[2:]) != window:
                raise ValueError(
                    f"predictor returned shape {tuple(out.shape)}, expected "
                    f"{(len(indices), classes, *window)}"
                )
            for index, pred in zip(indices, out):
                if first_row <= index[0] <= last_row:  # else batched with the block's
                    merger.aggregate(pred, index)  # windows but reaching no row of it
            done_rows = [i for i in indices if first_row <= i[0] <= last_row]
            done += len(done_rows)
            if progress is not None:
                progress(done, total)
            # rows whose windows are all done can be finalised
            if done_rows:
                last = done_rows[-1]
                row_done = all(i == len(st) - 1 for i, st in zip(last[1:], plan.starts[1:]))
                r_next = last[0] + int(row_done)  # first row with windows still to run
                if r_next > last_row:
                    merger.finalize()
                elif r_next > first_row:
                    merger.flush(min(reach[r_next][0], r1))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return array_sink.array if array_sink is not None else None
