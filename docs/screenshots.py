"""Screenshots of each step of the paintseg workflow in napari, for the README.

    DISPLAY=:99 python docs/screenshots.py        # writes docs/images/*.png

Runs the real widget on the bundled samples: the starter model segments the 2D sample; strokes
are painted on a new labels layer (the brush API) and a new U-Net is trained on them; the
stack is segmented; a folder with a corrupt file is batch-processed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"


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

    def shot(name: str) -> None:
        for _ in range(5):
            QApplication.processEvents()
        path = OUT / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        im = Image.open(path).convert("RGB")  # small files for the repository
        im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS)
        im.quantize(colors=128).save(path, optimize=True)
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")

    # 1. starter model: Segment
    w.segment_tab.segment_btn.click()
    w.jobs.wait()
    shot("1_segment_starter")

    # 2. paint strokes on a new labels layer for a new 2-class U-Net
    viewer.layers["nuclei2d segmentation"].visible = False
    w.tabs.setCurrentIndex(1)
    w.train_tab.form["continue_model"].value = False
    lab = w.new_labels_layer()
    rng = np.random.default_rng(0)
    lab.brush_size = 4
    for cls, mask in ((1, ~gt), (2, gt)):
        sub = np.zeros_like(mask)
        sub[:256] = mask[:256]
        ys, xs = np.nonzero(sub)
        for i in rng.choice(len(ys), 80, replace=False):
            for d in range(6):  # short strokes
                y, x = min(ys[i] + d, 511), xs[i]
                if mask[y, x]:
                    lab.paint((y, x), cls)
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
    viewer.close()


if __name__ == "__main__":
    main()
