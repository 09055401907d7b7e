"""Seconds per training step of the presets, against the old 3D configuration in the same
process (these machines are noisy: compare the ratios).

A step = forward, masked loss, backward and optimiser step on random patches of the preset's
default size and batch (no sampling or augmentation).

Then whole steps of the training loop continuing the bundled starter model on the DSB2018
image (``iter_train``, sampling and augmentation included), with the anchor (1, the default)
against without it (0), in the same process: on strokes the anchor costs a forward pass of the
starting weights per step; on dense instance labels nothing is unpainted and it costs nothing.

Between the two: steps and inference in the default memory layout against the one the
training loop and inference use (``preferred_layout``: channels-last without norm layers).

Usage::

    python benchmarks/train_step.py [--repeats 4] [--loop-steps 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

import paintseg.model
from paintseg.config import ModelConfig, TrainConfig
from paintseg.model import UNet, load_model, new_model, resolve_model
from paintseg.training import instance_targets, iter_train, masked_loss, prepare_data, preset_config

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"


def step_seconds(cfg: ModelConfig, patch: int, batch: int, repeats: int, *,
                 preferred: bool = True) -> float:
    """Median seconds of a step; ``preferred``: in the memory layout the training loop puts
    the network in on the CPU (:func:`preferred_layout`), else the default layout."""
    torch.manual_seed(0)
    net = UNet(cfg)
    if preferred:
        net.to_device("cpu")
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


def forward_seconds(cfg: ModelConfig, size: int, repeats: int, *, preferred: bool) -> float:
    """Median seconds of inference on one plane (2D) or cube (3D) of ``size``."""
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    if preferred:
        net.to_device("cpu")
    x = torch.rand(1, 1, *(size,) * cfg.dims)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def layouts(repeats: int, loop_steps: int, rounds: int = 3) -> None:
    """Default against preferred memory layout (channels-last without norm layers), both
    measured ``rounds`` times, alternating."""
    print("\nmemory layout on the CPU: default (NCHW) against preferred_layout "
          f"(median of {rounds} alternating runs)")
    print(f"{'configuration':<52}{'default':>9}{'preferred':>11}{'speed-up':>10}")
    strokes2d = preset_config("fast", dims=2, in_channels=1, classes=2)
    dense2d = preset_config("fast", dims=2, in_channels=1, classes=3, labels_kind="instances")
    fast3d = preset_config("fast", dims=3, in_channels=1, classes=3)
    acc2d = preset_config("accurate", dims=2, in_channels=1, classes=3)
    rows = [
        ("step: 2D strokes (3 U-Nets, base 8), 16 x 64^2", step_seconds,
         (strokes2d, 64, 16, repeats)),
        ("step: 2D dense (1 U-Net, base 16), 16 x 64^2", step_seconds, (dense2d, 64, 16, repeats)),
        ("step: 3D fast preset, 4 x 32^3", step_seconds, (fast3d, 32, 4, repeats)),
        ("step: 2D accurate (layer norm), 8 x 64^2", step_seconds, (acc2d, 64, 8, repeats)),
        ("inference: 2D strokes, 256^2", forward_seconds, (strokes2d, 256, repeats)),
        ("inference: 2D dense, 256^2", forward_seconds, (dense2d, 256, repeats)),
        ("inference: 3D fast preset, 64^3", forward_seconds, (fast3d, 64, repeats)),
        ("training loop: new 2D strokes model, DSB2018", new_loop_seconds, (loop_steps,)),
    ]
    for name, fn, fn_args in rows:
        runs = {False: [], True: []}
        for _ in range(rounds):
            for p in (False, True):
                runs[p].append(fn(*fn_args, preferred=p))
        d, p = np.median(runs[False]), np.median(runs[True])
        print(f"{name:<52}{d:9.3f}{p:11.3f}{d / p:9.2f}x")


def _loop_step_seconds(model, data, steps: int, **train) -> float:
    """Seconds per step of ``iter_train`` on the CPU, after 5 warm-up steps."""
    times = []
    for ev in iter_train(model, data, TrainConfig(steps=steps + 5, seed=0, **train),
                         device="cpu", step_every=0.0):
        if ev.step in (5, steps + 5) and ev.kind.name == "STEP":
            times.append(ev.elapsed)
    assert model.provenance["training"][-1]["steps"] == steps + 5
    return (times[-1] - times[0]) / steps


def new_loop_seconds(steps: int, *, preferred: bool) -> float:
    """Seconds per loop step training a new model of the 2D fast preset on strokes of the
    DSB2018 image (every 10th row painted), in the preferred memory layout or, through a
    stand-in for ``preferred_layout``, the default one."""
    inst = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")
    labels = np.zeros(inst.shape, np.uint8)
    labels[::10] = np.where(inst[::10] > 0, 2, 1)
    data = _dsb2018_data(labels, "scribbles")
    cfg = preset_config("fast", dims=2, in_channels=1, classes=2)
    model = new_model(cfg, class_values=data.class_values, seed=0)
    saved = paintseg.model.preferred_layout
    if not preferred:
        paintseg.model.preferred_layout = lambda config, device: torch.contiguous_format
    try:
        return _loop_step_seconds(model, data, steps)
    finally:
        paintseg.model.preferred_layout = saved


def _dsb2018_data(labels: np.ndarray, labels_kind: str):
    """Training data of the DSB2018 image with ``labels``, nothing held out."""
    img = tifffile.imread(SAMPLES / "nuclei2d.tif")
    return prepare_data([(img, labels)], dims=2, labels_kind=labels_kind, seed=0,
                        validation_fraction=0)


def loop_seconds(labels: np.ndarray, labels_kind: str, anchor: float, steps: int) -> float:
    """Seconds per loop step continuing the starter model."""
    data = _dsb2018_data(labels, labels_kind)
    return _loop_step_seconds(load_model(resolve_model("nuclei")), data, steps, anchor=anchor)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--loop-steps", type=int, default=40)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    fast3d = preset_config("fast", dims=3, in_channels=1, classes=3)
    old3d = ModelConfig(dims=3, classes=3, depth=3, base_features=16, norm="layer",
                        features=(1, 2, 4, 8, 16))
    base = step_seconds(old3d, 32, 16, args.repeats)
    print(f"{'configuration':<58}{'s/step':>8}{'x old 3D':>10}")
    print(f"{'old 3D: 2D fast preset, layer norm, 16 x 32^3 (baseline)':<58}{base:8.2f}{1:10.2f}")
    for name, cfg, patch, batch in [
        ("3D fast preset, 4 x 32^3", fast3d, 32, 4),
        ("3D fast preset, 8 x 32^3", fast3d, 32, 8),
        ("2D fast preset, 16 x 64^2", preset_config("fast", dims=2, in_channels=1, classes=3),
         64, 16),
    ]:
        s = step_seconds(cfg, patch, batch, args.repeats)
        print(f"{name:<58}{s:8.2f}{s / base:10.2f}")

    layouts(args.repeats, args.loop_steps)

    inst = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")
    # the starter model's classes (background, object, boundary) painted on a tenth of the rows
    strokes = np.zeros(inst.shape, np.uint8)
    strokes[::10] = (instance_targets(inst) + 1)[::10]
    print(f"\ncontinuing the starter model on DSB2018, {args.loop_steps} loop steps")
    print(f"{'labels':<30}{'s/step anchor 0':>16}{'anchor 1':>10}{'ratio':>8}")
    for name, labels, kind in [("strokes (10% painted)", strokes, "scribbles"),
                               ("dense instances", inst, "instances")]:
        off, on = (loop_seconds(labels, kind, a, args.loop_steps) for a in (0.0, 1.0))
        print(f"{name:<30}{off:16.3f}{on:10.3f}{on / off:8.2f}")


if __name__ == "__main__":
    main()
