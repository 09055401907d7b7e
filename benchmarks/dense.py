"""Dense training on the DSB2018 image split in halves; instance scores on the held-out half.

Trains paintseg's "fast" preset on the top half's instance mask (background / object /
boundary targets) for ``--budget`` seconds, segments the bottom half, recovers instances by
seeded watershed and prints AP / F1 at IoU 0.5 (StarDist's matching), next to StarDist's
published figure for its DSB2018 demo model (F1@0.5 = 0.91, trained on the full DSB2018
training set on a GPU; here: one 512x256 half image, CPU, a few minutes).

``--dataset nuclei3d``: a 3D model (the 3D "fast" preset) on the cells3d nuclei stack
(60x256x256, 3D instance labels), trained on the left half (x < 128) and scored on the right
half, 3D instances by seeded watershed.

``--dataset nuclei3d-slices``: a 2D model on two in-focus slices of the same stack (28 and 36,
each with its instance labels, about 20 nuclei each, as a user who corrected two slices' masks
hands them over), scored on the other in-focus slices 22..46, each slice a 2D image. For each
seed a new U-Net and the bundled starter continued (``paintseg train --labels-kind instances
--init nuclei``) train for ``--budget`` seconds, and the starter is also scored as it is, at
the stack's nucleus size (``--diameter`` of the segment command). The starter never saw this
stack, so the comparison is held out (on DSB2018, its own training image, it would not be).

Usage::

    python benchmarks/dense.py [--budget 120] [--device auto]
        [--dataset dsb2018|nuclei3d|nuclei3d-slices] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile

from paintseg.config import SegmentSettings, TrainConfig
from paintseg.devices import describe_device, resolve_device
from paintseg.inference import segment, segment_labels
from paintseg.metrics import instance_scores
from paintseg.model import load_model
from paintseg.postprocess import instances_from_probabilities
from paintseg.training import iter_train, median_diameter, prepare_training

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"
TRAIN_SLICES, TEST_SLICES = (28, 36), [z for z in range(22, 47) if z not in (28, 36)]


def slices_as_objects(stack_labels: list[np.ndarray]) -> np.ndarray:
    """2D instance labels of several slices stacked with ids unique per slice, so that 3D
    matching scores each slice's objects against that slice's only."""
    out, offset = [], 0
    for lab in stack_labels:
        ids, inverse = np.unique(lab, return_inverse=True)
        relabeled = inverse.reshape(lab.shape).astype(np.int32)
        if ids[0] != 0:
            relabeled += 1
        out.append(np.where(relabeled > 0, relabeled + offset, 0))
        offset += int(relabeled.max())
    return np.stack(out)


def print_scores(s: dict, label: str) -> None:
    print(f"{label}: {s['n_true']} true nuclei, {s['n_pred']} predicted")
    for t_, ap, f1 in zip(s["thresholds"], s["ap"], s["f1"]):
        if t_ in (0.5, 0.7, 0.9):
            print(f"  IoU {t_:.1f}: AP {ap:.3f}  F1 {f1:.3f}")


def slices_benchmark(args: argparse.Namespace, device) -> None:
    """2D dense training on two slices of the cells3d stack: new U-Net against the starter
    continued, and the starter as it is."""
    img = tifffile.imread(SAMPLES / "nuclei3d.tif")
    gt = tifffile.imread(SAMPLES / "nuclei3d_labels.tif")
    pairs = [(img[z], gt[z]) for z in TRAIN_SLICES]
    truth = slices_as_objects([gt[z] for z in TEST_SLICES])
    diameter = median_diameter([gt[z] for z in TRAIN_SLICES], dims=2)
    min_size = 100  # about a twentieth of a nucleus's area here

    def score(model, diameter: float | None = None) -> dict:
        settings = SegmentSettings(output="instances", min_size=min_size, diameter=diameter)
        pred = [segment_labels(img[z], model, settings, device=device).labels
                for z in TEST_SLICES]
        return instance_scores(slices_as_objects(pred), truth)

    print(f"training slices {TRAIN_SLICES}, held-out slices {TEST_SLICES[0]}..{TEST_SLICES[-1]}"
          f" ({len(TEST_SLICES)}); nucleus diameter {diameter:.0f} px")
    print_scores(score(load_model("nuclei"), diameter),
                 f"starter as it is, --diameter {diameter:.0f}")
    rows = []
    for seed in args.seeds:
        for init in (None, "nuclei"):
            data, model = prepare_training(pairs, base=load_model(init) if init else None,
                                           dims=2, in_channels=1, labels_kind="instances",
                                           seed=seed)
            t = time.perf_counter()
            for ev in iter_train(model, data, TrainConfig(time_budget=args.budget, seed=seed),
                                 device=device):
                done = ev
            took = time.perf_counter() - t
            s = score(model)
            what = "starter continued" if init else "new U-Net"
            print_scores(s, f"seed {seed}, {what}: {done.step} steps in {took:.0f} s "
                            f"(best step {done.best_step})")
            rows.append((what, s["ap"][0], s["f1"][0]))
    print(f"means over seeds {args.seeds}:")
    for what in ("new U-Net", "starter continued"):
        aps = [r[1] for r in rows if r[0] == what]
        f1s = [r[2] for r in rows if r[0] == what]
        print(f"  {what:18s} AP@0.5 {np.mean(aps):.3f}  F1@0.5 {np.mean(f1s):.3f}  "
              f"(per seed AP {' '.join(f'{a:.3f}' for a in aps)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="nuclei3d-slices: training seeds")
    parser.add_argument("--dataset", default="dsb2018",
                        choices=("dsb2018", "nuclei3d", "nuclei3d-slices"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.dataset == "nuclei3d-slices":
        slices_benchmark(args, device)
        return
    if args.dataset == "dsb2018":
        img = tifffile.imread(SAMPLES / "nuclei2d.tif")
        gt = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")
        h = img.shape[0] // 2
        train, test, dims, min_size = (img[:h], gt[:h]), (img[h:], gt[h:]), 2, 10
    else:
        img = tifffile.imread(SAMPLES / "nuclei3d.tif")
        gt = tifffile.imread(SAMPLES / "nuclei3d_labels.tif")
        w = img.shape[2] // 2
        train, test = (img[..., :w], gt[..., :w]), (img[..., w:], gt[..., w:])
        dims, min_size = 3, 200
    data, model = prepare_training([train], base=None, dims=dims, in_channels=1,
                                   labels_kind="instances", seed=args.seed)
    cfg = model.config
    t = time.perf_counter()
    for ev in iter_train(model, data, TrainConfig(time_budget=args.budget, seed=args.seed),
                         device=device):
        done = ev
    took = time.perf_counter() - t
    print(f"device {describe_device(device)}: {cfg.network_name} depth {cfg.depth}, base "
          f"{cfg.base_features}, filter scales {', '.join(f'{x:g}' for x in cfg.features)}: "
          f"trained {done.step} steps in {took:.0f} s ({took / max(done.step, 1):.2f} s/step, "
          f"best step {done.best_step})")
    res = segment(test[0], model, device=device, return_probabilities=True)
    inst = instances_from_probabilities(res.probabilities, min_size=min_size)
    print_scores(instance_scores(inst, test[1]), "held-out half")
    if args.dataset == "dsb2018":
        print("  StarDist DSB2018 demo model (published): F1@0.5 = 0.91")


if __name__ == "__main__":
    main()
