"""Live mode with a simulated user, beside an ilastik-style forest's live update.

Per task and draw: the user starts with a few strokes on one plane (0.1 % of its pixels,
split over the classes) and turns Live on. Every ``--every`` seconds of training the user
looks at the current prediction of that plane and adds strokes (0.1 % of the plane each time)
where it is most wrong (``--where errors``: each class's largest error regions, as
:func:`interactive.add_corrections` with ``where="largest"``) or where the model is least
sure (``--where uncertain``: the most uncertain tenth of the plane, each stroke with its true
class), for ``--seconds`` in all. The forest gets the same protocol with its own predictions
and uncertainty, refitted after each round of strokes (ilastik's live update; its fitting
time is not counted). The first strokes are shared; each method's later strokes come from a
generator of its own, seeded from the draw, so the forest's curve on a seed is the same
whatever paintseg does. Both are scored at each tick (or every ``--score-every`` ticks) by the
mean IoU of the object classes on the task's held-out images (:func:`interactive.dataset`),
paintseg by a snapshot of its averaged weights segmented as ``paintseg segment`` does (with
the default snap) and by its arg-max (what the live layer shows); the session is paused
meanwhile, so the time axis is training time.

Also measured, on the same session: the latency from the start (strokes of two classes
painted) to the first prediction of the plane from trained weights, each later prediction's
seconds, and live training steps per second against a headless
:func:`~paintseg.training.iter_train` of the same model for ``--headless`` seconds in the same
process.

``--json`` writes the curves after each run (so a stopped run keeps what it measured);
``--plot`` draws them, one panel per task and kind of strokes (needs matplotlib);
``--replot JSON`` draws a saved file again without running anything.

Needs scikit-learn for the forest and matplotlib for the plot:
``pip install torch==2.13.0 -e ".[bench]"``.

Usage::

    python benchmarks/live.py [--datasets dsb2018 nuclei3d usiigaci] [--seeds 0]
        [--seconds 120] [--every 10] [--score-every 1] [--where errors uncertain]
        [--device auto] [--json live.json] [--plot docs/images/live_curves.png] [--replot live.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from interactive import (
    FIX_Z,
    add_corrections,
    axes_of,
    class_map,
    dataset,
    object_iou,
    random_forest,
    require_sklearn,
    simulate_strokes,
)

from paintseg.config import TrainConfig
from paintseg.devices import describe_device, resolve_device
from paintseg.inference import default_snap, segment
from paintseg.postprocess import semantic_labels
from paintseg.training import iter_train
from paintseg.training.live import LiveSession

FIRST = 0.001  # the first strokes: this share of the plane's pixels
EACH = 0.001  # each round of strokes


def snapped_and_argmax(img: np.ndarray, model, *, device, classes: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The class maps of ``img`` as *Segment* gives them (the default snap) and as the live
    layer shows them (the arg-max), from one pass of the network: the arg-max is taken from
    the probabilities the snapped run returns."""
    result = segment(img, model, axes=axes_of(img), device=device, snap=default_snap(model),
                     return_probabilities=True)
    argmax = semantic_labels(np.asarray(result.probabilities), model.class_values)
    return class_map(result.labels, classes), class_map(argmax, classes)


def uncertain_strokes(plane: np.ndarray, unsure: np.ndarray, truth: np.ndarray, *,
                      rng: np.random.Generator, amount: int) -> None:
    """Strokes with the true class in the most uncertain tenth of ``plane`` (in place)."""
    hot = unsure >= np.quantile(unsure, 0.9)
    k = int(truth.max())
    strokes = simulate_strokes(truth, fraction=amount / truth.size, rng=rng, erode=0,
                               regions=[hot & (truth == v) for v in range(1, k + 1)])
    new = (strokes > 0) & (plane == 0)
    plane[new] = strokes[new]


def run(name: str, seed: int, *, seconds: float, every: float, where: str, device,
        headless: float, score_every: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    task = dataset(name, rng, corrections=True)
    # each method's later strokes from its own generator: the forest's strokes and curve do
    # not depend on how many draws paintseg's strokes took, so runs of two paintseg
    # variants on one seed meet the same forest
    rng_ours, rng_theirs = (np.random.default_rng([seed, i]) for i in (1, 2))
    k, fz, truth = task.fix
    img = task.train[k][0]
    classes = len(task.names)
    amount = int(EACH * truth.size)

    def plane_of(labels: np.ndarray) -> np.ndarray:
        return labels if fz is None else labels[fz]

    start = np.zeros(img.shape, np.uint8)
    plane_of(start)[:] = simulate_strokes(truth, fraction=FIRST, rng=rng,
                                          min_share=task.min_share)
    region = tuple(slice(0, n) for n in img.shape)
    if fz is not None:
        region = (slice(fz, fz + 1), *region[1:])
    ours, theirs = start.copy(), start.copy()
    session = LiveSession(img[..., None], ours, config=TrainConfig(seed=seed), device=device,
                          name=name)
    # all torch work on this one thread, as napari's jobs do (a second thread computing
    # with torch would slow both down): the session's loop runs here until each tick
    t0 = time.perf_counter()
    session.run(should_stop=lambda: session.step >= 1)  # the first prediction from trained
    session.predict(region, background_class=None)  # weights
    latency = time.perf_counter() - t0
    curve = []
    predict_s = []
    tick = every
    rounds = 0
    while True:
        session.run(should_stop=lambda: session.seconds >= tick)  # noqa: B023 - used here
        rounds += 1
        t = time.perf_counter()
        pred = session.predict(region, background_class=None)
        predict_s.append(time.perf_counter() - t)
        scored = rounds % score_every == 0 or tick >= seconds
        fix_entry = (img, None, None if fz is None else [fz])
        # the forest refits on its strokes every round (ilastik's live update); the held-out
        # images are predicted (and paintseg segmented) only on the rounds that are scored
        fpreds, funsure, _, _ = random_forest([(img, theirs)],
                                              [*(task.test if scored else []), fix_entry],
                                              uncertainty=True)
        if scored:
            model = session.model()
            maps = [snapped_and_argmax(x, model, device=device, classes=classes)
                    for x, _, _ in task.test]
            ours_iou = object_iou([m for m, _ in maps], task.test)
            argmax_iou = object_iou([m for _, m in maps], task.test)
            forest_iou = object_iou(fpreds[:-1], task.test)
            curve.append((round(session.seconds, 1), session.step, ours_iou, forest_iou,
                          argmax_iou))
            print(f"  {session.seconds:6.1f} s, step {session.step:4d}: paintseg "
                  f"{ours_iou:.3f} (arg-max {argmax_iou:.3f}), forest {forest_iou:.3f}  "
                  f"(strokes {int((ours > 0).sum())} / {int((theirs > 0).sum())} px)",
                  flush=True)
        if tick >= seconds:
            break
        mine = pred.labels.reshape(truth.shape)
        theirs_pred = plane_of(fpreds[-1])
        if where == "errors":
            add_corrections(plane_of(ours), mine, truth, painted=2 * amount, rng=rng_ours,
                            min_share=task.min_share, where="largest")
            add_corrections(plane_of(theirs), theirs_pred, truth, painted=2 * amount,
                            rng=rng_theirs, min_share=task.min_share, where="largest")
        else:
            uncertain_strokes(plane_of(ours), pred.uncertainty.reshape(truth.shape), truth,
                              rng=rng_ours, amount=amount)
            uncertain_strokes(plane_of(theirs), plane_of(funsure[-1]), truth, rng=rng_theirs,
                              amount=amount)
        session.update_labels(ours)
        tick += every
    live_rate = session.step / session.seconds
    # headless throughput of the same model and strokes, same process
    model = copy.deepcopy(session._run.model)
    steps = 0
    for ev in iter_train(model, session._run.data, TrainConfig(time_budget=headless, seed=seed,
                                                               validation_fraction=0),
                         device=device):
        steps = ev.step
    headless_rate = steps / headless
    print(f"  first prediction {latency:.1f} s after the start; predictions "
          f"{np.median(predict_s):.2f} s (median of {len(predict_s)}); steps/s live "
          f"{live_rate:.1f}, headless {headless_rate:.1f} ({live_rate / headless_rate:.2f}x)")
    return {"curve": curve, "latency": latency, "predict_s": float(np.median(predict_s)),
            "live_per_headless": live_rate / headless_rate}


def plot(results: list[dict], path: Path) -> None:
    """One panel per task and kind of strokes: object IoU on the held-out images against
    training time, paintseg (as *Segment* gives it, and the live layer's arg-max) beside the
    forest; one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["where"]) for r in results},
                    key=lambda p: ([r["task"] for r in results].index(p[0]), p[1]))
    tasks = list(dict.fromkeys(t for t, _ in panels))
    kinds = list(dict.fromkeys(w for _, w in panels))
    fig, axes = plt.subplots(len(kinds), len(tasks), figsize=(3.6 * len(tasks),
                             3.0 * len(kinds)), squeeze=False, sharey=True)
    for r in results:
        ax = axes[kinds.index(r["where"])][tasks.index(r["task"])]
        t = [c[0] for c in r["curve"]]
        first = r["seed"] == min(x["seed"] for x in results
                                 if (x["task"], x["where"]) == (r["task"], r["where"]))
        ax.plot(t, [c[2] for c in r["curve"]], "-o", color="C0", ms=3,
                label="paintseg (Segment)" if first else None)
        ax.plot(t, [c[4] for c in r["curve"]], ":", color="C0",
                label="paintseg live layer (arg-max)" if first else None)
        ax.plot(t, [c[3] for c in r["curve"]], "-s", color="C1", ms=3,
                label="forest, live update" if first else None)
        ax.set_title(f"{r['task']}: strokes where {r['where']}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training time (s)")
    for row in axes:
        row[0].set_ylabel("object IoU, held-out images")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description="live mode with a simulated user, beside a "
                                                 "forest's live update (needs scikit-learn)")
    parser.add_argument("--datasets", nargs="+", default=["dsb2018", "nuclei3d", "usiigaci"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--every", type=float, default=10.0)
    parser.add_argument("--where", nargs="+", choices=["errors", "uncertain"],
                        default=["errors", "uncertain"])
    parser.add_argument("--score-every", type=int, default=1, metavar="N",
                        help="score the held-out images every N rounds of strokes (and at "
                             "the end); the strokes still come every --every seconds")
    parser.add_argument("--headless", type=float, default=20.0,
                        help="seconds of the headless throughput reference")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the curves here after each run")
    parser.add_argument("--plot", type=Path, help="draw the curves into this PNG")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only draw the curves of a saved --json file (into --plot)")
    args = parser.parse_args()
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PNG")
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    require_sklearn(parser)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error('--plot needs matplotlib: pip install -e ".[bench]"')
    device = resolve_device(args.device)
    print(f"device: {describe_device(device)}; cells3d strokes on slice {FIX_Z}")
    results = {}
    for name in args.datasets:
        for where in args.where:
            for seed in args.seeds:
                print(f"\n{name}, strokes where {where}, seed {seed}:", flush=True)
                results[name, where, seed] = run(name, seed, seconds=args.seconds,
                                                 every=args.every, where=where,
                                                 device=device, headless=args.headless,
                                                 score_every=args.score_every)
                saved = [{"task": n, "where": w, "seed": s, **r}
                         for (n, w, s), r in results.items()]
                if args.json:
                    args.json.write_text(json.dumps(saved, indent=1))
    print("\nsummary (IoU at the last tick, paintseg / forest; first tick where paintseg "
          "leads from then on)")
    for (name, where, seed), r in results.items():
        curve = r["curve"]
        lead = next((t for i, (t, *_) in enumerate(curve)
                     if all(a > b for _, _, a, b, _ in curve[i:])), None)
        print(f"  {name:10s} {where:9s} seed {seed}: {curve[-1][2]:.3f} (arg-max "
              f"{curve[-1][4]:.3f}) / {curve[-1][3]:.3f}, "
              f"ahead from {lead if lead is not None else '-'} s; first prediction "
              f"{r['latency']:.1f} s, refresh {r['predict_s']:.2f} s, live/headless "
              f"{r['live_per_headless']:.2f}x")
    if args.plot:
        plot(saved, args.plot)


if __name__ == "__main__":
    main()
