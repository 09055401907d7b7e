"""Batch throughput and memory: one process against a local Dask cluster.

1. 20 files of 1024x1024 (DSB2018 nuclei mosaics, shifted) segmented with the bundled
   ``nuclei`` model (instances): files per minute in this process, then on a local Dask
   cluster of ``--workers`` processes (1 torch thread each), same process, same files;
   outputs compared byte for byte.
2. One uint16 stack of ``--slices`` x 1024 x 1024 (1024 slices = 2.15 GB) on the cluster with
   a small model: the peak resident memory of the worker that ran it, against the stack's
   size (goal: bounded by the tiles, not by the stack).

    python benchmarks/batch.py [--workers 2] [--slices 1024] [--dir /tmp/paintseg-batchbench]
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

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--slices", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/paintseg-batchbench"))
    args = parser.parse_args()
    root = args.dir
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

    # 2. a stack larger than 2 GB on one worker
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


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import importlib

    sys.modules["benchmarks_memory"] = importlib.import_module("memory")
    main()
