"""The networks of paintseg in plain PyTorch: the fixed filter bank and the U-Net.

This module imports nothing but torch and the standard library, so that it can travel on its
own: a BioImage.IO package exported by paintseg ships it as the architecture source of its
``pytorch_state_dict`` weights (:class:`ExportedUNet`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # never imported at run time: the file must stand alone
    from .config import ModelConfig

__all__ = ["ChannelNorm", "FeatureMemo", "FilterBank", "UNet", "ExportedUNet", "autocast_context",
           "preferred_layout"]


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


class _WSConv(nn.Module):
    """A 3x3 (3x3x3) convolution with scaled weight standardisation (Brock et al., 2021):
    each output channel's weights are centred and scaled to unit sum of squares (variance
    1 / fan-in) before use, times a learnt gain. Like a plain convolution it uses no
    statistics of the input, so tiles reproduce the whole image; unlike one, the scale of its
    output follows its gain, not the size its weights grow to in training."""

    def __init__(self, cin: int, cout: int, dims: int) -> None:
        super().__init__()
        self.dims = dims
        w = torch.empty(cout, cin, *([3] * dims))
        nn.init.kaiming_normal_(w, nonlinearity="relu")
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.gain = nn.Parameter(torch.full((cout, *([1] * (dims + 1))), math.sqrt(2.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        axes = tuple(range(1, w.ndim))
        w = w - w.mean(axes, keepdim=True)
        # each output channel's weights: unit sum of squares (variance 1 / fan-in), times a gain
        w = w * torch.rsqrt(w.square().sum(axes, keepdim=True) + 1e-4) * self.gain
        conv = F.conv2d if self.dims == 2 else F.conv3d
        return conv(x, w, self.bias, padding=1)


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
        self._per_channel = 1 + 5 * len(self.sigmas)
        self.out_channels = in_channels * self._per_channel
        #: Outputs to reuse for inputs seen before (None: every input is filtered).
        self.memo: FeatureMemo | None = None
        #: Convolve through the FFT (True), directly (False), or as suits the device (None).
        #: An ONNX export takes direct convolutions: ONNX's DFT is less exact.
        self.use_fft: bool | None = None

    def derivative_channels(self) -> list[int]:
        """Indices of the output channels that ``derivative_gain`` multiplies (gradient
        magnitude, Laplacian and the two Hessian features of every channel and scale)."""
        per = self._per_channel
        return [c * per + 1 + 5 * i + j for c in range(self.out_channels // per)
                for i in range(len(self.sigmas)) for j in (1, 2, 3, 4)]

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

    def _fft(self, x: torch.Tensor, taps: int) -> bool:
        """Whether a kernel of ``taps`` goes through the FFT: as :attr:`use_fft` says, or
        (None) always on the CPU and for long kernels elsewhere."""
        if self.use_fft is not None:
            return self.use_fft
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
    normalisation layers (``norm`` ``"none"`` or ``"weight"``) on the CPU and on CUDA, the
    default layout otherwise (Apple MPS included). The timings behind it:
    docs/inference.md, "Memory layout".
    """
    if config.norm not in ("none", "weight") or device.type not in ("cpu", "cuda"):
        return torch.contiguous_format
    return torch.channels_last if config.dims == 2 else torch.channels_last_3d


def _activation(name: str) -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True) if name == "leaky_relu" else nn.ReLU(inplace=True)


def _conv3(cin: int, cout: int, dims: int, norm: str) -> nn.Module:
    """A same-padded 3x3 (3x3x3) convolution for a block of ``norm``: with standardised
    weights for ``"weight"``, with a bias where no normalisation layer follows it."""
    if norm == "weight":
        return _WSConv(cin, cout, dims)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return conv(cin, cout, 3, padding=1, bias=norm == "none")


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, dims: int, norm: str,
                 activation: str = "relu") -> None:
        super().__init__(
            _conv3(cin, cout, dims, norm),
            _norm(norm, cout, dims),
            _activation(activation),
            _conv3(cout, cout, dims, norm),
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

    def member_parameters(self) -> list[list[nn.Parameter]]:
        """Each member's weights: the first member's are the network's own (with the filter
        bank's, if it has any), the others' those of ``extra_members``."""
        extra = {id(p) for p in self.extra_members.parameters()}
        first = [p for p in self.parameters() if id(p) not in extra]
        return [first, *(list(m.parameters()) for m in self.extra_members)]

    def set_derivative_gain(self, gain: float) -> None:
        """Give the filter bank derivative gain ``gain``, with the first layer of every member
        rescaled on the derivative channels so that the network computes the same function
        (what changes is how fast training moves the weights on those channels). Not for
        ``norm="weight"``, whose standardisation would undo the rescaling."""
        if self.filters is None or not gain > 0:
            raise ValueError(f"a filter bank and a gain > 0 expected, got {gain}")
        if self.config.norm == "weight":
            # standardised weights: rescaling some of a layer's inputs' weights is undone
            raise ValueError("the derivative gain of a network with standardised weights "
                             "(norm 'weight') cannot change without changing its function")
        idx = self.filters.derivative_channels()
        with torch.no_grad():
            for member in (self, *self.extra_members):
                member.down[0][0].weight[:, idx] *= self.filters.gain / gain
        self.filters.gain = float(gain)
        self.config = dataclasses.replace(self.config, derivative_gain=float(gain))

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

    def member_logits(self, x: torch.Tensor, *,
                      autocast: torch.dtype | None = None) -> torch.Tensor:
        """Each member's logits, ``(members, N, classes, *spatial)``, float32: what training
        fits, each member to the targets on its own.

        With ``autocast`` (``torch.bfloat16``), the members' layers run in that type under
        :func:`torch.autocast` on ``x``'s device; the filter bank stays in float32 (its
        responses are differences of nearby smoothed values, which 8 bits of mantissa would
        round away)."""
        return torch.stack(self._members(x, autocast=autocast))

    def forward(self, x: torch.Tensor, *, autocast: torch.dtype | None = None) -> torch.Tensor:
        """Logits ``(N, classes, *spatial)``, float32 (with several members, the log of their
        mean class probabilities); ``autocast`` as in :meth:`member_logits`."""
        out = self._members(x, autocast=autocast)
        if len(out) == 1:
            return out[0]
        # the log of the members' mean class probabilities: its softmax is their average
        return torch.logsumexp(torch.log_softmax(torch.stack(out), 2), 0) - math.log(len(out))

    def _members(self, x: torch.Tensor, *,
                 autocast: torch.dtype | None = None) -> list[torch.Tensor]:
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
        with autocast_context(x, autocast):
            out = [_body_forward(self, x), *(m(x) for m in self.extra_members)]
        if autocast is not None:
            out = [o.float() for o in out]
        if any(pads):
            crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
            out = [o[crop] for o in out]
        # logits in the default layout, whatever the layers ran in (a few channels: cheap)
        return [o.contiguous() for o in out]


def autocast_context(x: torch.Tensor, dtype: torch.dtype | None) -> Any:
    """:func:`torch.autocast` to ``dtype`` on ``x``'s device; no context for None (float32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type,
                                                                           dtype=dtype)


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


class ExportedUNet(UNet):
    """A :class:`UNet` built from plain keyword arguments that returns class probabilities.

    The form BioImage.IO consumers instantiate: ``ExportedUNet(**kwargs)`` with the fields of
    paintseg's ``ModelConfig`` as keywords, then ``load_state_dict`` with the weights of the
    paintseg network (the same parameter names). ``forward`` takes an image normalised as
    paintseg normalises it, ``(N, in_channels, *spatial)``, with spatial sizes multiples of
    ``2**depth``, and returns the softmax over the classes, ``(N, classes, *spatial)``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("features", ())
        kwargs["features"] = tuple(float(s) for s in kwargs["features"])
        config = types.SimpleNamespace(**kwargs, align=2 ** int(kwargs["depth"]))
        super().__init__(config)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=1)
