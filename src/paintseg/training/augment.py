"""Augmentation of training patches: flips, rotations, intensity, noise, deformation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, *, full: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random flips, 90-degree rotations and elastic warp for image and targets; intensity
    scale, shift, gamma-like curve and noise for the image only."""
    n, nd = x.shape[0], x.ndim - 2
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(dev)

    xs, ys = [], []
    for i in range(n):
        xi, yi = x[i], y[i]
        # flips and rotations are drawn and read on the CPU: reading a number back from the
        # device would wait for the GPU, up to 48 times a step
        for axis in range(nd):
            if torch.rand(1, generator=gen).item() < 0.5:
                xi, yi = xi.flip(axis + 1), yi.flip(axis)
        if xi.shape[-1] == xi.shape[-2]:
            k = int(torch.rand(1, generator=gen).item() * 4)
            xi, yi = torch.rot90(xi, k, (-2, -1)), torch.rot90(yi, k, (-2, -1))
        xs.append(xi)
        ys.append(yi)
    x, y = torch.stack(xs), torch.stack(ys)
    if not full:
        return x, y
    # elastic deformation on half of the batch: smooth random displacement of a coarse grid
    if nd == 2:
        warp_cpu = torch.rand(n, generator=gen) < 0.5
        if warp_cpu.any():
            warp = warp_cpu.to(dev)
            h, w = x.shape[-2:]
            coarse = (rand(n, 2, 5, 5) - 0.5) * (2 * 0.08)  # up to ~8% of the patch
            flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
            base_y, base_x = torch.meshgrid(
                torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev),
                indexing="ij",
            )
            grid = torch.stack([base_x, base_y], -1).expand(n, h, w, 2) + flow.permute(0, 2, 3, 1)
            xw = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                               align_corners=True)
            yw = F.grid_sample((y + 1).unsqueeze(1).float(), grid, mode="nearest",
                               padding_mode="zeros", align_corners=True).squeeze(1).long() - 1
            sel = warp.view(n, *([1] * (x.ndim - 1)))
            x = torch.where(sel, xw, x)
            y = torch.where(warp.view(n, *([1] * (y.ndim - 1))), yw, y)
    # intensity
    shape = (n,) + (1,) * (x.ndim - 1)
    scale = 0.75 + 0.5 * rand(*shape)
    shift = (rand(*shape) - 0.5) * 0.3
    x = x * scale + shift
    noise = rand(*shape) * 0.08
    x = x + noise * torch.randn(x.shape, generator=gen).to(dev)
    return x, y


def _shift_intensity(x: torch.Tensor, gen: torch.Generator, width: float) -> torch.Tensor:
    """``x`` plus an offset drawn uniformly from ``[-width, width]`` for each patch and channel
    (drawn on the CPU generator, so that seeded runs agree on every device)."""
    offset = (torch.rand(*x.shape[:2], generator=gen) * 2 - 1) * width
    return x + offset.to(x.device, x.dtype).view(*x.shape[:2], *([1] * (x.ndim - 2)))
