"""Model exchange with the BioImage Model Zoo (bioimage.io).

:func:`export_package` writes a paintseg model as a BioImage.IO model package (a zip, model
format 0.5) that deepImageJ, ilastik, QuPath and ``bioimageio.core`` run: TorchScript weights
and ``pytorch_state_dict`` weights with :mod:`paintseg.network` as their architecture source,
the filter bank inside the network, paintseg's percentile normalisation declared as the
spec's ``scale_range``, the tiling a consumer needs (halo, size step, minimum), test tensors,
a cover and a README with the training provenance; ONNX weights as well where ONNX Runtime
reproduces them.

:func:`load_package` reads a package back as a :class:`~paintseg.model.PaintsegModel`: a
package written by paintseg is rebuilt as the model it came from (the same network, classes
and settings); another tool's package with TorchScript or ``pytorch_state_dict`` weights,
axes ``bcyx`` / ``bczyx``, per-image scaling (``scale_range`` or ``zero_mean_unit_variance``)
and per-class outputs runs through
paintseg's tiled inference, and fine-tunes where its architecture comes with it. Anything
else is refused with one message saying what is not supported. The reasoning:
``docs/model-exchange.md``.

Both need the optional ``bioimageio`` extra (``pip install "napari-paintseg[bioimageio]"``);
paintseg imports without it. Nothing here reaches the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from torch import nn

from .config import ModelConfig, NormConfig, from_json
from .errors import CheckpointError, ConfigError, InputError
from .io import atomic_path
from .network import autocast_context

__all__ = ["export_package", "load_package", "is_package", "check_package", "require_extra",
           "sample_array",
           "bundled_sample", "tiling_info", "PackageNetwork", "EXTRA_HINT"]

#: What to tell a user whose installation lacks the optional dependencies.
EXTRA_HINT = ('BioImage.IO packages need the optional dependencies: '
              'pip install "napari-paintseg[bioimageio]"')

_RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
_PAINTSEG_CONFIG_VERSION = 1
_ONNX_OPSET = 18
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")
# the largest test tensor (per spatial axis) cut from the sample image
_TEST_EDGE = {2: (256, 256), 3: (32, 128, 128)}


def require_extra() -> None:
    """Raise :class:`ConfigError` with :data:`EXTRA_HINT` unless the ``bioimageio`` extra is
    installed (before work whose result would be a package)."""
    _spec()


def _spec() -> Any:
    try:
        import bioimageio.spec  # noqa: F401
        from bioimageio.spec.model import v0_5
    except ImportError:
        raise ConfigError(EXTRA_HINT) from None
    return v0_5


def is_package(source: str | os.PathLike[str] | bytes) -> bool:
    """Whether ``source`` (a path, or a file's bytes) is a zip holding a BioImage.IO resource
    description (a torch checkpoint is a zip too, without one)."""
    import io

    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            return any(n in _RDF_NAMES for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# --------------------------------------------------------------------------------- export


def _space_ids(dims: int) -> list[str]:
    return ["z", "y", "x"][3 - dims:]


def tiling_info(config: ModelConfig) -> list[tuple[int, int, int]]:
    """``(halo, min_size, step)`` declared for each spatial axis of an exported model.

    2D: the halo is the context a tile needs for its output to equal the untiled output
    (:func:`~paintseg.model.exact_halo`, from the receptive field): a consumer that pads and
    crops it gets paintseg's exact mode. 3D: a halo of the receptive field (72 voxels for the
    fast preset) would make the smallest tile 152^3 voxels, and the package's test tensors
    tens of megabytes; there the halo is the overlap paintseg's own tiles get in y and x
    (:func:`~paintseg.inference.default_halo`, blended there) and one pooling cell along z.
    Sizes are multiples of the pooling grid with at least one cell left once both halos are
    cut.
    """
    from .inference import default_halo
    from .model import exact_halo

    step = config.align
    if config.dims == 2:
        halos = [exact_halo(config)] * 2
    else:
        yx = default_halo(config, "blend")
        halos = [step, yx, yx]
    return [(h, 2 * h + step, step) for h in halos]


def _test_crop(sample: np.ndarray, config: ModelConfig, *, name: str) -> np.ndarray:
    """The centre of ``sample`` (C, *spatial), each axis cut to a multiple of the pooling grid
    no larger than :data:`_TEST_EDGE` (or the declared minimum, if larger)."""
    dims, step = config.dims, config.align
    if sample.ndim != dims + 1 or sample.shape[0] != config.in_channels:
        raise InputError(
            f"{name}: a sample of shape (channels, {'z, ' if dims == 3 else ''}y, x) = "
            f"({config.in_channels}, ...) is needed for this {dims}D model of "
            f"{config.in_channels} channel(s), got shape {sample.shape}")
    key: list[slice] = [slice(None)]
    for s, edge, (_h, least, _s) in zip(sample.shape[1:], _TEST_EDGE[dims],
                                        tiling_info(config)):
        n = min(s, max(edge, least)) // step * step
        if n < least:
            raise InputError(
                f"{name}: the sample is {tuple(sample.shape[1:])} pixels; this model's "
                f"package needs at least {tuple(t[1] for t in tiling_info(config))}")
        start = (s - n) // 2
        key.append(slice(start, start + n))
    return np.ascontiguousarray(sample[tuple(key)], dtype=np.float32)


def sample_array(image: Any, *, dims: int) -> np.ndarray:
    """A sample for :func:`export_package` from an :class:`~paintseg.io.ImageData` (or
    anything with ``data`` and ``axes``): ``(C, *spatial)``, the middle time point, and for a
    2D model the middle plane of a stack. Only that part is read."""
    data, axes = image.data, image.axes
    want = "C" + ("ZYX" if dims == 3 else "YX")
    if not set(want) - {"C"} <= set(axes):
        raise InputError(f"{getattr(image, 'path', None) or 'sample'}: axes {axes!r} do not "
                         f"hold a {dims}D image (a 3D model needs a Z axis)")
    key = tuple(data.shape[i] // 2 if a not in want else slice(None)
                for i, a in enumerate(axes))
    kept = "".join(a for a in axes if a in want)
    out = np.asarray(data[key])
    if "C" not in kept:
        out, kept = out[None], "C" + kept
    return np.transpose(out, [kept.index(a) for a in want])


def bundled_sample(dims: int) -> Path:
    """The sample image shipped with paintseg for a one-channel model of ``dims``."""
    name = "nuclei2d.tif" if dims == 2 else "nuclei3d.tif"
    return Path(__file__).resolve().parent / "sample_data" / name


def _normalised(x: np.ndarray, norm: NormConfig, eps: float) -> np.ndarray:
    """``x`` (C, *spatial) scaled per channel as the declared ``scale_range`` (or, in
    ``"mean_std"`` mode, ``zero_mean_unit_variance``) does."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    if norm.mode == "mean_std":
        lo, scale = flat.mean(1), flat.std(1) + norm.eps
    else:
        lo, hi = np.percentile(flat, (norm.low, norm.high), axis=1)
        scale = hi - lo + eps
    shape = (-1,) + (1,) * (x.ndim - 1)
    return ((x - lo.reshape(shape)) / scale.reshape(shape)).astype(np.float32)


def _exported_net(model: Any) -> nn.Module:
    """``model``'s network as the package ships it (:class:`~paintseg.network.ExportedUNet`:
    the same weights, class probabilities out), on the CPU in eval mode."""
    from .network import ExportedUNet

    net = ExportedUNet(**dataclasses.asdict(model.config))
    net.load_state_dict({k: t.detach().cpu() for k, t in model.network.state_dict().items()})
    return net.eval()


def _public_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """``provenance`` as a package shows it: image names without their folders, and no record
    of a package it was read from (a local path)."""
    out = {k: v for k, v in provenance.items() if k != "bioimageio"}
    out["training"] = [
        {**run, "images": [re.sub(r"\S*[/\\]", "", str(n)) for n in run.get("images") or []]}
        if "images" in run else run for run in provenance.get("training") or []]
    return _yaml_safe(out)


def _cover(image: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """A PNG of the test input (middle plane, first channel) beside it with the classes
    coloured over it (the background class left grey)."""
    from PIL import Image

    plane = image[0] if image.ndim == 3 else image[0, image.shape[1] // 2]
    lo, hi = np.percentile(plane, (1, 99.8))
    grey = np.clip((plane - lo) / max(hi - lo, 1e-12), 0, 1)
    cls = probs[0].argmax(0)
    cls = cls if cls.ndim == 2 else cls[cls.shape[0] // 2]
    palette = np.array([[0, 0, 0], [255, 80, 80], [80, 200, 255], [255, 220, 60],
                        [120, 255, 120], [230, 120, 255], [255, 160, 60]], np.float64)
    rgb = np.repeat(grey[..., None] * 255, 3, axis=2)
    over = rgb.copy()
    for k in range(1, int(cls.max()) + 1):
        mask = cls == k
        over[mask] = 0.45 * rgb[mask] + 0.55 * palette[1 + (k - 1) % (len(palette) - 1)]
    both = np.concatenate([rgb, np.full((rgb.shape[0], 4, 3), 255.0), over], axis=1)
    img = Image.fromarray(both.clip(0, 255).astype(np.uint8))
    # the spec wants a cover with an aspect ratio of 2:1 to 1:1
    w, h = img.size
    if w > 2 * h:
        canvas = Image.new("RGB", (w, math.ceil(w / 2)), (255, 255, 255))
        canvas.paste(img, (0, (canvas.size[1] - h) // 2))
        img = canvas
    img.save(path)


def _readme(model: Any, *, name: str, description: str,
            tiling: list[tuple[int, int, int]], sample_name: str) -> str:
    cfg = model.config
    runs = _public_provenance(model.provenance)["training"]
    lines = [
        f"# {name}", "", description, "",
        "Trained in paintseg (a napari plugin and command line tool for interactive "
        "segmentation with a U-Net) and exported as a BioImage.IO model.", "",
        "## Input and output", "",
        f"- Input: `{'bczyx' if cfg.dims == 3 else 'bcyx'}`, {cfg.in_channels} channel(s), "
        "float32, scaled per image and channel between its percentiles "
        f"{model.normalization.low:g} and {model.normalization.high:g} (declared as "
        "`scale_range`).",
        f"- Output: the probability of each class, `{'bczyx' if cfg.dims == 3 else 'bcyx'}`, "
        "one channel per class: " + ", ".join(
            f"`{n}` (label {v})" for v, n in zip(model.class_values, model.class_names)) + ".",
        "  The label image is the most likely class of each pixel. paintseg itself also moves "
        "class borders onto nearby image edges after training from strokes (its *snap*); "
        "consumers of this package get the network's probabilities only.",
        f"- Tiling: spatial sizes are multiples of {tiling[-1][2]}, at least "
        f"{' x '.join(str(t[1]) for t in tiling)}; the declared halo is "
        f"{' x '.join(str(t[0]) for t in tiling)} pixels on each side"
        + (" (the network's receptive field: tiles padded and cropped by it give the "
           "untiled result)." if cfg.dims == 2 else
           " (less than the receptive field, to keep 3D tiles small: tiles that overlap and "
           "blend, as paintseg's do, hide their borders)."), "",
        "## The network", "",
        model.describe().replace("\n", "  \n"), "",
        "The fixed filter bank (Gaussian smoothing, gradient magnitude, Laplacian and Hessian "
        "eigenvalues at several scales) is part of the network in every weight format.", "",
        "## Training", "",
    ]
    if runs:
        for r in runs:
            items = ", ".join(f"{k}: {v}" for k, v in sorted(r.items())
                              if isinstance(v, (int, float, str)))
            images = "; ".join(r.get("images") or []) or "not recorded"
            lines.append(f"- {r.get('steps', '?')} steps in {r.get('seconds', '?')} s on "
                         f"{images}. {items}")
    else:
        lines.append("- No training record.")
    lines += ["", "## Validation", ""]
    scored = [r for r in runs if "validation_iou" in r]
    if scored:
        lines.append(f"Mean IoU of the painted classes on held-out strokes at the end of the "
                     f"last training run: {scored[-1]['validation_iou']:.3f} (strokes are not "
                     "dense ground truth: this measures fit, not accuracy on new images).")
    else:
        lines.append("No validation score was recorded.")
    lines += ["", f"Test input: the centre of `{sample_name}`; the test output is paintseg's "
              "own prediction for it.", "",
              "## Limitations", "",
              "A model trained from a few strokes on a few images knows those images; check "
              "its result on yours, and paint corrections in paintseg where it is wrong.", ""]
    return "\n".join(lines)


def _yaml_safe(value: Any) -> Any:
    """``value`` with only the types YAML and the spec's validation take (JSON round trip)."""
    return json.loads(json.dumps(value, default=str))


def export_package(
    model: Any,
    path: str | os.PathLike[str],
    *,
    sample: np.ndarray,
    sample_name: str = "sample image",
    name: str | None = None,
    description: str | None = None,
    authors: Sequence[str] = (),
    license: str = "CC-BY-4.0",
    cite: Sequence[str] = (),
    cover: str | os.PathLike[str] | None = None,
    check: bool = True,
    onnx: bool | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write ``model`` as a BioImage.IO model package (a zip, model format 0.5).

    Parameters
    ----------
    model : PaintsegModel
        A paintseg model, or another tool's network fine-tuned in paintseg (written as its
        package again, see :func:`load_package`; ``license``, ``cite``, ``cover`` and
        ``onnx`` are then the original's).
    path : path-like
        The zip to write; written atomically (nothing is left behind on an error).
    sample : ndarray
        An image of the kind the model is for, ``(C, *spatial)`` with the model's channels;
        its centre (at most 256 x 256, or 32 x 128 x 128 in 3D) becomes the test input and
        the cover.
    sample_name : str
        Where the sample came from, for the README.
    name, description : str, optional
        Default: the file's name (with "paintseg" before a name under 5 characters, the
        spec's least) and a sentence from the model's classes.
    authors : sequence of str
        Names; default "paintseg user".
    license : str
        An SPDX licence identifier.
    cite : sequence of str
        DOIs (``10.xxx/...``) or URLs of works to cite; paintseg's U-Net reference is always
        included.
    cover : path-like, optional
        A PNG or JPEG to use as the cover instead of the one made from the test input.
    check : bool
        Run ``bioimageio.core``'s test of the package before writing it (a failing test
        raises and writes nothing).
    onnx : bool, optional
        Add ONNX weights: None adds them where ``onnx``, ``onnxscript`` and ``onnxruntime``
        are installed and ONNX Runtime reproduces the test output within 1e-4; True
        requires them; False leaves them out.
    notes : list, optional
        Receives what the user should know (e.g. why the ONNX weights were left out).

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    ConfigError
        The ``bioimageio`` extra is missing, or the package fails its test.
    InputError
        The sample does not fit the model.
    """
    v = _spec()
    from bioimageio.spec.generic.v0_3 import Author, CiteEntry, Doi, HttpUrl

    from . import network as network_module

    path = Path(path)
    if isinstance(model.network, PackageNetwork):
        return _repackage(model, path, sample=sample, sample_name=sample_name, name=name,
                          description=description, authors=authors, check=check)
    if path.suffix.lower() != ".zip":
        raise ConfigError(f"{path}: a BioImage.IO package is a .zip file")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: folder {path.parent} does not exist")
    cfg = model.config
    if name is None:
        stem = "".join(ch if ch in _NAME_CHARS else "-" for ch in path.stem)
        name = stem if len(stem) >= 5 else f"paintseg {stem}"
    elif not 5 <= len(name) <= 128 or any(ch not in _NAME_CHARS for ch in name):
        raise ConfigError(f"model name {name!r}: BioImage.IO takes 5 to 128 characters among "
                          "letters, digits, spaces and _+-()")
    classes = ", ".join(model.class_names)
    description = description or (
        f"{cfg.dims}D semantic segmentation into {cfg.classes} classes ({classes}), "
        "trained interactively in paintseg")
    notes = notes if notes is not None else []
    test_in = _test_crop(np.asarray(sample), cfg, name=sample_name)
    eps = 1e-6
    test_norm = _normalised(test_in, model.normalization, eps)
    exported = _exported_net(model)
    with torch.inference_mode():
        test_out = exported(torch.from_numpy(test_norm[None])).numpy()
    tiling = tiling_info(cfg)
    space = _space_ids(cfg.dims)

    with tempfile.TemporaryDirectory(prefix="paintseg-export-") as tmp:
        d = Path(tmp)
        np.save(d / "test_input.npy", test_in[None])
        np.save(d / "test_output.npy", test_out)
        tifffile.imwrite(d / "sample_input.tif", test_in[None], compression="zlib",
                         photometric="minisblack")
        tifffile.imwrite(d / "sample_output.tif", test_out, compression="zlib",
                         photometric="minisblack")
        torch.save({k: t.clone() for k, t in exported.state_dict().items()},
                   d / "weights_state_dict.pt")
        shutil.copyfile(network_module.__file__, d / "paintseg_network.py")
        with torch.inference_mode(False), torch.no_grad(), _quiet_trace():
            traced = torch.jit.trace(exported, torch.from_numpy(test_norm[None]))
        traced.save(str(d / "weights_torchscript.pt"))
        onnx_ok = False
        if onnx is not False:
            onnx_ok = _onnx_weights(exported, test_norm, test_out, d / "weights.onnx",
                                    notes=notes)
            if onnx and not onnx_ok:
                raise ConfigError(f"{path}: ONNX weights were asked for but " + notes[-1])
        if cover is not None:
            cover = Path(cover)
            if not cover.is_file() or cover.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                raise InputError(f"{cover}: the cover must be an existing PNG or JPEG file")
            cover_path = d / f"cover{cover.suffix.lower()}"
            shutil.copyfile(cover, cover_path)
        else:
            cover_path = d / "cover.png"
            _cover(test_in, test_out, cover_path)
        (d / "README.md").write_text(_readme(
            model, name=name, description=description, tiling=tiling,
            sample_name=sample_name), encoding="utf-8")

        in_axes: list[Any] = [v.BatchAxis(), v.ChannelAxis(channel_names=[
            v.Identifier(f"channel{i}") for i in range(cfg.in_channels)])]
        in_axes += [v.SpaceInputAxis(id=v.AxisId(a), size=v.ParameterizedSize(
            min=least, step=step)) for a, (_h, least, step) in zip(space, tiling)]
        out_axes: list[Any] = [v.BatchAxis(), v.ChannelAxis(channel_names=[
            v.Identifier(_identifier(n, i)) for i, n in enumerate(model.class_names)])]
        out_axes += [v.SpaceOutputAxisWithHalo(
            id=v.AxisId(a), halo=halo,
            size=v.SizeReference(tensor_id=v.TensorId("raw"), axis_id=v.AxisId(a)))
            for a, (halo, _m, _s) in zip(space, tiling)]
        norm = model.normalization
        inputs = [v.InputTensorDescr(
            id=v.TensorId("raw"), axes=in_axes,
            description="the image; any intensity range (it is scaled by percentiles)",
            test_tensor=v.FileDescr(source=d / "test_input.npy"),
            sample_tensor=v.FileDescr(source=d / "sample_input.tif"),
            preprocessing=[
                v.EnsureDtypeDescr(kwargs=v.EnsureDtypeKwargs(dtype="float32")),
                v.ZeroMeanUnitVarianceDescr(kwargs=v.ZeroMeanUnitVarianceKwargs(
                    axes=[v.AxisId(a) for a in space], eps=float(norm.eps)))
                if norm.mode == "mean_std" else
                v.ScaleRangeDescr(kwargs=v.ScaleRangeKwargs(
                    axes=[v.AxisId(a) for a in space], min_percentile=float(norm.low),
                    max_percentile=float(norm.high), eps=eps)),
            ])]
        outputs = [v.OutputTensorDescr(
            id=v.TensorId("probabilities"), axes=out_axes,
            description="probability of each class (softmax over the channels)",
            test_tensor=v.FileDescr(source=d / "test_output.npy"),
            sample_tensor=v.FileDescr(source=d / "sample_output.tif"),
            data=v.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))]
        kwargs = _yaml_safe(dataclasses.asdict(cfg))
        weights = v.WeightsDescr(
            pytorch_state_dict=v.PytorchStateDictWeightsDescr(
                source=d / "weights_state_dict.pt",
                architecture=v.ArchitectureFromFileDescr(
                    source=d / "paintseg_network.py", callable=v.Identifier("ExportedUNet"),
                    kwargs=kwargs),
                pytorch_version=v.Version(torch.__version__.split("+")[0])),
            torchscript=v.TorchscriptWeightsDescr(
                source=d / "weights_torchscript.pt", parent="pytorch_state_dict",
                pytorch_version=v.Version(torch.__version__.split("+")[0])),
            onnx=v.OnnxWeightsDescr(source=d / "weights.onnx", opset_version=_ONNX_OPSET,
                                    parent="pytorch_state_dict") if onnx_ok else None,
        )
        cites = [CiteEntry(text="Ronneberger, Fischer and Brox: U-Net (2015)",
                           doi=Doi("10.1007/978-3-319-24574-4_28"))]
        for c in cite:
            c = str(c).strip()
            if c.startswith("http"):
                cites.append(CiteEntry(text=c, url=HttpUrl(c)))
            else:
                cites.append(CiteEntry(text=c, doi=Doi(c.removeprefix("https://doi.org/"))))
        from . import __version__

        paintseg_config = {
            "format_version": _PAINTSEG_CONFIG_VERSION,
            "paintseg_version": __version__,
            "model_config": kwargs,
            "normalization": _yaml_safe(norm.to_json()),
            "class_values": [int(c) for c in model.class_values],
            "class_names": list(model.class_names),
            "provenance": _public_provenance(model.provenance),
        }
        _write(path, check=check, what="the model", describe=lambda: v.ModelDescr(
                name=name, description=description,
                authors=[Author(name=a) for a in (authors or ["paintseg user"])],
                cite=cites, license=license, covers=[v.FileDescr(source=cover_path)],
                documentation=v.FileDescr(source=d / "README.md"),
                tags=["segmentation", f"{cfg.dims}d", "paintseg", "unet", "pytorch"],
                inputs=inputs, outputs=outputs, weights=weights,
                config=v.Config(bioimageio=v.BioimageioConfig(
                    architecture_type="U-Net", task="semantic segmentation",
                    model_parameter_count=int(sum(p.numel() for p in
                                                  model.network.parameters()))),
                    paintseg=paintseg_config)))
    return path


def _write(path: Path, *, describe: Any, check: bool, what: str) -> None:
    """Build a model description with ``describe()`` (while its files exist), test it with
    bioimageio.core if ``check``, and write its package to ``path`` atomically."""
    from bioimageio.spec import save_bioimageio_package

    try:
        descr = describe()
    except Exception as exc:  # noqa: BLE001 - pydantic's validation errors
        raise ConfigError(f"cannot describe {what} for BioImage.IO: {_short(exc)}") from None
    if check:
        _check(descr, what=str(path))
    with atomic_path(path, suffix=".partial.zip") as out:
        save_bioimageio_package(descr, output_path=out)


def _repackage(model: Any, path: Path, *, sample: np.ndarray, sample_name: str,
               name: str | None, description: str | None, authors: Sequence[str],
               check: bool) -> Path:
    """Another tool's package again, with the fine-tuned state dict as its only weights
    (the TorchScript and ONNX of the original are stale) and a test output the new weights
    give; its architecture, processing and licence are the original's."""
    v = _spec()
    from bioimageio.spec import load_model_description

    net = model.network
    card = model.package
    if not net.trainable:
        raise ConfigError("only a network loaded with its architecture (fine-tuned in "
                          "paintseg) is written again: share the original package itself")
    if path.suffix.lower() != ".zip":
        raise ConfigError(f"{path}: a BioImage.IO package is a .zip file")
    src = Path(card.get("file", ""))
    if not src.is_file():
        raise ConfigError(f"the original package {src} is gone: it holds the architecture")
    descr = load_model_description(src, perform_io_checks=False)
    cfg = model.config
    test_in = _test_crop(np.asarray(sample), cfg, name=sample_name)
    inp, out = descr.inputs[0], descr.outputs[0]
    eps = float(next((p.kwargs.eps for p in inp.preprocessing
                      if p.id in ("scale_range", "zero_mean_unit_variance")), 1e-6))
    xn = torch.from_numpy(_normalised(test_in, model.normalization, eps)[None])
    net.to_device("cpu").eval()
    with torch.inference_mode():
        raw = net.module(xn)  # one pass: the test output, and the cover's probabilities
        probs = torch.softmax(net.log_probabilities(raw), 1).numpy()
    y = (raw[0] if isinstance(raw, (tuple, list)) else raw).float().numpy()
    runs = _public_provenance(model.provenance)["training"]
    with tempfile.TemporaryDirectory(prefix="paintseg-export-") as tmp:
        d = Path(tmp)
        np.save(d / "test_input.npy", test_in[None])
        np.save(d / "test_output.npy", y)
        torch.save({k: t.detach().cpu().clone() for k, t in net.module.state_dict().items()},
                   d / "weights_state_dict.pt")
        arch = descr.weights.pytorch_state_dict.architecture
        arch_file = d / Path(str(getattr(arch.source, "path", arch.source))).name
        arch_file.write_bytes(_read_member(src, arch.source))
        weights = v.WeightsDescr(pytorch_state_dict=v.PytorchStateDictWeightsDescr(
            source=d / "weights_state_dict.pt",
            architecture=v.ArchitectureFromFileDescr(source=arch_file, callable=arch.callable,
                                                     kwargs=dict(arch.kwargs)),
            pytorch_version=v.Version(torch.__version__.split("+")[0])))
        doc = d / "README.md"
        doc.write_text(
            f"# {name or descr.name}\n\n{description or descr.description}\n\n"
            f"Fine-tuned in paintseg from the BioImage.IO package '{descr.name}' "
            f"({', '.join(a.name for a in descr.authors)}), whose licence and citations it "
            f"keeps.\n\n## Training\n\n" + "\n".join(
                f"- {r.get('steps', '?')} steps in {r.get('seconds', '?')} s on "
                f"{'; '.join(r.get('images') or []) or 'images not recorded'}; validation "
                f"IoU {r.get('validation_iou')}" for r in runs) + "\n\n## Validation\n\n"
            "Measured on held-out strokes during training (above).\n", encoding="utf-8")
        _cover(test_in, probs, d / "cover.png")
        new_in = v.InputTensorDescr(**{**inp.model_dump(exclude={"test_tensor",
                                                               "sample_tensor"}),
                                       "test_tensor": v.FileDescr(source=d / "test_input.npy")})
        new_out = v.OutputTensorDescr(**{**out.model_dump(exclude={"test_tensor",
                                                                 "sample_tensor"}),
                                         "test_tensor": v.FileDescr(
                                             source=d / "test_output.npy")})
        _write(path, check=check, what="the fine-tuned model", describe=lambda: v.ModelDescr(
                name=name or descr.name, description=description or descr.description,
                authors=[v.Author(name=a) for a in authors] or list(descr.authors),
                cite=list(descr.cite), license=descr.license,
                covers=[v.FileDescr(source=d / "cover.png")],
                documentation=v.FileDescr(source=doc), tags=list(descr.tags),
                inputs=[new_in], outputs=[new_out], weights=weights,
                config=v.Config(paintseg_finetune={"from": descr.name, "training": runs})))
    return path


def _onnx_weights(net: nn.Module, test_norm: np.ndarray, test_out: np.ndarray, path: Path, *,
                  notes: list[str]) -> bool:
    """Export ``net`` (an :class:`~paintseg.network.ExportedUNet`) to ONNX at ``path`` with
    dynamic batch and spatial sizes and direct convolutions (ONNX's DFT is less exact than
    torch's FFT), and check it with ONNX Runtime on the normalised test input against the
    test output. False (with a note) where the packages are missing, the export fails or the
    outputs differ by more than 1e-4."""
    import importlib.util
    import io as _io
    import logging

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(m) is None]
    if missing:
        notes.append(f"no ONNX weights ({', '.join(missing)} not installed)")
        return False
    filters = getattr(net, "filters", None)
    before = filters.use_fft if filters is not None else None
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:
        if filters is not None:
            filters.use_fft = False
        x = torch.from_numpy(test_norm[None])
        dims = x.ndim - 2
        dyn = {0: torch.export.Dim("batch")}
        dyn.update({2 + i: torch.export.Dim(f"s{i}") for i in range(dims)})
        x2 = torch.cat([x, x])  # torch.export fixes an axis of size 1: batch 2 keeps it free
        onnx_log.setLevel(logging.ERROR)  # its notes on optional torchvision operators
        with _quiet_trace(), contextlib.redirect_stdout(_io.StringIO()), \
                contextlib.redirect_stderr(_io.StringIO()):
            torch.onnx.export(net, (x2,), str(path), dynamo=True, opset_version=_ONNX_OPSET,
                              input_names=["raw"], output_names=["probabilities"],
                              dynamic_shapes=(dyn,), external_data=False)
        import onnxruntime

        sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        err = float(np.abs(got - test_out).max())
    except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways
        notes.append(f"no ONNX weights (the export failed: {_short(exc, 200)})")
        return False
    finally:
        onnx_log.setLevel(level)
        if filters is not None:
            filters.use_fft = before
    if err > 1e-4:
        notes.append(f"no ONNX weights (ONNX Runtime differs from torch by {err:.1e})")
        path.unlink()
        return False
    return True


def _identifier(text: str, index: int) -> str:
    """``text`` as a spec identifier (letters, digits, underscores; starting with a letter)."""
    ident = "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")
    if not ident or not ident[0].isalpha():
        ident = f"class{index + 1}" + (f"_{ident}" if ident else "")
    return ident


@contextlib.contextmanager
def _quiet_trace() -> Iterator[None]:
    """Silence the tracers' warnings (deprecation, and shape checks that concern sizes off
    the pooling grid, which the package's declared step excludes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _short(exc: BaseException, limit: int = 600) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


def _check(descr: Any, *, what: str) -> None:
    """Run ``bioimageio.core``'s test of a model description; raise if it fails."""
    try:
        from bioimageio.core import test_model
    except ImportError:
        raise ConfigError(EXTRA_HINT) from None
    summary = test_model(descr)
    if summary.status != "passed":
        failed = [f"{d.name}: {'; '.join(e.msg for e in d.errors)[:300]}"
                  for d in summary.details if d.status == "failed"]
        raise ConfigError(f"{what}: the package fails bioimageio's test: "
                          + " | ".join(failed[:3]))


def check_package(path: str | os.PathLike[str]) -> Any:
    """``bioimageio.core.test_model`` of a package file: its validation summary (``status``
    is ``"passed"`` when the package loads and reproduces its test outputs)."""
    try:
        from bioimageio.core import test_model
    except ImportError:
        raise ConfigError(EXTRA_HINT) from None
    return test_model(str(path))


# --------------------------------------------------------------------------------- import


class PackageNetwork(nn.Module):
    """Another tool's network from a BioImage.IO package, in the form paintseg's inference
    takes: :meth:`forward` returns log-probabilities (or logits) of the classes.

    Parameters
    ----------
    module : nn.Module
        The package's network (TorchScript or its architecture with the state dict).
    config : ModelConfig
        ``dims``, ``in_channels``, ``classes`` and the pooling grid (``depth``) it needs.
    outputs : str
        What the module returns: ``"probabilities"``, ``"logits"`` (a softmax over the
        channels follows) or ``"sigmoid"`` (a sigmoid of each channel follows). A single
        channel is the foreground of two classes, background and foreground.
    trainable : bool
        Whether ``module`` is the package's architecture with its state dict (it trains),
        rather than its TorchScript (inference only).
    halo : int, optional
        The halo the package declares on its output (its tiles' overlap in paintseg).
    """

    def __init__(self, module: nn.Module, config: ModelConfig, *, outputs: str,
                 trainable: bool = False, halo: int | None = None) -> None:
        super().__init__()
        self.module = module
        self.config = config
        self.outputs = outputs
        self.trainable = trainable
        #: The overlap the package declares for tiles (None: paintseg's default).
        self.halo = halo
        self.filters = None

    def member_logits(self, x: torch.Tensor, *,
                      autocast: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`forward` as the one member paintseg's training fits (a network loaded
        with ``trainable=True``: its architecture with the state dict), float32; with
        ``autocast``, the module runs under :func:`torch.autocast` in that type."""
        if not self.trainable:
            raise InputError("this network was loaded for inference only (TorchScript)")
        return self.forward(x, autocast=autocast)[None]

    def member_parameters(self) -> list[list[nn.Parameter]]:
        """The weights of the one member (what ``TrainConfig.grad_clip`` clips as one)."""
        return [list(self.parameters())]

    def to_device(self, device: str | torch.device) -> PackageNetwork:
        """Move the network to ``device`` and return it."""
        return self.to(torch.device(device))

    def forward(self, x: torch.Tensor, *, autocast: torch.dtype | None = None) -> torch.Tensor:
        """Log-probabilities (float32) of ``x``; with ``autocast``, the module runs under
        :func:`torch.autocast` in that type."""
        with autocast_context(x, autocast):
            y = self.module(x)
        return self.log_probabilities(y)

    def log_probabilities(self, y: Any) -> torch.Tensor:
        """What :meth:`forward` returns, from the module's own output ``y`` (a tensor, or a
        tuple whose first item is one)."""
        if isinstance(y, (tuple, list)):
            y = y[0]
        y = y.float()
        one = y.shape[1] == 1
        if self.outputs == "logits" and not one:
            return y  # paintseg's softmax follows
        p = torch.sigmoid(y) if self.outputs == "sigmoid" or self.outputs == "logits" else y
        if one:
            p = p.clamp(0.0, 1.0)
            p = torch.cat([1.0 - p, p], dim=1)
        return torch.log(p.clamp_min(1e-7))


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; paintseg cannot run this BioImage.IO package "
                           "(nothing was written)")


def load_package(path: str | os.PathLike[str], *, trainable: bool = False) -> Any:
    """Read a BioImage.IO model package as a :class:`~paintseg.model.PaintsegModel`.

    A package that paintseg exported comes back as the model it was made from (same network,
    normalisation, classes and training record); one whose state-dict weights are paintseg's
    U-Net without that record (another tool rewrote the description) is rebuilt from the
    architecture's keywords, the declared scaling and the output's channel names. Both
    train further (``--init``). Another tool's network runs through paintseg's tiled
    inference when the package has TorchScript or ``pytorch_state_dict`` weights, one input
    with axes ``bcyx`` or ``bczyx``, scaling per image and channel (``scale_range`` or
    ``zero_mean_unit_variance``), and per-class outputs of the input's shape (probabilities,
    logits, or one foreground channel); it fine-tunes on its own classes where its
    architecture comes with it.

    For inference another tool's TorchScript weights are preferred (no code from the
    package runs); ``trainable=True`` loads its ``pytorch_state_dict`` weights with their
    architecture instead (the package's Python code runs), for fine-tuning.

    Raises
    ------
    CheckpointError
        A damaged package, or one whose weights, axes, processing or outputs paintseg
        cannot use; the message says what.
    ConfigError
        The ``bioimageio`` extra is missing.
    """
    v = _spec()
    from bioimageio.spec import InvalidDescr, load_model_description

    from .model import PaintsegModel

    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip file (damaged or not a BioImage.IO package)")
    try:
        descr = load_model_description(path, perform_io_checks=False, format_version="latest")
    except Exception as exc:  # noqa: BLE001 - damaged zips fail in many ways
        raise CheckpointError(f"{path}: cannot read the BioImage.IO package: {_short(exc)}"
                              ) from None
    if isinstance(descr, InvalidDescr) or not isinstance(descr, v.ModelDescr):
        errors = getattr(getattr(descr, "validation_summary", None), "errors", None) or []
        first = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors[:3])
        raise CheckpointError(
            f"{path}: not a valid BioImage.IO model description (model format 0.5 or "
            f"converted from 0.4){': ' + first if first else ''}")
    own = (descr.config.model_extra or {}).get("paintseg") if descr.config else None
    if isinstance(own, dict) and "model_config" in own:
        return _load_own(path, descr, own)
    rebuilt = _paintseg_architecture(path, descr)
    if rebuilt is not None:  # paintseg's U-Net in a package another tool rewrote
        return _load_own(path, descr, rebuilt)
    network, config, names, norm = _load_foreign(path, descr, trainable=trainable)
    card = {**_package_card(descr, path), "foreign": True,
            "trainable": descr.weights.pytorch_state_dict is not None}
    tuned = (descr.config.model_extra or {}).get("paintseg_finetune") if descr.config else None
    runs = list(tuned.get("training") or []) if isinstance(tuned, dict) else []
    return PaintsegModel(network=network, config=config, normalization=norm,
                         class_names=names, provenance={"bioimageio": card, "training": runs})


def _package_card(descr: Any, path: Path) -> dict[str, Any]:
    return {"name": descr.name, "authors": [a.name for a in descr.authors],
            "license": str(descr.license) if descr.license else "",
            "cite": [str(c.doi or c.url or c.text) for c in descr.cite], "file": str(path)}


def _read_member(path: Path, source: Any) -> bytes:
    """The bytes of a file the package references by a relative name."""
    name = str(getattr(source, "path", source)).replace("\\", "/").split("/")[-1]
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if member.split("/")[-1] == name:
                return zf.read(member)
    raise CheckpointError(f"{path}: the package lists {name} but does not hold it")


def _paintseg_architecture(path: Path, descr: Any) -> dict[str, Any] | None:
    """What :func:`_load_own` needs, for a package whose state-dict weights are paintseg's
    U-Net (architecture ``ExportedUNet`` with a paintseg architecture's keywords) but which
    lacks paintseg's own record, or None."""
    w = descr.weights.pytorch_state_dict
    if w is None or str(getattr(w.architecture, "callable", "")) != "ExportedUNet":
        return None
    try:
        config = from_json(ModelConfig, dict(w.architecture.kwargs))
    except Exception:  # noqa: BLE001 - another callable of that name: not paintseg's
        return None
    if len(descr.inputs) != 1 or not descr.outputs:
        return None
    norm = _supported_preprocessing(path, descr.inputs[0].preprocessing)
    names = [str(n) for n in descr.outputs[0].axes[1].channel_names]
    if len(names) != config.classes:
        return None
    return {"model_config": dataclasses.asdict(config), "normalization":
            norm.to_json(), "class_values": list(range(1, config.classes + 1)),
            "class_names": names, "provenance": {"training": []}}


def _load_own(path: Path, descr: Any, own: dict[str, Any]) -> Any:
    import io

    from .model import PaintsegModel
    from .network import UNet

    if int(own.get("format_version", 0)) > _PAINTSEG_CONFIG_VERSION:
        raise CheckpointError(f"{path} was exported by a newer paintseg: update paintseg")
    weights = descr.weights.pytorch_state_dict
    if weights is None:
        raise CheckpointError(f"{path}: a paintseg package without its state-dict weights")
    try:
        config = from_json(ModelConfig, own["model_config"])
        norm = from_json(NormConfig, own["normalization"])
        state = torch.load(io.BytesIO(_read_member(path, weights.source)),
                           map_location="cpu", weights_only=True)
        net = UNet(config)
        net.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged package fails in many ways
        raise CheckpointError(f"{path}: a damaged paintseg package: {_short(exc)}") from None
    net.eval()
    provenance = dict(own.get("provenance") or {})
    provenance["bioimageio"] = _package_card(descr, path)
    return PaintsegModel(network=net, config=config, normalization=norm,
                         class_values=tuple(own["class_values"]),
                         class_names=tuple(own["class_names"]), provenance=provenance)


def _load_foreign(path: Path, descr: Any, *, trainable: bool = False
                  ) -> tuple[Any, ModelConfig, tuple[str, ...], NormConfig]:
    if len(descr.inputs) != 1 or len(descr.outputs) < 1:
        raise _bad(path, f"it has {len(descr.inputs)} inputs (one image input is supported)")
    inp, out = descr.inputs[0], descr.outputs[0]
    axes_in = "".join(_axis_letter(a) for a in inp.axes)
    axes_out = "".join(_axis_letter(a) for a in out.axes)
    if axes_in not in ("bcyx", "bczyx"):
        raise _bad(path, f"its input axes are {axes_in!r} (bcyx or bczyx are supported)")
    if axes_out != axes_in:
        raise _bad(path, f"its output axes are {axes_out!r}, not per-class maps like the "
                         f"input's {axes_in!r}")
    for ai, ao in zip(inp.axes[2:], out.axes[2:]):
        ref = getattr(ao.size, "tensor_id", None)
        if ref is None or getattr(ao, "scale", 1.0) != getattr(ai, "scale", 1.0):
            raise _bad(path, "its output is not of the input's size (only outputs of the "
                             "input's shape can become labels)")
    dims = len(axes_in) - 2
    in_channels = len(inp.axes[1].channel_names)
    out_channels = len(out.axes[1].channel_names)
    norm = _supported_preprocessing(path, inp.preprocessing)
    for p in out.postprocessing:
        if p.id not in ("ensure_dtype", "sigmoid", "softmax"):
            raise _bad(path, f"its output postprocessing {p.id!r} is not supported")
    step = 1
    for a in inp.axes[2:]:
        size = a.size
        s = getattr(size, "step", None) or 1
        step = max(step, int(s))
    depth = int(round(math.log2(step)))
    if 2**depth != step or depth > 6:
        raise _bad(path, f"its input size step is {step} (a power of two up to 64 is "
                         "supported)")
    module = _weights_module(path, descr, trainable=trainable)
    names = tuple(str(n) for n in out.axes[1].channel_names)
    outputs = _output_kind(path, out)
    if out_channels == 1:
        names = ("background", names[0])
    config = ModelConfig(dims=dims, in_channels=in_channels, classes=len(names), depth=depth,
                         base_features=1, norm="none")
    halo = max(int(getattr(a, "halo", 0) or 0) for a in out.axes[2:]) or None
    # without TorchScript the state dict was loaded with its architecture: it trains
    trains = trainable or descr.weights.torchscript is None
    return (PackageNetwork(module, config, outputs=outputs, trainable=trains, halo=halo),
            config, names, norm)


def _axis_letter(axis: Any) -> str:
    kind = getattr(axis, "type", "")
    if kind == "batch":
        return "b"
    if kind == "channel":
        return "c"
    return str(axis.id)[:1] if kind == "space" else "?"


def _supported_preprocessing(path: Path, steps: Sequence[Any]) -> NormConfig:
    """The :class:`NormConfig` that reproduces a package's input processing."""
    norm = None
    for p in steps:
        if p.id == "ensure_dtype":
            continue
        if p.id in ("scale_range", "zero_mean_unit_variance") and norm is None:
            k = p.kwargs
            axes = [str(a) for a in (k.axes or [])]
            if "b" in axes or "batch" in axes or not axes or "c" in axes:
                raise _bad(path, f"its {p.id} is not per image and channel")
            if p.id == "scale_range":
                norm = NormConfig(low=float(k.min_percentile), high=float(k.max_percentile))
            else:
                norm = NormConfig(mode="mean_std", eps=float(k.eps))
            continue
        raise _bad(path, f"its input preprocessing {p.id!r} is not supported (scale_range "
                         "and zero_mean_unit_variance per image are)")
    if norm is None:
        raise _bad(path, "it declares no intensity scaling (paintseg scales every image; "
                         "scale_range and zero_mean_unit_variance per image are supported)")
    return norm


def _weights_module(path: Path, descr: Any, *, trainable: bool = False) -> nn.Module:
    import io

    w = descr.weights
    if trainable and w.pytorch_state_dict is None:
        raise _bad(path, "its weights are TorchScript only: paintseg fine-tunes packages "
                         "whose pytorch_state_dict weights come with their architecture")
    if w.torchscript is not None and not trainable:
        try:
            module = torch.jit.load(io.BytesIO(_read_member(path, w.torchscript.source)),
                                    map_location="cpu")
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _bad(path, f"its TorchScript weights do not load: {_short(exc, 200)}"
                       ) from None
        return module.eval()
    if w.pytorch_state_dict is not None:
        try:
            from bioimageio.core.backends.pytorch_backend import load_torch_model

            module = load_torch_model(w.pytorch_state_dict, devices=["cpu"])
        except Exception as exc:  # noqa: BLE001 - foreign code fails in many ways
            raise _bad(path, "its pytorch_state_dict weights do not load with their "
                             f"architecture: {_short(exc, 200)}") from None
        module.eval()
        for p in module.parameters():
            p.requires_grad_(True)
        return module
    present = [k for k, val in w.model_dump(exclude_none=True).items() if val]
    raise _bad(path, f"it has {', '.join(present) or 'no'} weights (TorchScript or "
                     "pytorch_state_dict weights are supported)")


def _output_kind(path: Path, out: Any) -> str:
    """What the network returns (see :class:`PackageNetwork`): from a sigmoid / softmax
    postprocessing or the declared range (0, 1), else from the package's test output
    (probabilities lie in [0, 1])."""
    post = [p.id for p in out.postprocessing]
    if "sigmoid" in post:
        return "sigmoid"
    if "softmax" in post:
        return "logits"
    rng = getattr(out.data, "range", (None, None)) if not isinstance(out.data, list) else (
        None, None)
    if rng == (0.0, 1.0) or rng == (0, 1):
        return "probabilities"
    try:
        data = _read_member(path, out.test_tensor.source)
        import io

        arr = np.load(io.BytesIO(data))
        if float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0:
            return "probabilities"
    except Exception:  # noqa: BLE001 - no usable test output: take the scores as logits
        pass
    return "logits"
