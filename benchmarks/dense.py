"""Dense training on the DSB2018 image split in halves; instance scores on the held-out half.

Trains paintseg's "fast" preset on the top half's instance mask (background / object /
boundary targets) for ``--budget`` seconds, segments the bottom half, recovers instances by
seeded watershed and prints AP / F1 at IoU 0.5 (StarDist's matching), next to StarDist's
published figure for its DSB2018 demo model (F1@0.5 = 0.91, trained on the full DSB2018
training set on a GPU; here: one 512x256 half image, CPU, a few minutes).

``--dataset nuclei3d``: a 3D model (the 3D "fast" preset) on the cells3d nuclei stack
(60x256x256, 3D instance labels), trained on the left half (x < 128) and scored on the right
half, 3D instances by seeded watershed.

Usage::

    python benchmarks/dense.py [--budget 120] [--device auto] [--dataset dsb2018|nuclei3d]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tifffile

from paintseg.config import TrainConfig
from paintseg.devices import describe_device, resolve_device
from paintseg.inference import segment
from paintseg.metrics import instance_scores
from paintseg.model import new_model
from paintseg.postprocess import instances_from_probabilities
from paintseg.training import iter_train, prepare_data, preset_config

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="dsb2018", choices=("dsb2018", "nuclei3d"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.dataset == "dsb2018":
        img = tifffile.imread(SAMPLES / "nuclei2d.tif")
        gt = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")
        h = img.shape[0] // 2
        train, test, dims, min_size = (img[:h], gt[:h]), (img[h:], gt[h:]), 2, 10
    else:
        img = tifffile.imread(SAMPLES / "nuclei3d.tif")
        gt = tifffile.imread(SAMPLES / "nuclei3d_labels.tif")
        w = img.shape[2] // 2
        train, test, dims, min_size = (img[..., :w], gt[..., :w]), (img[..., w:], gt[..., w:]), 3, 200
    data = prepare_data([train], dims=dims, labels_kind="instances", seed=args.seed)
    cfg = preset_config("auto", dims=dims, in_channels=1, classes=3, labels_kind="instances")
    model = new_model(cfg, class_values=data.class_values, class_names=data.class_names,
                      seed=args.seed)
    t = time.perf_counter()
    for ev in iter_train(model, data, TrainConfig(time_budget=args.budget, seed=args.seed),
                         device=device):
        done = ev
    took = time.perf_counter() - t
    print(f"device {describe_device(device)}: {dims}D U-Net depth {cfg.depth}, base "
          f"{cfg.base_features}, filter scales {', '.join(f'{x:g}' for x in cfg.features)}: "
          f"trained {done.step} steps in {took:.0f} s ({took / max(done.step, 1):.2f} s/step, "
          f"best step {done.best_step})")
    res = segment(test[0], model, device=device, return_probabilities=True)
    inst = instances_from_probabilities(res.probabilities, min_size=min_size)
    s = instance_scores(inst, test[1])
    print(f"held-out half: {s['n_true']} true nuclei, {s['n_pred']} predicted")
    for t_, ap, f1 in zip(s["thresholds"], s["ap"], s["f1"]):
        if t_ in (0.5, 0.7, 0.9):
            print(f"  IoU {t_:.1f}: AP {ap:.3f}  F1 {f1:.3f}")
    if args.dataset == "dsb2018":
        print("  StarDist DSB2018 demo model (published): F1@0.5 = 0.91")


if __name__ == "__main__":
    main()
