"""The filter bank in front of the U-Net: every kernel through the FFT (what the CPU does now)
against a direct convolution for kernels under 25 taps (what every device did before, and
what devices other than the CPU still do), in one process on the same inputs.

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
from paintseg.model import _FFT_KERNEL, FilterBank


class DirectShortKernels(FilterBank):
    """The filter bank with the earlier rule: the FFT only for kernels of 25 taps or more."""

    def _along(self, x, k, axis, *, fft=None):
        return super()._along(x, k, axis, fft=k.numel() >= _FFT_KERNEL)


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
    print(f"{'input':28s} {'direct < 25 taps':>17s} {'all FFT':>9s} {'ratio':>6s}  max diff")
    for name, shape, sigmas in CASES:
        dims = len(shape) - 2
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
        now = FilterBank(1, sigmas, dims).to(device)
        before = DirectShortKernels(1, sigmas, dims).to(device)
        with torch.no_grad():
            t_before = best_of(before, x, args.repeats, device)
            t_now = best_of(now, x, args.repeats, device)
            diff = (before(x) - now(x)).abs().max().item()
        print(f"{name:28s} {t_before * 1000:14.1f} ms {t_now * 1000:6.1f} ms "
              f"{t_now / t_before:5.2f}x  {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
