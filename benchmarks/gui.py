"""Does napari stay responsive while paintseg works? (needs a display: Xvfb)

A QTimer on the GUI thread asks to fire every 10 ms. The script records when it actually fires
while the viewer is idle (the baseline, same process) and while the dock widget trains, segments
a stack and runs a batch, and prints the longest gap between ticks and the 99th percentile.
Goal: longest gap under 100 ms. A reference row measures napari's own ``viewer.add_labels`` of
an array the size of the result: the cost of any new layer, which the first segmentation
pays. It also prints the training speed in the viewer as a ratio to
the same training run without the widget in this process.

Live mode is measured too: *Live* turned on with the same strokes, a few brush dabs painted
on the displayed plane every 2 s, turned off after the training budget. Printed: the GUI gaps,
the seconds from the toggle to the first prediction on screen, the seconds between the
refreshes, and live training steps against the headless run's.

``--stack sample`` (default): training on the 2D sample, the 60x256x256 sample stack, a batch
of 4 files of 512x512. ``--stack em``: a 32x768x1024 EM stack built from
``../shared/datasets/vnc-sstem`` (its 20 sections, then the same mirrored), membrane strokes on
two of its slices, the whole stack segmented, a batch of 2 files of 16x768x1024.

    DISPLAY=:99 python benchmarks/gui.py [--seconds 20] [--stack sample|em] [--live-only]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0, help="training budget")
    parser.add_argument("--stack", choices=("sample", "em"), default="sample",
                        help="the data (see the docstring)")
    parser.add_argument("--live-only", action="store_true",
                        help="only the idle, training and live phases")
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from paintseg._napari._widget import PaintsegWidget
    from paintseg.config import TrainConfig
    from paintseg.training import iter_train, prepare_training

    rng = np.random.default_rng(0)
    if args.stack == "em":
        em = SAMPLES.parents[2].parent / "shared" / "datasets" / "vnc-sstem"
        sections = tifffile.imread(em / "image.tif")
        membrane = tifffile.imread(em / "labels.tif") == 1
        stack = np.concatenate([sections, sections[::-1]])[:32, :768]
        truth = np.concatenate([membrane, membrane[::-1]])[:32, :768]
        train_image, train_name = stack, "em"
        strokes = np.zeros(stack.shape, np.uint8)
        for z in (5, 20):
            pick = rng.random(truth[z].shape)
            strokes[z][~truth[z] & (pick < 0.003)] = 1
            strokes[z][truth[z] & (pick < 0.01)] = 2
        train_pair = (stack[..., None], strokes)
        sem = np.where(truth, 2, 1).astype(np.uint8)
        stack_name, stack_what = "em", "the 32x768x1024 EM stack"
        files = [stack[:16], stack[16:]]
        files_what = "batch of 2 files of 16x768x1024"
    else:
        img2d = tifffile.imread(SAMPLES / "nuclei2d.tif")
        gt = tifffile.imread(SAMPLES / "nuclei2d_instances.tif") > 0
        stack = tifffile.imread(SAMPLES / "nuclei3d.tif")
        strokes = np.zeros(gt.shape, np.uint8)
        top = np.zeros_like(gt)
        top[:256] = True
        strokes[top & ~gt & (rng.random(gt.shape) < 0.01)] = 1
        strokes[top & gt & (rng.random(gt.shape) < 0.02)] = 2
        train_image, train_name = img2d, "nuclei2d"
        train_pair = (img2d[..., None], strokes)
        sem = np.where(gt, 2, 1).astype(np.uint8)
        stack_name, stack_what = "nuclei3d", "the 60x256x256 stack"
        files = [np.roll(img2d, 50 * k, axis=0) for k in range(4)]
        files_what = "batch of 4 files of 512x512"

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    viewer.add_image(train_image, name=train_name)
    if stack_name != train_name:
        viewer.add_image(stack, name=stack_name, visible=False)
    w = PaintsegWidget(viewer, load_starter=True)
    viewer.window.add_dock_widget(w, name="paintseg", area="right")
    w.jobs.wait()

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def measure(label: str, start, at_ms: int | None = None) -> dict:
        ticks.clear()
        timer.start()
        t0 = time.perf_counter()
        if start is None or at_ms is not None:
            loop = QEventLoop()
            if start is not None:
                QTimer.singleShot(at_ms, start)
            QTimer.singleShot(5000 if start is None else at_ms + 2000, loop.quit)
            loop.exec()
        else:
            start()
            w.jobs.wait(30 * 60_000)
        wall = time.perf_counter() - t0
        timer.stop()
        gaps = np.diff(ticks) * 1000
        row = {"what": label, "wall_s": wall, "ticks": len(ticks), "max_ms": gaps.max(),
               "p99_ms": np.percentile(gaps, 99), "median_ms": np.median(gaps)}
        print(f"{label:<44} {wall:6.1f} s  ticks {len(ticks):5d}  median {row['median_ms']:5.1f} ms"
              f"  p99 {row['p99_ms']:6.1f} ms  longest gap {row['max_ms']:6.1f} ms", flush=True)
        return row

    print("GUI-thread timer asking for a tick every 10 ms:")
    measure("idle viewer (baseline)", None)

    lab = w.new_labels_layer()
    lab.data = strokes
    w.train_tab.form["continue_model"].value = False
    w.train_tab.form["refresh"].value = False
    w.train_tab.form["time_budget"].value = int(args.seconds)
    measure(f"training a new U-Net, {args.seconds:.0f} s budget", w.train_tab.train_btn.click)
    gui_steps = w.model.provenance["training"][-1]["steps"]

    # live mode: on with the same strokes, dabs painted every 2 s, off after the budget
    live = w.train_tab.live
    shown: list[float] = []
    show = live._show
    live._show = lambda pred, region: (shown.append(time.perf_counter()), show(pred, region))
    lab.brush_size = 5

    def dab() -> None:
        z = (int(viewer.dims.current_step[0]),) if sem.ndim == 3 else ()
        plane = sem[z] if z else sem
        for _ in range(10):
            y, x = (int(rng.integers(n)) for n in plane.shape)
            lab.paint((*z, y, x), int(plane[y, x]))

    painter = QTimer()
    painter.setInterval(2000)
    painter.timeout.connect(dab)
    t_on: list[float] = []

    def live_on() -> None:
        t_on.append(time.perf_counter())
        live.toggle.click()
        painter.start()
        QTimer.singleShot(int(args.seconds * 1000),
                          lambda: (painter.stop(), live.toggle.click()))

    sessions: list = []
    started = live._progress

    def progress(item) -> None:
        if live.live is None and hasattr(item, "live"):
            sessions.append(item.live)
        started(item)

    live._progress = progress
    # a new U-Net, as in the training phase: after Train, *Continue from the current model* is
    # ticked by default, and continuing holds the model to its own predictions (a second
    # forward pass a step), which is not the same model as the headless reference
    w.train_tab.form["continue_model"].value = False
    measure(f"live mode, {args.seconds:.0f} s, dabs every 2 s", live_on)
    live_run = w.model.provenance["training"][-1]
    live_steps = live_run["steps"]
    refresh = np.diff(shown)
    live_text = (f"live mode: first prediction on screen {shown[0] - t_on[0]:.1f} s after "
                 f"the toggle; refreshes every {np.median(refresh):.1f} s (median, longest "
                 f"{refresh.max():.1f} s); {live_steps} steps in {live_run['seconds']:.0f} s"
                 if len(shown) > 1 else "live mode: fewer than two refreshes")
    if sessions:
        spent = sessions[0].spent
        live_text += " (the loop's seconds: " + ", ".join(
            f"{k} {v:.1f}" for k, v in spent.items()) + ")"

    if args.live_only:
        viewer.close()
        print(f"\ntraining steps in {args.seconds:.0f} s: in the viewer {gui_steps}; "
              f"{live_text}; live / viewer's training {live_steps / max(gui_steps, 1):.2f}x")
        return
    w.segment_tab.image.setCurrentText(stack_name)
    w.segment_tab.form["output"].value = "semantic"
    seg_first = measure(f"segmenting {stack_what}", w.segment_tab.segment_btn.click)
    seg_again = measure("again (the labels layer updated in place)",
                        w.segment_tab.segment_btn.click)
    # the reference for the first row: napari adding a labels layer of the same size by itself
    result = next(ly for ly in viewer.layers if ly.name.endswith("segmentation")).data
    measure("napari's own add_labels, same size (ref.)",
            lambda: viewer.add_labels(np.array(result), name="reference"), at_ms=500)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for k, data in enumerate(files):
            tifffile.imwrite(src / f"img{k}.tif", data)
        w.batch_tab.input.setText(str(src))
        w.batch_tab.output.setText(str(Path(tmp) / "out"))
        measure(files_what, w.batch_tab.batch_btn.click)

    # the same training without the widget: as a job on the widget's thread (a second
    # thread computing with torch would slow both, see _jobs.py) that shows nothing
    def headless(report, should_stop):
        data, model = prepare_training([train_pair], base=None, dims=2, in_channels=1,
                                       channel_axis=-1)
        done = None
        for done in iter_train(model, data, TrainConfig(time_budget=args.seconds)):  # noqa: B007
            pass  # the last event is returned
        return done

    finished: list = []
    w.jobs.start("headless", headless, on_done=finished.append, on_error=finished.append)
    w.jobs.wait(30 * 60_000)
    done = finished[0]
    if isinstance(done, BaseException):
        raise done
    # Segment's reference: the call the widget makes (segment_labels, its settings, a copy
    # of its model), on the widget's job thread without showing anything, and on the main
    # thread as `paintseg segment` runs it (napari does not draw meanwhile)
    from paintseg.inference import segment_labels

    settings = w.segment_tab.settings(axes="ZYX")
    seg_model = copy.deepcopy(w.model)
    finished.clear()
    t0 = time.perf_counter()
    w.jobs.start("headless segment",
                 lambda report, should_stop: segment_labels(stack, copy.deepcopy(seg_model),
                                                            settings, device=w.session.device),
                 on_done=finished.append, on_error=finished.append)
    w.jobs.wait(30 * 60_000)
    on_job = time.perf_counter() - t0
    t0 = time.perf_counter()
    main_labels = segment_labels(stack, copy.deepcopy(seg_model), settings,
                                 device=w.session.device).labels
    on_main = time.perf_counter() - t0
    same = float(np.mean(main_labels == result))
    viewer.close()
    print(f"\nsegmenting {stack_what}: the widget {seg_first['wall_s']:.1f} s (again "
          f"{seg_again['wall_s']:.1f} s), segment_labels on the job thread {on_job:.1f} s, on "
          f"the main thread (as the CLI) {on_main:.1f} s; widget / main thread "
          f"{seg_again['wall_s'] / on_main:.2f}x; labels equal on {100 * same:.4f}% of pixels")
    print(f"\ntraining steps in {args.seconds:.0f} s: in the viewer {gui_steps}, headless "
          f"{done.step}; viewer / headless {gui_steps / max(done.step, 1):.2f}x")
    print(f"{live_text}; live / headless {live_steps / max(done.step, 1):.2f}x")


if __name__ == "__main__":
    main()
