"""Inference speed: paintseg's tiled inference against the plain forward pass and MONAI.

Everything runs in one process on the same model (2D U-Net, depth 4, base 32, layer norm) and
the same images, and is printed as Mpx/s and as a ratio to the plain forward pass on the whole
image (the floor: no tiling, no normalisation, no label output). These machines are noisy:
read the ratios, not the absolute numbers.

Images: a 2048x2048 mosaic of the real DSB2018 nuclei image, and a 64x512x512 stack built from
the real cells3d nuclei stack (2x2 mosaic in XY, 64 slices). MONAI is optional: install it
after torch with ``pip install --no-deps monai``.

Usage::

    python benchmarks/inference.py [--quick] [--device auto|cpu|cuda|mps] [--skip-3d]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from paintseg.config import ModelConfig, TileConfig
from paintseg.devices import describe_device, resolve_device
from paintseg.inference import segment
from paintseg.model import new_model

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"


def images(quick: bool) -> tuple[np.ndarray, np.ndarray]:
    n2 = tifffile.imread(SAMPLES / "nuclei2d.tif")
    img2d = np.tile(n2, (2, 2) if quick else (4, 4))
    n3 = tifffile.imread(SAMPLES / "nuclei3d.tif")
    stack = np.tile(n3, (1, 2, 2))
    stack = np.concatenate([stack, stack[::-1][: 64 - stack.shape[0]]])
    return img2d, stack[:16] if quick else stack


def timed(fn) -> float:
    """Best of REPEAT["n"] runs."""
    best = float("inf")
    for _ in range(REPEAT["n"]):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, (1, 99.8))
    return ((x - lo) / (hi - lo)).astype(np.float32)


REPEAT = {"n": 1}


def forward_floor(net, img: np.ndarray, device, *, channels_last: bool, slices_per_batch: int = 4):
    """The plain forward pass over the whole image (slices batched for a stack)."""
    planes = img[None] if img.ndim == 2 else img
    x_all = torch.from_numpy(normalise(planes))[:, None]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device).to(memory_format=fmt)

    def run():
        with torch.inference_mode():
            for k in range(0, len(x_all), slices_per_batch):
                x = x_all[k : k + slices_per_batch].to(device).contiguous(memory_format=fmt)
                torch.softmax(net(x), 1).argmax(1).cpu()

    seconds = timed(run)
    net.to(memory_format=torch.contiguous_format)
    return seconds


def monai_call(net, img: np.ndarray, device, roi: int = 256, overlap: float = 0.25):
    """sliding_window_inference as its users typically call it."""
    from monai.inferers import sliding_window_inference

    planes = img[None] if img.ndim == 2 else img
    x_all = torch.from_numpy(normalise(planes))[:, None]
    net = net.to(device)

    def run():
        with torch.inference_mode():
            for k in range(len(x_all)):
                out = sliding_window_inference(
                    x_all[k : k + 1].to(device), roi_size=(roi, roi), sw_batch_size=4,
                    predictor=net, overlap=overlap, mode="gaussian",
                )
                torch.softmax(out, 1).argmax(1).cpu()

    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller images (smoke test)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="best of N for the 2D image")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    cfg = ModelConfig(dims=2, depth=4, base_features=32)
    model = new_model(cfg, seed=0)
    net = model.network.eval()
    print(f"model: 2D U-Net depth {cfg.depth}, base {cfg.base_features}, {cfg.norm} norm, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters")
    try:
        import monai  # noqa: F401

        have_monai = True
    except ImportError:
        have_monai = False
        print("MONAI not installed: its rows are skipped (pip install --no-deps monai)")

    img2d, stack = images(args.quick)
    # warm-up (allocator, oneDNN kernels)
    segment(img2d[:256, :256], model, device=device)
    forward_floor(net, img2d[:256, :256], device, channels_last=False)

    for label, img, axes in (("2D", img2d, "YX"), ("3D stack", stack, "ZYX")):
        if label != "2D" and args.skip_3d:
            continue
        REPEAT["n"] = args.repeat if img.ndim == 2 else 1
        mpx = img.size / 1e6
        print(f"\n{label}: {img.shape} ({mpx:.1f} Mpx), 2D model (slices batched for a stack), "
              f"best of {REPEAT['n']}")
        rows: list[tuple[str, float]] = []
        floor = forward_floor(net, img, device, channels_last=False)
        rows.append(("forward pass, whole image, NCHW (floor)", floor))
        if device.type == "cpu":
            rows.append(("forward pass, whole image, channels-last",
                         forward_floor(net, img, device, channels_last=True)))
        res = {}

        def run_seg(tiles: TileConfig, key: str):
            def go():
                # called at once by timed(): the loop's current values are the ones meant
                res[key] = segment(img, model, axes=axes, tiles=tiles, device=device)  # noqa: B023
            return timed(go)

        rows.append(("paintseg default (auto tile, blended)", run_seg(TileConfig(), "default")))
        d = res["default"]
        print(f"  default chose window {d.plan.window[-1]} px, halo {d.plan.halo[-1]}, "
              f"{d.plan.n_tiles} windows, batch {d.batch_size}")
        for tile in (256, 512):
            if tile < max(img.shape[-2:]):
                rows.append((f"paintseg tile {tile} (+2x32 halo, blended)",
                             run_seg(TileConfig(tile=tile), f"t{tile}")))
        # equal tile size and overlap as the MONAI call: 256 window, 192 stride
        rows.append(("paintseg window 256, stride 192 (= MONAI's tiling)",
                     run_seg(TileConfig(tile=192, halo=32, batch_size=4), "eq")))
        if have_monai:
            rows.append(("MONAI sliding_window_inference roi 256, overlap 0.25, gaussian",
                         monai_call(net, img, device)))
        monai_s = rows[-1][1] if have_monai else None
        print(f"  {'method':66s} {'s':>7s} {'Mpx/s':>7s} {'x floor':>8s}" +
              ("  MONAI/this" if have_monai else ""))
        for name, s in rows:
            extra = f"  {monai_s / s:9.2f}x" if monai_s else ""
            print(f"  {name:66s} {s:7.2f} {mpx / s:7.3f} {s / floor:8.2f}{extra}")


if __name__ == "__main__":
    main()
