"""The live session: training while the user paints (core, no Qt)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

import paintseg.inference
from paintseg.config import TrainConfig
from paintseg.errors import InputError
from paintseg.inference import segment
from paintseg.model import load_model
from paintseg.training import IGNORE
from paintseg.training.live import LiveSession

SAMPLES = Path(__file__).parents[1] / "src" / "paintseg" / "sample_data"


@pytest.fixture(scope="module")
def crop():
    """A 256 x 256 crop of the DSB2018 sample, its truth (1 background, 2 nucleus)."""
    img = tifffile.imread(SAMPLES / "nuclei2d.tif")[:256, :256]
    gt = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")[:256, :256]
    return img[..., None], np.where(gt > 0, 2, 1).astype(np.uint8)


def strokes(sem: np.ndarray, rows: slice, n: int = 30, seed: int = 0) -> np.ndarray:
    """Short strokes (3 x 12 px) with the true class, within ``rows``."""
    lab = np.zeros(sem.shape, np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        y = int(rng.integers(rows.start, rows.stop - 3))
        x = int(rng.integers(0, sem.shape[1] - 12))
        lab[y : y + 3, x : x + 12] = sem[y : y + 3, x : x + 12]
    return lab


def wait_for(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def sampled(session: LiveSession) -> np.ndarray:
    """The painted pixels the session's training samples from now (a mask)."""
    item = session._run.data.items[0]
    return item.train_targets >= 0


def test_strokes_painted_while_it_runs_enter_the_sampling_and_erased_ones_leave(crop):
    img, sem = crop
    top = strokes(sem, slice(0, 128))
    s = LiveSession(img, top, config=TrainConfig(seed=0), device="cpu")
    s.start()
    try:
        wait_for(lambda: s.step >= 3)
        np.testing.assert_array_equal(sampled(s), top > 0)
        both = top | strokes(sem, slice(128, 256), seed=1)
        s.update_labels(both)
        n = s.step
        wait_for(lambda: s.step >= n + 2)  # one step to take them in, one with them
        np.testing.assert_array_equal(sampled(s), both > 0)
        erased = both.copy()
        erased[128:] = 0
        s.update_labels(erased)
        n = s.step
        wait_for(lambda: s.step >= n + 2)
        assert not sampled(s)[128:].any()
        assert (s._run.data.items[0].targets[128:] == IGNORE).all()
    finally:
        s.stop()
    assert not s.running


def test_strokes_steer_the_live_prediction(crop):
    """Background painted as 'nucleus' in a box: the live prediction follows the user there,
    and predicting from another thread runs the network on the loop's thread."""
    img, sem = crop
    lab = strokes(sem, slice(0, 256))
    box = (slice(0, 40), slice(0, 40))
    assert (sem[box] == 1).mean() > 0.9  # background there
    s = LiveSession(img, lab, config=TrainConfig(seed=0), device="cpu")
    s.start()
    try:
        wait_for(lambda: s.step >= 40)
        before = s.predict(box).labels
        assert (before == 2).mean() < 0.5
        painted = lab.copy()
        painted[box] = 2
        s.update_labels(painted)
        # the prediction says which painted class it misses where it was asked for
        missed = s.predict(box)
        assert missed.agreement[2] < 0.5 and set(missed.agreement) <= {1, 2}
        n = s.step
        wait_for(lambda: s.step >= n + 50)  # all of the box from about 30 steps on
        threads = []
        original = paintseg.inference.segment

        def watched(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return original(*args, **kwargs)

        paintseg.inference.segment = watched
        try:
            after = s.predict(box)
        finally:
            paintseg.inference.segment = original
        assert threads == ["paintseg-live"]
        assert after.step >= n + 50
        assert (after.labels == 2).mean() > 0.8
        assert after.agreement[2] > 0.8  # the box, painted as nucleus, is predicted so
        assert after.uncertainty.shape == after.labels.shape == (40, 40)
        assert 0.0 <= after.uncertainty.min() and after.uncertainty.max() <= 1.0
    finally:
        s.stop()


def test_stop_resume_and_save_give_a_normal_checkpoint(crop, tmp_path):
    img, sem = crop
    lab = strokes(sem, slice(0, 256))
    given = lab.copy()
    s = LiveSession(img, lab, config=TrainConfig(seed=0), device="cpu", name="crop")
    lab[:] = 0  # the caller's array changes: the session trains on its own copy
    s.start()
    wait_for(lambda: s.step >= 10)
    s.stop()
    assert not s.running
    k = s.step
    time.sleep(0.3)
    assert s.step == k  # stopped means stopped
    np.testing.assert_array_equal(s.labels, given)
    s.start()
    wait_for(lambda: s.step >= k + 10)
    s.stop()
    path = s.save(tmp_path / "live.pt")
    model = load_model(path)
    assert model.class_values == (1, 2)
    record = model.provenance["training"][-1]
    assert record["live"] is True and record["steps"] == s.step
    assert record["painted_pixels"] == [int((given == 1).sum()), int((given == 2).sum())]
    # the checkpoint segments as the session predicts
    whole = s.predict()
    np.testing.assert_array_equal(segment(img[..., 0], model, axes="YX", snap=0,
                                          device="cpu").labels, whole.labels)


def test_offered_labels_are_copied_when_taken_in(crop):
    """A GUI offers the array it goes on painting into: the session copies it when it takes
    it in, so later changes reach it only through the next offer."""
    img, sem = crop
    painting = strokes(sem, slice(0, 256))
    given = painting.copy()
    s = LiveSession(img, np.zeros_like(painting), config=TrainConfig(seed=0), device="cpu",
                    name="crop")
    s.offer_labels(painting)  # not running: taken in at once
    np.testing.assert_array_equal(s.labels, given)
    painting[:] = 0  # the user goes on (here: erases everything) without offering
    np.testing.assert_array_equal(s.labels, given)
    s.start()
    try:
        s.offer_labels(painting)
        wait_for(lambda: not s.labels.any())  # the newest offer, taken in by the loop
        painting[:] = given
        time.sleep(0.3)
        assert not s.labels.any()  # not offered: not seen
        np.testing.assert_array_equal(given, painting)  # the caller's array only read
    finally:
        s.stop()


def test_a_refresh_of_the_same_view_filters_nothing_again(crop):
    """The image never changes: the filter bank's output for a view is kept, and the
    prediction with it is the one without it; the snapshots handed out keep no memo."""
    img, sem = crop
    s = LiveSession(img, strokes(sem, slice(0, 256)), config=TrainConfig(seed=0),
                    device="cpu", name="crop")
    s.run(should_stop=lambda: s.step >= 5)
    view = (slice(10, 140), slice(20, 200))
    first = s.predict(view)
    memo = s._features
    assert (memo.hits, memo.misses) == (0, 1)
    again = s.predict(view)
    assert memo.hits == 1  # the same view: its features were found
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.uncertainty, again.uncertainty)
    s.predict((slice(0, 100), slice(0, 100)))  # another view: filtered
    assert memo.misses == 2
    model = s.model()
    assert model.network.filters.memo is None
    # the same weights without a memo predict the same view alike
    fresh = segment(img[..., 0], model, axes="YX", snap=0, device="cpu").labels
    np.testing.assert_array_equal(
        np.where(fresh[view] == 1, 0, fresh[view]), again.labels)


def test_it_waits_for_two_classes_and_grows_with_a_new_one(crop, monkeypatch):
    """Nothing trains before two classes are painted; a third class painted later grows the
    model and starts a new run, its learning rate again from the peak."""
    import paintseg.training.live as live
    from paintseg.training.loop import TrainingRun

    monkeypatch.setattr(live, "LIVE_DECAY_STEPS", 40)  # at the floor within the test
    rates: list[float] = []
    step = TrainingRun.train_step
    monkeypatch.setattr(TrainingRun, "train_step",
                        lambda run, lr: (rates.append(lr), step(run, lr))[1])
    img, sem = crop
    lab = strokes(sem, slice(0, 256))
    only_bg = np.where(lab == 1, 1, 0).astype(np.uint8)
    s = LiveSession(img, only_bg, config=TrainConfig(seed=0), device="cpu", name="crop")
    with pytest.raises(InputError, match="crop: nothing trained yet: paint at least two"):
        s.predict()
    s.start()
    try:
        time.sleep(0.5)
        assert s.step == 0
        assert s.update_labels(lab)
        wait_for(lambda: s.step >= 45)
        peak = TrainConfig().learning_rate
        assert rates[-1] == pytest.approx(peak * live.LIVE_FLOOR)
        third = lab.copy()
        third[100:110, 100:140] = 3
        s.update_labels(third)
        n, k = s.step, len(rates)  # the new classes are taken in before the next step
        wait_for(lambda: s.step >= n + 14)
        assert max(rates[k:k + 14]) > 0.8 * peak  # warmed up again, near the peak (floor 0.1)
        model = s.model()
        assert model.class_values == (1, 2, 3)
        assert s.predict((slice(0, 64), slice(0, 64))).labels.max() <= 3
    finally:
        s.stop()


def test_bad_input_names_the_image(crop):
    img, sem = crop
    with pytest.raises(InputError, match="crop: labels have shape"):
        LiveSession(img, sem[:10], name="crop")
    s = LiveSession(img, strokes(sem, slice(0, 256)), name="crop", device="cpu")
    with pytest.raises(InputError, match="crop: region"):
        s.predict((slice(10, 10), slice(0, 5)))


def test_a_prediction_that_must_not_run_here_waits_for_the_loop_or_is_cancelled(crop,
                                                                                  monkeypatch):
    """napari's thread asks with ``inline=False``: while the loop runs, the prediction is
    made on the loop's thread; when the loop has stopped (as Live ends), nothing is computed
    on the caller's thread and the future is cancelled. A plain call still predicts here."""
    img, sem = crop
    s = LiveSession(img, strokes(sem, slice(0, 256)), config=TrainConfig(seed=0),
                    device="cpu", name="crop")
    threads = []
    predict = s._predict
    monkeypatch.setattr(s, "_predict", lambda *a: threads.append(
        threading.current_thread()) or predict(*a))
    s.start()
    try:
        wait_for(lambda: s.step >= 2)
        fut = s.predict_async((slice(0, 64), slice(0, 64)), inline=False)
        assert fut.result(120).labels.shape == (64, 64)
        assert threads == [s._thread]  # the loop's thread, not this one
    finally:
        s.stop()
    late = s.predict_async((slice(0, 64), slice(0, 64)), inline=False)
    assert late.cancelled() and len(threads) == 1
    here = s.predict_async((slice(0, 64), slice(0, 64)))
    assert here.result().labels.shape == (64, 64) and threads[-1] is threading.current_thread()


def test_the_live_learning_rate_warms_up_falls_to_its_floor_and_stays():
    """A run's rate rises over the warm-up, falls by a cosine to the floor, then holds there
    for as long as the session trains (a new class restarts it: see
    test_it_waits_for_two_classes_and_grows_with_a_new_one)."""
    from paintseg.training.live import LIVE_DECAY_STEPS, LIVE_FLOOR, live_learning_rate

    rates = [live_learning_rate(3e-3, i) for i in range(3 * LIVE_DECAY_STEPS)]
    assert rates[0] < rates[5] < rates[9]  # warm-up
    assert max(rates) == pytest.approx(3e-3, rel=0.01)
    falling = rates[9:LIVE_DECAY_STEPS + 1]
    assert all(a >= b for a, b in zip(falling, falling[1:]))
    assert rates[LIVE_DECAY_STEPS // 2] == pytest.approx(3e-3 * (1 + LIVE_FLOOR) / 2, rel=0.02)
    assert rates[LIVE_DECAY_STEPS:] == pytest.approx([3e-3 * LIVE_FLOOR] * (2 * LIVE_DECAY_STEPS))


def test_live_training_has_no_brightness_offset_unless_set(crop):
    # strokes in a live session go on borders, where a brightness offset per patch blurs the
    # border the strokes set; a set offset is kept
    img, sem = crop
    lab = strokes(sem, slice(0, 256))
    for config, shift in ((TrainConfig(seed=0), 0.0),
                          (TrainConfig(seed=0, intensity_shift=0.05), 0.05)):
        s = LiveSession(img, lab, config=config, device="cpu", name="crop")
        s.run(should_stop=lambda s=s: s.step >= 2)
        assert s._run.shift == shift
        assert s.model().provenance["training"][-1]["intensity_shift"] == shift
