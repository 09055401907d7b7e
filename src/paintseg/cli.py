"""The ``paintseg`` command.

Exit codes: 0 success, 1 some input failed (each is reported, the others are still written),
2 nothing could be done (bad model, bad arguments, unwritable output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import (
    DEFAULT_BLOCK_BYTES,
    PRECISIONS,
    SNAP_PIXELS,
    STROKES_INTENSITY_SHIFT,
    SegmentSettings,
    TileConfig,
    TrainConfig,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["main"]

EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL = 0, 1, 2


def _parse_size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 512M)") from None


def _tile_arg(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--tile must be 'auto' or a number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--tile must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="paintseg",
        description="Interactive microscopy segmentation with a U-Net: segment TIFF images "
        "and stacks with a paintseg model.",
    )
    parser.add_argument("--version", action="version", version=f"paintseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser(
        "segment",
        help="segment TIFF images (2D, 2D + channels, 3D, time series) into label TIFFs",
        description="Segment each INPUT and write OUT/<name>_labels.tif (and, with "
        "--probabilities, OUT/<name>_probabilities.tif). Outputs appear only when complete.",
    )
    seg.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="TIFF / OME-TIFF files, or folders (searched recursively; outputs keep "
                     "the sub-folders)")
    seg.add_argument("--pattern", default="*.tif*",
                     help="file names to take from INPUT folders (default '*.tif*')")
    seg.add_argument("--format", choices=("tiff", "zarr"), default="tiff",
                     help="output format: TIFF files, or OME-Zarr folders (<name>_labels.ome.zarr, "
                     "opened lazily by napari; needs zarr)")
    seg.add_argument("--workers", type=int, default=1, metavar="N",
                     help="segment N files at a time, each in its own process on a local "
                     "Dask cluster (default 1: this process)")
    seg.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="run the files on an existing Dask distributed cluster, e.g. "
                     "tcp://host:8786 (inputs and outputs must be on storage its workers see)")
    seg.add_argument("--report", type=Path, default=None, metavar="FILE.json",
                     help="write a JSON summary: done, skipped, failed with reasons")
    seg.add_argument(
        "--model",
        required=True,
        help="checkpoint file (.pt), a bundled model name ('nuclei'), or 'new' for a freshly "
        "initialised 2D U-Net (untrained: for trying the pipeline only)",
    )
    seg.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    seg.add_argument("--tile", type=_tile_arg, default=None, metavar="auto|N",
                     help="tile edge in pixels (default auto: the whole image when it fits)")
    seg.add_argument("--tile-mode", choices=("blend", "exact"), default="blend",
                     help="blend: modest blended overlap (default); exact: halo covers the "
                     "receptive field, identical to untiled inference")
    seg.add_argument("--memory", type=_parse_size, default=None, metavar="SIZE",
                     help="working memory for inference, e.g. 2G (default: a quarter of free "
                     "memory, at most 8G)")
    seg.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass")
    seg.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="number type of the U-Nets' layers: auto (default) is mixed precision "
                     "on a CUDA GPU and on a CPU with bfloat16 units (Intel AMX), float32 "
                     "elsewhere and with --tile-mode exact")
    seg.add_argument("--block", type=_parse_size, default=DEFAULT_BLOCK_BYTES, metavar="SIZE",
                     help="a stack larger than this is segmented in blocks (of slices for a 2D "
                     "model, of Z planes with halos for a 3D model) when its instance output "
                     "would not fit, and on a cluster to spread it over workers (default 512M)")
    seg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    seg.add_argument("--axes", default=None,
                     help="axes of the inputs when the metadata is missing or wrong, e.g. ZYX, "
                     "YXC, TZCYX")
    seg.add_argument("--probabilities", action="store_true",
                     help="also write class probabilities (float32, classes first)")
    seg.add_argument("--background-class", type=int, default=1, metavar="VALUE",
                     help="class value written as 0 in the labels (default 1; -1 keeps all)")
    seg.add_argument("--output", choices=("auto", "semantic", "instances"), default="auto",
                     help="labels kind: instances (numbered objects, for models trained on "
                     "instances such as 'nuclei') or semantic classes; auto follows the model")
    seg.add_argument("--diameter", type=float, default=None, metavar="PIXELS",
                     help="typical object diameter in the images; the image is rescaled to "
                     "the object size the model was trained on (models trained on instances "
                     "record it: paintseg info MODEL prints it). Loads the image into memory")
    seg.add_argument("--min-size", type=int, default=30,
                     help="instances smaller than this many pixels are removed (default 30)")
    seg.add_argument("--snap", type=int, default=None, metavar="PIXELS",
                     help="semantic labels of 2D models: class borders may move by up to this "
                     f"many pixels to the image's nearest edge where the model is not sure "
                     f"(default: {SNAP_PIXELS} for a model trained on strokes, 0 for one "
                     "trained on dense labels; 0: the model's arg-max)")
    seg.add_argument("--overlay", action="store_true",
                     help="also write OUT/<name>_overlay.png (image with label outlines; the "
                     "middle slice of a stack)")
    seg.add_argument("--overwrite", action="store_true",
                     help="redo files whose outputs are complete (default: skip them, so a "
                     "rerun resumes an interrupted batch)")
    seg.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    tr = sub.add_parser(
        "train",
        help="train (or continue training) a U-Net on painted labels",
        description="Fine-tune a U-Net on IMAGE / LABELS pairs. LABELS: 0 = not painted, "
        "1..K = class (1 = background by convention); or a dense instance image with "
        "--labels-kind instances. Writes the latest weights, unless earlier ones scored clearly "
        "better on the held-out painted pixels (a continued model's starting weights included; "
        "judged only with enough held-out pixels of every class), and warns about a painted "
        "class the model misses.",
    )
    tr.add_argument("pairs", nargs="+", metavar="IMAGE LABELS",
                    help="image and labels TIFFs, in pairs")
    tr.add_argument("--out", required=True, type=Path,
                    help="checkpoint to write (.pt), or a BioImage.IO package (.zip, with the "
                    "first image as its test input; needs the [bioimageio] extra)")
    tr.add_argument("--init", default=None,
                    help="start from this checkpoint, BioImage.IO package (.zip) or bundled "
                         "model name instead of a new U-Net; "
                         "where its classes are kept, it is held to its own predictions on the "
                         "unpainted pixels, so that corrections change little elsewhere; on "
                         "corrected nuclei masks (--labels-kind instances), --init nuclei "
                         "trained better than a new U-Net")
    tr.add_argument("--dims", type=int, choices=(2, 3), default=2,
                    help="2D or 3D U-Net (new models)")
    tr.add_argument("--preset", choices=("auto", "fast", "accurate"), default="auto",
                    help="size of a new U-Net: fast (default, any device) or accurate (larger, "
                         "for a GPU); auto = fast")
    tr.add_argument("--labels-kind", choices=("scribbles", "instances"), default="scribbles")
    tr.add_argument("--class-names", default=None, metavar="NAME,NAME,...",
                    help="names of the classes 1, 2, ... (comma-separated, e.g. "
                         "background,membrane,mitochondria), kept in the checkpoint and shown "
                         "in napari; default: background, class 2, ...")
    tr.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=None,
                    help="patches per step (default 16 for 2D, 4 for 3D)")
    tr.add_argument("--patch-size", type=int, default=None)
    tr.add_argument("--learning-rate", type=float, default=3e-3)
    tr.add_argument("--augment", choices=("none", "flips", "full"), default="flips")
    tr.add_argument("--intensity-shift", type=float, default=None, metavar="WIDTH",
                    help="half-width of a random brightness offset per training patch, in "
                         "normalised units (default: %s on strokes, 0 on dense labels and "
                         "when continuing an --init model anchored to its predictions; 0: "
                         "none)" % STROKES_INTENSITY_SHIFT)
    tr.add_argument("--smoothness", type=float, default=0.0, metavar="WEIGHT",
                    help="weight of a term that pulls class borders between the strokes onto "
                         "the image's edges, e.g. 8 for thin vessels on a flat background "
                         "(default 0: none; docs/beyond-nuclei.md)")
    tr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    tr.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="number type of the networks' layers while training (default auto: "
                         "bfloat16 on a CPU with bfloat16 matrix units, Intel AMX, float32 "
                         "elsewhere)")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--validation-fraction", type=float, default=0.15)
    tr.add_argument("--axes", default=None, help="axes of the images, e.g. ZYX or YXC")
    tr.add_argument("--quiet", "-q", action="store_true")

    ev = sub.add_parser("evaluate", help="score a prediction against ground truth (JSON)")
    ev.add_argument("pred", help="predicted label TIFF")
    ev.add_argument("gt", help="ground-truth label TIFF")
    how = ev.add_mutually_exclusive_group()
    how.add_argument("--instances", action="store_true",
                     help="instance matching: AP / F1 / precision / recall at IoU 0.5..0.9")
    how.add_argument("--foreground", action="store_true",
                     help="score foreground against background: every nonzero label is "
                     "foreground (e.g. semantic labels from 'segment' against instance ground "
                     "truth)")

    ex = sub.add_parser(
        "export", help="write a model as a BioImage.IO package (Fiji/deepImageJ, ilastik, "
        "QuPath, bioimage.io)",
        description="Write a paintseg model as a BioImage.IO model package (a zip, model "
        "format 0.5) with TorchScript, state-dict and (where onnx, onnxscript and onnxruntime "
        "are installed) ONNX weights, its normalisation, tiling, test tensors, a cover and a "
        "README. The package is tested with bioimageio.core before it "
        "is written. Needs: pip install \"napari-paintseg[bioimageio]\".")
    ex.add_argument("model", help="checkpoint file or bundled model name")
    ex.add_argument("--out", required=True, help="the package to write (NAME.zip)")
    ex.add_argument("--sample", default=None,
                    help="an image of the kind the model is for: its centre becomes the test "
                    "input and the cover (default: paintseg's sample nuclei, for one-channel "
                    "models)")
    ex.add_argument("--axes", default=None, help="axes of --sample (e.g. ZYX, YXC)")
    ex.add_argument("--name", default=None, help="model name (default: the file's name)")
    ex.add_argument("--description", default=None, help="one or two sentences")
    ex.add_argument("--authors", nargs="+", default=[], help="author names")
    ex.add_argument("--license", default="CC-BY-4.0", help="SPDX licence (default CC-BY-4.0)")
    ex.add_argument("--cite", nargs="+", default=[], help="DOIs or URLs to cite")
    ex.add_argument("--cover", default=None, help="a PNG or JPEG cover (default: made from "
                    "the test input and its result)")

    info = sub.add_parser("info", help="describe a model, or this installation")
    info.add_argument("model", nargs="?", help="checkpoint file or BioImage.IO package")
    return parser


def _progress_printer(enabled: bool, label: str):
    state = {"last": 0.0}
    enabled = enabled and sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if not enabled or (now - state["last"] < 0.5 and done < total):
            return
        state["last"] = now
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r  {label} [{bar}] {done}/{total} tiles")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def segment_settings(args: argparse.Namespace) -> SegmentSettings:
    """The :class:`~paintseg.config.SegmentSettings` that ``paintseg segment``'s options ask
    for (the napari Segment tab builds the same object from its form)."""
    tiles = TileConfig(tile=args.tile, mode=args.tile_mode, memory_budget=args.memory,
                       batch_size=args.batch_size, precision=args.precision)
    return SegmentSettings(
        output=args.output, min_size=args.min_size, snap=args.snap, diameter=args.diameter,
        background_class=None if args.background_class < 0 else args.background_class,
        probabilities=args.probabilities, overlay=args.overlay, axes=args.axes, tiles=tiles,
        format=args.format,
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from .batch import collect_inputs, segment_file, write_report
    from .config import ModelConfig
    from .devices import describe_device, resolve_device, type_name
    from .errors import PaintsegError
    from .inference import autocast_type, scale_for
    from .io import check_output_folder, read_image
    from .model import load_model, new_model

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    try:
        device = resolve_device(args.device)
        settings = segment_settings(args)
        precision = type_name(autocast_type(settings.tiles, device))
        jobs = collect_inputs(args.inputs, pattern=args.pattern)
        out_dir = check_output_folder(args.out)
        if args.model == "new":
            try:
                channels = read_image(jobs[0].source, axes=args.axes).channels
            except PaintsegError:
                channels = 1
            model = new_model(ModelConfig(dims=2, in_channels=channels), seed=0)
            say("paintseg: WARNING: --model new is a freshly initialised, UNTRAINED U-Net; "
                "its labels show the pipeline works, not a real segmentation")
        else:
            model = load_model(args.model)
        scale_for(model, args.diameter)  # a bad --diameter is an error before any file
    except (PaintsegError, ValueError) as exc:
        print(f"paintseg: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    auto = " (auto)" if args.device == "auto" else ""
    say(f"paintseg: device {describe_device(device)}{auto}; U-Nets in {precision}")
    results = []
    t0 = time.perf_counter()

    def record(r) -> None:
        results.append(r)
        head = f"[{len(results)}/{len(jobs)}] {r.source}"
        if r.status == "skipped":
            say(f"{head}: {r.reason}, skipped (use --overwrite to redo)")
        elif r.status == "failed":
            print(f"paintseg: error: {r.reason}", file=sys.stderr)
        else:
            for msg in r.messages:
                say(f"  note: {msg}")
            what = f", {r.objects} objects" if r.objects is not None else ""
            say(f"{head}: wrote {r.labels}{what} in {r.seconds:.1f} s")

    try:
        if args.workers > 1 or args.scheduler:
            from .batch import run_batch

            where = args.scheduler or f"a local cluster of {args.workers} processes"
            say(f"paintseg: {len(jobs)} file(s) on {where}")
            run_batch(jobs, model, out_dir=out_dir, settings=settings, device=device,
                      overwrite=args.overwrite, workers=max(args.workers, 1),
                      scheduler=args.scheduler, on_result=record, block_bytes=args.block)
            order = {str(job.source): k for k, job in enumerate(jobs)}
            results.sort(key=lambda r: order[r.source])  # the report lists inputs in order
        else:
            for job in jobs:
                record(segment_file(job, model, out_dir=out_dir, settings=settings,
                                    device=device, overwrite=args.overwrite,
                                    progress=_progress_printer(not args.quiet, job.source.name),
                                    block_bytes=args.block))
    except KeyboardInterrupt:
        print("paintseg: interrupted; no partial output was left (a rerun resumes)",
              file=sys.stderr)
        return 130
    except (PaintsegError, OSError) as exc:
        print(f"paintseg: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    done = sum(r.status == "done" for r in results)
    failed = [r for r in results if r.status == "failed"]
    skipped = len(results) - done - len(failed)
    if len(jobs) > 1 or failed:
        say(f"paintseg: {done} written, {skipped} skipped, {len(failed)} failed "
            f"({time.perf_counter() - t0:.0f} s)")
    if args.quiet and skipped:  # not progress: without it a rerun leaves old labels silently
        print(f"paintseg: {skipped} of {len(jobs)} skipped, complete outputs exist in "
              f"{out_dir} (use --overwrite to redo)", file=sys.stderr)
    if args.report is not None:
        try:
            write_report(args.report, results, model=str(args.model), out=str(out_dir),
                         seconds=round(time.perf_counter() - t0, 1))
        except OSError as exc:
            print(f"paintseg: error: cannot write report {args.report}: {exc}", file=sys.stderr)
            return EXIT_FATAL
    if failed:
        return EXIT_SOME_FAILED if done or skipped or len(jobs) > 1 else EXIT_FATAL
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    import numpy as np

    from .devices import describe_device, resolve_device, training_autocast, type_name
    from .errors import PaintsegError
    from .io import check_output_folder, read_image
    from .model import load_model, save_model
    from .training import (
        EventKind,
        check_channels,
        collapse_text,
        disagreement_text,
        iter_train,
        kept_weights_text,
        prepare_training,
    )

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if len(args.pairs) % 2:
        print(f"paintseg: error: images and labels must come in pairs; got {len(args.pairs)} "
              "paths (an odd number)", file=sys.stderr)
        return EXIT_FATAL
    try:
        config = TrainConfig(time_budget=args.time_budget, steps=args.steps,
                             batch_size=args.batch_size, patch_size=args.patch_size,
                             learning_rate=args.learning_rate, augment=args.augment,
                             intensity_shift=args.intensity_shift,
                             smoothness=args.smoothness, precision=args.precision,
                             validation_fraction=args.validation_fraction, seed=args.seed)
        device = resolve_device(args.device)
        out = Path(args.out)
        # a missing folder is created once training is done (nothing is written before), if
        # the nearest folder that exists can take it
        base = next(p for p in (out.parent, *out.parent.parents) if p.exists())
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            raise PaintsegError(f"cannot write {out}: {base} is not a writable folder")
        if out.suffix.lower() == ".zip":  # a package: the extra must be there before training
            from .exchange import require_extra

            require_extra()
        init = load_model(args.init) if args.init else None  # a path or a bundled name
        pairs, image_names, channels = [], [], None
        first_image = None
        for img_path, lab_path in zip(args.pairs[::2], args.pairs[1::2]):
            image = read_image(img_path, axes=args.axes, lazy=False)
            if first_image is None:
                first_image = image
            labels = read_image(lab_path, lazy=False)
            if "C" in image.axes:
                data = np.moveaxis(np.asarray(image.data), image.axes.index("C"), -1)
            else:
                data = np.asarray(image.data)[..., None]
            channels = data.shape[-1]
            pairs.append((data, np.asarray(labels.data)))  # shapes checked by prepare_data
            image_names.append(f"{img_path} with labels {lab_path}")
        if init is not None:  # before any work
            check_channels(init, channels, model_name=args.init)
            if init.foreign and out.suffix.lower() != ".zip":
                raise PaintsegError(
                    f"{args.init} is another tool's network: a paintseg checkpoint cannot "
                    "hold it; write a BioImage.IO package instead (--out NAME.zip)")
        names = None
        if args.class_names is not None:
            listed = [n.strip() for n in args.class_names.split(",")]
            if not all(listed):
                raise PaintsegError(f"--class-names {args.class_names!r}: a name is empty")
            names = dict(enumerate(listed, start=1))
        # the same set-up as the napari widget's
        data, model = prepare_training(
            pairs, base=init, dims=args.dims, in_channels=channels, class_names=names,
            labels_kind=args.labels_kind, preset=args.preset, seed=args.seed,
            channel_axis=-1, validation_fraction=args.validation_fraction, names=image_names,
        )
    except (PaintsegError, ValueError, OSError) as exc:
        print(f"paintseg: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    say(f"paintseg: training on {describe_device(device)} in "
        f"{type_name(training_autocast(device, args.precision))}: "
        f"{model.config.network_name} depth "
        f"{model.config.depth}, base {model.config.base_features}; classes "
        f"{list(data.class_values)}; painted pixels {data.counts.tolist()}")
    for note in data.notes:
        say(f"  note: {note}")
    if args.seed is not None and args.steps is None:
        # measured: the same strokes and seed gave cells3d IoU 0.80 to 0.86 over 60 s runs
        say("  note: the budget is in seconds, so the number of steps and the result vary "
            "between runs; a seeded run repeats exactly on the CPU only with --steps")
    warning = disagreement_text(model, data, device=device, anchor=config.anchor)
    if warning:
        print(f"paintseg: warning: {warning} (without --init, a new U-Net is trained)",
              file=sys.stderr)
    done = None
    try:
        for event in iter_train(model, data, config, device=device, step_every=2.0):
            if event.kind is EventKind.STEP:
                eta = f", {event.eta:.0f} s left" if event.eta is not None else ""
                say(f"  step {event.step}: loss {event.loss:.4f} ({event.elapsed:.0f} s{eta})")
            elif event.kind is EventKind.VALIDATION and event.validation:
                say(f"  validation at step {event.step}: mean IoU "
                    f"{event.validation['mean_iou']:.3f}, loss {event.validation['loss']:.4f}")
            else:
                done = event
    except KeyboardInterrupt:
        print("paintseg: interrupted; nothing was written", file=sys.stderr)
        return 130
    try:
        check_output_folder(out.parent)
    except PaintsegError as exc:
        print(f"paintseg: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    if out.suffix.lower() == ".zip":  # a BioImage.IO package, the first image as its sample
        from .exchange import export_package, sample_array

        try:
            export_package(model, out, sample=sample_array(first_image, dims=model.config.dims),
                           sample_name=Path(args.pairs[0]).name)
        except PaintsegError as exc:
            print(f"paintseg: error: {exc}", file=sys.stderr)
            if not model.foreign:
                kept = out.with_suffix(".pt")  # the training is not lost (nor another file)
                k = 1
                while kept.exists():
                    kept, k = out.with_name(f"{out.stem}-{k}.pt"), k + 1
                save_model(model, kept)
                print(f"paintseg: the trained model is in {kept}; 'paintseg export' makes a "
                      "package of it", file=sys.stderr)
            return EXIT_FATAL
    else:
        save_model(model, out)
    assert done is not None
    say(f"paintseg: wrote {args.out} ({done.step} steps in {done.elapsed:.0f} s; "
        f"{kept_weights_text(done)})")
    warning = collapse_text(model, data, device=device)
    if warning:
        print(f"paintseg: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _labels_kind_warning(pred: np.ndarray, gt: np.ndarray, *, pred_name: str, gt_name: str,
                         instances: bool) -> str | None:
    """A warning when one label image looks like instances and the other like classes (more
    than 8 nonzero values in one, and at least 4 times as many as in the other), or when
    their classes share no nonzero value (every class would score 0)."""
    import numpy as np

    values = [set(np.unique(a).tolist()) - {0} for a in (pred, gt)]
    counts = [(name, len(v)) for name, v in zip((pred_name, gt_name), values)]
    (many_name, many), (few_name, few) = sorted(counts, key=lambda nc: -nc[1])
    if many <= 8 or many < 4 * max(few, 1):
        if instances or not all(values) or values[0] & values[1]:
            return None
        return (f"{pred_name} has class value(s) {sorted(values[0])} but {gt_name} has "
                f"{sorted(values[1])}: no class is in both, so every class scores 0 (use "
                f"--foreground to score foreground against background)")
    if instances:
        return (f"{few_name} has {few} label value(s) but {many_name} has {many}: {few_name} "
                f"looks like classes, not objects, and instance matching takes each class for "
                f"one object (segment with --output instances, or use --foreground)")
    return (f"{many_name} has {many} label values but {few_name} has {few}: {many_name} looks "
            f"like instances, and semantic scores compare class values with object ids (use "
            f"--foreground to score foreground against background, or --instances)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import PaintsegError
    from .io import read_image
    from .metrics import instance_scores, semantic_scores

    try:
        pred = np.asarray(read_image(args.pred, lazy=False).data)
        gt = np.asarray(read_image(args.gt, lazy=False).data)
        if pred.shape != gt.shape:
            raise PaintsegError(
                f"{args.pred} has shape {pred.shape} but {args.gt} has shape {gt.shape}"
            )
        warning = None if args.foreground else _labels_kind_warning(
            pred, gt, pred_name=str(args.pred), gt_name=str(args.gt), instances=args.instances)
        if warning:
            print(f"paintseg: warning: {warning}", file=sys.stderr)
        if args.instances:
            result = instance_scores(pred, gt)
        else:
            if args.foreground:
                pred, gt = (pred > 0).view(np.uint8), (gt > 0).view(np.uint8)
            result = semantic_scores(pred, gt)
            result["iou"] = {str(k): v for k, v in result["iou"].items()}
            result["dice"] = {str(k): v for k, v in result["dice"].items()}
    except (PaintsegError, ValueError) as exc:
        print(f"paintseg: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import PaintsegError
    from .exchange import bundled_sample, export_package, sample_array
    from .io import read_image
    from .model import load_model

    try:
        model = load_model(args.model)
        if args.sample is None:
            if model.config.in_channels != 1:
                print(f"paintseg: error: {args.model} takes {model.config.in_channels} "
                      "channels: give an image of its kind with --sample", file=sys.stderr)
                return EXIT_FATAL
            sample_path = bundled_sample(model.config.dims)
        else:
            sample_path = Path(args.sample)
        image = read_image(sample_path, axes=args.axes, lazy=False)
        sample = sample_array(image, dims=model.config.dims)
        notes: list[str] = []
        out = export_package(
            model, args.out, sample=sample, sample_name=sample_path.name, name=args.name,
            description=args.description, authors=args.authors, license=args.license,
            cite=args.cite, cover=args.cover, notes=notes)
    except PaintsegError as exc:
        print(f"paintseg: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    for note in notes:
        print(f"paintseg: note: {note}", file=sys.stderr)
    print(f"paintseg: wrote {out} ({out.stat().st_size / 1e6:.1f} MB); bioimageio's test "
          "passed", file=sys.stderr)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .devices import describe_device, describe_precision, resolve_device
    from .errors import PaintsegError
    from .model import load_model

    if args.model:
        try:
            model = load_model(args.model)
        except PaintsegError as exc:
            print(f"paintseg: error: {exc}", file=sys.stderr)
            return EXIT_FATAL
        print(f"{args.model}:")
        print(model.describe())
        return EXIT_OK
    dev = resolve_device("auto")
    print(f"paintseg {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"device (auto): {describe_device(dev)}; {describe_precision(dev)}")
    print(f"CUDA build: {torch.version.cuda or 'no'}; CPU threads: {torch.get_num_threads()}")
    from .model import bundled_models

    print("bundled models (use the name as --model / --init):")
    for name, path in bundled_models().items():
        try:
            m = load_model(path)
        except PaintsegError as exc:
            print(f"  {name}: unreadable ({exc})")
            continue
        ev = m.provenance.get("unseen_evaluation") or {}
        extra = f"; on unseen data AP@0.5 {ev['ap50']:.2f}" if "ap50" in ev else ""
        print(f"  {name}: {m.provenance.get('note', '')}{extra}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paintseg`` command; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        names = getattr(args, "class_names", None)
        if names is not None and not any(e.startswith("-") for e in extra):
            # "--class-names background membrane": the names after the first are left over
            joined = ",".join([names, *extra])
            parser.error(f"--class-names takes one comma-separated list; {' '.join(extra)!r} "
                         f"was left over: write --class-names {joined}")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run(parser, args)
    except BrokenPipeError:
        # what reads the output went away (`paintseg info | head`): stop without a traceback,
        # and without another at exit when Python flushes stdout
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FATAL


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The command ``args`` asks for."""
    if args.command == "segment":
        return cmd_segment(args)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "evaluate":
        return cmd_evaluate(args)
    if args.command == "export":
        return cmd_export(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_FATAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
