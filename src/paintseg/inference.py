"""Apply a :class:`~paintseg.model.PaintsegModel` to an image of any size.

:func:`segment` is the one entry point shared by the CLI, the batch runner and the napari
widget. It validates the image against the model, normalises intensities, chooses tiles from a
memory budget, runs :func:`~paintseg.tiling.predict_tiled` on the chosen device and streams
labels (and optionally probabilities) into output arrays, which may be memory-mapped files.

A 2D model on a stack (``ZYX``, ``TYX``, ``TZYX``) segments it slice by slice, batching slices
together; a 3D model runs on each volume.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import DENSE_SHARE, OUTPUTS, SNAP_PIXELS, ModelConfig, SegmentSettings, TileConfig
from .devices import (
    flush_denormals,
    inference_autocast,
    keep_freed_memory,
    memory_available,
    resolve_device,
)
from .errors import ConfigError, InputError
from .io import ImageData, guess_axes, label_dtype, label_values
from .model import PaintsegModel, class_argmax, exact_halo
from .normalize import channel_scaling, percentile_range
from .tiling import TilePlan, plan_tiles, predict_tiled

__all__ = [
    "segment",
    "segment_labels",
    "scale_for",
    "SegmentResult",
    "AxesView",
    "choose_tiling",
    "autocast_type",
    "resolve_tiles",
    "output_axes",
    "output_spec",
    "wants_instances",
    "default_snap",
]

_MAX_BATCH = 32
_CPU_BATCH_PIXELS = 2.0**18


class AxesView:
    """A lazy view of an array with its axes reordered (and a size-1 ``C`` added if absent).

    Indexing reads only the requested block from the underlying array, so it works on
    memory maps and zarr arrays. Only basic indexing with one int or slice per axis is
    supported.
    """

    def __init__(self, data: Any, axes: str, order: str) -> None:
        missing = set(order) - set(axes)
        if missing - {"C"} or set(axes) - set(order):
            raise ValueError(f"cannot view axes {axes!r} as {order!r}")
        self.data, self.axes, self.order = data, axes, order
        sizes = dict(zip(axes, data.shape))
        self.shape = tuple(int(sizes.get(a, 1)) for a in order)
        self.dtype = data.dtype
        self.ndim = len(order)

    def __getitem__(self, key: Any) -> np.ndarray:
        if key is Ellipsis:
            key = ()
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        by_axis = dict(zip(self.order, key))
        src_key = tuple(by_axis[a] for a in self.axes)
        block = self.data[src_key]
        if hasattr(block, "compute"):
            block = block.compute()
        block = np.asarray(block)
        kept_src = [a for a, k in zip(self.axes, src_key) if not isinstance(k, (int, np.integer))]
        kept_dst = [a for a, k in zip(self.order, key) if not isinstance(k, (int, np.integer))]
        if "C" not in self.axes and "C" in kept_dst:
            block = block[np.newaxis]
            kept_src = ["C", *kept_src]
        return np.transpose(block, [kept_src.index(a) for a in kept_dst])


@dataclass
class SegmentResult:
    """What :func:`segment` produced.

    Attributes
    ----------
    labels : array
        Label image, axes :attr:`axes` (the input's without ``C``).
    probabilities : array or None
        ``(classes, *labels.shape)`` float32 when asked for.
    axes : str
        Axes of ``labels``.
    device : str
        Device used in the end (after any fall-back).
    plan : TilePlan
        The tiling of one image (slice or volume).
    batch_size : int
        Windows per forward pass.
    seconds : float
        Wall time.
    messages : list of str
        Things the user should know (device fall-backs, constant images).
    """

    labels: Any
    probabilities: Any
    axes: str
    device: str
    plan: TilePlan
    batch_size: int
    seconds: float
    messages: list[str]


def output_axes(axes: str, config: ModelConfig) -> str:
    """Axes of the label output for an input with ``axes``: batch axes then spatial, no C."""
    spatial = "YX" if config.dims == 2 else "ZYX"
    batch = "".join(a for a in "TZ" if a in axes and a not in spatial)
    return batch + spatial


def output_spec(
    image: ImageData, model: PaintsegModel, *, background_class: int | None = 1
) -> tuple[str, tuple[int, ...], np.dtype]:
    """Check that ``image`` fits ``model``; return the label output's axes, shape and dtype.

    Raises
    ------
    InputError
        Empty image, a 3D model without a Z axis, a channel count the model does not take,
        or an unsupported pixel type.
    """
    name = str(image.path) if image.path is not None else "image"
    if len(image.axes) != len(image.shape):
        raise InputError(f"{name}: axes {image.axes!r} do not match shape {image.shape}")
    if min(image.shape) == 0:
        raise InputError(f"{name}: empty image (shape {image.shape})")
    cfg = model.config
    if cfg.dims == 3 and "Z" not in image.axes:
        raise InputError(
            f"{name}: the model is 3D but the image has no Z axis (axes {image.axes}, shape "
            f"{image.shape}); use a 2D model or give the axes"
        )
    if image.channels != cfg.in_channels:
        raise InputError(
            f"{name}: image has {image.channels} channel(s) (axes {image.axes}, shape "
            f"{image.shape}) but the model expects {cfg.in_channels}"
        )
    if np.dtype(image.data.dtype).kind not in "buif":
        raise InputError(f"{name}: unsupported pixel type {image.data.dtype}")
    axes = output_axes(image.axes, cfg)
    sizes = dict(zip(image.axes, image.shape))
    shape = tuple(sizes[a] for a in axes)
    return axes, shape, label_dtype(max(label_values(model.class_values, background_class)))


def wants_instances(model: PaintsegModel, output: str = "auto") -> bool:
    """Whether labels should be instances: ``"instances"``, ``"semantic"``, or ``"auto"``
    (instances for models trained on instances, which record ``output: instances``)."""
    if output not in OUTPUTS:
        raise ConfigError(f"output must be auto, semantic or instances, got {output!r}")
    want = output == "instances" or (
        output == "auto" and model.provenance.get("output") == "instances"
    )
    if want and model.config.classes != 3:
        raise InputError(
            "instance output needs a model trained on instances (3 classes: background, "
            f"object, boundary); this model has {model.config.classes}"
        )
    return want


def _bytes_per_pixel(config: ModelConfig, half: bool) -> float:
    # Measured on the CPU with torch 2.13 (depth 4, base 32, inference mode): ~0.7 KB per
    # window pixel at full resolution; the deeper levels add ~1/2**dims each. The members of
    # a several-member network run one after another: the peak is one member's.
    per = 24.0 * config.base_features * (1.0 + 2.0 ** -config.dims)
    return per / 2 if half else per


def default_halo(config: ModelConfig, mode: str) -> int:
    """Halo for ``"exact"`` (receptive field) or ``"blend"`` (a modest overlap) mode."""
    if mode == "exact":
        return exact_halo(config)
    a = config.align
    return int(math.ceil(max(2 * a, 32) / a) * a)


def model_halo(model: PaintsegModel, mode: str) -> int:
    """The halo ``model``'s tiles get unless the user sets one: the halo another tool's
    BioImage.IO package declares for its network, else :func:`default_halo`."""
    declared = getattr(model.network, "halo", None)
    return int(declared) if declared else default_halo(model.config, mode)


def choose_tiling(
    spatial: tuple[int, ...],
    config: ModelConfig,
    tiles: TileConfig,
    *,
    budget: int,
    half: bool = False,
) -> tuple[int, int, int]:
    """Pick (tile, halo, batch size) for an image of ``spatial`` shape (model axes only).

    The whole image is one tile when its window fits the memory ``budget``; otherwise the
    largest aligned cube that does. The batch fills the budget with windows.
    """
    a = config.align
    halo = tiles.halo if tiles.halo is not None else default_halo(config, tiles.mode)
    halo = int(math.ceil(halo / a) * a)
    max_px = max(1.0, budget / _bytes_per_pixel(config, half))
    padded = [int(math.ceil(s / a) * a) for s in spatial]
    if tiles.tile is not None:
        tile = int(math.ceil(tiles.tile / a) * a)
    elif np.prod([p + 2 * halo for p in padded]) <= max_px or (
        tiles.mode == "blend" and np.prod(padded) <= max_px
    ):
        tile = max(padded)  # one window (in blend mode it needs no halo)
    else:
        edge = int(max_px ** (1.0 / len(spatial)))
        tile = max(a, ((edge - 2 * halo) // a) * a)
    window_px = float(np.prod([min(tile, p) + 2 * halo for p in padded]))
    batch = tiles.batch_size or _fill_batch(window_px, max_px)
    return tile, halo, batch


def _auto_budget(device: torch.device) -> int:
    """A quarter of the available memory (at most 8 GiB), rounded down to a power of two so
    that small changes in free memory do not change the tiling (and so the numbers)."""
    free = int(min(memory_available(device) * 0.25, 8 * 2**30))
    return 2 ** max(20, int(math.floor(math.log2(max(free, 1)))))


def _plan(labels_shape: tuple[int, ...], config: ModelConfig, fixed: TileConfig) -> TilePlan:
    """The tile plan of a label output for fixed tile and halo (see :func:`resolve_tiles`)."""
    nb = len(labels_shape) - config.dims
    tile, halo, a = int(fixed.tile or 1), int(fixed.halo or 0), config.align
    blend = fixed.mode == "blend"
    # in blend mode an axis that one core spans needs no halo (a plain forward pass along it)
    halos = tuple(0 if blend and math.ceil(s / a) * a <= tile else halo
                  for s in labels_shape[nb:])
    return plan_tiles(
        labels_shape,
        tile=(1,) * nb + (tile,) * config.dims,
        halo=(0,) * nb + halos,
        align=(1,) * nb + (a,) * config.dims,
        blend=(0,) * nb + tuple(0 if not blend else h // 2 for h in halos),
        inner=blend,
    )


def resolve_tiles(
    labels_shape: Sequence[int],
    model: PaintsegModel,
    tiles: TileConfig | None = None,
    *,
    device: str | torch.device = "auto",
) -> TileConfig:
    """The tiling :func:`segment` would use, with tile, halo and batch size all fixed.

    Parameters
    ----------
    labels_shape : sequence of int
        Shape of the label output (batch axes, then the model's spatial axes).
    tiles : TileConfig, optional
        What the user asked for; unset fields are chosen from the memory of ``device``.

    Returns
    -------
    TileConfig
        Passing it to :func:`segment` gives the same windows in the same batches anywhere,
        e.g. for the blocks of one image run on different machines.
    """
    tiles = tiles or TileConfig()
    if tiles.halo is None:  # the default, or the halo another tool's package declares
        tiles = dataclasses.replace(tiles, halo=model_halo(model, tiles.mode))
    cfg = model.config
    dev = resolve_device(device)
    shape = tuple(int(v) for v in labels_shape)
    spatial = shape[len(shape) - cfg.dims:]
    budget = tiles.memory_budget or _auto_budget(dev)
    half = autocast_type(tiles, dev) is not None
    tile, halo, batch = choose_tiling(spatial, cfg, tiles, budget=budget, half=half)
    if tiles.mode == "blend" and tile >= max(spatial):
        halo = 0  # one window over the image: exactly the plain forward pass
    fixed = dataclasses.replace(tiles, tile=tile, halo=halo, memory_budget=budget)
    if tiles.batch_size is None:
        # size the batch on the real window (the halo may have been dropped). On the CPU a
        # batch beyond about a quarter of a megapixel runs slower (the activations leave the
        # caches) and holds more memory: cap it there (one window at least).
        budget_px = budget / _bytes_per_pixel(cfg, half)
        if dev.type != "cuda":
            budget_px = min(budget_px, _CPU_BATCH_PIXELS)
        batch = _fill_batch(float(np.prod(_plan(shape, cfg, fixed).window)), budget_px)
    return dataclasses.replace(fixed, batch_size=batch)


def autocast_type(tiles: TileConfig, device: torch.device) -> torch.dtype | None:
    """The type the U-Nets run in with ``tiles`` (its precision and mode) on ``device``
    (None: float32; :func:`paintseg.devices.inference_autocast`)."""
    return inference_autocast(device, tiles.precision, exact=tiles.mode == "exact")


def _fill_batch(window_px: float, budget_px: float) -> int:
    """Windows per forward pass that fit ``budget_px`` pixels of activations (1 to 32)."""
    return int(max(1, min(_MAX_BATCH, budget_px // window_px)))


def _make_predictor(
    network: torch.nn.Module, device: torch.device, dtype: torch.dtype | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Probabilities (float32) of ``network`` (already on ``device`` by
    :meth:`UNet.to_device`, in the memory layout that suits it there) for a batch of windows,
    its layers in ``dtype`` (None: float32) behind a float32 filter bank."""
    dims = network.config.dims  # type: ignore[attr-defined]

    def predict(x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, *batch_axes_of_size_1, *spatial) -> squeeze the batch axes for the net
        shape = x.shape
        extra = x.ndim - 2 - dims
        xin = x.reshape(shape[0], shape[1], *shape[2 + extra :]) if extra else x
        with torch.inference_mode(), flush_denormals():
            logits = network(xin, autocast=dtype)
            probs = torch.softmax(logits.float(), dim=1)
        if extra:
            probs = probs.reshape(shape[0], probs.shape[1], *shape[2:])
        return probs

    return predict


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def after_oom(
    current: TileConfig, requested: TileConfig, *, used_tile: int, used_batch: int, align: int,
    device: torch.device,
) -> tuple[TileConfig, torch.device, str]:
    """What to try after the GPU ran out of memory: half the tiles per batch, then (one tile
    per batch) half the tile edge down to twice the pooling grid, then the CPU with the
    settings the user asked for. Returns the new settings, the device and what to tell."""
    if used_batch > 1:
        cfg = dataclasses.replace(current, batch_size=used_batch // 2)
        return cfg, device, f"GPU out of memory: retrying with {cfg.batch_size} tile(s) per batch"
    if used_tile > 2 * align:
        tile = max(align, used_tile // 2)
        cfg = dataclasses.replace(current, tile=tile, batch_size=1)
        return cfg, device, f"GPU out of memory: retrying with tiles of {tile} pixels"
    return (requested, torch.device("cpu"),
            "GPU out of memory even with the smallest tiles: using the CPU")


class OomRetry:
    """Runs an inference attempt, and after a CUDA out-of-memory error runs it again with
    the settings :func:`after_oom` chooses (fewer tiles per batch, smaller tiles, then the
    CPU), until one succeeds; other errors pass through.

    Parameters
    ----------
    tiles : TileConfig
        The settings the user asked for (the first attempt's).
    device : torch.device
        The first attempt's device.
    align : int
        The model's pooling grid (tiles are not made smaller than twice it).

    Attributes
    ----------
    device : torch.device
        The device of the last attempt.
    notes : list of str
        What was changed after each out-of-memory error, for the user.
    """

    def __init__(self, tiles: TileConfig, device: torch.device, *, align: int) -> None:
        self.requested = self.tiles = tiles
        self.device, self.align = device, align
        self.used_tile, self.used_batch = 0, 1
        self.notes: list[str] = []

    def ran_with(self, *, tile: int, batch: int) -> None:
        """Record the tile edge and batch size an attempt resolved (the next retry halves
        them)."""
        self.used_tile, self.used_batch = tile, batch

    def run(self, attempt: Callable[[torch.device, TileConfig], Any]) -> Any:
        """``attempt(device, tiles)``, retried after out-of-memory errors on a GPU."""
        while True:
            try:
                return attempt(self.device, self.tiles)
            except Exception as exc:
                if self.device.type != "cuda" or not _is_oom(exc):
                    raise
                torch.cuda.empty_cache()
                self.tiles, self.device, note = after_oom(
                    self.tiles, self.requested, used_tile=self.used_tile,
                    used_batch=self.used_batch, align=self.align, device=self.device)
                self.notes.append(note)


def _segment_rescaled(view: AxesView, model: PaintsegModel, *, scale: float, out_axes: str,
                      name: str, t_start: float, labels_out: Any, probabilities_out: Any,
                      return_probabilities: bool, background_class: int | None,
                      snap: int, **kwargs: Any) -> SegmentResult:
    from skimage.transform import resize

    from .postprocess import semantic_labels

    if not 0.05 <= scale <= 20:
        raise InputError(f"{name}: scale {scale:g} is out of range (0.05 to 20)")
    dims = model.config.dims
    data = np.asarray(view[...], dtype=np.float32)  # (C, *batch, *spatial)
    spatial = data.shape[-dims:]
    small = tuple(max(1, int(round(s * scale))) for s in spatial)
    lead = data.shape[: data.ndim - dims]
    resized = np.empty(lead + small, np.float32)
    for idx in np.ndindex(*lead):
        resized[idx] = resize(data[idx], small, order=1, anti_aliasing=scale < 1,
                              preserve_range=True)
    inner = segment(np.moveaxis(resized, 0, -1), model, axes=out_axes + "C",
                    return_probabilities=True, background_class=background_class, snap=0,
                    **kwargs)
    probs = np.empty((model.config.classes, *lead[1:], *spatial), np.float32)
    for idx in np.ndindex(*probs.shape[: probs.ndim - dims]):
        probs[idx] = resize(inner.probabilities[idx], spatial, order=1, preserve_range=True)
    probs /= probs.sum(0, keepdims=True).clip(1e-12)
    snap = snap if dims == 2 else 0  # borders snapped to the edges of the image as given
    if snap:
        lo, inv = channel_scaling(*(kwargs.get("intensity_range") or percentile_range(
            view, model.normalization, name=name)), data.ndim)
        data = (data - lo) * inv
    labels = semantic_labels(probs, model.class_values, background_class=background_class,
                             image=data, snap=snap)
    if labels_out is not None:
        labels_out[...] = labels
        labels = labels_out
    if probabilities_out is not None:
        probabilities_out[...] = probs
        probs = probabilities_out
    return SegmentResult(
        labels=labels,
        probabilities=probs if (return_probabilities or probabilities_out is not None) else None,
        axes=out_axes, device=inner.device, plan=inner.plan, batch_size=inner.batch_size,
        seconds=time.perf_counter() - t_start,
        messages=inner.messages + [f"image resampled by {scale:.3g} for the model"],
    )


def segment(
    image: ImageData | np.ndarray,
    model: PaintsegModel,
    *,
    axes: str | None = None,
    tiles: TileConfig | None = None,
    device: str | torch.device = "auto",
    background_class: int | None = 1,
    labels_out: Any = None,
    probabilities_out: Any = None,
    return_probabilities: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    scale: float = 1.0,
    intensity_range: tuple[np.ndarray, np.ndarray] | None = None,
    rows: tuple[int, int] | None = None,
    snap: int = SNAP_PIXELS,
) -> SegmentResult:
    """Segment an image (2D, 2D + channels, 3D, time series) with a model.

    The first call in a process keeps the memory it frees for its next allocations (Linux
    with glibc; :func:`~paintseg.devices.keep_freed_memory`).

    Parameters
    ----------
    image : ImageData or numpy.ndarray
        The image; an array needs ``axes`` unless it is YX / ZYX / TZYX. Never modified.
    model : PaintsegModel
        The network and its metadata.
    axes : str, optional
        Axes of a plain array (letters of ``TZCYX``).
    tiles : TileConfig, optional
        Tiling settings; default: blended tiles sized by available memory.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    background_class : int or None
        Class value written as 0 in the labels (``None``: write every class value as is).
    labels_out, probabilities_out : array-like, optional
        Preallocated outputs (numpy arrays or memory maps) of shapes ``labels_shape`` and
        ``(classes, *labels_shape)``; allocated in memory when omitted.
    return_probabilities : bool
        Allocate and fill a probability array when ``probabilities_out`` is not given.
    progress : callable, optional
        ``progress(done, total)`` in tiles over the whole image.
    should_stop : callable, optional
        Polled between batches of tiles; True raises :class:`~paintseg.errors.StopRequested`.
    scale : float
        Rescale the image by this factor for the model (and the result back).
    intensity_range : (low, high) arrays, optional
        Per-channel normalisation range; default: the model's percentiles of this image. Given
        when this image is a block of a larger one, so that every block is normalised alike.
    rows : (start, stop), optional
        Segment only this range of the output's first axis, reading the context it needs
        around it: a block of a large image. With the whole image's ``intensity_range`` and
        the tiling of :func:`resolve_tiles` for the whole image, the block equals the same
        range of a whole-image run. Outputs then have the block's shape.
    snap : int
        2D models: class borders in the labels may move by up to this many pixels to the
        image's nearest strong edge, where the model is not confident (see
        :func:`~paintseg.postprocess.snap_to_edges`; per plane of the whole image, so tiling
        does not change it). 0: the arg-max class. The probabilities are not changed; 3D
        models are not snapped (not measured).

    Returns
    -------
    SegmentResult

    Raises
    ------
    InputError
        The image does not fit the model (channels, dimensionality) or contains NaN.
    """
    t_start = time.perf_counter()
    keep_freed_memory()
    tiles = tiles or TileConfig()
    if not isinstance(image, ImageData):
        arr = image
        image = ImageData(data=arr, axes=(axes or guess_axes(np.shape(arr))).upper())
    elif axes:
        image = ImageData(image.data, axes.upper(), image.path, image.storage)
    name = str(image.path) if image.path is not None else "image"
    cfg = model.config
    out_axes, labels_shape, ldtype = output_spec(image, model, background_class=background_class)
    view = AxesView(image.data, image.axes, "C" + out_axes)
    if rows is not None:
        r0, r1 = int(rows[0]), int(rows[1])
        if not 0 <= r0 < r1 <= labels_shape[0]:
            raise ValueError(f"rows {rows} are not a range inside 0..{labels_shape[0]}")
        if scale != 1.0:
            raise ValueError("a block (rows) cannot be rescaled; rescale the whole image")
    else:
        r0, r1 = 0, labels_shape[0]
    out_shape = (r1 - r0, *labels_shape[1:])
    if scale != 1.0:
        return _segment_rescaled(
            view, model, scale=scale, out_axes=out_axes, tiles=tiles, device=device,
            background_class=background_class, labels_out=labels_out,
            probabilities_out=probabilities_out, return_probabilities=return_probabilities,
            progress=progress, should_stop=should_stop, name=name, t_start=t_start,
            intensity_range=intensity_range, snap=snap,
        )
    n_batch_axes = len(out_axes) - cfg.dims
    spatial = labels_shape[n_batch_axes:]

    if intensity_range is not None:
        lo, hi = (np.asarray(v, dtype=np.float32).reshape(-1) for v in intensity_range)
    else:
        lo, hi = percentile_range(view, model.normalization, name=name)
    messages: list[str] = []
    if np.any(hi - lo <= 1e-12):
        messages.append(f"{name}: image is constant (no contrast); segmentation is trivial")
    lo_b, inv_b = channel_scaling(lo, hi, view.ndim)
    check_finite = np.dtype(image.data.dtype).kind == "f"

    def transform(win: np.ndarray, start: tuple[int, ...]) -> np.ndarray:
        if check_finite and not np.isfinite(win).all():
            raise InputError(
                f"{name}: contains NaN or infinite values (in the tile at {start}); replace "
                "them before segmenting"
            )
        win -= lo_b
        win *= inv_b
        return win

    lut_values = label_values(model.class_values, background_class)
    if labels_out is None:
        labels_out = np.zeros(out_shape, dtype=ldtype)
    elif tuple(labels_out.shape) != out_shape:
        raise ValueError(f"labels_out has shape {labels_out.shape}, expected {out_shape}")
    if probabilities_out is None and return_probabilities:
        probabilities_out = np.zeros((cfg.classes, *out_shape), dtype=np.float32)

    # snapping borders to edges (2D models) needs whole planes: the slabs of a stack are
    # whole planes; the rows of a single image are kept (in the probabilities) until all are in
    if snap < 0:
        raise ValueError(f"snap must be 0 or more pixels, got {snap}")
    snap_in_sink = snap > 0 and cfg.dims == 2 and n_batch_axes > 0
    snap_later = None
    if snap > 0 and cfg.dims == 2 and n_batch_axes == 0:
        snap_later = probabilities_out if probabilities_out is not None else np.zeros(
            (cfg.classes, *out_shape), dtype=np.float32)

    def snapped(region: tuple[slice, ...], probs: np.ndarray) -> np.ndarray:
        """Labels of whole planes (``region``, image coordinates) of probabilities."""
        from .postprocess import semantic_labels

        x = np.asarray(view[(slice(None), *region)], dtype=np.float32)
        return semantic_labels(probs, model.class_values, background_class=background_class,
                               image=(x - lo_b) * inv_b, snap=snap).astype(ldtype, copy=False)

    network = model.network
    retry = OomRetry(tiles, resolve_device(device), align=cfg.align)

    def run_on(dev: torch.device, tile_cfg: TileConfig) -> tuple[TilePlan, int]:
        fixed = resolve_tiles(labels_shape, model, tile_cfg, device=dev)
        plan = _plan(labels_shape, cfg, fixed)
        batch = int(fixed.batch_size or 1)
        retry.ran_with(tile=min(int(fixed.tile or 0), max(spatial)), batch=batch)
        net = network.to_device(dev)
        net.eval()
        lut = torch.tensor(lut_values, dtype=torch.int64, device=dev)

        def sink(region: tuple[slice, ...], block: torch.Tensor) -> None:
            local = (slice(region[0].start - r0, region[0].stop - r0), *region[1:])
            if snap_in_sink:  # whole planes: snapped here, as they come
                probs = block.to("cpu").numpy()
                labels_out[local] = snapped(region, probs)
            elif snap_later is not None:  # rows of one image: snapped once all are in
                probs = block.to("cpu").numpy()
                snap_later[(slice(None), *local)] = probs
            else:
                labels_out[local] = lut[class_argmax(block)].to("cpu").numpy().astype(ldtype)
                probs = None
            if probabilities_out is not None and probabilities_out is not snap_later:
                probabilities_out[(slice(None), *local)] = (
                    probs if probs is not None else block.to("cpu").numpy())

        predict_tiled(
            view,
            _make_predictor(net, dev, autocast_type(fixed, dev)),
            classes=cfg.classes,
            plan=plan,
            batch_size=batch,
            device=dev,
            transform=transform,
            sink=sink,
            progress=progress,
            should_stop=should_stop,
            rows=(r0, r1),
        )
        return plan, batch

    plan, batch = retry.run(run_on)
    messages += retry.notes
    dev = retry.device
    network.to_device("cpu")
    if snap_later is not None:
        whole = (slice(r0, r1), *(slice(0, n) for n in out_shape[1:]))
        labels_out[...] = snapped(whole, np.asarray(snap_later))
    return SegmentResult(
        labels=labels_out,
        probabilities=probabilities_out,
        axes=out_axes,
        device=str(dev),
        plan=plan,
        batch_size=batch,
        seconds=time.perf_counter() - t_start,
        messages=messages,
    )


def scale_for(model: PaintsegModel, diameter: float | None) -> float:
    """Rescaling factor that brings objects of ``diameter`` pixels to the size ``model`` was
    trained on (1.0 when ``diameter`` is None).

    Raises
    ------
    InputError
        The model records no object size, or ``diameter`` is not positive.
    """
    if diameter is None:
        return 1.0
    trained = model.provenance.get("object_diameter")
    if not trained:
        raise InputError("an object diameter needs a model trained on instances (it records "
                         "the object size it learned); this model does not")
    if not diameter > 0:
        raise InputError(f"the object diameter must be positive, got {diameter}")
    return float(trained) / float(diameter)


def default_snap(model: PaintsegModel) -> int:
    """The snap distance a model's semantic labels get unless the user sets one:
    :data:`~paintseg.config.SNAP_PIXELS` for a model whose last training run was on strokes
    (their borders are undecided between the strokes), 0 for one trained on dense labels
    (every pixel of the painted planes labelled, :data:`~paintseg.config.DENSE_SHARE`), whose
    borders were learned. Models without a record of their training (the starter) count as
    trained on strokes; another tool's network from a BioImage.IO package gets 0."""
    if model.foreign:
        return 0  # another tool's network: its borders are its own
    runs = model.provenance.get("training") or [{}]
    share = runs[-1].get("painted_share", 0.0)
    return 0 if share is not None and share >= DENSE_SHARE else SNAP_PIXELS


def segment_labels(
    image: ImageData | np.ndarray,
    model: PaintsegModel,
    settings: SegmentSettings | None = None,
    *,
    device: str | torch.device = "auto",
    labels_out: Any = None,
    probabilities_out: Any = None,
    return_probabilities: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    intensity_range: tuple[np.ndarray, np.ndarray] | None = None,
) -> SegmentResult:
    """:func:`segment` followed by the postprocessing a user asked for: the one path that the
    CLI, the batch runner and the napari widget share, so their labels are identical.

    Parameters
    ----------
    settings : SegmentSettings, optional
        What to compute (output kind, minimum object size, snap, object diameter, axes of a
        plain array, tiling, background class); default: ``SegmentSettings()``. Its
        file-output fields (``probabilities``, ``overlay``, ``format``) are for a batch and
        are not used here.
    labels_out : array-like, optional
        Preallocated semantic label output; must be None for instance output (the object
        count, and so the label type, is known only at the end).

    Other parameters are those of :func:`segment`.
    """
    s = settings or SegmentSettings()
    instances = wants_instances(model, s.output)
    if instances and labels_out is not None:
        raise ValueError("instance labels are returned in memory; labels_out must be None")
    result = segment(
        image, model, axes=s.axes, tiles=s.tiles, device=device,
        background_class=s.background_class, labels_out=labels_out,
        probabilities_out=probabilities_out,
        return_probabilities=return_probabilities or instances, progress=progress,
        should_stop=should_stop, scale=scale_for(model, s.diameter),
        intensity_range=intensity_range,
        snap=0 if instances else (default_snap(model) if s.snap is None else s.snap),
    )
    if instances:
        from .postprocess import instances_per_image

        result.labels = instances_per_image(
            np.asarray(result.probabilities), dims=model.config.dims, min_size=s.min_size
        )
        if not (return_probabilities or probabilities_out is not None):
            result.probabilities = None
    return result
