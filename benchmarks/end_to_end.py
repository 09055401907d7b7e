"""End-to-end segmentation of the models users train, and where its time goes.

For each input, in one process: a model as a user gets it (a new fast-preset U-Net trained
from simulated strokes for ``--seconds``; the bundled ``nuclei`` starter, with instances),
then ``paintseg segment``'s own path (:func:`paintseg.batch.segment_file`: reading,
normalisation, tiled inference, snap or watershed, atomic writing of the labels TIFF) in
float32 and in the default precision (mixed where the device has it: CUDA, a CPU with
bfloat16 units), timed against the floor: the network's forward pass in fp32 (filter bank
and U-Nets) on each whole plane (a 3D model: the whole volume), nothing else, measured before
and after them (the mean is the floor), and the same floor in the mixed type; the default's
labels are compared with float32's. The default's path is run again under :mod:`cProfile`
for each stage's share of the time (the profiler slows the Python parts: that run's total is
shown apart). A last run of the same file with the path as it was before this benchmark
existed (commit b3825ff's snap: the watershed flooded from every pixel of the plane, every
class tested for thin lines with distance transforms of its own; batches of up to 4 Mpx on
the CPU; float32), also profiled, gives the speed-up as a ratio in the same process, and the
share of pixels whose labels agree with float32's now.

Inputs (``--data``): ``em``, a 32x768x1024 EM stack (the ``vnc-sstem`` sections of
``../shared/datasets``, forwards then backwards), membranes painted; ``phase``, 10 phase-contrast
images of 1022x1024 (``usiigaci-phase``), cells painted (blob-like: the snap moves borders);
``nuclei3d``, the sample cells3d stack as 64x512x512 (2x2 in XY; ``--side 1024``: 4x4) with a
3D fast-preset model trained from dots on two planes; ``starter``, a 2048x2048 mosaic of the
sample nuclei image segmented by the bundled starter with instances (the last two run without
``../shared``);
``mosaic`` (not run by default), ``--planes`` planes of that mosaic (64: 64x2048x2048, the
GPU stack of issue 41; ``--side 1024``: 64x1024x1024, its CPU stack), a fast-preset model
trained from dots on the first. ``--no-before`` leaves out the run of the path as it was.
``--device cuda`` runs the same on a GPU (training steps per second reported too).

Usage::

    python benchmarks/end_to_end.py [--data em phase nuclei3d starter mosaic] [--seconds 20]
                                    [--device cpu|cuda|mps|auto] [--planes 64] [--side N]
                                    [--no-before]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage as ndi

from paintseg import inference, postprocess
from paintseg.batch import Job, segment_file
from paintseg.config import SegmentSettings, TileConfig, TrainConfig
from paintseg.devices import (
    describe_device,
    flush_denormals,
    resolve_device,
    type_name,
)
from paintseg.inference import default_snap
from paintseg.io import RawArray
from paintseg.model import load_model
from paintseg.network import FilterBank, _body_forward
from paintseg.normalize import percentile_range
from paintseg.training import iter_train, prepare_training

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src" / "paintseg" / "sample_data"
SHARED = ROOT.parent / "shared" / "datasets"


def dot_strokes(truth: np.ndarray, planes: tuple[int, ...], rng: np.random.Generator
                ) -> np.ndarray:
    """Dots of both classes on ``planes`` (1: rest, 2: the structure), as benchmarks/gui.py
    paints them."""
    strokes = np.zeros(truth.shape, np.uint8)
    for z in planes:
        pick = rng.random(truth[z].shape)
        strokes[z][~truth[z] & (pick < 0.003)] = 1
        strokes[z][truth[z] & (pick < 0.01)] = 2
    return strokes


def inputs(names: list[str], *, planes: int = 64, side: int | None = None
           ) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, stack, strokes or None for the starter); ``planes``: the mosaic's; ``side``:
    the mosaic's and the cells3d stack's planes (default 2048 and 512)."""
    rng = np.random.default_rng(0)
    out = []
    for name in names:
        if name == "em":
            em = SHARED / "vnc-sstem"
            sections = tifffile.imread(em / "image.tif")
            membrane = tifffile.imread(em / "labels.tif") == 1
            stack = np.concatenate([sections, sections[::-1]])[:32, :768]
            truth = np.concatenate([membrane, membrane[::-1]])[:32, :768]
            out.append((name, stack, dot_strokes(truth, (5, 20), rng)))
        elif name == "phase":
            folder = SHARED / "usiigaci-phase"
            stack = tifffile.imread(folder / "image.tif")[:10]
            truth = tifffile.imread(folder / "labels.tif")[:10] > 0
            out.append((name, stack, dot_strokes(truth, (0, 1), rng)))
        elif name == "nuclei3d":
            n = (side or 512) // 256
            stack = np.tile(tifffile.imread(SAMPLES / "nuclei3d.tif"), (1, n, n))
            truth = np.tile(tifffile.imread(SAMPLES / "nuclei3d_labels.tif") > 0, (1, n, n))
            stack = np.concatenate([stack, stack[::-1][: 64 - len(stack)]])
            truth = np.concatenate([truth, truth[::-1][: 64 - len(truth)]])
            out.append((name, stack, dot_strokes(truth, (20, 40), rng)))
        elif name == "mosaic":
            # issue 41's GPU stack: the sample nuclei image as a 2048^2 mosaic, shifted per
            # plane, dots on the first plane
            n = (side or 2048) // 512
            tile = np.tile(tifffile.imread(SAMPLES / "nuclei2d.tif"), (n, n))
            truth = np.tile(tifffile.imread(SAMPLES / "nuclei2d_instances.tif") > 0, (n, n))
            stack = np.stack([np.roll(tile, 37 * k, axis=(0, 1)) for k in range(planes)])
            out.append((name, stack, dot_strokes(truth[None], (0,), rng)
                        if planes == 1 else np.concatenate(
                            [dot_strokes(truth[None], (0,), rng),
                             np.zeros((planes - 1, *truth.shape), np.uint8)])))
        else:
            out.append((name, np.tile(tifffile.imread(SAMPLES / "nuclei2d.tif"), (4, 4)), None))
    return out


def floor_seconds(model, stack: np.ndarray, device: torch.device,
                  dtype: torch.dtype | None = None) -> float:
    """The network's forward pass (its U-Nets' layers in ``dtype``, None: fp32) on each whole
    plane (a 3D model: on the whole volume), normalised with the model's percentiles of the
    whole stack, nothing else; with denormals flushed, as paintseg runs it, after one plane
    (a 3D model: a corner of the volume) unmeasured."""
    lo, hi = percentile_range(stack[np.newaxis].astype(np.float32), model.normalization)
    net = model.network.to_device(device).eval()
    dims = model.config.dims
    parts = stack.reshape(-1, *stack.shape[-dims:])

    def forward(part: np.ndarray) -> None:
        x = torch.from_numpy(((part - lo[0]) / (hi[0] - lo[0])).astype(np.float32))
        net(x[None, None].to(device), autocast=dtype)

    with torch.inference_mode(), flush_denormals():
        forward(parts[0] if dims == 2 else parts[0][:32, :256, :256])
        t = time.perf_counter()
        for part in parts:
            forward(part)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    net.to_device("cpu")
    return seconds


# stage -> the functions whose cumulative time it is
STAGES = {
    "reading": [RawArray.__getitem__, tifffile.TiffFile.asarray],
    "normalisation": [percentile_range],
    "filter bank": [FilterBank.forward],
    "U-Nets": [_body_forward],
    "snap": [postprocess.snap_planes],
    "instances": [postprocess.instances_from_probabilities],
    "writing": [RawArray.__setitem__, RawArray.flush, tifffile.TiffWriter.write],
}


def timed(model, path: Path, out: Path, settings: SegmentSettings, device: torch.device
          ) -> tuple[float, np.ndarray]:
    """Seconds of ``paintseg segment``'s path on ``path``, and the labels it wrote."""
    t = time.perf_counter()
    result = segment_file(Job(path, Path(path.name)), model, out_dir=out, settings=settings,
                          device=device, overwrite=True)
    return time.perf_counter() - t, tifffile.imread(result.labels)


def profiled(model, path: Path, out: Path, settings: SegmentSettings, device: torch.device
             ) -> tuple[float, dict[str, float], np.ndarray]:
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    result = segment_file(Job(path, Path(path.name)), model, out_dir=out, settings=settings,
                          device=device, overwrite=True)
    prof.disable()
    total = time.perf_counter() - t
    if result.status != "done":
        raise SystemExit(f"{path}: {result.reason}")
    stats = pstats.Stats(prof).stats
    shares = {}
    for stage, funcs in STAGES.items():
        codes = {(f.__code__.co_filename, f.__code__.co_firstlineno) for f in funcs}
        shares[stage] = sum(v[3] for k, v in stats.items() if (k[0], k[1]) in codes)
    return total, shares, tifffile.imread(result.labels)


def snap_before(probabilities, image, *, snap=8, confidence=postprocess.SNAP_CONFIDENCE,
                sigma=1.0):
    """The snap as it was before this benchmark (commit b3825ff): a watershed seeded from
    every pixel outside the band, every class's thin-line test with distance transforms of
    its own."""
    from skimage.filters import gaussian, sobel
    from skimage.segmentation import watershed

    index = np.argmax(probabilities, axis=0)
    present = np.unique(index)
    if snap == 0 or len(present) < 2:
        return index
    distance = np.zeros(index.shape, np.float32)
    for k in present:
        inside = index == k
        distance[inside] = ndi.distance_transform_edt(inside)[inside]
    band = (distance <= snap) & (probabilities.max(axis=0) < confidence)
    thin = thin_before(index, snap=snap) if band.any() else []
    if thin:
        band &= ndi.distance_transform_edt(~np.isin(index, thin)) > snap
    if not band.any():
        return index
    grad = np.zeros(index.shape, np.float32)
    for channel in np.asarray(image, dtype=np.float32):
        grad += sobel(gaussian(channel, sigma=sigma, preserve_range=True))
    return watershed(grad, markers=np.where(band, 0, index + 1)).astype(np.int64) - 1


def thin_before(index, *, snap):
    from skimage.morphology import skeletonize

    thin = []
    for c in np.unique(index):
        inside = index == c
        if inside.all():
            continue
        skeleton = skeletonize(inside)
        widths = 2 * ndi.distance_transform_edt(inside)[skeleton]
        if not len(widths):
            continue
        width = float(np.median(widths))
        if width >= 2 * snap:
            continue
        regions, n = ndi.label(inside)
        big = np.flatnonzero(np.bincount(regions.ravel(), minlength=n + 1)[1:] >= width**2) + 1
        if len(big) and np.isin(regions[skeleton], big).sum() / len(big) >= 3 * width:
            thin.append(int(c))
    return thin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", default=["em", "phase", "nuclei3d", "starter"],
                        choices=("em", "phase", "nuclei3d", "starter", "mosaic"))
    parser.add_argument("--planes", type=int, default=64, help="planes of the mosaic stack")
    parser.add_argument("--seconds", type=float, default=20.0, help="training budget")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--side", type=int, default=None,
                        help="side of the mosaic's planes (a multiple of 512; default 2048) "
                             "and of the cells3d stack's (a multiple of 256; default 512)")
    parser.add_argument("--no-before", action="store_true",
                        help="leave out the run of the path as it was (b3825ff)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{describe_device(device)}")
    for name, stack, strokes in inputs(args.data, planes=args.planes, side=args.side):
        if strokes is None:
            model = load_model("nuclei")
            settings = SegmentSettings(axes="YX")
            print()
        else:
            dims = 3 if name == "nuclei3d" else 2
            data, model = prepare_training([(stack, strokes)], base=None, dims=dims,
                                           in_channels=1, seed=0)
            done = None
            for done in iter_train(model, data,  # noqa: B007 - the last event is kept
                                   TrainConfig(time_budget=args.seconds, seed=0),
                                   device=device):
                pass
            print(f"\n{name}: trained {done.step} steps in {args.seconds:g} s "
                  f"({done.step / args.seconds:.1f} steps/s)")
            settings = SegmentSettings(axes="ZYX")
        auto = inference.autocast_type(settings.tiles, device)
        mixed = None if auto is None else type_name(auto)
        fp32 = dataclasses.replace(settings, tiles=TileConfig(precision="float32"))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.tif"
            tifffile.imwrite(path, stack)

            # the floors before and after the unprofiled runs (their mean: machines drift),
            # then the profiled run of the default for the stages' shares (cProfile slows
            # the Python parts)
            floors = [floor_seconds(model, stack, device)]
            floors16 = [floor_seconds(model, stack, device, auto)] if mixed else []
            seconds32, labels32 = timed(model, path, Path(tmp) / "fp32", fp32, device)
            seconds, labels = (timed(model, path, Path(tmp) / "plain", settings, device)
                               if mixed else (seconds32, labels32))
            floors.append(floor_seconds(model, stack, device))
            if mixed:
                floors16.append(floor_seconds(model, stack, device, auto))
            floor = float(np.mean(floors))
            total, shares, _ = profiled(model, path, Path(tmp) / "out", settings, device)
            before = None
            if not args.no_before:
                # the path as it was before: the snap of b3825ff, CPU batches of up to 4 Mpx,
                # float32
                saved = postprocess.snap_to_edges, inference._CPU_BATCH_PIXELS
                postprocess.snap_to_edges, inference._CPU_BATCH_PIXELS = snap_before, 4e6
                try:
                    before = profiled(model, path, Path(tmp) / "before", fp32, device)
                finally:
                    postprocess.snap_to_edges, inference._CPU_BATCH_PIXELS = saved
                same = float(np.mean(before[2] == labels32))
        mpx = stack.size / 1e6
        output = ("instances" if strokes is None else "not snapped (3D)"
                  if model.config.dims == 3 else f"snap {default_snap(model)}")
        print(f"{name}: {stack.shape} {stack.dtype}, {model.config.network_name}, "
              f"{output}")
        print(f"  floor (network, whole planes)    {floor:6.1f} s  {mpx / floor:5.2f} Mpx/s  "
              f"(before and after: {floors[0]:.1f} s, {floors[1]:.1f} s)")
        print(f"  end to end, float32              {seconds32:6.1f} s  "
              f"{mpx / seconds32:5.2f} Mpx/s  {seconds32 / floor:4.2f}x the floor")
        if mixed:
            floor16 = float(np.mean(floors16))
            print(f"  floor in {mixed:<8}                {floor16:6.1f} s  "
                  f"{mpx / floor16:5.2f} Mpx/s  {floor16 / floor:4.2f}x the float32 floor")
            print(f"  end to end, default ({mixed})  {seconds:6.1f} s  {mpx / seconds:5.2f} "
                  f"Mpx/s  {seconds / floor:4.2f}x the float32 floor, {seconds / floor16:4.2f}x "
                  f"its own; {seconds / seconds32:4.2f}x float32 end to end, labels equal on "
                  f"{100 * np.mean(labels == labels32):.3f}% of pixels")
        print(f"  default under cProfile, for the shares {total:6.1f} s")
        for stage, s in shares.items():
            if s > 0:
                print(f"    {stage:<14} {s:6.1f} s  {100 * s / total:4.0f}%")
        other = total - sum(shares.values())
        print(f"    {'other':<14} {other:6.1f} s  {100 * other / total:4.0f}%")
        if before is None:
            continue
        print(f"  before (the snap of b3825ff, CPU batches of 4 Mpx, float32; profiled): "
              f"{before[0]:.1f} s; now {total / before[0]:.2f}x; labels equal to float32's "
              f"now on {100 * same:.4f}% of pixels")


if __name__ == "__main__":
    main()
