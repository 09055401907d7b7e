"""paintseg models: a network (:mod:`paintseg.network`) with its settings, and checkpoints.

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

from .config import ModelConfig, NormConfig, from_json
from .errors import CheckpointError
from .io import atomic_path
from .network import UNet, preferred_layout

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

    @property
    def package(self) -> dict[str, Any]:
        """The BioImage.IO package the model was read from (name, authors, licence, cite,
        file; ``foreign`` for another tool's network), or an empty dict."""
        return self.provenance.get("bioimageio") or {}

    @property
    def foreign(self) -> bool:
        """Whether the network is another tool's, from a BioImage.IO package."""
        return bool(self.package.get("foreign"))

    @property
    def frozen(self) -> bool:
        """Whether the network is another tool's without its architecture (TorchScript
        weights only): it segments but cannot train."""
        return self.foreign and not self.package.get("trainable")

    def describe(self) -> str:
        """A few human-readable lines saying what this model is."""
        c = self.config
        card = self.package
        if self.foreign:
            return "\n".join([
                f"BioImage.IO package {card.get('name', '')!r} (another tool's network), "
                f"{c.dims}D, {c.in_channels} input channel(s), {c.classes} classes",
                "classes: " + ", ".join(
                    f"{v}={n}" for v, n in zip(self.class_values, self.class_names)),
                f"normalisation: {self.normalization.describe()}",
                *_card_lines(card)])
        lines = [
            f"{c.network_name}, {c.in_channels} input channel(s), {c.classes} classes, "
            f"depth {c.depth}, {c.base_features} base features, "
            + ("standardised weights" if c.norm == "weight" else f"{c.norm} norm")
            + (", leaky ReLU" if c.activation == "leaky_relu" else ""),
            "classes: "
            + ", ".join(f"{v}={n}" for v, n in zip(self.class_values, self.class_names)),
            f"parameters: {sum(p.numel() for p in self.network.parameters()):,}",
        ]
        if c.features:
            gain = "" if c.derivative_gain == 1 else f"; derivative channels x{c.derivative_gain:g}"
            lines.append(f"filter bank: scales {', '.join(f'{x:g}' for x in c.features)}{gain}")
        norm = self.normalization
        lines.append(f"normalisation: {norm.describe()}")
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
        for note in prov.get("notes", []):  # what adapting the model changed
            lines.append(f"note: {note}")
        for entry in prov.get("training", []):
            lines.append(f"trained: {json.dumps(entry, sort_keys=True)}")
        if card:
            lines += [f"BioImage.IO package {card.get('name', '')!r}", *_card_lines(card)]
        return "\n".join(lines)


def _card_lines(card: dict[str, Any]) -> list[str]:
    """The authors, licence and citations of a BioImage.IO package, one line each."""
    return [f"{label}: {text}" for label, text in (
        ("authors", ", ".join(card.get("authors") or [])), ("licence", card.get("license")),
        ("cite", "; ".join(card.get("cite") or []))) if text]


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
    if model.foreign:
        raise CheckpointError(
            f"cannot save {path}: this model came from another tool's BioImage.IO package "
            f"({model.package.get('name', '')}), which a paintseg checkpoint "
            "cannot hold; write a package (Export…, or paintseg train --out NAME.zip)")
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
        "normalization": model.normalization.to_json(),
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
        if model.foreign:  # the package itself travels
            return Path(model.package["file"]).read_bytes()
        buf = io.BytesIO()
        torch.save(_payload(model), buf)
        return buf.getvalue()
    load_model(model)  # a clear error here rather than on every worker
    return resolve_model(model).read_bytes()


def load_model_bytes(data: bytes, *, name: str = "checkpoint") -> PaintsegModel:
    """:func:`load_model` for a checkpoint or BioImage.IO package held in memory (same
    checks; no code is executed for a checkpoint)."""
    from .exchange import is_package

    if is_package(data):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="paintseg-package-") as tmp:
            path = Path(tmp) / "package.zip"
            path.write_bytes(data)
            from .exchange import load_package

            model = load_package(path)
            model.provenance["bioimageio"]["file"] = name
            return model
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
        The checkpoint file, a bundled model's name, or a BioImage.IO model package (a zip;
        see :func:`paintseg.exchange.load_package`).
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
    from .exchange import is_package

    if is_package(path):
        from .exchange import load_package

        return _check_fit(load_package(path), path, in_channels=in_channels, dims=dims)
    if path.suffix.lower() == ".zip":
        raise CheckpointError(
            f"{path} is not a BioImage.IO model package (a damaged or truncated zip, or a zip "
            "without rdf.yaml / bioimageio.yaml)")
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
    return _check_fit(_from_payload(payload, str(path)), path, in_channels=in_channels,
                      dims=dims)


def _check_fit(model: PaintsegModel, path: Path, *, in_channels: int | None,
               dims: int | None) -> PaintsegModel:
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
