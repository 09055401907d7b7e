"""The dock widget in a real napari viewer, clicked through as a user would (needs a display:
Xvfb in CI). Every job runs in a thread worker; the tests wait on the Qt event loop."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.gui

if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    pytest.skip("no display (run under Xvfb, as .ci/run does)", allow_module_level=True)

from qtpy.QtCore import QTimer  # noqa: E402

from paintseg._napari._widget import EDITED, PaintsegWidget  # noqa: E402
from paintseg.batch import collect_inputs, segment_file  # noqa: E402
from paintseg.config import SegmentSettings  # noqa: E402
from paintseg.inference import segment_labels  # noqa: E402
from paintseg.metrics import instance_scores  # noqa: E402
from paintseg.model import load_model  # noqa: E402

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "src", "paintseg", "sample_data")
# a new U-Net's training in the GUI tests, in steps: a time budget trains fewer steps under
# load (15 s gave 42-48 steps, and the held-out IoU then ranged 0.37-0.73 between runs, with
# random initial weights); by 60 steps the network has learned the strokes (held-out IoU
# 0.85 and 0.93, RGB agreement 0.83 at 2x; 0.82, 0.93 and 0.92 at 100)
TRAIN_STEPS = 60


@pytest.fixture
def gt2d():
    return tifffile.imread(os.path.join(SAMPLES, "nuclei2d_instances.tif")) > 0


@pytest.fixture
def open_widget(make_napari_viewer):
    """``open_widget(image, name, **widget_options)``: a shown viewer with the image and the
    dock widget, once its start-up jobs are done; their jobs are stopped at the end."""
    widgets = []

    def opener(image, name, **options):
        viewer = make_napari_viewer(show=True)
        viewer.add_image(image, name=name)
        widget = PaintsegWidget(viewer, **options)
        viewer.window.add_dock_widget(widget, name="paintseg", area="right")
        widgets.append(widget)
        assert widget.jobs.wait(60_000)  # the starter model loads in the background
        return viewer, widget

    yield opener
    for widget in widgets:
        widget.jobs.stop()
        widget.jobs.wait(60_000)


@pytest.fixture
def viewer_widget(open_widget, nuclei2d):
    return open_widget(nuclei2d, "nuclei2d")


def _paint_strokes(layer, gt, rng, rows=slice(0, 256), dabs=60):
    """Brush dabs (the API the paint brush uses) on background and nuclei of some rows."""
    layer.brush_size = 5
    for cls, mask in ((1, ~gt), (2, gt)):
        sub = np.zeros_like(mask)
        sub[rows] = mask[rows]
        ys, xs = np.nonzero(sub)
        for i in rng.choice(len(ys), dabs, replace=False):
            layer.paint((ys[i], xs[i]), cls)


def test_the_segment_form_is_the_clis_settings(viewer_widget):
    """The Segment tab's form starts at SegmentSettings' defaults (the CLI's), and the same
    choices in the form and on the command line give equal settings objects; tooltips come
    from the settings' docstring where the form has none of its own."""
    from paintseg.cli import build_parser, segment_settings

    viewer, w = viewer_widget
    tab = w.segment_tab
    base = ["segment", "x.tif", "--out", "o", "--model", "m.pt"]
    cli = segment_settings(build_parser().parse_args(base))
    assert tab.settings() == cli.replace(probabilities=False)
    form = tab.form
    form["output"].value = "semantic"
    form["min_size"].value = 12
    form["snap"].value = 0
    form["diameter"].value = 25.5
    form["tiles"].value = 256
    form["precision"].value = "float32"
    cli = segment_settings(build_parser().parse_args(
        [*base, "--output", "semantic", "--min-size", "12", "--snap", "0", "--diameter", "25.5",
         "--tile", "256", "--precision", "float32"]))
    assert tab.settings() == cli
    assert tab.settings().snap == 0 and isinstance(tab.settings().snap, int)
    assert form["snap"].native.text() == "0 px" and form["tiles"].native.suffix() == ""
    form["snap"].value = -1  # shown as "auto": the model's own (none after dense labels)
    assert form["snap"].native.text() == "auto" and tab.settings().snap is None
    form["diameter"].value = 0  # shown as "as trained": no rescaling
    assert tab.settings().diameter is None
    assert "Instances smaller than this" in form["min_size"].tooltip


def test_layer_choices_follow_the_layer_list(viewer_widget):
    viewer, w = viewer_widget
    seg, train = w.segment_tab, w.train_tab
    viewer.add_image(np.zeros((8, 8)), name="other")
    assert [seg.image.itemText(i) for i in range(seg.image.count())] == ["nuclei2d", "other"]
    viewer.layers["other"].name = "renamed"
    assert train.image.findText("renamed") >= 0 and train.image.findText("other") < 0
    lab = viewer.add_labels(np.zeros((8, 8), np.uint8), name="paint")
    assert train.labels.currentText() == "paint" and seg.image.findText("paint") < 0
    viewer.layers.remove(lab)
    assert train.labels.count() == 0
    seg.image.setCurrentText("renamed")
    viewer.layers.remove("nuclei2d")
    assert seg.image.currentText() == "renamed"  # the choice stays while its layer exists


def test_segment_with_starter_model_updates_one_layer(viewer_widget):
    viewer, w = viewer_widget
    assert w.model_source == "nuclei" and "2D U-Net" in w.model_panel.info.text()
    assert "; U-Nets in " in w.model_panel.device_info.text()  # as paintseg info says
    assert not w.segment_tab.stop_btn.isEnabled() and w.segment_tab.segment_btn.isEnabled()
    w.segment_tab.segment_btn.click()
    # one job at a time
    assert not w.segment_tab.segment_btn.isEnabled() and not w.train_tab.train_btn.isEnabled()
    assert w.jobs.wait(120_000)
    seg = viewer.layers["nuclei2d segmentation"]
    assert seg.data.shape == (512, 512) and 80 < seg.data.max() < 140  # instances
    # identical to what the CLI and batch runner write
    ref = segment_labels(viewer.layers["nuclei2d"].data, load_model("nuclei"),
                         SegmentSettings(axes="YX"))
    np.testing.assert_array_equal(seg.data, ref.labels)
    # a rerun updates the same layer in place
    w.segment_tab.form["output"].value = "semantic"
    w.segment_tab.segment_btn.click()
    assert w.jobs.wait(120_000)
    assert [ly.name for ly in viewer.layers] == ["nuclei2d", "nuclei2d segmentation"]
    assert viewer.layers["nuclei2d segmentation"] is seg
    assert set(np.unique(seg.data)) <= {0, 2, 3}
    # once the user paints on it, it is theirs: the next result goes to a new layer
    seg.paint((10, 10), 5)
    assert seg.metadata[EDITED]
    edited = seg.data.copy()
    w.segment_tab.segment_btn.click()
    assert w.jobs.wait(120_000)
    assert [ly.name for ly in viewer.layers] == [
        "nuclei2d", "nuclei2d segmentation [2]", "nuclei2d segmentation"]
    np.testing.assert_array_equal(viewer.layers["nuclei2d segmentation"].data, edited)


def test_field_of_view_and_probabilities(viewer_widget, qtbot):
    viewer, w = viewer_widget
    camera = getattr(viewer, "scene", viewer).camera  # napari 0.9 moved it to the scene
    camera.zoom = camera.zoom * 4  # look at the centre
    camera.center = (0, 256, 256)
    qtbot.wait(100)  # napari updates the visible box when it draws
    w.segment_tab.form["scope"].value = "field of view"
    w.segment_tab.form["probabilities"].value = True
    w.segment_tab.segment_btn.click()
    assert w.jobs.wait(120_000)
    seg = viewer.layers["nuclei2d segmentation"].data
    ys, xs = np.nonzero(seg)
    assert ys.size and 0 < ys.min() and ys.max() < 511 and 0 < xs.min() and xs.max() < 511
    assert (seg[:64] == 0).all()  # the top rows were not in view
    probs = [ly for ly in viewer.layers if ly.metadata.get("paintseg_role") == "probability"]
    assert sorted(ly.name for ly in probs) == ["nuclei2d P(boundary)", "nuclei2d P(object)"]
    probs.sort(key=lambda ly: ly.name, reverse=True)
    assert probs[0].data.max() > 0.5


def test_six_named_classes_in_the_legend_and_the_paint_layer(viewer_widget):
    """Six classes named on the Model panel: the Train tab's legend lists them with their
    values, and a new labels layer carries their names (shown by napari under the cursor)."""
    viewer, w = viewer_widget
    w.tabs.setCurrentIndex(1)
    w.model_panel.classes.setValue(6)
    w.model_panel.names.setText("rest, membrane, mitochondria, glia, synapse, vesicle")
    text = w.train_tab.legend.text()
    for value, name in enumerate(("rest", "membrane", "mitochondria", "glia", "synapse",
                                  "vesicle"), start=1):
        assert f"{value} = {name}" in text, text
    lab = w.new_labels_layer()
    assert list(lab.features["class"]) == ["not painted", "rest", "membrane", "mitochondria",
                                           "glia", "synapse", "vesicle"]


def test_the_new_unet_row_follows_a_trained_or_opened_model(viewer_widget):
    """After a model of 3 named classes becomes the current one (trained or opened), the New
    U-Net row shows its 3 classes and names; classes named there but not in the model stay;
    the bundled starter leaves the row as it is."""
    from paintseg.config import ModelConfig
    from paintseg.model import new_model

    viewer, w = viewer_widget
    mp = w.model_panel
    assert w.model_source == "nuclei" and mp.classes.value() == 2 and mp.names.text() == ""
    three = new_model(ModelConfig(depth=2, base_features=4, classes=3), class_values=(1, 2, 3),
                      class_names=("rest", "membrane", "mitochondria"), seed=0)
    w.session.set_model(three, "em3.pt")
    assert mp.classes.value() == 3 and mp.names.text() == "rest, membrane, mitochondria"
    w.tabs.setCurrentIndex(1)
    w.train_tab.form["continue_model"].value = False  # the legend of a new U-Net
    assert "3 = mitochondria" in w.train_tab.legend.text(), w.train_tab.legend.text()
    mp.load_model("nuclei")
    assert w.jobs.wait(60_000)
    assert w.model_source == "nuclei" and mp.classes.value() == 3
    # a model with the default names: written over typed names, never into an empty box
    w.session.set_model(new_model(ModelConfig(depth=2, base_features=4, classes=3), seed=0),
                        "new U-Net")
    assert mp.classes.value() == 3 and mp.names.text() == "background, class 2, class 3"
    mp.names.setText("")
    w.session.set_model(new_model(ModelConfig(depth=2, base_features=4, classes=3), seed=0),
                        "new U-Net")
    assert mp.names.text() == ""
    # five classes named, three of them painted and trained: the other two stay
    mp.classes.setValue(5)
    mp.names.setText("cytoplasm, membrane, mitochondria, glia, synapse")
    w.session.set_model(three, "em3.pt")
    assert mp.classes.value() == 5
    assert mp.names.text() == "rest, membrane, mitochondria, glia, synapse"


def test_paint_train_stop_save_reopen(viewer_widget, gt2d, tmp_path):
    viewer, w = viewer_widget
    w.tabs.setCurrentIndex(1)
    # the bundled starter is loaded: Train starts a new U-Net unless the user ticks Continue
    assert w.model_source == "nuclei" and not w.train_tab.form["continue_model"].value
    legend = w.train_tab.legend
    assert "2 = class 2" in legend.text() and "boundary" not in legend.text()
    w.train_tab.form["continue_model"].value = True  # ticked: the legend shows the starter's
    assert "3 = boundary" in w.train_tab.legend.text()
    w.train_tab.form["continue_model"].value = False
    # corrected instances fine-tune the starter by default (benchmarks/dense.py); strokes not
    w.train_tab.form["labels_kind"].value = "instances"
    assert w.train_tab.form["continue_model"].value
    assert "0 = background" in legend.text() and "boundary" not in legend.text()
    w.train_tab.form["labels_kind"].value = "scribbles"
    assert not w.train_tab.form["continue_model"].value and "1 = background" in legend.text()
    lab = w.new_labels_layer()
    assert lab.data.shape == (512, 512) and lab.data.max() == 0
    assert viewer.layers.selection.active is lab and lab.mode == "paint"
    assert "1 = background" in w.train_tab.legend.text()
    _paint_strokes(lab, gt2d, np.random.default_rng(0))
    painted = lab.data.copy()
    w.train_tab.form["time_budget"].value = 0  # no time limit
    w.train_tab.form["steps"].value = TRAIN_STEPS
    w.train_tab.train_btn.click()
    assert w.train_tab.stop_btn.isEnabled() and not w.segment_tab.segment_btn.isEnabled()
    assert w.jobs.wait(120_000)  # training, then the automatic Segment
    assert w.model_source == "new U-Net (trained)"
    np.testing.assert_array_equal(lab.data, painted)  # the painted labels are untouched
    seg = viewer.layers["nuclei2d segmentation"].data
    assert viewer.layers.selection.active is lab  # still painting on the same layer
    assert [ly.name for ly in viewer.layers][-1] == "nuclei2d paint"  # strokes stay visible
    assert len(w.train_tab.plot.loss) > 3
    held = slice(256, 512)
    iou = ((seg[held] == 2) & gt2d[held]).sum() / ((seg[held] == 2) | gt2d[held]).sum()
    assert iou > 0.5, iou
    # continue training (on by default now that the model is trained on this image), stop it
    # midway: it ends early and keeps the best weights
    assert w.train_tab.form["continue_model"].value
    w.train_tab.form["refresh"].value = False
    w.train_tab.form["time_budget"].value = 600
    w.train_tab.form["steps"].value = 0  # no step limit: only Stop ends it early
    t0 = time.perf_counter()
    w.train_tab.train_btn.click()
    QTimer.singleShot(3000, w.train_tab.stop_btn.click)
    assert w.jobs.wait(120_000)
    assert time.perf_counter() - t0 < 60
    assert "stopped; best weights kept" in w.train_tab.info.text()
    runs = w.model.provenance["training"]
    assert len(runs) == 2 and runs[-1]["stopped"]
    # save and reopen
    path = tmp_path / "painted.pt"
    w.save_model(path)
    assert w.jobs.wait(60_000) and path.exists()
    trained = w.model
    w.load_model(str(path))
    assert w.jobs.wait(60_000)
    assert w.model_source == "painted.pt" and w.model is not trained
    assert w.train_tab.form["continue_model"].value  # a checkpoint file is continued
    w.train_tab.form["labels_kind"].value = "instances"
    w.train_tab.form["labels_kind"].value = "scribbles"
    assert w.train_tab.form["continue_model"].value  # whatever the labels are
    for a, b in zip(trained.network.state_dict().values(), w.model.network.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    w.load_model("nuclei")  # the bundled starter again: a new U-Net by default
    assert w.jobs.wait(60_000)
    assert w.model_source == "nuclei" and not w.train_tab.form["continue_model"].value


def test_corrected_instances_fine_tune_the_starter(open_widget):
    """Segment a cells3d slice with the starter (nuclei twice its training size: poor), hand
    the corrected instances back (here set as data, as a plugin or the console would: no paint
    event), Train with the default settings: the starter is fine-tuned, its result on another
    slice improves, and the corrected layer is neither modified nor overwritten."""
    stack = tifffile.imread(os.path.join(SAMPLES, "nuclei3d.tif"))
    truth = tifffile.imread(os.path.join(SAMPLES, "nuclei3d_labels.tif"))
    viewer, w = open_widget(stack[32], "slice32")
    w.segment_tab.segment_btn.click()
    assert w.jobs.wait(120_000)
    seg = viewer.layers["slice32 segmentation"]
    seg.data = truth[32].astype(seg.data.dtype)  # the user's corrections
    corrected = seg.data.copy()
    w.tabs.setCurrentIndex(1)
    w.train_tab.labels.setCurrentText(seg.name)
    w.train_tab.form["labels_kind"].value = "instances"
    assert w.train_tab.form["continue_model"].value  # the default for corrected instances
    w.train_tab.form["time_budget"].value = 0
    w.train_tab.form["steps"].value = 20
    w.train_tab.form["precision"].value = "float32"  # the CLI's --precision
    w.train_tab.train_btn.click()
    assert w.jobs.wait(120_000)  # training, then the automatic Segment
    assert w.model_source == "nuclei (trained)"
    assert w.model.provenance["training"][-1]["anchor"] == 0.0  # nothing unpainted to hold
    assert w.model.provenance["training"][-1]["precision"] == "float32"
    np.testing.assert_array_equal(seg.data, corrected)
    assert "slice32 segmentation [2]" in viewer.layers  # the new result, in a new layer

    def ap(model):
        labels = segment_labels(stack[40], model,
                                        SegmentSettings(output="instances", axes="YX")).labels
        return instance_scores(labels, truth[40])["ap"][0]

    before, after = ap(load_model("nuclei")), ap(w.model)
    assert after > before + 0.15, (before, after)  # measured: 0.39 -> 0.65-0.68


def test_continuing_a_contradicted_model_warns(open_widget, nuclei2d, gt2d):
    """Continue ticked with the starter on an image of inverted contrast: the user is told
    that it contradicts the strokes, during training and when it ends. The trained model is
    named as continued even though Continue was unticked while it trained."""
    viewer, w = open_widget(nuclei2d.max() + nuclei2d.min() - nuclei2d, "inverted")
    assert w.model_source == "nuclei"
    w.tabs.setCurrentIndex(1)
    lab = w.new_labels_layer()
    _paint_strokes(lab, gt2d, np.random.default_rng(0))
    w.train_tab.form["continue_model"].value = True
    w.train_tab.form["refresh"].value = False
    w.train_tab.form["time_budget"].value = 0
    w.train_tab.form["steps"].value = 2
    w.train_tab.train_btn.click()
    # unticked during the run: it changes the next run only
    w.train_tab.form["continue_model"].value = False
    assert w.jobs.wait(120_000)
    assert w.model_source == "nuclei (trained)"  # named by what it was trained from
    text = w.status.text()
    assert text.startswith("Training done") and "background 0%" in text, text
    assert "Untick 'Continue from the current model'" in text
    assert "background 0%" in w.train_tab.info.text()  # stays on the Train tab


def test_continuing_a_model_of_other_channels_is_refused_at_once(open_widget, nuclei2d, gt2d):
    """Continue ticked with the one-channel starter on an RGB image: Train says so before any
    work (no job starts, nothing trained, the strokes untouched); unticked, a new U-Net of three
    channels trains on the same strokes."""
    rgb = np.stack([nuclei2d, nuclei2d // 2, nuclei2d // 4], -1)
    viewer, w = open_widget(rgb, "rgb")
    assert viewer.layers["rgb"].rgb and w.model_source == "nuclei"
    w.tabs.setCurrentIndex(1)
    lab = w.new_labels_layer()
    _paint_strokes(lab, gt2d, np.random.default_rng(0))
    painted = lab.data.copy()
    runs = len(w.model.provenance.get("training", []))
    w.train_tab.form["continue_model"].value = True
    w.train_tab.form["refresh"].value = False
    w.train_tab.form["time_budget"].value = 0
    w.train_tab.form["steps"].value = 3
    assert w.train() is False  # refused before a job starts
    text = w.status.text()
    assert text.startswith("'nuclei' expects 1 channel(s) but got 3 from 'rgb'"), text
    assert "untick 'Continue from the current model'" in text
    assert w.model_source == "nuclei" and len(w.model.provenance.get("training", [])) == runs
    w.train_tab.form["continue_model"].value = False
    assert w.train() is True
    assert w.jobs.wait(120_000)
    assert w.model_source == "new U-Net (trained)" and w.model.config.in_channels == 3
    np.testing.assert_array_equal(lab.data, painted)


def test_every_job_runs_on_one_thread_of_its_own(viewer_widget, qtbot):
    """torch keeps a team of helper threads per computing thread (see _jobs.py): the widget's
    jobs share one thread, not napari's pool, where they would land on whichever thread is
    free, e.g. one another plugin's worker has just used."""
    import threading

    from napari.qt.threading import create_worker

    _viewer, w = viewer_widget
    other = create_worker(threading.get_ident)  # napari's shared pool, as other plugins use it
    with qtbot.waitSignal(other.returned, timeout=10_000) as napari_thread:
        other.start()
    seen = []

    def job(report, should_stop):
        seen.append(threading.get_ident())

    for _ in range(3):
        assert w.jobs.start("probe", job)
        assert not w.jobs.start("probe", job)  # one at a time
        assert w.jobs.wait(10_000)
    assert len(seen) == 3 and len(set(seen)) == 1
    assert seen[0] not in (threading.get_ident(), napari_thread.args[0])


def test_no_torch_work_on_the_gui_thread(viewer_widget, tmp_path):
    """Torch on the GUI thread (copying a model for a job, say) starts a team of helper
    threads for it beside the job thread's (see _jobs.py). Torch's dispatch modes are per
    thread: this one, entered on the GUI thread, sees only the operations run there, the
    handlers of the jobs included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    _viewer, w = viewer_widget
    with Seen() as seen:
        w.segment_tab.segment_btn.click()  # the starter model, copied for the job
        assert w.jobs.wait(120_000)
        w.model_panel.save_model(tmp_path / "m.pt")
        assert w.jobs.wait(60_000)
        w.model_panel.new_btn.click()
        assert w.jobs.wait(60_000)
    assert (tmp_path / "m.pt").exists() and "nuclei2d segmentation" in _viewer.layers
    assert seen.ops == []


def test_errors_are_notifications_and_the_widget_stays_usable(viewer_widget, tmp_path):
    viewer, w = viewer_widget
    # nothing painted
    w.tabs.setCurrentIndex(1)
    w.new_labels_layer()
    w.train_tab.train_btn.click()
    assert w.jobs.wait(60_000)
    assert "nothing is painted" in w.status.text()
    # a file that is not a checkpoint
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    w.load_model(str(bad))
    assert w.jobs.wait(60_000)
    assert "bad.pt" in w.status.text() and w.model_source == "nuclei"  # the old model stays
    # a job asked for from code while another runs (the buttons are disabled then)
    w.segment_tab.segment_btn.click()
    assert not w.train_tab.train()
    assert w.status.text() == ("Cannot train now: the segment job is still running (Stop it, "
                               "or wait for it to end).")
    assert w.jobs.wait(60_000)
    viewer.layers.remove("nuclei2d segmentation")
    # a 3D model on a 2D image
    w.model_panel.dims.setCurrentText("3D")
    w.model_panel.new_btn.click()
    assert w.jobs.wait(60_000)
    w.segment_tab.segment_btn.click()
    # said as is (it read "Unexpected error (_UserError: ...); details are in the log.")
    assert w.status.text() == "The model is 3D but 'nuclei2d' is 2D."
    assert w.segment_tab.segment_btn.isEnabled()
    assert [ly.name for ly in viewer.layers] == ["nuclei2d", "nuclei2d paint"]


def test_batch_tab_with_a_corrupt_file(viewer_widget, tmp_path, nuclei2d):
    viewer, w = viewer_widget
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", nuclei2d[:256])
    tifffile.imwrite(src / "b.tif", nuclei2d[256:])
    (src / "broken.tif").write_bytes((src / "a.tif").read_bytes()[:5000])
    w.tabs.setCurrentIndex(2)
    w.batch_tab.input.setText(str(src))
    w.batch_tab.output.setText(str(out))
    w.batch_tab.batch_btn.click()
    assert w.jobs.wait(120_000)
    table = {w.batch_tab.table.item(r, 0).text(): (w.batch_tab.table.item(r, 1).text(),
                                               w.batch_tab.table.item(r, 2).text())
             for r in range(w.batch_tab.table.rowCount())}
    assert table["a.tif"][0] == "done" and table["b.tif"][0] == "done"
    assert table["broken.tif"][0] == "failed" and "truncated" in table["broken.tif"][1]
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "b_labels.tif"]
    assert "1 failed" in w.status.text()
    # the same labels as the core batch runner (and so the CLI)
    ref = segment_file(collect_inputs([src / "a.tif"])[0], load_model("nuclei"),
                       out_dir=tmp_path / "ref", settings=SegmentSettings())
    np.testing.assert_array_equal(tifffile.imread(out / "a_labels.tif"),
                                  tifffile.imread(ref.labels))
    # a rerun skips the finished files
    w.batch_tab.batch_btn.click()
    assert w.jobs.wait(120_000)
    statuses = [w.batch_tab.table.item(r, 1).text() for r in range(w.batch_tab.table.rowCount())]
    assert sorted(statuses) == ["failed", "skipped", "skipped"]


def test_gui_thread_keeps_ticking_while_training(viewer_widget, gt2d):
    """A QTimer on the GUI thread keeps firing while training runs (benchmarks/gui.py
    measures the gaps; here only a generous bound)."""
    viewer, w = viewer_widget
    w.tabs.setCurrentIndex(1)
    lab = w.new_labels_layer()
    _paint_strokes(lab, gt2d, np.random.default_rng(1), dabs=30)
    w.train_tab.form["refresh"].value = False
    w.train_tab.form["time_budget"].value = 6
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    w.train_tab.train_btn.click()
    assert w.jobs.wait(120_000)
    timer.stop()
    gaps = np.diff(ticks)
    assert len(ticks) > 200 and gaps.max() < 1.0, (len(ticks), gaps.max())


def test_stack_paint_two_slices_train_segment_current_slice(open_widget, nuclei3d_path):
    """A 2D model on a 3D stack: paint two slices, train, segment the displayed slice."""
    gt = tifffile.imread(os.path.join(SAMPLES, "nuclei3d_labels.tif")) > 0
    viewer, w = open_widget(tifffile.imread(nuclei3d_path), "nuclei3d", load_starter=False)
    w.model_panel.new_btn.click()  # a new 2D U-Net, 2 classes
    assert w.jobs.wait(60_000)
    # named as the Model panel describes it (the fast preset averages 3 U-Nets for strokes)
    assert w.model_source == "new 3 averaged 2D U-Nets"
    assert w.model_panel.info.text().startswith(
        "<b>new 3 averaged 2D U-Nets</b>: 3 averaged 2D U-Nets")
    lab = w.new_labels_layer()
    assert lab.data.shape == (60, 256, 256)
    rng = np.random.default_rng(0)
    for z in (27, 38):
        for cls, mask in ((1, ~gt[z]), (2, gt[z])):
            ys, xs = np.nonzero(mask)
            for i in rng.choice(len(ys), 40, replace=False):
                lab.paint((z, ys[i], xs[i]), cls)
    w.train_tab.form["refresh"].value = False
    w.train_tab.form["time_budget"].value = 0  # no time limit
    w.train_tab.form["steps"].value = TRAIN_STEPS
    w.train_tab.train_btn.click()
    assert w.jobs.wait(120_000)
    viewer.dims.set_current_step(0, 33)
    w.segment_tab.form["scope"].value = "current slice"
    w.segment_tab.segment_btn.click()
    assert w.jobs.wait(120_000)
    seg = viewer.layers["nuclei3d segmentation"].data
    assert seg.shape == (60, 256, 256)
    assert np.flatnonzero(seg.reshape(60, -1).any(1)).tolist() == [33]
    fg = seg[33] == 2
    iou = (fg & gt[33]).sum() / (fg | gt[33]).sum()
    assert iou > 0.4, iou


def test_rgb_three_named_classes_and_a_missed_class_is_named(open_widget, tmp_path):
    """An RGB histology picture, three classes named on the widget, painted and trained: the
    legend and the labels layer show the names, the model keeps them, the segmentation has
    the three classes. A one-step run misses a class, and the Train tab says which."""
    from scipy import ndimage as ndi
    from skimage import color, data, filters

    rgb = data.immunohistochemistry()
    hed = color.rgb2hed(rgb)
    dab = filters.gaussian(hed[..., 2], sigma=2)
    dab = dab > filters.threshold_otsu(dab)
    haem = filters.gaussian(hed[..., 0], sigma=1)
    truth = np.where(dab, 3, np.where(~dab & (haem > filters.threshold_otsu(haem[~dab])), 2, 1))
    viewer, w = open_widget(rgb, "ihc")
    assert viewer.layers["ihc"].rgb
    w.tabs.setCurrentIndex(1)
    w.model_panel.classes.setValue(3)
    w.model_panel.names.setText("stroma, nuclei, DAB")
    assert "2 = nuclei" in w.train_tab.legend.text() and "3 = DAB" in w.train_tab.legend.text()
    lab = w.new_labels_layer()
    assert lab.data.shape == (512, 512)
    assert list(lab.features["class"]) == ["not painted", "stroma", "nuclei", "DAB"]
    lab.brush_size = 3
    rng = np.random.default_rng(0)
    for cls in (1, 2, 3):
        ys, xs = np.nonzero(ndi.binary_erosion(truth == cls, iterations=2))
        for i in rng.choice(len(ys), 120, replace=False):
            lab.paint((ys[i], xs[i]), cls)
    painted = lab.data.copy()
    w.train_tab.form["continue_model"].value = False
    w.train_tab.form["time_budget"].value = 0
    w.train_tab.form["steps"].value = 1  # one step: not enough to learn every class
    w.train_tab.form["refresh"].value = False
    w.train_tab.train_btn.click()
    assert w.jobs.wait(120_000)
    assert w.model.class_names == ("stroma", "nuclei", "DAB")
    assert "the result will miss" in w.train_tab.info.text(), w.train_tab.info.text()
    # three classes in colour: more steps (at 120 steps one unseeded run in 8 left a class
    # under half its strokes; at 240, 12 seeded runs gave each class >= 96 % of them)
    w.train_tab.form["steps"].value = 4 * TRAIN_STEPS
    w.train_tab.form["refresh"].value = True
    w.train_tab.form["continue_model"].value = False
    w.train_tab.train_btn.click()
    assert w.jobs.wait(120_000)
    np.testing.assert_array_equal(lab.data, painted)  # the painted labels are untouched
    assert "the result will miss" not in w.train_tab.info.text(), w.train_tab.info.text()
    seg = viewer.layers["ihc segmentation"].data
    assert set(np.unique(seg)) == {0, 2, 3}  # stroma written as 0, as the CLI writes it
    held = np.s_[:, 256:]
    agree = (np.where(seg == 0, 1, seg)[held] == truth[held]).mean()
    assert agree > 0.7, agree
    viewer.screenshot(str(tmp_path / "ihc.png"), canvas_only=False)


def test_live_mode_learns_while_the_user_paints(viewer_widget, gt2d, qtbot):
    """Live on, then paint: each stroke reaches the session, the live layer (under the
    strokes) shows the prediction of the view, uncertainty and 'where to paint next' appear;
    Live off makes the trained model the current one. The strokes are never touched."""
    viewer, w = viewer_widget
    w.tabs.setCurrentIndex(1)
    lab = w.new_labels_layer()
    live = w.train_tab.live
    live.toggle.click()  # on before anything is painted: it waits for two classes
    assert w.jobs.name == "live" and live.toggle.isEnabled()
    assert not w.segment_tab.segment_btn.isEnabled() and not w.train_tab.train_btn.isEnabled()
    qtbot.waitUntil(lambda: live.live is not None, timeout=30_000)
    assert live.live.step == 0
    _paint_strokes(lab, gt2d, np.random.default_rng(0))  # the brush's paint events
    painted = lab.data.copy()
    qtbot.waitUntil(lambda: live.live.step >= 90, timeout=120_000)  # IoU about 0.77
    step = live.live.step
    qtbot.waitUntil(lambda: "nuclei2d live" in viewer.layers
                    and live._layer("live") is not None and not live._inflight
                    and w.train_tab.info.text().startswith("Live: step")
                    and int(w.train_tab.info.text().split()[2].rstrip(",")) >= step,
                    timeout=60_000)
    names = [ly.name for ly in viewer.layers]
    assert names.index("nuclei2d live") < names.index("nuclei2d paint")  # under the strokes
    assert viewer.layers.selection.active is lab  # still painting on the same layer
    region = live._visible_region()
    shown = viewer.layers["nuclei2d live"].data[region] == 2
    truth = gt2d[region]
    assert (shown & truth).sum() / (shown | truth).sum() > 0.5
    live.uncertain.setChecked(True)
    qtbot.waitUntil(lambda: "nuclei2d uncertainty" in viewer.layers, timeout=30_000)
    unc = viewer.layers["nuclei2d uncertainty"].data
    assert 0 <= unc.min() and unc.max() <= 1 and unc.max() > 0
    live.next_btn.click()
    qtbot.waitUntil(lambda: "nuclei2d paint next" in viewer.layers, timeout=30_000)
    assert len(viewer.layers["nuclei2d paint next"].data) == 1
    # a prediction that misses a painted class in view is named under the status line
    from paintseg.training.live import MISSED_AFTER_STEPS, LivePrediction

    shape = tuple(sl.stop - sl.start for sl in region)
    missing = LivePrediction(np.zeros(shape, np.uint8), np.zeros(shape, np.float32), region,
                             max(live.live.step, MISSED_AFTER_STEPS), {1: 0.9, 2: 0.1})
    live._show(missing, region)
    assert "The live model predicts" in w.train_tab.info.text()
    assert "(value 2) on only 10% of its painted pixels in view" in w.train_tab.info.text()
    from paintseg.training import EventKind, TrainEvent

    live._progress(TrainEvent(EventKind.STEP, live.live.step, 0.5, 30.0, None, 0.0))
    assert "(value 2) on only 10%" in w.train_tab.info.text()  # the step count does not hide it
    early = LivePrediction(missing.labels, missing.uncertainty, region, 5, missing.agreement)
    live._show(early, region)  # over the first steps a new U-Net misses a class: not said
    assert "predicts" not in w.train_tab.info.text()
    lab.name = "my strokes"  # renamed while live: its strokes still reach the session
    y, x = np.argwhere(~gt2d & (lab.data == 0))[0]
    lab.paint((y, x), 1)
    qtbot.waitUntil(lambda: live.live.labels[y, x] == 1, timeout=30_000)
    painted = lab.data.copy()
    live.toggle.click()  # off: the model is kept
    assert w.jobs.wait(60_000)
    assert w.model_source == "live U-Net (trained)" and not live.toggle.isChecked()
    assert w.model.provenance["training"][-1]["live"] is True
    from paintseg.devices import cpu_has_bf16_units  # the Train tab's precision: auto

    auto = "bfloat16" if cpu_has_bf16_units() else "float32"
    assert w.model.provenance["training"][-1]["precision"] == auto
    assert w.segment_tab.segment_btn.isEnabled()
    np.testing.assert_array_equal(lab.data, painted)  # the strokes are untouched
    assert w.segment()
    assert w.jobs.wait(60_000)
    seg = viewer.layers["nuclei2d segmentation"].data
    held = slice(256, 512)
    iou = ((seg[held] == 2) & gt2d[held]).sum() / ((seg[held] == 2) | gt2d[held]).sum()
    assert iou > 0.5, iou


def test_closing_the_viewer_stops_a_live_session(make_napari_viewer, nuclei2d, gt2d, qtbot):
    """No job outlives the window: closing napari while Live trains stops the session (it
    would otherwise train on in the background, and quitting would wait for it)."""
    viewer = make_napari_viewer(show=True)
    viewer.add_image(nuclei2d, name="nuclei2d")
    w = PaintsegWidget(viewer)
    viewer.window.add_dock_widget(w, name="paintseg", area="right")
    assert w.jobs.wait(60_000)
    lab = w.new_labels_layer()
    _paint_strokes(lab, gt2d, np.random.default_rng(0))
    live = w.train_tab.live
    live.toggle.click()
    qtbot.waitUntil(lambda: live.live is not None and live.live.step >= 5, timeout=60_000)
    session = live.live
    viewer.close()
    qtbot.waitUntil(lambda: not session.running, timeout=10_000)
    step = session.step
    qtbot.wait(500)
    assert session.step == step  # stopped, not paused


def test_export_a_bioimageio_package_and_open_it_again(viewer_widget, tmp_path, without_onnx):
    pytest.importorskip("bioimageio.core")
    from paintseg._napari._model_panel import ExportDialog

    viewer, w = viewer_widget
    panel = w.model_panel
    assert panel.export_btn.isEnabled() and panel.export_btn in panel.buttons()
    dialog = ExportDialog(panel, images=["nuclei2d"], default_name="nuclei")
    dialog.name.setText("nuclei starter copy")
    dialog.authors.setText("A. Biologist, B. Imager")
    dialog.cite.setText("10.1038/s41592-020-01018-x")
    values = dialog.values()
    assert values["authors"] == ["A. Biologist", "B. Imager"]
    assert values["license"] == "CC-BY-4.0" and values.pop("sample_layer") == "nuclei2d"
    w.tabs.setCurrentIndex(0)
    w.segment_tab.segment_btn.click()
    assert w.jobs.wait(120_000)
    starter_labels = viewer.layers["nuclei2d segmentation"].data.copy()
    path = tmp_path / "starter.zip"
    panel.export_model(path, sample_layer="nuclei2d", **values)
    assert w.jobs.wait(120_000)
    assert path.exists() and "bioimageio's test passed" in w.status.text()
    w.load_model(str(path))  # as Open… does with the file chosen
    assert w.jobs.wait(60_000)
    text = panel.info.text()
    for part in ("starter.zip", "BioImage.IO: nuclei starter copy", "A. Biologist, B. Imager",
                 "licence CC-BY-4.0", "10.1038/s41592-020-01018-x"):
        assert part in text, (part, text)
    viewer.layers.remove("nuclei2d segmentation")
    w.segment_tab.segment_btn.click()
    assert w.jobs.wait(120_000)
    np.testing.assert_array_equal(viewer.layers["nuclei2d segmentation"].data, starter_labels)
    # a bad name is one notification, nothing written
    panel.export_model(tmp_path / "bad.zip", sample_layer="nuclei2d", name="x")
    assert w.jobs.wait(60_000)
    assert "Exporting bad.zip failed" in w.status.text() and not (tmp_path / "bad.zip").exists()
