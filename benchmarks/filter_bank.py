"""The filter bank in front of the U-Net, three ways in one process on the same inputs: a
direct convolution for kernels under 25 taps (what every device did before 2026-12-06, and
what devices other than the CPU still do), every kernel through the FFT with a transform of
its own (the CPU from 2026-12-06, eighth session), and through the FFT with one transform of
each pass's input shared by the kernels applied to it (the CPU now).

The inputs are the sizes paintseg filters: a live-mode view of a 768x1024 EM slice with the
network's context (864x1120), a 512x512 tile, a training batch of 16 patches of 64x64 (with
the bank's padding), a 3D tile of 64x256x256 and a 3D training batch. Timings are the best of
a few runs; read the ratios. Also checks that both give the same features (float rounding).

Usage::

    python benchmarks/filter_bank.py [--device cpu|cuda|mps] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from paintseg.devices import resolve_device
from paintseg.network import _FFT_KERNEL, FilterBank


class DirectShortKernels(FilterBank):
    """The filter bank with the earlier rule: the FFT only for kernels of 25 taps or more."""

    def _along(self, x, k, axis, *, fft=None, fx=None):
        return super()._along(x, k, axis, fft=k.numel() >= _FFT_KERNEL)

    def _along_each(self, x, ks, axis):
        return [self._along(x, k, axis) for k in ks]


class FFTEachKernel(FilterBank):
    """Every kernel through the FFT, each with its own transform of the input."""

    def _along_each(self, x, ks, axis):
        return [self._along(x, k, axis) for k in ks]


CASES = [
    # name, input shape (N, 1, *spatial), filter scales
    ("live view 864x1120", (1, 1, 864, 1120), (1.0, 2.0, 4.0, 8.0)),
    ("tile 512x512", (1, 1, 512, 512), (1.0, 2.0, 4.0, 8.0)),
    ("training batch 16x64x64", (16, 1, 64, 64), (1.0, 2.0, 4.0, 8.0)),
    ("3D tile 64x256x256", (1, 1, 64, 256, 256), (1.0, 2.0, 4.0)),
    ("3D training batch 4x32^3", (4, 1, 32, 32, 32), (1.0, 2.0, 4.0)),
]


def best_of(bank: FilterBank, x: torch.Tensor, repeats: int, device: torch.device) -> float:
    def run():
        bank(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads")
    print(f"{'input':28s} {'direct < 25 taps':>17s} {'FFT each':>9s} {'FFT shared':>11s} "
          f"{'shared/direct':>13s} {'shared/each':>11s}  max diff")
    for name, shape, sigmas in CASES:
        dims = len(shape) - 2
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
        banks = [cls(1, sigmas, dims).to(device)
                 for cls in (DirectShortKernels, FFTEachKernel, FilterBank)]
        with torch.no_grad():
            t = [best_of(bank, x, args.repeats, device) for bank in banks]
            outs = [bank(x) for bank in banks]
            diff = max((o - outs[-1]).abs().max().item() for o in outs[:-1])
        print(f"{name:28s} {t[0] * 1000:14.1f} ms {t[1] * 1000:6.1f} ms {t[2] * 1000:8.1f} ms "
              f"{t[2] / t[0]:12.2f}x {t[2] / t[1]:10.2f}x  {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
