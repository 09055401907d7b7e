"""Segment files and folders of TIFF images: one file at a time, resumable, failures isolated.

:func:`segment_file` is the unit of work (one input, its outputs written atomically);
:func:`iter_batch` runs it over many files in this process, yielding one
:class:`FileResult` per file, so the CLI, the napari widget and the tests share it.
:func:`run_batch` adds parallel execution: a local pool of processes or an existing Dask
distributed cluster, each worker loading the model once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

from .config import DEFAULT_BLOCK_BYTES, SegmentSettings
from .errors import InputError, OutputError, PaintsegError, StopRequested
from .io import atomic_path, list_images, open_output, read_image, write_tiff
from .model import PaintsegModel

if TYPE_CHECKING:
    from .blocks import BlockPlan

__all__ = [
    "SegmentSettings",
    "FileResult",
    "Job",
    "collect_inputs",
    "output_paths",
    "output_complete",
    "segment_file",
    "iter_batch",
    "run_batch",
    "BatchStats",
    "summarize",
    "write_report",
]

_TIFF_EXTENSIONS = (".ome.tiff", ".ome.tif", ".tiff", ".tif")


@dataclass
class FileResult:
    """Outcome for one input file.

    Attributes
    ----------
    source : str
        The input.
    status : str
        ``"done"``, ``"skipped"`` (complete outputs were already there) or ``"failed"``.
    reason : str
        Why it failed or was skipped; empty when done.
    labels : str or None
        The label output.
    seconds : float
        Time spent on this file.
    objects : int or None
        Instance output: objects in the image (in the fullest slice of a slice-wise stack).
    messages : list of str
        Notes (device fall-back, constant image).
    """

    source: str
    status: str
    reason: str = ""
    labels: str | None = None
    seconds: float = 0.0
    objects: int | None = None
    messages: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """One input and where its outputs go: ``out_dir / relative folder / <stem>_labels.tif``."""

    source: Path
    relative: Path  # the input's path relative to its folder (just the name for a file)


def _stem(name: str) -> str:
    for ext in _TIFF_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], *, pattern: str = "*.tif*",
                   recursive: bool = True) -> list[Job]:
    """Jobs for files and folders: a file as given, a folder expanded with ``pattern``
    (recursively, keeping sub-folders in the output).

    Raises
    ------
    InputError
        A folder with no file matching ``pattern``, or two inputs whose outputs would collide.
    """
    jobs: list[Job] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [Job(p, p.relative_to(path)) for p in
                     list_images(path, pattern=pattern, recursive=recursive)]
            if not found:
                raise InputError(f"{path}: no file matches {pattern!r}")
            jobs.extend(found)
        else:  # a missing file fails on its own (reported, the others still run)
            jobs.append(Job(path, Path(path.name)))
    seen: dict[Path, Path] = {}
    for job in jobs:
        key = job.relative.parent / _stem(job.relative.name)
        if key in seen and seen[key] != job.source:
            raise InputError(f"{seen[key]} and {job.source} would write the same outputs "
                             f"({key}_labels.tif); segment them into different folders")
        seen[key] = job.source
    return jobs


def output_paths(job: Job, out_dir: str | os.PathLike[str], fmt: str = "tiff") -> dict[str, Path]:
    """``{"labels", "probabilities", "overlay"}`` paths of a job's outputs."""
    base = Path(out_dir) / job.relative.parent / _stem(job.relative.name)
    ext = ".ome.zarr" if fmt == "zarr" else ".tif"
    return {
        "labels": base.with_name(base.name + "_labels" + ext),
        "probabilities": base.with_name(base.name + "_probabilities" + ext),
        "overlay": base.with_name(base.name + "_overlay.png"),
    }


def read_output(path: str | os.PathLike[str]) -> Any:
    """An output image (TIFF, or the array of an OME-Zarr folder), not loaded."""
    path = Path(path)
    if path.is_dir():
        import zarr

        return zarr.open_group(str(path), mode="r")["0"]
    return read_image(path).data


def output_complete(path: str | os.PathLike[str], shape: Sequence[int]) -> bool:
    """Whether ``path`` is a readable TIFF of ``shape`` whose last plane can be read.

    Outputs are renamed into place only when written completely, so this guards against a
    file left by something else, a different image under the same name, or a damaged disk.
    """
    path = Path(path)
    if path.is_dir():
        try:
            arr = read_output(path)
            if tuple(arr.shape) != tuple(shape):
                return False
            expected = int(np.prod([-(-n // c) for n, c in zip(arr.shape, arr.chunks)]))
            stored = sum(1 for p in (path / "0").iterdir() if not p.name.startswith("."))
            if stored != expected:  # paintseg stores every chunk (zeros included)
                return False
            arr[tuple(s - 1 for s in arr.shape)]  # the last chunk can be read
            return True
        except Exception:  # noqa: BLE001 - any failure to read means "not complete"
            return False
    if not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if tuple(series.shape) != tuple(shape):
                return False
            pages = series.pages
            last = pages[len(pages) - 1] if len(pages) else None
            if last is None:
                return False
            last.asarray()
        return True
    except Exception:  # noqa: BLE001 - any failure to read means "not complete"
        return False


@dataclass(frozen=True)
class _FileInfo:
    """An opened input and the labels it will give (from :func:`_inspect`)."""

    image: Any
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    instances: bool


def _inspect(job: Job, model: PaintsegModel, settings: SegmentSettings) -> _FileInfo:
    """Open ``job``'s input (header only) and check it against ``model``.

    Raises
    ------
    PaintsegError, ValueError
        Unreadable input, or one the model cannot take.
    """
    from .inference import output_spec, wants_instances

    image = read_image(job.source, axes=settings.axes)
    axes, shape, dtype = output_spec(image, model, background_class=settings.background_class)
    return _FileInfo(image, axes, tuple(shape), np.dtype(dtype),
                     wants_instances(model, settings.output))


def _block_parts(labels_path: Path, n: int) -> list[str]:
    """Temporary files (hidden, beside the output) for ``n`` blocks of one file."""
    return [str(labels_path.with_name(f".{labels_path.name}.block{b:04d}.npz"))
            for b in range(n)]


def segment_file(
    job: Job,
    model: PaintsegModel,
    *,
    out_dir: str | os.PathLike[str],
    settings: SegmentSettings | None = None,
    device: Any = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> FileResult:
    """Segment one file and write its outputs atomically; never raises for a bad input.

    Instance output needs the class probabilities in memory; a stack whose probabilities
    would exceed ``block_bytes`` is done in blocks (see :mod:`paintseg.blocks`), so memory
    stays bounded: blocks of slices for a 2D model (the labels are the same as whole), blocks
    of Z planes with halos for a 3D model (objects joined across block borders).

    Returns
    -------
    FileResult
        ``failed`` with a reason naming the file for unreadable, corrupt or unsuitable input
        and for write errors; ``skipped`` when complete outputs exist and ``overwrite`` is
        False.

    Raises
    ------
    StopRequested
        ``should_stop`` returned True (no output of this file is left behind).
    """
    from .inference import segment_labels

    s = settings or SegmentSettings()
    t0 = time.perf_counter()
    paths = output_paths(job, out_dir, s.format)
    src = str(job.source)
    outputs: list[Any] = []
    try:
        info = _inspect(job, model, s)
        image, axes, shape, dtype, instances = (info.image, info.axes, info.shape, info.dtype,
                                                info.instances)
        wanted = [("labels", shape)]
        if s.probabilities:
            wanted.append(("probabilities", (model.config.classes, *shape)))
        if not overwrite and all(output_complete(paths[k], shp) for k, shp in wanted) and (
            not s.overlay or paths["overlay"].is_file()
        ):
            return FileResult(src, "skipped", "complete outputs exist", str(paths["labels"]),
                              time.perf_counter() - t0)
        try:
            paths["labels"].parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {paths['labels'].parent}: {exc.strerror}") from None
        plan = _plan_blocks(info, model, s, block_bytes, src, device) \
            if instances and block_bytes else None
        if plan is not None:
            parts = _block_parts(paths["labels"], len(plan.ranges))
            try:
                tops = [_block_labels(info, model, s, device, plan, b, parts[b], progress,
                                      should_stop) for b in range(len(plan.ranges))]
            except BaseException:
                for part in parts:
                    Path(part).unlink(missing_ok=True)
                raise
            return _assemble(job, parts, tops, info, plan, s, out_dir, time.perf_counter() - t0)
        labels_file = probs_file = None
        if not instances:
            labels_file = open_output(paths["labels"], shape, dtype, axes=axes, fmt=s.format)
            outputs.append(labels_file)
        if s.probabilities:
            probs_file = open_output(paths["probabilities"], (model.config.classes, *shape),
                                     "float32", axes="C" + axes, fmt=s.format)
            outputs.append(probs_file)
        result = segment_labels(
            image, model, s.replace(axes=None),  # the image was read with s.axes
            device=device,
            labels_out=labels_file.array if labels_file else None,
            probabilities_out=probs_file.array if probs_file else None,
            progress=progress, should_stop=should_stop,
        )
        top = None
        if instances:
            if s.format == "zarr":
                out = open_output(paths["labels"], shape, result.labels.dtype, axes=axes,
                                  fmt="zarr")
                outputs.append(out)
                out.array[...] = result.labels
            else:
                write_tiff(paths["labels"], result.labels, axes=axes)
            top = int(result.labels.max()) if result.labels.size else 0
        for out in outputs:
            out.commit()
        outputs.clear()
        if s.overlay:
            _write_overlay(paths["overlay"], image, axes, paths["labels"])
        return FileResult(src, "done", "", str(paths["labels"]), time.perf_counter() - t0,
                          top, list(result.messages))
    except StopRequested:
        for out in outputs:
            out.abort()
        raise
    except (PaintsegError, ValueError, OSError, MemoryError, RuntimeError) as exc:
        for out in outputs:
            out.abort()
        reason = str(exc) if isinstance(exc, PaintsegError) else f"{src}: {exc}"
        if isinstance(exc, MemoryError):
            reason = f"{src}: out of memory ({exc}); try a smaller --memory or --tile"
        return FileResult(src, "failed", reason, None, time.perf_counter() - t0)


def _write_overlay(path: Path, image: Any, axes: str, labels_path: Path) -> None:
    """PNG of the image (middle slice of a stack) with the label outlines."""
    from PIL import Image

    from .inference import AxesView
    from .postprocess import overlay_rgb

    labels = read_output(labels_path)
    view = AxesView(image.data, image.axes, "C" + axes)
    index = tuple(s // 2 for s in labels.shape[:-2])
    img = np.moveaxis(view[(slice(None), *index)], 0, -1)
    lab = np.asarray(labels[index]) if index else np.asarray(labels[...])
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(overlay_rgb(img, lab)).save(tmp, format="PNG")


def iter_batch(
    jobs: Iterable[Job],
    model: PaintsegModel,
    *,
    out_dir: str | os.PathLike[str],
    settings: SegmentSettings | None = None,
    device: Any = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[FileResult]:
    """Segment ``jobs`` one after another in this process, yielding a result per file.

    A bad file yields a ``failed`` result and the batch goes on. A stop request ends the
    batch between files or tiles; the file being written is discarded (a rerun redoes it).
    ``progress(done, total)`` reports tiles of the current file; ``block_bytes`` is that of
    :func:`segment_file`.
    """
    for job in jobs:
        if should_stop is not None and should_stop():
            return
        try:
            yield segment_file(job, model, out_dir=out_dir, settings=settings, device=device,
                               overwrite=overwrite, progress=progress, should_stop=should_stop,
                               block_bytes=block_bytes)
        except StopRequested:
            return


def summarize(results: Sequence[FileResult]) -> dict[str, Any]:
    """Counts and per-file results, ready for JSON."""
    counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
    return {"total": len(results), **counts, "files": [asdict(r) for r in results]}


def write_report(path: str | os.PathLike[str], results: Sequence[FileResult],
                 **extra: Any) -> Path:
    """Write :func:`summarize` (plus ``extra`` fields) as JSON, atomically."""
    data = {**extra, **summarize(results)}
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------- parallel

_WORKER_MODELS: dict[str, PaintsegModel] = {}  # per process: checkpoint digest -> model
_WORKER_LOADS: list[str] = []  # digests loaded by this process (to prove "once per worker")


def _worker_model(checkpoint: bytes, digest: str) -> PaintsegModel:
    """The model for ``checkpoint``, deserialised once per worker process."""
    model = _WORKER_MODELS.get(digest)
    if model is None:
        from .model import load_model_bytes

        model = load_model_bytes(checkpoint, name=f"model {digest[:8]}")
        _WORKER_MODELS.clear()  # one model at a time per worker
        _WORKER_MODELS[digest] = model
        _WORKER_LOADS.append(digest)
    return model


def _set_threads(threads: int | None) -> None:
    """Torch threads of this worker process (one per core it is meant to use)."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _worker_task(job: Job, checkpoint: bytes, digest: str, out_dir: str,
                 settings: SegmentSettings, device: Any, overwrite: bool,
                 threads: int | None) -> tuple[FileResult, int, int, int]:
    """One file on a worker; returns its result, the worker's pid, how many times this worker
    has loaded the model, and the worker's peak resident memory so far (bytes; 0 if the
    platform does not say)."""
    _set_threads(threads)
    model = _worker_model(checkpoint, digest)
    try:
        result = segment_file(job, model, out_dir=out_dir, settings=settings, device=device,
                              overwrite=overwrite)
    except Exception as exc:  # noqa: BLE001 - a task never kills the batch
        result = FileResult(str(job.source), "failed", f"{job.source}: {exc}")
    return result, os.getpid(), _WORKER_LOADS.count(digest), _peak_rss()


def _peak_rss() -> int:
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return 0


def _worker_block(job: Job, checkpoint: bytes, digest: str, settings: SegmentSettings,
                  device: Any, plan: BlockPlan, index: int, part: str,
                  threads: int | None) -> tuple[int, int, int, int]:
    """:func:`_block_labels` on a worker. Returns (largest label, pid, model loads, peak
    memory)."""
    _set_threads(threads)
    model = _worker_model(checkpoint, digest)
    info = _inspect(job, model, settings)
    top = _block_labels(info, model, settings, device, plan, index, part)
    return top, os.getpid(), _WORKER_LOADS.count(digest), _peak_rss()


def _block_labels(info: _FileInfo, model: PaintsegModel, settings: SegmentSettings,
                  device: Any, plan: BlockPlan, index: int, part: str,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> int:
    """Block ``index`` of one file saved to ``part``; returns its largest label."""
    from .blocks import segment_block

    return segment_block(info.image, model, plan, index, part, settings, axes=info.axes,
                         device=device, progress=progress, should_stop=should_stop)


def _plan_blocks(info: _FileInfo, model: PaintsegModel, settings: SegmentSettings,
                 block_bytes: int, name: str, device: Any) -> BlockPlan | None:
    """How to cut one file into blocks (see :mod:`paintseg.blocks`), or None to run it whole;
    never with rescaling, probabilities or an overlay."""
    from .blocks import plan_blocks

    if settings.diameter or settings.probabilities or settings.overlay:
        return None
    return plan_blocks(info.image, model, axes=info.axes, shape=info.shape,
                       instances=info.instances, block_bytes=block_bytes,
                       tiles=settings.tiles, device=device, name=name)


def _assemble(job: Job, parts: list[str], tops: list[int], info: _FileInfo, plan: BlockPlan,
              settings: SegmentSettings, out_dir: str | os.PathLike[str],
              seconds: float) -> FileResult:
    """Write the blocks of a file into its labels output (atomically) and remove them."""
    from .blocks import read_block, stitch_instances
    from .io import label_dtype

    paths = output_paths(job, out_dir, settings.format)
    try:
        luts = None
        if plan.volume and plan.instances:
            luts, top = stitch_instances(parts, tops, min_size=settings.min_size)
        else:
            top = max(tops) if tops else 0
        # instance numbers are known only now; class labels have the type output_spec gave
        dtype = label_dtype(max(top, 1)) if info.instances else info.dtype
        paths["labels"].parent.mkdir(parents=True, exist_ok=True)
        out = open_output(paths["labels"], info.shape, dtype, axes=info.axes,
                          fmt=settings.format)
        try:
            for k, ((a, b), part) in enumerate(zip(plan.ranges, parts)):
                block = read_block(part)
                out.array[a:b] = (block if luts is None else luts[k][block]).astype(dtype)
            out.commit()
        except BaseException:
            out.abort()
            raise
    finally:
        for part in parts:
            Path(part).unlink(missing_ok=True)
    how = "blocks with halos, joined" if plan.volume and plan.instances else "blocks"
    return FileResult(str(job.source), "done", "", str(paths["labels"]), seconds,
                      top if info.instances else None, [f"segmented in {len(parts)} {how}"])


@dataclass
class BatchStats:
    """How a parallel batch ran: ``loads`` maps worker pid to model loads (1 each) and
    ``peak_rss`` to the worker's peak resident memory in bytes."""

    workers: int = 1
    loads: dict[int, int] = field(default_factory=dict)
    peak_rss: dict[int, int] = field(default_factory=dict)


def run_batch(
    jobs: Sequence[Job],
    model: PaintsegModel | str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str],
    settings: SegmentSettings | None = None,
    device: Any = "auto",
    overwrite: bool = False,
    workers: int = 1,
    scheduler: Any = None,
    threads_per_worker: int | None = None,
    on_result: Callable[[FileResult], None] | None = None,
    stats: BatchStats | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> list[FileResult]:
    """Segment ``jobs``: in this process (``workers=1``, no scheduler), on a local cluster of
    ``workers`` processes, or on an existing Dask distributed cluster (``scheduler``: its
    address, e.g. ``"tcp://10.0.0.5:8786"``, or a ``distributed.Client``).

    The checkpoint is sent to every worker once (broadcast) and loaded once per worker
    process; inputs and outputs must be on storage the workers can reach. Results come back
    in input order; ``on_result`` is called as each file finishes.

    On a cluster, a stack larger than ``block_bytes`` is cut into blocks that run as separate
    tasks and are written into its output when all are done (see :mod:`paintseg.blocks`):
    blocks of slices for a 2D model, blocks of Z planes with their halos for a 3D model.
    """
    s = settings or SegmentSettings()
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if scheduler is None and workers == 1:
        from .model import load_model

        net = model if isinstance(model, PaintsegModel) else load_model(model)
        out = []
        for r in iter_batch(jobs, net, out_dir=out_dir, settings=s, device=device,
                            overwrite=overwrite, block_bytes=block_bytes):
            out.append(r)
            if on_result is not None:
                on_result(r)
        return out
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise InputError("parallel batches need Dask: pip install 'dask[distributed]'") from None
    import hashlib

    from .model import model_bytes

    checkpoint = model_bytes(model)
    digest = hashlib.sha256(checkpoint).hexdigest()
    cluster = None
    if isinstance(scheduler, Client):
        client = scheduler
    elif scheduler is not None:
        client = Client(scheduler)
    else:
        cores = os.cpu_count() or 1
        threads_per_worker = threads_per_worker or max(1, cores // workers)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    try:
        n_workers = len(client.scheduler_info().get("workers", {})) or workers
        ckpt = client.scatter(checkpoint, broadcast=True)
        local = None
        results: list[FileResult | None] = [None] * len(jobs)
        loads: dict[int, int] = {}
        peaks: dict[int, int] = {}
        futures: dict[Any, tuple[int, int]] = {}  # future -> (job index, block index or -1)
        split: dict[int, dict[str, Any]] = {}
        for i, job in enumerate(jobs):
            plan = info = None
            labels_path = output_paths(job, out_dir, s.format)["labels"]
            if block_bytes:
                if local is None:
                    from .model import load_model_bytes

                    local = load_model_bytes(checkpoint)
                try:
                    info = _inspect(job, local, s)
                except (PaintsegError, ValueError):
                    info = None  # the whole-file task reports it
                if info is not None and (overwrite
                                         or not output_complete(labels_path, info.shape)):
                    plan = _plan_blocks(info, local, s, block_bytes, str(job.source), device)
            if plan is None:
                fut = client.submit(_worker_task, job, ckpt, digest, str(out_dir), s, device,
                                    overwrite, threads_per_worker, pure=False)
                futures[fut] = (i, -1)
                continue
            n_blocks = len(plan.ranges)
            labels_path.parent.mkdir(parents=True, exist_ok=True)
            parts = _block_parts(labels_path, n_blocks)
            split[i] = {"parts": parts, "tops": [None] * n_blocks, "left": n_blocks,
                        "info": info, "plan": plan, "t0": time.perf_counter(), "failed": None}
            for b in range(n_blocks):
                fut = client.submit(_worker_block, job, ckpt, digest, s, device, plan, b,
                                    parts[b], threads_per_worker, pure=False)
                futures[fut] = (i, b)
        for fut in as_completed(list(futures)):
            i, b = futures[fut]
            r = None
            try:
                if b < 0:
                    r, pid, n, rss = fut.result()
                else:
                    top, pid, n, rss = fut.result()
                    split[i]["tops"][b] = top
                loads[pid] = max(loads.get(pid, 0), n)
                peaks[pid] = max(peaks.get(pid, 0), rss)
            except Exception as exc:  # noqa: BLE001 - a lost worker fails its file only
                msg = f"{jobs[i].source}: worker failed: {exc}"
                if b < 0:
                    r = FileResult(str(jobs[i].source), "failed", msg)
                else:
                    split[i]["failed"] = split[i]["failed"] or msg
            if b >= 0:
                info = split[i]
                info["left"] -= 1
                if info["left"]:
                    continue
                if info["failed"]:
                    for part in info["parts"]:
                        Path(part).unlink(missing_ok=True)
                    r = FileResult(str(jobs[i].source), "failed", info["failed"])
                else:
                    try:
                        r = _assemble(jobs[i], info["parts"], info["tops"], info["info"],
                                      info["plan"], s, out_dir, time.perf_counter() - info["t0"])
                    except (OSError, PaintsegError) as exc:
                        r = FileResult(str(jobs[i].source), "failed", f"{jobs[i].source}: {exc}")
            results[i] = r
            if on_result is not None:
                on_result(r)
        if stats is not None:
            stats.workers, stats.loads, stats.peak_rss = n_workers, loads, peaks
        return [r for r in results if r is not None]
    finally:
        if client is not scheduler:
            client.close()
        if cluster is not None:
            cluster.close()
