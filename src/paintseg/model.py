"""U-Net for 2D and 3D images, and paintseg checkpoints.

A checkpoint is one file holding the weights, the :class:`~paintseg.config.ModelConfig`, the
:class:`~paintseg.config.NormConfig`, the class values and names, and provenance. It is written
atomically and read with ``torch.load(weights_only=True)``, so loading never executes pickled
code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import platform
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, NormConfig, from_json
from .errors import CheckpointError
from .io import atomic_path

__all__ = [
    "model_bytes",
    "load_model_bytes",
    "UNet",
    "PaintsegModel",
    "new_model",
    "save_model",
    "load_model",
    "receptive_field",
    "preferred_layout",
    "exact_halo",
    "bundled_models",
    "default_class_names",
    "resolve_model",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "paintseg-checkpoint"
CHECKPOINT_VERSION = 1


class ChannelNorm(nn.Module):
    """Layer normalisation over the channels of each pixel.

    Unlike batch or group normalisation it uses no statistics across pixels or samples, so
    the network is translation-equivariant (tiles reproduce the whole image) and behaves the
    same in training and evaluation, whatever the patches look like.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = x.ndim
        perm = (0, *range(2, nd), 1)
        inv = (0, nd - 1, *range(1, nd - 1))
        y = F.layer_norm(x.permute(perm), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(inv)


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "layer":
        return ChannelNorm(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def _gaussian_kernels(sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """1D Gaussian and its first and second derivatives (scale-normalised), and the radius."""
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    d1 = -x / sigma**2 * g * sigma  # sigma * dG/dx
    d2 = (x**2 / sigma**4 - 1 / sigma**2) * g * sigma**2  # sigma^2 * d2G/dx2
    d2 = d2 - d2.mean()  # no response to a constant image
    return g.float(), d1.float(), d2.float(), radius


# kernels at least this long are applied through the FFT (sigma >= 4); on the CPU every
# kernel is: there a direct convolution of one channel is several times slower than the FFT
# at every size (docs/inference.md, "The filter bank on the CPU")
_FFT_KERNEL = 25


class FeatureMemo:
    """The filter bank's output for the last few inputs it saw, for a caller that filters the
    same input again and again (live mode predicts the same view at every refresh; the image
    does not change, only the network after the filter bank).

    An input is found again only if it equals a remembered one exactly. The least recently
    used entries go first once the outputs pass ``max_bytes``; an output larger than that is
    not kept.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._items: list[tuple[torch.Tensor, torch.Tensor]] = []  # oldest first

    def lookup(self, x: torch.Tensor) -> torch.Tensor | None:
        """The remembered output for an input equal to ``x``, or None."""
        for i, (key, out) in enumerate(self._items):
            if (key.shape == x.shape and key.dtype == x.dtype and key.device == x.device
                    and torch.equal(key, x)):
                self._items.append(self._items.pop(i))
                self.hits += 1
                return out
        self.misses += 1
        return None

    def store(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Remember ``out`` as the output for ``x`` (both kept as they are: not to be changed
        in place afterwards)."""
        size = out.numel() * out.element_size()
        if size > self.max_bytes:
            return
        self._items.append((x.detach().clone(), out.detach()))
        while sum(o.numel() * o.element_size() for _, o in self._items) > self.max_bytes:
            self._items.pop(0)


class FilterBank(nn.Module):
    """Fixed multiscale filters in front of the U-Net (not trained).

    For each channel and scale: Gaussian smoothing, gradient magnitude, Laplacian of Gaussian
    and two Hessian features, with scale-normalised derivatives; the raw channels come first.
    In 2D the two features are the Hessian's eigenvalues; in 3D they are cheap bounds on its
    largest and smallest eigenvalues (extreme diagonal entry plus / minus the norm of the
    off-diagonal entries). Borders are reflected. The derivative channels are multiplied by
    ``derivative_gain``.
    """

    def __init__(self, in_channels: int, sigmas: Sequence[float], dims: int,
                 derivative_gain: float = 1.0) -> None:
        super().__init__()
        self.dims, self.sigmas = dims, tuple(sigmas)
        self.gain = float(derivative_gain)
        self.radius = max(_gaussian_kernels(s)[3] for s in self.sigmas)
        for i, s in enumerate(self.sigmas):
            g, d1, d2, _r = _gaussian_kernels(s)
            self.register_buffer(f"g{i}", g, persistent=False)
            self.register_buffer(f"d1_{i}", d1, persistent=False)
            self.register_buffer(f"d2_{i}", d2, persistent=False)
        # raw + per scale: smooth, gradient magnitude, LoG, two Hessian features
        self.out_channels = in_channels * (1 + 5 * len(self.sigmas))
        #: Outputs to reuse for inputs seen before (None: every input is filtered).
        self.memo: FeatureMemo | None = None

    def _along(self, x: torch.Tensor, k: torch.Tensor, axis: int, *,
               fft: bool | None = None, fx: torch.Tensor | None = None) -> torch.Tensor:
        """Valid correlation of ``x`` (N, 1, *spatial) with the 1D kernel ``k`` along
        ``axis``; through the FFT (``fft=None``: on the CPU, and for long kernels elsewhere)
        or as a direct convolution: the same numbers up to float rounding. ``fx``: the
        FFT path's transform of ``x`` along ``axis``, where the caller has it."""
        d = 2 + axis
        m = k.numel()
        if fft is None:
            fft = self._fft(x, m)
        if not fft:
            shape = [1, 1] + [1] * self.dims
            shape[d] = m
            return (F.conv2d if self.dims == 2 else F.conv3d)(x, k.view(shape))
        n = x.shape[d]
        shape = [1] * x.ndim
        shape[d] = -1
        spectrum = torch.fft.rfft(k.flip(0), n=n).view(shape)
        if fx is None:
            fx = torch.fft.rfft(x, n=n, dim=d)
        y = torch.fft.irfft(fx * spectrum, n=n, dim=d)
        return y.narrow(d, m - 1, n - m + 1)

    @staticmethod
    def _fft(x: torch.Tensor, taps: int) -> bool:
        """Whether a kernel of ``taps`` goes through the FFT: always on the CPU, for long
        kernels elsewhere."""
        return taps >= _FFT_KERNEL or x.device.type == "cpu"

    def _along_each(self, x: torch.Tensor, ks: Sequence[torch.Tensor], axis: int
                    ) -> list[torch.Tensor]:
        """:meth:`_along` of ``x`` with each of the kernels ``ks`` (all of one length); on
        the FFT path the transform of ``x`` is taken once for all of them (the same
        numbers)."""
        fft = self._fft(x, ks[0].numel())
        fx = torch.fft.rfft(x, n=x.shape[2 + axis], dim=2 + axis) if fft else None
        return [self._along(x, k, axis, fft=fft, fx=fx) for k in ks]

    def _derivatives(self, x: torch.Tensor, kernels: Sequence[torch.Tensor]
                     ) -> dict[tuple[int, ...], torch.Tensor]:
        """Gaussian derivatives of total order <= 2, keyed by the order along each axis;
        axis by axis, sharing the passes they have in common (and, through the FFT, the
        transform of each pass's input)."""
        level: dict[tuple[int, ...], torch.Tensor] = {(): x}
        for axis in range(self.dims):
            nxt = {}
            for orders, t in level.items():
                os_ = range(3 - sum(orders))
                for o, y in zip(os_, self._along_each(t, [kernels[o] for o in os_], axis)):
                    nxt[orders + (o,)] = y
            level = nxt
        return level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memo is not None:
            out = self.memo.lookup(x)
            if out is None:
                out = self._filter(x)
                self.memo.store(x, out)
            return out
        return self._filter(x)

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        spatial = x.shape[2:]
        flat = x.reshape(n * c, 1, *spatial)
        r = self.radius
        mode = "reflect" if min(spatial) > r else "replicate"
        padded = F.pad(flat, [r, r] * self.dims, mode=mode)
        feats = [flat]
        dims = self.dims

        def order(*axes: int) -> tuple[int, ...]:
            return tuple(axes.count(a) for a in range(dims))

        for i in range(len(self.sigmas)):
            g, d1, d2 = getattr(self, f"g{i}"), getattr(self, f"d1_{i}"), getattr(self, f"d2_{i}")
            ri = g.numel() // 2
            crop = r - ri
            xi = padded[(..., *[slice(crop, padded.shape[2 + a] - crop) for a in range(dims)])]
            der = self._derivatives(xi, (g, d1, d2))
            smooth = der[order()]
            grads = [der[order(a)] for a in range(dims)]
            second = {(a, b): der[order(a, b)] for a in range(dims) for b in range(a, dims)}
            gradmag = torch.sqrt(sum(gr * gr for gr in grads) + 1e-12)
            log = sum(second[(a, a)] for a in range(self.dims))
            if self.dims == 2:
                hxx, hyy, hxy = second[(0, 0)], second[(1, 1)], second[(0, 1)]
                half = torch.sqrt(((hxx - hyy) * 0.5) ** 2 + hxy * hxy + 1e-12)
                ev = [log * 0.5 + half, log * 0.5 - half]
            else:  # bounds on the largest / smallest eigenvalue (see the class docstring)
                off = torch.sqrt(sum(second[(a, b)] ** 2 for a in range(3)
                                     for b in range(a + 1, 3)) + 1e-12)
                diag = torch.stack([second[(a, a)] for a in range(3)])
                ev = [diag.max(0).values + off, diag.min(0).values - off]
            if self.gain != 1.0:
                gradmag, log, ev = gradmag * self.gain, log * self.gain, [e * self.gain for e in ev]
            feats += [smooth, gradmag, log, *ev]
        out = torch.cat(feats, 1)
        return out.reshape(n, -1, *spatial)


def preferred_layout(config: ModelConfig, device: torch.device) -> torch.memory_format:
    """The memory layout a network of ``config`` runs fastest in on ``device``.

    Channels-last (``torch.channels_last``, ``channels_last_3d`` in 3D) for a network without
    normalisation layers on the CPU and on CUDA, the default layout otherwise (Apple MPS
    included). The timings behind it: docs/inference.md, "Memory layout".
    """
    if config.norm != "none" or device.type not in ("cpu", "cuda"):
        return torch.contiguous_format
    return torch.channels_last if config.dims == 2 else torch.channels_last_3d


def _activation(name: str) -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True) if name == "leaky_relu" else nn.ReLU(inplace=True)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, dims: int, norm: str,
                 activation: str = "relu") -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bias = norm == "none"
        super().__init__(
            conv(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout, dims),
            _activation(activation),
            conv(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout, dims),
            _activation(activation),
        )


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. (2015) with same-padded convolutions.

    Parameters
    ----------
    config : ModelConfig
        Architecture. The network returns logits of shape ``(N, classes, *spatial)`` for an
        input of shape ``(N, in_channels, *spatial)``; spatial sizes that are not multiples of
        ``2**depth`` are padded internally and the output cropped back. With
        ``config.members > 1`` it holds that many U-Nets behind one filter bank, and returns
        the log of their mean class probabilities (its softmax is their average);
        :meth:`member_logits` gives each member's own logits.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        cin = config.in_channels
        self.filters: FilterBank | None = None
        if config.features:
            self.filters = FilterBank(cin, config.features, config.dims, config.derivative_gain)
            cin = self.filters.out_channels
        # the first member's layers sit on the network itself, so that a one-member network
        # (every checkpoint saved before members existed) keeps its parameter names
        _build_body(self, cin, config)
        self.extra_members = nn.ModuleList(
            [_Member(cin, config) for _ in range(config.members - 1)])

    def to_device(self, device: str | torch.device) -> UNet:
        """Move the network to ``device`` in the memory layout of :func:`preferred_layout`
        there, and return it; :meth:`forward` hands its layers their input in that layout."""
        device = torch.device(device)
        return self.to(device).to(memory_format=preferred_layout(self.config, device))

    def _layout(self) -> torch.memory_format:
        """The memory layout the weights are in (see :meth:`to_device`)."""
        w = self.down[0][0].weight
        if w.ndim == 4 and w.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if w.ndim == 5 and w.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
        return torch.contiguous_format

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits, ``(members, N, classes, *spatial)``: what training fits, each
        member to the targets on its own."""
        return torch.stack(self._members(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._members(x)
        if len(out) == 1:
            return out[0]
        # the log of the members' mean class probabilities: its softmax is their average
        return torch.logsumexp(torch.log_softmax(torch.stack(out), 2), 0) - math.log(len(out))

    def _members(self, x: torch.Tensor) -> list[torch.Tensor]:
        cfg = self.config
        if x.ndim != cfg.dims + 2:
            raise ValueError(
                f"expected a {cfg.dims + 2}-D tensor (N, C, *spatial), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} channels, got {x.shape[1]}")
        spatial = x.shape[2:]
        a = cfg.align
        pads = [(-s) % a for s in spatial]
        if any(pads):
            # F.pad takes pairs from the last axis backwards; replicate works for any size.
            pad_arg: list[int] = []
            for p in reversed(pads):
                pad_arg += [0, p]
            x = F.pad(x, pad_arg, mode="replicate")
        if self.filters is not None:
            x = self.filters(x)  # computed once, shared by the members
        layout = self._layout()
        if layout is not torch.contiguous_format:
            x = x.contiguous(memory_format=layout)
        out = [_body_forward(self, x), *(m(x) for m in self.extra_members)]
        if any(pads):
            crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
            out = [o[crop] for o in out]
        # logits in the default layout, whatever the layers ran in (a few channels: cheap)
        return [o.contiguous() for o in out]


def _build_body(module: nn.Module, cin: int, config: ModelConfig) -> None:
    """Give ``module`` the layers of one U-Net (encoder, decoder, output layer) on ``cin``
    input channels."""
    d, n = config.dims, config.norm
    conv = nn.Conv2d if d == 2 else nn.Conv3d
    feats = [config.base_features * 2**i for i in range(config.depth + 1)]
    module.down = nn.ModuleList()
    for f in feats[:-1]:
        module.down.append(_Block(cin, f, d, n, config.activation))
        cin = f
    module.bottom = _Block(cin, feats[-1], d, n, config.activation)
    module.up = nn.ModuleList()
    module.dec = nn.ModuleList()
    for i in reversed(range(config.depth)):
        if config.upsampling == "transpose":
            tconv = nn.ConvTranspose2d if d == 2 else nn.ConvTranspose3d
            module.up.append(tconv(feats[i + 1], feats[i], 2, stride=2))
        else:
            module.up.append(
                nn.Sequential(nn.Upsample(scale_factor=2.0), conv(feats[i + 1], feats[i], 1))
            )
        module.dec.append(_Block(2 * feats[i], feats[i], d, n, config.activation))
    module.head = conv(feats[0], config.classes, 1)


def _body_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the U-Net layers :func:`_build_body` gave ``module``, on aligned input."""
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    skips = []
    for block in module.down:
        x = block(x)
        skips.append(x)
        x = pool(x, 2)
    x = module.bottom(x)
    for up, block in zip(module.up, module.dec, strict=True):
        x = up(x)
        x = block(torch.cat([skips.pop(), x], dim=1))
    return module.head(x)


class _Member(nn.Module):
    """A further member of a :class:`UNet` with ``members > 1``: U-Net layers of its own on
    the shared filter bank's output."""

    def __init__(self, cin: int, config: ModelConfig) -> None:
        super().__init__()
        _build_body(self, cin, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _body_forward(self, x)


def receptive_field(config: ModelConfig) -> int:
    """Size of the receptive field of one output pixel along each axis, in pixels."""
    r, j = 1, 1
    if config.features:
        # the filter bank: a Gaussian of radius 3 sigma per axis, applied once per axis
        r += 2 * max(int(math.ceil(3 * s)) for s in config.features)
    for _ in range(config.depth):
        r += 4 * j  # two 3-wide convolutions
        r += j  # 2-wide max pool
        j *= 2
    r += 4 * j  # bottom block
    for _ in range(config.depth):
        j //= 2  # up-sampling maps one input pixel to a 2-wide block: no growth
        r += 4 * j
    return r


def class_argmax(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Index of the largest score along ``dim`` (the first on ties), as ``torch.argmax``
    gives for finite scores, in one pass a class: torch's own arg-max along an axis that is
    not the innermost is many times slower on the CPU (docs/inference.md)."""
    best = scores.select(dim, 0)
    index = torch.zeros(best.shape, dtype=torch.int64, device=scores.device)
    for k in range(1, scores.shape[dim]):
        s = scores.select(dim, k)
        better = s > best
        index.masked_fill_(better, k)
        best = torch.maximum(best, s)
    return index


def exact_halo(config: ModelConfig) -> int:
    """Context needed on each side of a tile for tiled inference to equal untiled inference.

    Half the receptive field, plus the asymmetry of aligned pooling (at most ``2**depth - 1``),
    rounded up to a multiple of ``2**depth`` so that tiles stay on the pooling grid.
    """
    a = config.align
    need = receptive_field(config) // 2 + a - 1
    return int(math.ceil(need / a) * a)


def default_class_names(class_values: Sequence[int]) -> tuple[str, ...]:
    """``("background", "class 2", ...)``: the first class is background by convention."""
    return ("background",) + tuple(f"class {v}" for v in list(class_values)[1:])


@dataclass
class PaintsegModel:
    """A network together with everything needed to apply it to new images.

    Attributes
    ----------
    network : UNet
        The torch module (on the CPU unless moved).
    config : ModelConfig
        Its architecture.
    normalization : NormConfig
        Intensity normalisation the network was trained with.
    class_values : tuple of int
        Label value of each output class (the painted values, 1..K).
    class_names : tuple of str
        A name per class, for display.
    provenance : dict
        Versions, creation time and training history.
    """

    network: UNet
    config: ModelConfig
    normalization: NormConfig = field(default_factory=NormConfig)
    class_values: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = self.config.classes
        if not self.class_values:
            self.class_values = tuple(range(1, k + 1))
        if not self.class_names:
            self.class_names = default_class_names(self.class_values)
        self.class_values = tuple(int(v) for v in self.class_values)
        self.class_names = tuple(str(n) for n in self.class_names)
        if len(self.class_values) != k or len(self.class_names) != k:
            raise ValueError(
                f"the model has {k} classes but {len(self.class_values)} class values and "
                f"{len(self.class_names)} class names were given"
            )
        if len(set(self.class_values)) != k or min(self.class_values) < 1:
            raise ValueError(f"class values must be distinct and >= 1, got {self.class_values}")

    def describe(self) -> str:
        """A few human-readable lines saying what this model is."""
        c = self.config
        lines = [
            f"{c.network_name}, {c.in_channels} input channel(s), {c.classes} classes, "
            f"depth {c.depth}, {c.base_features} base features, {c.norm} norm"
            + (", leaky ReLU" if c.activation == "leaky_relu" else ""),
            "classes: "
            + ", ".join(f"{v}={n}" for v, n in zip(self.class_values, self.class_names)),
            f"parameters: {sum(p.numel() for p in self.network.parameters()):,}",
        ]
        if c.features:
            gain = "" if c.derivative_gain == 1 else f"; derivative channels x{c.derivative_gain:g}"
            lines.append(f"filter bank: scales {', '.join(f'{x:g}' for x in c.features)}{gain}")
        norm = self.normalization
        lines.append(f"normalisation: percentiles {norm.low}-{norm.high}")
        prov = self.provenance
        if prov.get("object_diameter"):
            lines.append(f"object diameter: about {float(prov['object_diameter']):.0f} px, the "
                         "size it learned (--diameter rescales images to it)")
        if prov.get("created"):
            lines.append(
                f"created {prov['created']} with paintseg {prov.get('paintseg', '?')}, "
                f"torch {prov.get('torch', '?')}"
            )
        if prov.get("note"):
            lines.append(f"note: {prov['note']}")
        for entry in prov.get("training", []):
            lines.append(f"trained: {json.dumps(entry, sort_keys=True)}")
        return "\n".join(lines)


def new_model(
    config: ModelConfig,
    *,
    class_values: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    normalization: NormConfig | None = None,
    seed: int | None = None,
) -> PaintsegModel:
    """Create a freshly initialised model.

    Parameters
    ----------
    config : ModelConfig
        Architecture.
    class_values, class_names : sequence, optional
        Default ``1..K`` and ``("background", "class 2", ...)``.
    normalization : NormConfig, optional
        Default percentiles 1-99.8.
    seed : int, optional
        Seed for the weight initialisation (reproducible weights).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = UNet(config)
    else:
        net = UNet(config)
    net.eval()
    return PaintsegModel(
        network=net,
        config=config,
        normalization=normalization or NormConfig(),
        class_values=tuple(class_values or ()),
        class_names=tuple(class_names or ()),
        provenance=_provenance(),
    )


def _provenance() -> dict[str, Any]:
    from . import __version__

    return {
        "paintseg": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "training": [],
    }


def bundled_models() -> dict[str, Path]:
    """Models shipped inside the package, by name (e.g. ``"nuclei"``)."""
    folder = Path(__file__).resolve().parent / "models"
    return {p.stem: p for p in sorted(folder.glob("*.pt"))}


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """A bundled model name or a path, as a path."""
    text = str(spec)
    bundled = bundled_models()
    if text in bundled and not Path(text).exists():
        return bundled[text]
    return Path(text)


def save_model(model: PaintsegModel, path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, then rename).

    Returns
    -------
    Path
        The path written.
    """
    path = Path(path)
    payload = _payload(model)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save model to {path}: folder {path.parent} does not exist")
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def _payload(model: PaintsegModel) -> dict[str, Any]:
    meta = {
        "model_config": dataclasses.asdict(model.config),
        "normalization": dataclasses.asdict(model.normalization),
        "class_values": list(model.class_values),
        "class_names": list(model.class_names),
        "provenance": model.provenance,
    }
    state = {k: v.detach().to("cpu").clone() for k, v in model.network.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "metadata": json.dumps(meta, sort_keys=True),
        "state_dict": state,
    }


def model_bytes(model: PaintsegModel | str | os.PathLike[str]) -> bytes:
    """A checkpoint as bytes (to send to other processes): of an in-memory model, or the
    file of a path or bundled name (checked by loading it first)."""
    if isinstance(model, PaintsegModel):
        buf = io.BytesIO()
        torch.save(_payload(model), buf)
        return buf.getvalue()
    load_model(model)  # a clear error here rather than on every worker
    return resolve_model(model).read_bytes()


def load_model_bytes(data: bytes, *, name: str = "checkpoint") -> PaintsegModel:
    """:func:`load_model` for a checkpoint held in memory (same checks, no code executed)."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign data
        raise CheckpointError(f"{name} cannot be read as a paintseg checkpoint: "
                              f"{exc.__class__.__name__}: {str(exc)[:200]}") from None
    return _from_payload(payload, name)


def load_model(
    path: str | os.PathLike[str],
    *,
    in_channels: int | None = None,
    dims: int | None = None,
) -> PaintsegModel:
    """Read a checkpoint written by :func:`save_model`.

    Parameters
    ----------
    path : path-like
        The checkpoint file.
    in_channels : int, optional
        If given, refuse a model made for another number of image channels.
    dims : int, optional
        If given, refuse a model of another dimensionality.

    Raises
    ------
    CheckpointError
        With a message naming the file: missing, not a checkpoint, truncated, or a mismatch.
    """
    path = resolve_model(path)
    if not path.exists():
        names = ", ".join(bundled_models()) or "none"
        raise CheckpointError(
            f"model file {path} does not exist (bundled models: {names})"
        )
    if path.is_dir():
        raise CheckpointError(f"model path {path} is a folder, not a checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a paintseg checkpoint (not a torch save file; truncated or another "
            "format)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged or foreign files
        raise CheckpointError(
            f"{path} cannot be read as a paintseg checkpoint (damaged, truncated, or it holds "
            f"code rather than plain weights): {exc.__class__.__name__}: {str(exc)[:200]}"
        ) from None
    model = _from_payload(payload, str(path))
    config = model.config
    if dims is not None and config.dims != dims:
        raise CheckpointError(
            f"{path} is a {config.dims}D model but a {dims}D model is needed here"
        )
    if in_channels is not None and config.in_channels != in_channels:
        raise CheckpointError(
            f"{path} expects images with {config.in_channels} channel(s) but the image has "
            f"{in_channels}"
        )
    return model


def _from_payload(payload: Any, path: str) -> PaintsegModel:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not a paintseg checkpoint (no '{CHECKPOINT_FORMAT}' "
            "marker)"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this paintseg reads up to "
            f"{CHECKPOINT_VERSION}: update paintseg"
        )
    try:
        meta = json.loads(payload["metadata"])
        config = from_json(ModelConfig, meta["model_config"])
        norm = from_json(NormConfig, meta["normalization"])
        net = UNet(config)
        net.load_state_dict(payload["state_dict"], strict=True)
        model = PaintsegModel(
            network=net,
            config=config,
            normalization=norm,
            class_values=tuple(meta["class_values"]),
            class_names=tuple(meta["class_names"]),
            provenance=dict(meta.get("provenance", {})),
        )
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint fails in many ways
        raise CheckpointError(
            f"{path} is a damaged paintseg checkpoint: {exc.__class__.__name__}: "
            f"{str(exc)[:300]}"
        ) from None
    net.eval()
    return model
