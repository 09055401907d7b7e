"""Frozen configuration dataclasses with a JSON round trip.

These are the settings a checkpoint stores (:class:`ModelConfig`, :class:`NormConfig`), the
settings of tiled inference (:class:`TileConfig`), of segmentation (:class:`SegmentSettings`,
shared by the CLI, the napari widget and a batch) and of training (:class:`TrainConfig`). They
are plain data (no torch, no arrays), validate themselves when built and raise
:class:`~paintseg.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["ModelConfig", "NormConfig", "TileConfig", "TrainConfig", "SegmentSettings",
           "to_json", "from_json", "DEFAULT_BLOCK_BYTES", "SNAP_PIXELS", "DENSE_SHARE", "OUTPUTS",
           "FORMATS", "PRECISIONS"]

T = TypeVar("T")

NORMS = ("layer", "batch", "group", "none", "weight")
UPSAMPLINGS = ("transpose", "upsample")
ACTIVATIONS = ("relu", "leaky_relu")


#: Stacks larger than this are segmented in blocks where needed (see :mod:`paintseg.blocks`).
DEFAULT_BLOCK_BYTES = 512 * 2**20

#: How far (pixels) class borders of a 2D model's semantic labels may move to the image's
#: nearest edge by default (:func:`paintseg.postprocess.snap_to_edges`; why: docs/training.md),
#: for a model trained on strokes; a model trained on dense labels is not snapped
#: (:func:`paintseg.inference.default_snap`).
SNAP_PIXELS = 8

#: A training run counts as dense labels when the planes (2D models) or images (3D models)
#: that hold paint have at least this share of their pixels painted
#: (:func:`paintseg.training.painted_share`).
DENSE_SHARE = 0.9

#: Number types the U-Nets may run in, in training (:attr:`TrainConfig.precision`) and in
#: segmentation (:attr:`TileConfig.precision`).
PRECISIONS = ("auto", "float32", "bfloat16")

#: The axes letters paintseg knows: time, depth, channels, rows, columns.
AXES = "TZCYX"


def axes_letters(axes: str) -> str:
    """A user's axes string as paintseg reads it: upper case, S (samples) read as C."""
    return axes.upper().replace("S", "C")


def distinct_axes(letters: str) -> bool:
    """Whether ``letters`` (as :func:`axes_letters` gives them) are letters of :data:`AXES`,
    each at most once."""
    return bool(letters) and not set(letters) - set(AXES) and len(set(letters)) == len(letters)


#: What :class:`SegmentSettings` may ask for: the model's own kind of labels, class values,
#: or numbered objects.
OUTPUTS = ("auto", "semantic", "instances")

#: Output file formats: TIFF files or OME-Zarr folders.
FORMATS = ("tiff", "zarr")


def _check_precision(value: Any) -> None:
    """Refuse a precision that is not one of :data:`PRECISIONS`."""
    if value not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a U-Net.

    Parameters
    ----------
    dims : int
        2 for a 2D (YX) network, 3 for a 3D (ZYX) network.
    in_channels : int
        Number of image channels the network takes.
    classes : int
        Number of output classes (channels of the probability map).
    depth : int
        Number of 2x down-sampling steps. Spatial sizes are padded to a multiple of
        ``2**depth`` internally.
    base_features : int
        Feature maps at full resolution; doubled at every level.
    norm : str
        ``"layer"`` (per-pixel normalisation over channels: independent of tile size, batch
        and patch content, so tiled inference can reproduce untiled inference exactly),
        ``"batch"``, ``"group"`` (statistics over the whole tile: tiled output then depends on
        the tile), ``"none"`` or ``"weight"`` (no normalisation layer; each 3x3 convolution's
        weights standardised per output channel, times a learnt gain: like ``"none"``, tiles
        reproduce the whole image).
    upsampling : str
        ``"transpose"`` (2x transposed convolution) or ``"upsample"`` (nearest + 1x1 conv).
    features : tuple of float
        Scales (sigma, pixels) of a fixed filter bank in front of the network: per scale the
        Gaussian-smoothed image, its gradient magnitude, Laplacian of Gaussian and Hessian
        eigenvalues, per channel (ilastik's features). Empty: the raw image only.
    derivative_gain : float
        Factor on the filter bank's derivative channels (gradient magnitude, Laplacian,
        Hessian) against the smoothed ones. Below 1 a freshly initialised network leans on
        brightness first and on shape second, as a random forest on the same features does;
        1 leaves the responses as they are (models saved before this option existed).
    members : int
        Number of U-Nets of this shape behind the one filter bank, each trained on the same
        patches to the targets on its own, their class probabilities averaged. Small networks
        trained from strokes for a minute differ much from one start to the next where nothing
        is painted; their average differs less.
    activation : str
        ``"relu"`` or ``"leaky_relu"`` (slope 0.1 below zero). Without normalisation layers a
        ReLU layer can go silent for good (every channel negative on every input) and its
        network then predicts one constant; a leaky ReLU keeps a gradient. Checkpoints saved
        before this option existed are ReLU networks.
    """

    dims: int = 2
    in_channels: int = 1
    classes: int = 2
    depth: int = 4
    base_features: int = 32
    norm: str = "layer"
    upsampling: str = "transpose"
    features: tuple[float, ...] = ()
    derivative_gain: float = 1.0
    members: int = 1
    activation: str = "relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(float(s) for s in self.features))
        object.__setattr__(self, "derivative_gain", float(self.derivative_gain))
        if not 0 < self.derivative_gain <= 100:
            raise ConfigError(f"derivative_gain must be > 0 and <= 100, got {self.derivative_gain}")
        if any(not 0.3 <= s <= 32 for s in self.features):
            raise ConfigError(f"feature scales must be between 0.3 and 32, got {self.features}")
        _check_int("dims", self.dims, 2, 3)
        _check_int("in_channels", self.in_channels, 1, 64)
        _check_int("classes", self.classes, 1, 255)
        _check_int("depth", self.depth, 0, 6)
        _check_int("base_features", self.base_features, 1, 512)
        _check_int("members", self.members, 1, 16)
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.upsampling not in UPSAMPLINGS:
            raise ConfigError(f"upsampling must be one of {UPSAMPLINGS}, got {self.upsampling!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def align(self) -> int:
        """Spatial sizes and tile origins must be multiples of this (``2**depth``)."""
        return 2**self.depth

    @property
    def network_name(self) -> str:
        """What the network is, for people: ``"2D U-Net"``, ``"3 averaged 2D U-Nets"``."""
        net = f"{self.dims}D U-Net"
        return net if self.members == 1 else f"{self.members} averaged {net}s"


@dataclass(frozen=True)
class NormConfig:
    """Intensity normalisation applied to every image before the network.

    ``(x - p_low) / (p_high - p_low)`` per channel, where the percentiles are computed on the
    whole image (on a strided subsample of at most ``max_samples`` values for big stacks).
    With ``mode="mean_std"``, ``(x - mean) / (std + eps)`` per channel instead (another
    tool's BioImage.IO package that declares ``zero_mean_unit_variance``).

    Parameters
    ----------
    low, high : float
        Percentiles, ``0 <= low < high <= 100``.
    max_samples : int
        Largest number of values per channel the statistics are computed from.
    mode : str
        ``"percentile"`` (paintseg's own models) or ``"mean_std"``.
    eps : float
        Added to the standard deviation in ``"mean_std"`` mode.
    """

    low: float = 1.0
    high: float = 99.8
    max_samples: int = 4_000_000
    mode: str = "percentile"
    eps: float = 1e-6

    def describe(self) -> str:
        """How images are scaled, in a few words."""
        if self.mode == "mean_std":
            return "mean and standard deviation of each channel"
        return f"percentiles {self.low}-{self.high}"

    def to_json(self) -> dict[str, Any]:
        """The fields for a checkpoint: ``mode`` and ``eps`` only where they are not the
        defaults, so that percentile models stay readable by paintseg versions before them."""
        out = dataclasses.asdict(self)
        if self.mode == "percentile":
            out.pop("mode")
            out.pop("eps")
        return out

    def __post_init__(self) -> None:
        if self.mode not in ("percentile", "mean_std"):
            raise ConfigError(f"normalisation mode must be percentile or mean_std, got "
                              f"{self.mode!r}")
        if not 0.0 < float(self.eps) <= 0.1:
            raise ConfigError(f"eps must be in (0, 0.1], got {self.eps}")
        if not (0.0 <= float(self.low) < float(self.high) <= 100.0):
            raise ConfigError(
                f"percentiles must satisfy 0 <= low < high <= 100, got low={self.low}, "
                f"high={self.high}"
            )
        _check_int("max_samples", self.max_samples, 1000)


@dataclass(frozen=True)
class TileConfig:
    """How an image is cut into windows for inference.

    Parameters
    ----------
    tile : int or None
        Edge of the core of each tile, in pixels (rounded up to the model's alignment).
        ``None`` chooses it from ``memory_budget``: the whole image when it fits.
    halo : int or None
        Context added on each side of a core. ``None`` takes the model's receptive-field
        radius in ``"exact"`` mode and a small blended overlap otherwise.
    mode : str
        ``"blend"`` (default: moderate overlap, cores blended with a linear taper so no seam
        shows) or ``"exact"`` (halo covers the receptive field and cores are cropped: the
        output equals untiled inference up to float rounding).
    batch_size : int or None
        Tiles per forward pass; ``None`` chooses from the memory budget.
    memory_budget : int or None
        Bytes of working memory inference may use for activations; ``None`` takes a quarter
        of the available memory (of the GPU when running on one), at most 8 GiB.
    precision : str
        Number type of the U-Nets' layers (the filter bank, the probabilities and the
        blending stay float32; see :func:`paintseg.devices.inference_autocast`): ``"auto"``
        (default) is mixed precision on a CUDA device and on a CPU with bfloat16 matrix units
        (Intel AMX), float32 elsewhere and in ``"exact"`` mode; ``"float32"``; ``"bfloat16"``.
    """

    tile: int | None = None
    halo: int | None = None
    mode: str = "blend"
    batch_size: int | None = None
    memory_budget: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.tile is not None:
            _check_int("tile", self.tile, 1)
        if self.halo is not None:
            _check_int("halo", self.halo, 0)
        if self.mode not in ("blend", "exact"):
            raise ConfigError(f"mode must be 'blend' or 'exact', got {self.mode!r}")
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        if self.memory_budget is not None:
            _check_int("memory_budget", self.memory_budget, 1)
        _check_precision(self.precision)


@dataclass(frozen=True)
class SegmentSettings:
    """What to compute for each image: the one settings object that the CLI, the napari
    widget, :func:`paintseg.inference.segment_labels`, the stack blocks and a batch share.

    Parameters
    ----------
    output : str
        ``"auto"``, ``"semantic"`` or ``"instances"`` (see
        :func:`~paintseg.inference.wants_instances`).
    min_size : int
        Instances smaller than this many pixels (voxels) are removed.
    snap : int or None
        Semantic labels of 2D models: how far (pixels) class borders may move to the image's
        nearest edge (0: the arg-max class; see :func:`paintseg.postprocess.snap_to_edges`).
        ``None`` (default): the model's own (:func:`~paintseg.inference.default_snap`:
        :data:`SNAP_PIXELS` for a model trained on strokes, 0 for one trained on dense
        labels). Instances are not snapped.
    diameter : float or None
        Typical object diameter in the image, in pixels (rescales the image to the object
        size of a model trained on instances).
    background_class : int or None
        Class value written as 0 (``None``: every class value as is).
    probabilities : bool
        Batch: also write the class probabilities (float32, classes first).
    overlay : bool
        Batch: also write a PNG of the image with the label outlines.
    axes : str or None
        Axes of the input (letters of ``TZCYX``) when its metadata is missing or wrong, or
        when it is a plain array that is not YX / ZYX / TZYX.
    tiles : TileConfig
        Tiling (a dict of its fields is accepted, as read from JSON).
    format : str
        Batch outputs: ``"tiff"`` or ``"zarr"`` (OME-Zarr folders, which napari opens lazily).

    Raises
    ------
    ConfigError
        A value out of range, naming the setting and the value.
    """

    output: str = "auto"
    min_size: int = 30
    snap: int | None = None
    diameter: float | None = None
    background_class: int | None = 1
    probabilities: bool = False
    overlay: bool = False
    axes: str | None = None
    tiles: TileConfig = dataclasses.field(default_factory=TileConfig)
    format: str = "tiff"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ConfigError(f"output must be auto, semantic or instances, got {self.output!r}")
        _check_int("min_size (the minimum object size)", self.min_size, 0)
        if self.snap is not None:
            _check_int("snap (pixels)", self.snap, 0)
        if self.diameter is not None:
            if isinstance(self.diameter, bool) or not isinstance(self.diameter, (int, float)) \
                    or not 0 < self.diameter < float("inf"):
                raise ConfigError(
                    f"the object diameter must be a positive number, got {self.diameter!r}")
        if self.background_class is not None:
            _check_int("background_class", self.background_class, 0)
        if self.axes is not None:
            # io.parse_axes checks them again against each file's dimensions
            if not isinstance(self.axes, str) or not distinct_axes(axes_letters(self.axes)):
                raise ConfigError(f"axes must be distinct letters of TZCYX, got {self.axes!r}")
        if isinstance(self.tiles, dict):
            object.__setattr__(self, "tiles", from_json(TileConfig, self.tiles))
        elif not isinstance(self.tiles, TileConfig):
            raise ConfigError(f"tiles must be a TileConfig, got {type(self.tiles).__name__}")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be 'tiff' or 'zarr', got {self.format!r}")

    def replace(self, **changes: Any) -> SegmentSettings:
        """A copy with ``changes`` (validated again; an unknown name is a ConfigError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown SegmentSettings fields: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def to_json(obj: Any) -> str:
    """Serialise a config dataclass to a JSON string."""
    return json.dumps(dataclasses.asdict(obj), sort_keys=True)


def from_json(cls: type[T], text: str | dict[str, Any]) -> T:
    """Build a config dataclass from JSON (a string or an already parsed dict).

    Unknown keys are refused with a message naming them, so that a checkpoint from a newer
    paintseg is not silently misread.
    """
    data = json.loads(text) if isinstance(text, str) else dict(text)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**data)


STROKES_INTENSITY_SHIFT = 0.05
"""``TrainConfig.intensity_shift`` when training on strokes: 5% of the normalised range (by
default the span from the 1st to the 99.8th percentile of the image's intensities)."""

SMOOTHNESS_RAMP_STEPS = 300
"""Training steps over which the smoothness term's weight grows linearly from 0 to its full
value: the network first fits the strokes, then their borders are pulled onto edges."""


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune a U-Net on painted labels.

    Parameters
    ----------
    time_budget : float or None
        Seconds of training (the loop stops at the first step past it).
    steps : int or None
        Number of optimisation steps; with ``time_budget`` too, whichever comes first.
        With neither, 60 seconds.
    batch_size : int or None
        Patches per step; ``None``: 16 for 2D models, 4 for 3D models.
    patch_size : int or None
        Edge of the training patches; ``None``: 64 for 2D models, 32 for 3D models (small
        patches around the strokes: more steps per second where little is painted).
    learning_rate : float
        Peak learning rate of AdamW (warm-up, then cosine decay over the budget).
    weight_decay : float
        AdamW weight decay.
    validation_fraction : float
        Share of the painted pixels (taken as whole blocks of the image) held out to choose
        the weights kept: the latest, unless earlier ones (the starting weights included)
        scored clearly better there; 0 keeps the last weights.
    validate_every : float
        Seconds between validations (also validated before the first step and at the end).
    augment : str
        ``"flips"`` (default: flips and 90-degree rotations, true invariances of microscopy),
        ``"full"`` (also intensity scale / shift, noise and elastic deformation: for long
        training on dense labels) or ``"none"``. On short budgets the full set slows learning
        (docs/training.md, "Why the training defaults").
    intensity_shift : float or None
        Half-width of a random offset added to each training patch's normalised intensities
        (uniform in ``[-intensity_shift, intensity_shift]``, one per patch and channel), whatever
        ``augment`` says; 0 turns it off. ``None`` (default): :data:`STROKES_INTENSITY_SHIFT`
        when some training pixels are unpainted (strokes), 0 on dense labels, when
        training continues a model anchored to its predictions (the starting model has
        decided the brightness gap there) and in a live session
        (:data:`paintseg.training.live.LIVE_INTENSITY_SHIFT`: its strokes lie on borders).
        Strokes leave a gap in brightness between the classes; the offset puts the border in
        that gap (the haze of out-of-focus slices, dim objects) nearer its middle instead of
        where the network's start and batch order put it (docs/training.md, "Why the training
        defaults").
    dice_weight : float
        Weight of the soft Dice term added to the cross-entropy.
    ema : float
        Decay of an exponential moving average of the weights (0: none). The averaged
        weights are validated, kept and returned: smoother than the last step's on short
        budgets.
    anchor : float
        When continuing a trained model (its output layer kept), weight of a cross-entropy
        that pulls its predictions on the *unpainted* pixels of each patch toward those of the
        starting weights: correction strokes then change the result where they must and
        little elsewhere (0: none). Has no effect on a new model, a new output layer, or
        labels that leave no pixel unpainted (dense instance labels).
    smoothness : float
        Weight of a contrast-weighted smoothness term on every pixel of each patch, painted
        or not (0, the default: none): the predictions of two neighbouring pixels are pulled
        together, strongly where their intensities are alike and little across an edge, so
        that class borders between the strokes settle on the image's edges. Its weight grows
        from 0 over the first :data:`SMOOTHNESS_RAMP_STEPS` steps of a run. Off by default:
        it helped thin structures on a flat background and cost other kinds of data
        (docs/beyond-nuclei.md, "Borders on edges").
    grad_clip : float
        Largest norm of each member's gradient before the optimiser's step, a longer one
        scaled down to it (0: no limit): for one U-Net this limit, for averaged U-Nets the
        limit over their number (each member's share of the loss), so that each trains as it
        would alone. Why: docs/training.md, "Why the training defaults".
    precision : str
        Number type of the U-Nets' layers in a training step: ``"float32"``, ``"bfloat16"``
        (under :func:`torch.autocast`; the filter bank, the losses, the optimiser and the
        weights stay float32) or ``"auto"`` (default): bfloat16 on a CPU with bfloat16 matrix
        units (:func:`~paintseg.devices.cpu_has_bf16_units`: Intel AMX), float32 elsewhere.
        Validation, the kept weights and segmentation are float32 whatever it says; the run's
        training record names the type used. Why: docs/training.md, "Why the training
        defaults".
    seed : int or None
        Seed of sampling, augmentation and new weights (deterministic on the CPU).
    """

    time_budget: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    patch_size: int | None = None
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    validation_fraction: float = 0.15
    validate_every: float = 5.0
    augment: str = "flips"
    intensity_shift: float | None = None
    dice_weight: float = 1.0
    ema: float = 0.98
    anchor: float = 1.0
    smoothness: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.time_budget is not None and not float(self.time_budget) > 0:
            raise ConfigError(f"time budget must be positive, got {self.time_budget}")
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        if self.patch_size is not None:
            _check_int("patch_size", self.patch_size, 8)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.augment not in ("none", "flips", "full"):
            raise ConfigError(f"augment must be none, flips or full, got {self.augment!r}")
        if self.intensity_shift is not None and not 0.0 <= self.intensity_shift <= 1.0:
            raise ConfigError(
                f"intensity shift must be in [0, 1], got {self.intensity_shift}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not self.anchor >= 0:
            raise ConfigError(f"anchor must be >= 0, got {self.anchor}")
        if not self.smoothness >= 0:
            raise ConfigError(f"smoothness must be >= 0, got {self.smoothness}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"gradient clip must be >= 0, got {self.grad_clip}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        _check_precision(self.precision)

    @property
    def budget(self) -> tuple[float | None, int | None]:
        """(seconds, steps) with the 60-second default applied."""
        if self.time_budget is None and self.steps is None:
            return 60.0, None
        return self.time_budget, self.steps
