"""Interactive training: paintseg against an ilastik-style random forest on the same scribbles.

Needs scikit-learn (``pip install scikit-learn``) besides paintseg. Tasks (``--datasets``, all
by default), each scored by the mean IoU of its object classes (all but the first) on images
or slices nobody painted:

- ``nuclei3d``: cells3d nuclei stack; strokes on 2 slices of the stack (as painted in napari),
  a 2D model trained on the stack and run on the whole stack, evaluated on the other slices
  20..50 (``--planes all``: on every other slice; ``--planes both``: each method scored
  both ways, paired). The stack is normalised as a whole, for both methods.
- ``dsb2018``: the DSB2018 nuclei image; strokes on the top half, evaluated on the bottom half.
- ``dsb2018-inverted`` (not run by default): the same with its intensities inverted, dark
  nuclei on a bright background, a stand-in for data unlike the starter model's.
- ``usiigaci``: phase-contrast cells against background; ``usiigaci-boundary``: background /
  cell / the boundary between touching cells (a thin class, the cells' pixels within 2 px of
  another cell). 20 images with hand-drawn masks, ``../shared/datasets/usiigaci-phase``.
- ``vnc-membrane``: membranes against the rest in serial-section EM; ``vnc-3class``: rest /
  membrane / mitochondria. 20 sections with dense labels, ``../shared/datasets/vnc-sstem``
  (non-commercial licence: read in place, never copied into this repository).
- ``vnc-5class`` (not run by default): all five classes of the same labels, rest (cytoplasm)
  / membrane / glia and extracellular space / mitochondria / synapse (the last 0.6 % of the
  pixels): many classes at once.
- ``retina`` (not run by default): thin vessels in an RGB fundus photograph (scikit-image's
  ``data.retina()``, CC0, halved to 706 x 706), painted in colour on the top half, scored on
  the bottom half. No hand labels of it exist offline: the truth is a proxy, the green
  channel's black top-hat (disk of radius 6) inside the field of view, thresholded by Otsu,
  pieces under 30 px dropped. It favours per-pixel brightness features (the forest's) and
  takes the wider vessels' edges as the top-hat sees them; compare methods on it, not with
  figures of hand-labelled data.

  The shared tasks paint 2 of the 20 images (drawn by the seed) and score 3 others.

``--labels dense`` labels every pixel of the painted images instead of drawing strokes
(``both``: strokes and dense labels on the same images, with paintseg's strokes / dense
ratio); the forest is then fitted on 200 000 of the labelled pixels drawn at random.

Scribbles are simulated: short random strokes drawn inside each class (eroded so that they
stay inside; on the shared tasks less where a class is thin), about 1% of the pixels of one
image in all, split evenly over the classes.

Both methods get the same strokes. The baseline is scikit-image ``multiscale_basic_features``
(intensity, edges, texture at sigma 1..16) with a scikit-learn random forest (100 trees), as in
ilastik's pixel classification. paintseg trains its default preset ("fast", on every device;
``--presets`` tries others) for ``--budget`` seconds
and predicts the held-out pixels with tiled inference, its class borders snapped to the image's
edges as `paintseg segment` does (``--argmax-too`` also scores the same model's arg-max labels,
``snap=0``). The summary gives per task both means, the draws on which paintseg is ahead, the
paired 95% bootstrap interval of the difference and each method's worst draw.

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

Needs scikit-learn for the forest: ``pip install torch==2.13.0 -e ".[bench]"``.

Usage::

    python benchmarks/interactive.py [--budget 60] [--device auto] [--datasets nuclei3d dsb2018
        usiigaci usiigaci-boundary vnc-membrane vnc-3class] [--seeds 0 ... 9]
        [--labels strokes|dense|both]
        [--presets auto accurate accurate:none fast,dims=3,patch_size=48 auto,init=nuclei]
        [--rounds 2] [--planes middle|all|both] [--argmax-too]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from paintseg.config import ModelConfig, NormConfig, TrainConfig
from paintseg.devices import describe_device, resolve_device
from paintseg.inference import default_snap, segment
from paintseg.metrics import semantic_scores
from paintseg.model import PaintsegModel, load_model, new_model
from paintseg.normalize import percentile_range
from paintseg.training import iter_train, prepare_training

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"


def simulate_strokes(truth: np.ndarray, *, fraction: float, rng: np.random.Generator,
                     length: int = 20, regions: Sequence[np.ndarray] | None = None,
                     erode: int = 3, min_share: float = 0.0) -> np.ndarray:
    """Random-walk strokes inside each class of a 2D class map; the strokes' values are the
    classes' (1..K).

    ``truth`` is a class map (1..K; a boolean foreground mask is background 1 / object 2).
    ``regions`` (one mask per class) narrows where each class is painted (corrections: each
    class's strokes in the pixels of that class the method got wrong); by default all of each
    class. Strokes stay ``erode`` pixels inside their region; with ``min_share``, less where
    the eroded region would keep less than that share of it (down to 0: a membrane 3 px wide
    is painted along its middle, as a user paints a thin structure)."""
    truth = np.asarray(truth)
    classes = truth.astype(np.uint8) + 1 if truth.dtype == bool else truth
    k = int(classes.max())
    out = np.zeros(truth.shape, np.uint8)
    target = int(fraction * truth.size)
    for value, region in zip(range(1, k + 1), regions or [classes == v for v in range(1, k + 1)]):
        for e in range(erode, -1, -1):
            inside = ndi.binary_erosion(region, iterations=e) if e else region.copy()
            if inside.sum() >= min_share * region.sum():
                break
        pts = np.argwhere(inside)
        painted = 0
        while len(pts) and painted < min(target // k, len(pts)):
            y, x = pts[rng.integers(len(pts))]
            angle = rng.uniform(0, 2 * np.pi)
            for _ in range(length):
                if not (0 <= y < truth.shape[0] and 0 <= x < truth.shape[1]) or not inside[y, x]:
                    break
                ys, xs = slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2)
                new = (out[ys, xs] == 0) & inside[ys, xs]
                out[ys, xs][new] = value
                painted += int(new.sum())
                angle += rng.normal(0, 0.3)
                y, x = int(round(y + 2 * np.sin(angle))), int(round(x + 2 * np.cos(angle)))
    return out


def require_sklearn(parser: argparse.ArgumentParser) -> None:
    """Exit with the install command when scikit-learn (the forest) is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        parser.exit(1, f'{parser.prog}: the forest needs scikit-learn: '
                       'pip install torch==2.13.0 -e ".[bench]"\n')


def random_forest(train, test, *, max_pixels: int = 200_000, uncertainty: bool = False):
    """ilastik-style pixel classifier: 2D features per slice, the image (or the whole stack)
    normalised by its 1st / 99.8th percentiles, as paintseg normalises it; fitted on at most
    ``max_pixels`` painted pixels (a random subset of dense labels).

    Returns the class maps of ``test``, the fit's seconds and the whole run's; with
    ``uncertainty``, also each map's uncertainty (1 - the margin between the two most likely
    classes' probabilities)."""
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    def norm(img):
        if axes_of(img) == "YXC":  # colour: each channel by its own percentiles
            lo, hi = percentile_range(np.moveaxis(img, -1, 0), NormConfig())
            return ((img - lo) / (hi - lo)).astype(np.float32)
        lo, hi = percentile_range(img[np.newaxis], NormConfig())
        return ((img - lo[0]) / (hi[0] - lo[0])).astype(np.float32)

    def feats(plane):
        return multiscale_basic_features(plane, intensity=True, edges=True, texture=True,
                                         sigma_min=1, sigma_max=16,
                                         channel_axis=-1 if axes_of(plane) == "YXC" else None)

    t = time.perf_counter()
    xs, ys = [], []
    for img, lab in train:
        x = norm(img)
        planes = [(x, lab)] if lab.ndim == 2 else [(x[z], lab[z]) for z in np.unique(
            np.nonzero(lab)[0])]
        for plane, plab in planes:
            m = plab > 0
            xs.append(feats(plane)[m])
            ys.append(plab[m])
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    if len(ys) > max_pixels:  # dense labels: a random subset, or the fit takes many minutes
        keep = np.random.default_rng(0).choice(len(ys), size=max_pixels, replace=False)
        xs, ys = xs[keep], ys[keep]
    clf = RandomForestClassifier(n_estimators=100, n_jobs=2, max_depth=None, random_state=0)
    clf.fit(xs, ys)
    train_s = time.perf_counter() - t
    preds, margins = [], []
    for img, _, planes in test:
        x = norm(img)
        shape = x.shape[:2] if axes_of(img) == "YXC" else x.shape
        out = np.zeros(shape, np.uint8)
        unsure = np.zeros(shape, np.float32)
        for z in ([None] if planes is None else planes):
            plane = x if z is None else x[z]
            f = feats(plane)
            prob = clf.predict_proba(f.reshape(-1, f.shape[-1]))
            p = clf.classes_[prob.argmax(1)].reshape(f.shape[:-1]).astype(np.uint8)
            top = np.sort(prob, axis=1)
            u = (1 - (top[:, -1] - (top[:, -2] if prob.shape[1] > 1 else 0))).reshape(
                f.shape[:-1])
            if z is None:
                out, unsure = p, u.astype(np.float32)
            else:
                out[z], unsure[z] = p, u
        preds.append(out)
        margins.append(unsure)
    if uncertainty:
        return preds, margins, train_s, time.perf_counter() - t
    return preds, train_s, time.perf_counter() - t


# the slice of the cells3d stack on which the simulated user paints corrections (near the
# stack's end, where out-of-focus haze lies between the two classes' strokes in brightness)
FIX_Z = 48

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# tasks beyond nuclei, read in place from ../shared/datasets (never copied into the repository):
# (folder, class names; the first class is the background / rest and is not scored)
SHARED_TASKS = {
    "usiigaci": ("usiigaci-phase", ("background", "cell")),
    "usiigaci-boundary": ("usiigaci-phase", ("background", "cell", "boundary")),
    "vnc-membrane": ("vnc-sstem", ("rest", "membrane")),
    "vnc-3class": ("vnc-sstem", ("rest", "membrane", "mitochondria")),
    "vnc-5class": ("vnc-sstem", ("rest", "membrane", "glia", "mitochondria", "synapse")),
}
# tasks that --datasets runs unless told otherwise (not dsb2018-inverted, not vnc-5class)
ALL_TASKS = ("nuclei3d", "dsb2018", *(t for t in SHARED_TASKS if t != "vnc-5class"))


@dataclasses.dataclass
class Task:
    """One draw of a task: painted (image, strokes) pairs; held-out (image, truth, planes)
    triples (truth: a class map 1..K; planes: the stack's planes scored, None for a 2D image);
    where corrections are painted (index of the painted pair, plane or None, its truth); the
    class names; how strokes are drawn (``min_share`` of :func:`simulate_strokes`)."""

    train: list
    test: list
    fix: tuple
    names: tuple[str, ...] = ("background", "object")
    min_share: float = 0.0


def task_truth(name: str, labels: np.ndarray) -> np.ndarray:
    """The class map (uint8, 1..K) of one image of a shared task from its dataset's labels."""
    if name == "usiigaci":
        return (labels > 0).astype(np.uint8) + 1
    if name == "usiigaci-boundary":
        # boundary: the pixels of a cell within 2 px of another cell (a thin class, 3-4 px)
        lab = labels.astype(np.int64)
        big = np.iinfo(np.int64).max
        hi = ndi.maximum_filter(lab, size=5)
        lo = ndi.minimum_filter(np.where(lab > 0, lab, big), size=5)
        touching = (lab > 0) & ((hi > lab) | (lo < lab))
        return np.where(touching, 3, np.where(lab > 0, 2, 1)).astype(np.uint8)
    # vnc-sstem: 0 cytoplasm, 1 membrane, 2 glia / extracellular, 3 mitochondria, 4 synapse
    if name == "vnc-5class":
        return (labels + 1).astype(np.uint8)
    out = np.where(labels == 1, 2, 1).astype(np.uint8)
    if name == "vnc-3class":
        out[labels == 3] = 3
    return out


def dataset(name: str, rng: np.random.Generator, *, corrections: bool = False,
            score_slices: str = "middle", dense: bool = False) -> Task:
    """One draw of task ``name``: strokes drawn by ``rng`` (with ``dense``, every pixel of
    the painted images labelled instead).

    With ``corrections`` the corrected plane of the stack is not scored. ``score_slices="all"``
    (or ``"both"``, see :func:`scorings`) scores every unpainted slice of the stack, its
    out-of-focus ends included, instead of slices 20..50.

    The shared tasks (:data:`SHARED_TASKS`) draw 2 of the dataset's 20 images to paint (1% of
    one image's pixels in all, as on the nuclei, split evenly over the classes) and 3 others to
    score; corrections go on the first painted image."""
    if name == "nuclei3d":
        # as in napari: strokes on 2 slices of the stack's Labels layer, a 2D model trained on
        # the stack (normalised as a whole) and run on the whole stack, scored on the other
        # slices 20..50 (those away from the stack's ends, where nuclei are in focus)
        img = tifffile.imread(SAMPLES / "nuclei3d.tif")
        gt = (tifffile.imread(SAMPLES / "nuclei3d_labels.tif") > 0).astype(np.uint8) + 1
        paint_z = (27, 38)
        scored = range(20, 51) if score_slices == "middle" else range(img.shape[0])
        test_z = [z for z in scored
                  if z not in paint_z and not (corrections and z == FIX_Z)]
        lab = np.zeros(img.shape, np.uint8)
        for z in paint_z:
            lab[z] = gt[z] if dense else simulate_strokes(gt[z], fraction=0.01 / len(paint_z),
                                                          rng=rng)
        return Task([(img, lab)], [(img, gt, test_z)], (0, FIX_Z, gt[FIX_Z]))
    if name in ("dsb2018", "dsb2018-inverted"):
        img = tifffile.imread(SAMPLES / "nuclei2d.tif")
        if name == "dsb2018-inverted":  # dark nuclei on a bright background: unlike the
            img = img.max() + img.min() - img  # starter model's data, for init=nuclei
        gt = (tifffile.imread(SAMPLES / "nuclei2d_instances.tif") > 0).astype(np.uint8) + 1
        h = img.shape[0] // 2
        lab = gt[:h] if dense else simulate_strokes(gt[:h], fraction=0.02, rng=rng)
        # corrections on the painted top half
        return Task([(img[:h], lab)], [(img[h:], gt[h:], None)], (0, None, gt[:h]))
    if name == "retina":
        img, gt = retina_task()
        h = img.shape[0] // 2
        lab = gt[:h] if dense else simulate_strokes(gt[:h], fraction=0.01, rng=rng,
                                                    min_share=0.2)
        return Task([(img[:h], lab)], [(img[h:], gt[h:], None)], (0, None, gt[:h]),
                    ("background", "vessel"), 0.2)
    if name not in SHARED_TASKS:
        raise ValueError(f"unknown task {name!r}; one of {', '.join(ALL_TASKS)}")
    folder, names = SHARED_TASKS[name]
    if not (DATASETS / folder).is_dir():
        raise SystemExit(f"{name}: {DATASETS / folder} not found (the shared datasets sit "
                         "beside the repository, in ../shared/datasets)")
    images = tifffile.imread(DATASETS / folder / "image.tif")
    labels = tifffile.imread(DATASETS / folder / "labels.tif")
    order = rng.permutation(len(images))
    painted, held = order[:2], order[2:5]
    train = []
    for i in painted:
        truth = task_truth(name, labels[i])
        train.append((images[i], truth if dense else simulate_strokes(
            truth, fraction=0.005, rng=rng, min_share=0.2)))
    test = [(images[i], task_truth(name, labels[i]), None) for i in held]
    return Task(train, test, (0, None, task_truth(name, labels[painted[0]])), names, 0.2)


def retina_task() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's RGB fundus photograph at half size and its proxy vessel map (class map:
    1 background, 2 vessel; see the module's docstring)."""
    from skimage import data, filters, morphology

    rgb = np.ascontiguousarray(data.retina()[::2, ::2])
    green = rgb[..., 1].astype(np.float32)
    fov = ndi.binary_erosion(rgb.max(-1) > 25, iterations=10)
    top = morphology.black_tophat(green, morphology.disk(6))
    top[~fov] = 0
    vessels = morphology.remove_small_objects(top > filters.threshold_otsu(top[fov]),
                                              max_size=29)
    return rgb, np.where(vessels, 2, 1).astype(np.uint8)


def scorings(name: str, test, score_slices: str) -> dict[str, list]:
    """The held-out sets each method is scored on, by row label: ``test`` itself, or for the
    stack with ``score_slices="both"`` its slices 20..50 and all its scored slices."""
    if name != "nuclei3d" or score_slices != "both":
        return {name: test}
    middle = [(img, gt, [z for z in zs if 20 <= z <= 50]) for img, gt, zs in test]
    return {"nuclei3d 20..50": middle, "nuclei3d all": test}


def class_ious(preds, test) -> list[float]:
    """IoU of each object class (2..K: all but the first, background or rest) over the scored
    planes of every held-out image; predictions and truths are class maps 1..K."""
    p = np.concatenate([(pr if z is None else pr[z]).ravel() for pr, (_, _, z) in zip(preds, test)])
    g = np.concatenate([(gt if z is None else gt[z]).ravel() for _, gt, z in test])
    k = int(g.max())
    iou = semantic_scores(p.astype(np.uint8), g.astype(np.uint8), classes=range(2, k + 1))["iou"]
    return [iou.get(c, 0.0) for c in range(2, k + 1)]


def object_iou(preds, test) -> float:
    """Mean IoU of the object classes (:func:`class_ious`; for two classes the foreground
    IoU)."""
    return float(np.mean(class_ious(preds, test)))


def per_class_text(preds, test, names) -> str:
    """``"  (membrane 0.512, mitochondria 0.301)"`` for more than one object class, else ``""``."""
    ious = class_ious(preds, test)
    if len(ious) < 2:
        return ""
    return "  (" + ", ".join(f"{n} {v:.3f}" for n, v in zip(names[1:], ious)) + ")"


def run_one(name: str, seed: int, budget: float, device, presets: list[str],
            rounds: int = 1, score_slices: str = "middle", argmax_too: bool = False,
            dense: bool = False, corrections: str = "errors"
            ) -> list[dict[str, tuple[float, ...]]]:
    """Forest IoU and paintseg's IoU per preset for one task and one seed (strokes drawn by
    ``seed``), per round, by scoring (:func:`scorings`); ``score_slices`` picks the stack's
    scored slices (see :func:`dataset`); ``dense`` labels every pixel of the painted images.
    With ``argmax_too``, each preset's IoU is followed by that of the same model's arg-max
    labels (``snap=0``: borders not snapped to edges).

    After each round but the last, every method gets correction strokes in its own errors on
    the correction plane (half as many pixels as the first strokes: each class's strokes in
    the pixels of that class it got wrong), added to its labels, as a user paints where the
    result is wrong; the forest is fitted again on all its strokes, paintseg continues
    training its model for another ``budget`` seconds."""
    rng = np.random.default_rng(seed)
    task = dataset(name, rng, corrections=rounds > 1, score_slices=score_slices, dense=dense)
    train, test, (k, fz, fix_gt) = task.train, task.test, task.fix
    painted = sum(int((lab > 0).sum()) for _, lab in train)
    planes = sum(len(np.unique(np.nonzero(lab)[0])) if lab.ndim == 3 else 1 for _, lab in train)
    first = train[0][0]
    one = 512 * 512 if name.startswith("dsb2018") else int(np.prod(
        first.shape[:2] if axes_of(first) == "YXC" else first.shape[-2:]))
    scored = sum(1 if z is None else len(z) for _, _, z in test)
    sets = scorings(name, test, score_slices)
    per_class = np.bincount(np.concatenate([lab[lab > 0] for _, lab in train]))[1:]
    print(f"\n{name}{' (dense labels)' if dense else ''}, seed {seed}: {planes} painted "
          f"image(s), {painted} painted pixels ({100 * painted / one:.2f}% of one image; "
          + ", ".join(f"{n} {c}" for n, c in zip(task.names, per_class))
          + f"), {scored} held-out image(s)")
    if name.startswith("dsb2018") and any("init=nuclei" in p for p in presets):
        print("  note: the starter model was trained on this image, its bottom half included: "
              "init=nuclei is not held out here")
    fix_img = train[k][0]
    fix_entry = (fix_img, None, None if fz is None else [fz])  # predicted, not scored
    labels = {m: [lab.copy() for _, lab in train] for m in ("forest", *presets)}
    models: dict[str, PaintsegModel] = {}
    added: dict[str, int] = {}  # correction pixels per method
    classes = len(task.names)
    rows = []
    for r in range(rounds):
        if r:
            where = "the painted image" if fz is None else f"slice {fz}"
            print(f"  round {r + 1}: corrections on {where}, in each method's errors: "
                  + ", ".join(f"{m} {n} pixels" for m, n in added.items()))
        mine = {m: [(img, lab) for (img, _), lab in zip(train, labels[m])] for m in labels}
        preds, fit_s, total_s = random_forest(mine["forest"], [*test, fix_entry])
        masks = [preds[:-1]]  # class maps: the forest, then each column of paintseg
        rf = object_iou(masks[0], test)
        print(f"  random forest (ilastik-style): object IoU {rf:.3f}"
              f"{per_class_text(masks[0], test, task.names)}  "
              f"(fit {fit_s:.1f} s, fit + predict {total_s:.1f} s)")
        fixes = {"forest": preds[-1] if fz is None else preds[-1][fz]}
        for p in presets:
            mask, models[p], fixed = paintseg_run(mine[p], test, seed=seed, budget=budget,
                                                  device=device, preset=p, model=models.get(p),
                                                  extra=fix_img, names=task.names)
            masks.append(mask)
            if argmax_too:
                masks.append([class_map(segment(img, models[p], axes=axes_of(img),
                                                device=device, snap=0).labels, classes)
                              for img, _, _ in test])
                print(f"    the same model's arg-max labels (snap 0): object IoU "
                      f"{object_iou(masks[-1], test):.3f}"
                      f"{per_class_text(masks[-1], test, task.names)}", flush=True)
            fixes[p] = fixed if fz is None else fixed[fz]
        rows.append({label: tuple(object_iou(m, held) for m in masks)
                     for label, held in sets.items()})
        if len(sets) > 1:
            for label, row in rows[-1].items():
                print(f"  scored on {label}: " + "  ".join(f"{x:.3f}" for x in row)
                      + "  (forest, then paintseg)")
        if r == rounds - 1:
            break
        for m, pred in fixes.items():
            plane = labels[m][k] if fz is None else labels[m][k][fz]
            added[m] = int(add_corrections(plane, pred, fix_gt, painted=painted, rng=rng,
                                           min_share=task.min_share,
                                           where=corrections).sum())
    return rows


def add_corrections(plane: np.ndarray, pred: np.ndarray, truth: np.ndarray, *, painted: int,
                    rng: np.random.Generator, min_share: float = 0.0,
                    where: str = "errors") -> np.ndarray:
    """Correction strokes in the errors of ``pred`` (a class map 1..K) on one plane, half as
    many pixels as ``painted``: each class's strokes in the pixels of that class that ``pred``
    gets wrong (for two classes: background strokes in the false positives, object strokes in
    the misses), added to ``plane`` in place where nothing is painted yet, as a user adds
    them. Returns the mask of the pixels added.

    ``where="errors"`` paints anywhere in the errors, their one-pixel fringes along borders
    included; ``"largest"`` paints only in the largest error regions of each class (their
    inner parts, one pixel in from the region's edge unless that leaves under a fifth of it),
    the regions taken largest first until they hold three times the class's share of strokes,
    as a user paints where the result is visibly wrong. ``"random"`` is the control: as many
    strokes anywhere in the plane's unpainted pixels, right or wrong."""
    k = int(truth.max())
    fraction = 0.5 * painted / truth.size
    regions = [(truth == v) & (pred != v) for v in range(1, k + 1)]
    if where == "largest":
        share = 3 * fraction * truth.size / k
        for i, err in enumerate(regions):
            core = ndi.binary_erosion(err)
            core = core if core.sum() >= 0.2 * err.sum() else err
            comp, n = ndi.label(core)
            if not n:
                continue
            sizes = np.bincount(comp.ravel())[1:]
            order = np.argsort(sizes)[::-1]
            keep = order[:int(np.searchsorted(np.cumsum(sizes[order]), share)) + 1]
            regions[i] = np.isin(comp, keep + 1)
    elif where == "random":
        regions = [(truth == v) & (plane == 0) for v in range(1, k + 1)]
    elif where != "errors":
        raise ValueError(f"where: 'errors', 'largest' or 'random', not {where!r}")
    corr = simulate_strokes(truth, fraction=fraction, rng=rng, regions=regions,
                            erode={"largest": 0, "errors": 1, "random": 3}[where],
                            min_share=min_share)
    new = (corr > 0) & (plane == 0)
    plane[new] = corr[new]
    return new


def axes_of(img: np.ndarray) -> str:
    """The axes of a task's image: a plane, an RGB plane (the retina: 3 or 4 last), or a stack
    (no task's stack has 3 or 4 planes, which would be taken for colour)."""
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        return "YXC"
    return "YX" if img.ndim == 2 else "ZYX"


def class_map(labels: np.ndarray, classes: int) -> np.ndarray:
    """paintseg's labels (background written as 0) as a task's class map 1..K; a model from
    the starter has a boundary class (3), counted as object on a two-class task."""
    return np.minimum(np.where(labels == 0, 1, labels), classes).astype(np.uint8)


def paintseg_run(train, test, *, seed: int, budget: float, device, preset: str,
                 model: PaintsegModel | None = None, extra: np.ndarray | None = None,
                 names: Sequence[str] = ("background", "object")
                 ) -> tuple[list[np.ndarray], PaintsegModel, np.ndarray | None]:
    """Train a new model of ``preset`` on the strokes for ``budget`` s (or continue training
    ``model``); its class maps (1..K for the task's K class ``names``, :func:`class_map`) of
    the held-out images (their object IoU printed), the model and its class map of ``extra``
    (None without it).

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
    first = train[0][0]  # colour images (the retina): channels last
    channels = ({"in_channels": first.shape[-1], "channel_axis": -1}
                if axes_of(first) == "YXC" else {"in_channels": 1})
    if model is None and init is not None:
        model = load_model(init)  # a bundled or saved model, as `paintseg train --init` does
    if model is not None:
        # continued as `paintseg train --init` and the widget's "Continue from the current
        # model" do: its classes (the strokes' values are among them) and normalisation kept
        data, model = prepare_training(train, base=model, dims=dims, seed=seed, **channels)
    else:
        # a new U-Net as `paintseg train` and the widget make it (model_for_training: its
        # derivative gain chosen from the strokes), then the preset's options
        data, model = prepare_training(train, base=None, dims=dims, preset=name, seed=seed,
                                       **channels)
        if norm or arch:
            cfg = dataclasses.replace(model.config, **({"norm": norm} if norm else {}), **arch)
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
            # the snap a user gets by default (default_snap: none after dense labels)
            cache[id(img)] = class_map(segment(img, model, axes=axes_of(img), device=device,
                                               snap=default_snap(model)).labels, len(names))
        return cache[id(img)]

    labels = [labels_of(img) for img, _, _ in test]
    predict_s = time.perf_counter() - t
    iou = object_iou(labels, test)
    print(f"  paintseg {preset} ({cfg.network_name}, depth {cfg.depth}, base {cfg.base_features}, "
          f"{cfg.norm} norm, filter scales {', '.join(f'{x:g}' for x in cfg.features)}, "
          f"derivative gain {cfg.derivative_gain:g}): "
          f"object IoU {iou:.3f}{per_class_text(labels, test, names)}  ({done.step} steps, "
          f"best step {done.best_step}, train "
          f"{train_s:.1f} s, predict {predict_s:.1f} s)", flush=True)
    return labels, model, None if extra is None else labels_of(extra)


def bootstrap_interval(diffs: Sequence[float], *, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Paired 95% bootstrap interval of the mean of ``diffs`` (paintseg minus forest)."""
    d = np.asarray(diffs, dtype=float)
    means = d[np.random.default_rng(seed).integers(len(d), size=(resamples, len(d)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(summary: dict[str, list], columns: list[str], seeds: list[int], rounds: int
              ) -> None:
    """Per task (and round, and scoring): forest and paintseg means, the ratio, the draws on
    which paintseg is ahead, the paired bootstrap interval of the difference, both methods'
    worst draw; for tasks run with dense labels too, paintseg's strokes / dense ratio."""
    print(f"\nmeans over seeds {seeds}:")
    print(f"  {'task':<24} {'column':<14} forest  paintseg  ratio  ahead   "
          f"mean diff [95% bootstrap]  worst forest / paintseg")
    means: dict[tuple[str, str, int], float] = {}
    for r in range(rounds):
        if rounds > 1:
            print(f" round {r + 1}:")
        for task, runs in summary.items():
            for label in runs[0][r]:
                rows = np.array([run[r][label] for run in runs])
                rf = rows[:, 0]
                for i, preset in enumerate(columns, start=1):
                    ps = rows[:, i]
                    lo, hi = bootstrap_interval(ps - rf) if len(rows) > 1 else (np.nan, np.nan)
                    name = label + task[len(task.split(" ")[0]):]  # " (dense)" kept
                    means[(name, preset, r)] = float(ps.mean())
                    print(f"  {name:<24} {preset:<14} {rf.mean():.3f}   {ps.mean():.3f}   "
                          f"{ps.mean() / rf.mean():.2f}x  {int((ps > rf).sum()):>2} of "
                          f"{len(rows):<2}  {ps.mean() - rf.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
                          f"       {rf.min():.3f} / {ps.min():.3f}")
                if len(rows) > 1:
                    print(f"  {'':<24} per seed: " + "; ".join(
                        " ".join(f"{x:.3f}" for x in row) for row in rows))
    dense = [(k, v) for k, v in means.items() if k[0].endswith(" (dense)")]
    if dense:
        print("  paintseg from strokes / from dense labels of the same images:")
        for (name, preset, r), dv in dense:
            sv = means.get((name[: -len(" (dense)")], preset, r))
            if sv is not None:
                print(f"    {name[: -len(' (dense)')]:<22} {preset:<14} {sv:.3f} / {dv:.3f} "
                      f"= {100 * sv / dv:.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="paintseg against an ilastik-style forest on the same strokes, per task "
                    "and draw of strokes (needs scikit-learn; the tasks beyond nuclei read "
                    "../shared/datasets)")
    parser.add_argument("--budget", type=float, default=60.0, help="paintseg training seconds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--datasets", nargs="+", default=list(ALL_TASKS), choices=[
        *ALL_TASKS, "dsb2018-inverted", "vnc-5class", "retina"], metavar="TASK",
        help=f"tasks (default: all of {', '.join(ALL_TASKS)}; also dsb2018-inverted, "
             "vnc-5class, retina)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)),
                        help="each seed draws other strokes and trains anew; means are printed")
    parser.add_argument("--labels", choices=["strokes", "dense", "both"], default="strokes",
                        help="what the painted images carry: simulated strokes, every pixel "
                             "labelled (dense), or both on the same images, paired")
    parser.add_argument("--presets", nargs="+", default=["auto"],
                        help="model presets to train on the same strokes (auto = fast; "
                             "accurate:none = accurate without norm layers)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of painting: after each, correction strokes in each "
                             "method's errors (the cells3d slice %d is then not scored)" % FIX_Z)
    parser.add_argument("--corrections", choices=["errors", "largest", "random"],
                        default="errors",
                        help="where the correction strokes go: anywhere in each method's "
                             "errors, in its largest error regions only, or (a control) "
                             "anywhere unpainted, right or wrong")
    parser.add_argument("--argmax-too", action="store_true",
                        help="also score each trained model's arg-max labels (snap 0), paired")
    parser.add_argument("--planes", choices=["middle", "all", "both"], default="middle",
                        help="cells3d slices scored: middle = 20..50 (in focus), all = every "
                             "unpainted slice, the out-of-focus ends included; both = each "
                             "method scored both ways")
    args = parser.parse_args()
    require_sklearn(parser)
    device = resolve_device(args.device)
    print(f"device: {describe_device(device)}; paintseg budget {args.budget:.0f} s")
    summary = {}
    kinds = {"strokes": [False], "dense": [True], "both": [False, True]}[args.labels]
    for name in args.datasets:
        for dense in kinds:
            summary[name + (" (dense)" if dense else "")] = [
                run_one(name, seed, args.budget, device, args.presets, args.rounds, args.planes,
                        args.argmax_too, dense=dense, corrections=args.corrections)
                for seed in args.seeds]
    columns = [c for p in args.presets for c in ([p, f"{p} arg-max"] if args.argmax_too
                                                 else [p])]
    summarise(summary, columns, args.seeds, args.rounds)


if __name__ == "__main__":
    main()
