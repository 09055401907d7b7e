"""Seconds per training step of the presets, against the old 3D configuration in the same
process (these machines are noisy: compare the ratios).

A step = forward, masked loss, backward and optimiser step on random patches of the preset's
default size and batch (no sampling or augmentation).

Usage::

    python benchmarks/train_step.py [--repeats 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from paintseg.config import ModelConfig
from paintseg.model import UNet
from paintseg.training import masked_loss, preset_config


def step_seconds(cfg: ModelConfig, patch: int, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    net = UNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.rand(batch, 1, *(patch,) * cfg.dims)
    y = torch.randint(0, cfg.classes, (batch, *(patch,) * cfg.dims))
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        t = time.perf_counter()
        loss = masked_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    old3d = ModelConfig(dims=3, classes=3, depth=3, base_features=16, norm="layer",
                        features=(1, 2, 4, 8, 16))
    base = step_seconds(old3d, 32, 16, args.repeats)
    print(f"{'configuration':<58}{'s/step':>8}{'x old 3D':>10}")
    print(f"{'old 3D: 2D fast preset, layer norm, 16 x 32^3 (baseline)':<58}{base:8.2f}{1:10.2f}")
    for name, cfg, patch, batch in [
        ("3D fast preset, 4 x 32^3", preset_config("fast", dims=3, in_channels=1, classes=3), 32, 4),
        ("3D fast preset, 8 x 32^3", preset_config("fast", dims=3, in_channels=1, classes=3), 32, 8),
        ("2D fast preset, 16 x 64^2", preset_config("fast", dims=2, in_channels=1, classes=3), 64, 16),
    ]:
        s = step_seconds(cfg, patch, batch, args.repeats)
        print(f"{name:<58}{s:8.2f}{s / base:10.2f}")


if __name__ == "__main__":
    main()
