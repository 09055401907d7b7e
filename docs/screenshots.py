"""Screenshots of each step of the paintseg workflow in napari, for the README.

    DISPLAY=:99 python docs/screenshots.py        # writes docs/images/*.png
    DISPLAY=:99 python docs/screenshots.py live   # only the live-mode pictures (7, 8)

Runs the real widget on the bundled samples: the starter model segments the 2D sample; strokes
are painted on a new labels layer (the brush API) and a new U-Net is trained on them; the
stack is segmented; a folder with a corrupt file is batch-processed; Live mode is turned on
with a few strokes, then more strokes, the uncertainty and *Where to paint next*.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"


def paint(lab, gt, rng, *, rows: slice, strokes: int) -> None:
    """Short vertical strokes with the brush API on background (1) and nuclei (2) of ``rows``."""
    for cls, mask in ((1, ~gt), (2, gt)):
        sub = np.zeros_like(mask)
        sub[rows] = mask[rows]
        ys, xs = np.nonzero(sub)
        for i in rng.choice(len(ys), strokes, replace=False):
            for d in range(6):
                y, x = min(ys[i] + d, mask.shape[0] - 1), xs[i]
                if mask[y, x]:
                    lab.paint((y, x), cls)


def pause(ms: int) -> None:
    """Let napari run (and the jobs report) for ``ms`` milliseconds."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def live_sequence(viewer, w, gt, shot) -> None:
    """7: Live on after a few strokes; 8: more strokes, the uncertainty and the box of
    *Where to paint next*."""
    viewer.layers.clear()
    viewer.open_sample("napari-paintseg", "nuclei2d")
    viewer.reset_view()
    w.tabs.setCurrentIndex(1)
    w.train_tab.image.setCurrentText("nuclei2d")
    w.train_tab.form["continue_model"].value = False
    lab = w.new_labels_layer()
    lab.brush_size = 4
    rng = np.random.default_rng(1)
    paint(lab, gt, rng, rows=slice(0, 256), strokes=15)
    w.train_tab.live.toggle.click()
    pause(10_000)
    shot("7_live")
    paint(lab, gt, rng, rows=slice(256, 512), strokes=15)
    w.train_tab.live.uncertain.setChecked(True)
    pause(10_000)
    w.train_tab.live.next_btn.click()
    pause(3_000)
    shot("8_live_uncertainty")
    w.train_tab.live.toggle.click()
    w.jobs.wait()


def main() -> None:
    import napari
    from PIL import Image
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from paintseg._napari._widget import PaintsegWidget

    OUT.mkdir(parents=True, exist_ok=True)
    img = tifffile.imread(ROOT / "src" / "paintseg" / "sample_data" / "nuclei2d.tif")
    gt = tifffile.imread(ROOT / "src" / "paintseg" / "sample_data" / "nuclei2d_instances.tif") > 0
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-paintseg", "nuclei2d")
    w = PaintsegWidget(viewer)
    viewer.window.add_dock_widget(w, name="paintseg", area="right")
    w.jobs.wait()
    only_live = sys.argv[1:] == ["live"]

    def shot(name: str) -> None:
        for _ in range(5):
            QApplication.processEvents()
        path = OUT / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        im = Image.open(path).convert("RGB")  # small files for the repository
        im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS)
        im.quantize(colors=128).save(path, optimize=True)
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")

    if only_live:
        live_sequence(viewer, w, gt, shot)
        viewer.close()
        return

    # 1. starter model: Segment
    w.segment_tab.segment_btn.click()
    w.jobs.wait()
    shot("1_segment_starter")

    # 2. paint strokes on a new labels layer for a new 2-class U-Net
    viewer.layers["nuclei2d segmentation"].visible = False
    w.tabs.setCurrentIndex(1)
    w.train_tab.form["continue_model"].value = False
    lab = w.new_labels_layer()
    lab.brush_size = 4
    paint(lab, gt, np.random.default_rng(0), rows=slice(0, 256), strokes=80)
    shot("2_paint")

    # 3. training, mid-run (live loss curve)
    w.train_tab.form["time_budget"].value = 30
    w.train_tab.train_btn.click()
    QTimer.singleShot(15000, lambda: shot("3_training"))
    w.jobs.wait()
    viewer.layers["nuclei2d segmentation"].visible = True
    lab.visible = False
    shot("4_after_training")

    # 5. the 3D stack
    viewer.layers.clear()
    viewer.open_sample("napari-paintseg", "nuclei3d")
    viewer.reset_view()
    w.tabs.setCurrentIndex(0)
    w.segment_tab.image.setCurrentText("nuclei3d")
    w.load_model("nuclei")
    w.jobs.wait()
    # cells3d nuclei; the starter model also works without it
    w.segment_tab.form["diameter"].value = 90
    w.segment_tab.segment_btn.click()
    w.jobs.wait()
    viewer.dims.set_current_step(0, 30)
    shot("5_stack")

    # 6. batch with a corrupt file
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "experiment"
        src.mkdir()
        for k in range(3):
            tifffile.imwrite(src / f"well_{k + 1}.tif", np.roll(img, 128 * k, axis=1))
        raw = (src / "well_1.tif").read_bytes()
        (src / "well_4_truncated.tif").write_bytes(raw[: len(raw) // 2])
        w.tabs.setCurrentIndex(2)
        w.batch_tab.input.setText(str(src))
        w.batch_tab.output.setText(str(Path(tmp) / "labels"))
        w.batch_tab.batch_btn.click()
        w.jobs.wait()
        shot("6_batch")
    live_sequence(viewer, w, gt, shot)
    viewer.close()


if __name__ == "__main__":
    main()
