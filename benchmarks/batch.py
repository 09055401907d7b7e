"""Batch throughput and memory: one process against a local Dask cluster.

1. 20 files of 1024x1024 (DSB2018 nuclei mosaics, shifted) segmented with the bundled
   ``nuclei`` model (instances): files per minute in this process, then on a local Dask
   cluster of ``--workers`` processes (1 torch thread each), same process, same files;
   outputs compared byte for byte.
2. One uint16 stack of ``--slices`` x 1024 x 1024 (1024 slices = 2.15 GB) on the cluster with
   a small model: the peak resident memory of the worker that ran it, against the stack's
   size (goal: bounded by the tiles, not by the stack).
3. One volume segmented by a 3D instance model (``tests/data/balls3d.pt``) on a cluster
   worker, in blocks of Z planes with halos, at two depths (``--planes3d``, 288 x 288 planes of
   synthetic balls): the worker's peak memory against the memory a whole-volume instance
   run needs, and the object count against a whole-volume run in this process.

    python benchmarks/batch.py [--workers 2] [--slices 1024] [--dir /tmp/paintseg-batchbench]
                               [--only 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tifffile

from paintseg.batch import BatchStats, collect_inputs, run_batch
from paintseg.config import ModelConfig
from paintseg.model import new_model, save_model

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--slices", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/paintseg-batchbench"))
    parser.add_argument("--planes3d", default="192,768")
    parser.add_argument("--only", default="1,2,3")
    args = parser.parse_args()
    root = args.dir
    parts = {int(p) for p in args.only.split(",")}
    if 1 in parts:
        files_per_minute(args, root)
    if 2 in parts:
        big_stack(args, root)
    if 3 in parts:
        volume_blocks(args, root)


def files_per_minute(args: argparse.Namespace, root: Path) -> None:
    src = root / "files"
    src.mkdir(parents=True, exist_ok=True)
    base = np.tile(tifffile.imread(SAMPLES / "nuclei2d.tif"), (2, 2))
    for k in range(args.files):
        path = src / f"img{k:02d}.tif"
        if not path.exists():
            tifffile.imwrite(path, np.roll(base, (37 * k, 91 * k), axis=(0, 1)))
    jobs = collect_inputs([src])
    print(f"{len(jobs)} files of 1024x1024, model 'nuclei' (instances)")
    rates = {}
    for label, workers in (("1 process", 1), (f"Dask LocalCluster, {args.workers} workers",
                                              args.workers)):
        out = root / f"out_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        stats = BatchStats()
        t = time.perf_counter()
        res = run_batch(jobs, "nuclei", out_dir=out, workers=workers, stats=stats)
        secs = time.perf_counter() - t
        assert all(r.status == "done" for r in res), [r.reason for r in res]
        rates[workers] = len(jobs) / secs * 60
        peak = (f", peak memory per worker {max(stats.peak_rss.values()) / 1e9:.2f} GB"
                if stats.peak_rss else "")
        print(f"  {label:<34} {secs:6.1f} s  {rates[workers]:5.1f} files/min{peak}",
              flush=True)
    same = all((root / "out_1" / p.name).read_bytes() == p.read_bytes()
               for p in (root / f"out_{args.workers}").iterdir())
    print(f"  cluster / 1 process: {rates[args.workers] / rates[1]:.2f}x; outputs byte-identical: "
          f"{same}")



def big_stack(args: argparse.Namespace, root: Path) -> None:
    """A stack larger than 2 GB on one worker."""
    from benchmarks_memory import make_stack  # noqa: E402 - sibling script

    stack_dir = root / "stack"
    stack_dir.mkdir(exist_ok=True)
    stack = stack_dir / "stack.tif"
    if not stack.exists() or stack.stat().st_size < args.slices * 2 * 2**20:
        print(f"writing {stack} ...", flush=True)
        make_stack(stack, args.slices)
    model = save_model(new_model(ModelConfig(depth=2, base_features=4), seed=0),
                       root / "tiny.pt")
    out = root / "out_stack"
    shutil.rmtree(out, ignore_errors=True)
    stats = BatchStats()
    from distributed import Client, LocalCluster

    # one file: one worker process with all the cores
    cores = os.cpu_count() or 1
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        t = time.perf_counter()
        res = run_batch(collect_inputs([stack]), model, out_dir=out, scheduler=client,
                        threads_per_worker=cores, stats=stats)
        secs = time.perf_counter() - t
    assert res[0].status == "done", res[0].reason
    size = stack.stat().st_size / 1e9
    peak = max(stats.peak_rss.values()) / 1e9
    print(f"\nstack {args.slices}x1024x1024 uint16 ({size:.2f} GB) on a Dask worker ({cores} "
          f"torch threads), 2D U-Net depth 2 base 4: {secs:.0f} s; peak memory of the worker "
          f"{peak:.2f} GB ({peak / size:.2f}x the stack)")


def volume_blocks(args: argparse.Namespace, root: Path) -> None:
    """One volume of a 3D instance model in blocks with halos, on a cluster worker."""
    import importlib.util

    from distributed import Client, LocalCluster

    from paintseg.batch import segment_file
    from paintseg.config import SegmentSettings
    from paintseg.metrics import instance_scores
    from paintseg.model import load_model

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("t", repo / "scripts" / "train_test_model3d.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model_path = repo / "tests" / "data" / "balls3d.pt"
    model = load_model(model_path)
    cell, _ = script.balls((48, 96, 96), 45, seed=5)
    cell = np.tile(cell, (1, 3, 3))  # 48 x 288 x 288
    block_bytes = 256 * 2**20
    cores = os.cpu_count() or 1
    print(f"\n3D instance model {model_path.name} (depth 2, base 8), blocks of "
          f"{block_bytes / 2**20:.0f} MB target, one Dask worker ({cores} torch threads)")
    for planes in (int(p) for p in args.planes3d.split(",")):
        vol = np.concatenate([cell] * -(-planes // len(cell)))[:planes]
        path = root / "vol3d" / f"vol{planes}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, vol, metadata={"axes": "ZYX"})
        jobs = collect_inputs([path])
        out = root / f"out_vol{planes}"
        shutil.rmtree(out, ignore_errors=True)
        stats = BatchStats()
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=40) as cluster, \
                Client(cluster) as client:
            t = time.perf_counter()
            res = run_batch(jobs, model_path, out_dir=out, scheduler=client,
                            threads_per_worker=cores, stats=stats, block_bytes=block_bytes)
            secs = time.perf_counter() - t
        assert res[0].status == "done", res[0].reason
        peak = max(stats.peak_rss.values()) / 1e9
        whole_work = vol.size * (model.config.classes * 4 + 20) / 1e9
        line = (f"  {planes}x288x288 ({vol.nbytes / 1e6:.0f} MB): {res[0].messages[0]}, "
                f"{res[0].objects} objects, {secs:.0f} s; worker peak {peak:.2f} GB "
                f"(a whole-volume instance run holds {whole_work:.2f} GB of probabilities "
                "and work)")
        if planes <= 192:  # compare with a whole-volume run in this process
            t = time.perf_counter()
            whole = segment_file(jobs[0], model, out_dir=root / f"whole_vol{planes}",
                                 settings=SegmentSettings(), block_bytes=0)
            wsecs = time.perf_counter() - t
            a, b = tifffile.imread(whole.labels), tifffile.imread(res[0].labels)
            f1 = instance_scores(b, a)["f1"]
            line += (f"\n    whole volume in this process: {whole.objects} objects, {wsecs:.0f} s"
                     f"; blocks vs whole F1 {f1[0]:.3f} at IoU 0.5, {f1[-1]:.3f} at 0.9")
        print(line, flush=True)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import importlib

    sys.modules["benchmarks_memory"] = importlib.import_module("memory")
    main()
