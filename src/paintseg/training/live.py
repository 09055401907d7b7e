"""Live training: the U-Net learns while the user paints.

A :class:`LiveSession` holds one image, its painted labels and a :class:`~.loop.TrainingRun`.
Its loop (:meth:`LiveSession.run`, or a thread of its own with :meth:`LiveSession.start`)
trains step after step; new or erased strokes (:meth:`LiveSession.update_labels`) replace the
data it samples from before the next step; :meth:`LiveSession.predict` gives the current
(averaged) weights' labels and uncertainty for any region; :meth:`LiveSession.model` and
:meth:`LiveSession.save` give a normal checkpoint at any time. The same
:class:`~.loop.TrainingRun` serves :func:`~.loop.iter_train`.

All torch work of a session runs on its loop's thread: a prediction or a snapshot asked for
from another thread while the loop runs is handed to the loop, which does it between two
steps. Two threads that both run torch slow each other down on a few cores (each keeps its
own team of OpenMP helper threads; see docs/architecture.md).
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..config import NormConfig, TrainConfig
from ..devices import flush_denormals, keep_freed_memory, resolve_device
from ..errors import InputError
from ..model import PaintsegModel, default_class_names, save_model
from ..network import FeatureMemo
from .data import TrainingData, _assemble, _normalised_range
from .loop import TrainingRun, cosine_rate
from .losses import _NEW_OUTPUT_LAYER
from .messages import agreement_in, missed_text
from .prepare import classes_to_continue, model_for_training
from .targets import _check_labels

T = TypeVar("T")

#: A class painted on fewer pixels of a predicted region than this is left out of the
#: prediction's :attr:`LivePrediction.agreement` (too few to judge).
AGREEMENT_MIN_PIXELS = 20
#: :meth:`LiveSession.missed_text` names a missed class only from this many training steps
#: on: over the first steps a new U-Net predicts one class everywhere.
MISSED_AFTER_STEPS = 100

#: A live run's learning rate falls from its peak to ``LIVE_FLOOR`` times the peak over its
#: first ``LIVE_DECAY_STEPS`` steps (a cosine, as a normal run's over its budget), then stays:
#: at the peak throughout, a new U-Net on hard strokes (phase-contrast cells) never fitted them.
LIVE_DECAY_STEPS = 300
LIVE_FLOOR = 0.1
#: A live session trains without the brightness offset per patch
#: (``TrainConfig.intensity_shift``, unless its config sets one): its strokes go where the
#: model is wrong or unsure, on the borders, and the offset blurs the brightness at which
#: those strokes put a border (correction rounds train without it too). With it, a live model
#: on the cells3d stack drew the nuclei a pixel or two too wide (benchmarks/RESULTS.md).
LIVE_INTENSITY_SHIFT = 0.0


def live_learning_rate(peak: float, run_step: int) -> float:
    """The learning rate of a live session's step ``run_step`` of its current run: the
    warm-up of :func:`~.loop.iter_train`, a cosine from ``peak`` down to ``LIVE_FLOOR *
    peak`` at step ``LIVE_DECAY_STEPS``, then that floor for as long as the session trains
    (a new run, for a new class, starts again from the peak)."""
    done = min(1.0, run_step / LIVE_DECAY_STEPS)
    return cosine_rate(peak, run_step, done, floor=LIVE_FLOOR)


@dataclass(frozen=True)
class LivePrediction:
    """What :meth:`LiveSession.predict` returns for a region.

    Attributes
    ----------
    labels : numpy.ndarray
        The arg-max class of each pixel of the region (the background class written as 0
        unless ``background_class`` was None), no snapping.
    uncertainty : numpy.ndarray
        float32, 0..1: one minus the margin between the two most likely classes' probabilities
        (0: sure, 1: a tie).
    region : tuple of slice
        The region predicted, over the image's spatial axes.
    step : int
        Training steps done when the prediction was made.
    agreement : dict
        ``{class value: share}``: for each class painted on at least
        :data:`AGREEMENT_MIN_PIXELS` pixels of the region (in the labels the session trained
        on), the share of them that the prediction gives that class (a share under
        :data:`~paintseg.training.messages.COLLAPSED` means the model misses the class
        there, see :func:`~paintseg.training.messages.missed_text`).
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    region: tuple[slice, ...]
    step: int
    agreement: dict[int, float] = field(default_factory=dict)


def _painted_values(labels: np.ndarray) -> set[int]:
    """The values > 0 in ``labels`` (checked: whole numbers >= 0)."""
    if (labels.dtype.kind in "biu" and labels.dtype.itemsize <= 4 and labels.size
            and int(labels.max()) < 65536):
        return {int(v) for v in np.flatnonzero(np.bincount(labels.ravel()))} - {0}
    return {int(v) for v in np.unique(labels)} - {0}


class LiveSession:
    """Train a model on one image's painted labels while they are being painted.

    Parameters
    ----------
    image : numpy.ndarray
        The image, channels last: ``(Y, X, C)`` or ``(Z, Y, X, C)``. Normalised once, as a
        whole (the percentiles of ``base`` when continuing it). Never modified.
    labels : numpy.ndarray
        The painted labels so far, the image's spatial shape (0 = not painted). Copied.
    base : PaintsegModel, optional
        A model to continue (a copy is trained); None: a new U-Net of ``preset`` once two
        classes are painted.
    dims : int
        2 or 3: a new U-Net's dimensionality (a 2D model trains on a stack's slices).
    preset : str
        A new U-Net's preset (see :func:`~.prepare.model_for_training`).
    config : TrainConfig, optional
        Batch, patch, learning rate, EMA, seed; its budget is not used (the session trains
        until stopped) nor its validation (every stroke trains: the user judges the live
        prediction). Its brightness offset, unless set, is :data:`LIVE_INTENSITY_SHIFT`.
    device : str or torch.device
        Where to train and predict.
    class_names : mapping, optional
        Names of classes by value, for a new U-Net (``{1: "rest", 2: "membrane"}``).
    name : str
        How messages name the image.

    Raises
    ------
    InputError
        The labels do not fit the image, the image has NaN, a 3D model on a 2D image, the
        base model takes another number of channels.
    """

    def __init__(self, image: np.ndarray, labels: np.ndarray, *,
                 base: PaintsegModel | None = None, dims: int = 2, preset: str = "auto",
                 config: TrainConfig | None = None, device: str | torch.device = "auto",
                 class_names: Mapping[int, str] | None = None, name: str = "image") -> None:
        image = np.asarray(image)
        if image.ndim not in (3, 4):
            raise InputError(f"{name}: expected (Y, X, C) or (Z, Y, X, C), got shape "
                             f"{image.shape}")
        self.name = name
        self._image = image
        self._spatial = tuple(image.shape[:-1])
        self._channels = int(image.shape[-1])
        if base is not None:
            if base.config.in_channels != self._channels:
                raise InputError(f"the model expects {base.config.in_channels} channel(s) but "
                                 f"{name} has {self._channels}")
            dims = base.config.dims
        if dims == 3 and len(self._spatial) != 3:
            raise InputError(f"{name}: a 3D model needs a 3D stack, got shape {image.shape}")
        self.dims = dims
        self._base = copy.deepcopy(base) if base is not None else None
        self._preset = preset
        config = config or TrainConfig()
        if config.intensity_shift is None:
            config = replace(config, intensity_shift=LIVE_INTENSITY_SHIFT)
        self._config = config
        self._device = resolve_device(device)
        self._names = dict(class_names or {})
        norm = base.normalization if base is not None else NormConfig()
        self._norm, self._range = _normalised_range(image, -1, norm, name)
        self._labels = np.zeros(self._spatial, np.uint8)
        self._classes: tuple[int, ...] | None = (tuple(base.class_values)
                                                  if base is not None else None)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = \
            queue.SimpleQueue()
        self._pending: TrainingData | None = None
        self._offered: np.ndarray | None = None  # the newest labels handed over
        self.error = ""  # why the newest labels handed over were refused
        self._run: TrainingRun | None = None
        self._run_steps = 0  # steps of the current run at its start (for the warm-up)
        self._running = False
        self._thread: threading.Thread | None = None  # started by start()
        self._loop_thread: threading.Thread | None = None  # running the loop now
        self._seconds = 0.0  # seconds the loop ran, over all its runs
        #: Seconds the loop spent training, taking in labels and doing what was asked
        #: (predictions, snapshots), over all its runs.
        self.spent = {"training": 0.0, "labels": 0.0, "requests": 0.0}
        self._trains = False  # the current data has two painted classes or more
        #: The filter bank's output for the regions predicted last (the image never changes:
        #: a refresh of the same view filters nothing again).
        self._features = FeatureMemo()
        self.waiting_for = "paint at least two classes"
        self.update_labels(labels)

    # ------------------------------------------------------------------ the labels

    @property
    def labels(self) -> np.ndarray:
        """A copy of the labels the session trains on now."""
        return self._labels.copy()

    def update_labels(self, labels: np.ndarray) -> bool:
        """Train on ``labels`` (the whole painted array, copied) from the next step on:
        new strokes join the sampling and erased ones leave it.

        Painting a value that is not yet a class adds it (a new output layer, the trained
        weights kept). With fewer than two classes painted the session waits.

        Returns
        -------
        bool
            Whether the session has enough to train on (two classes painted).

        Raises
        ------
        InputError
            ``labels`` do not have the image's spatial shape, or are not whole numbers >= 0.
        """
        return self._update(np.array(_check_labels(labels, self._spatial, self.name),
                                     copy=True))

    def _update(self, lab: np.ndarray) -> bool:
        """:meth:`update_labels` with checked labels that are the session's own."""
        planes = None
        if self.dims == 2 and lab.ndim == 3:
            # a 2D model samples only the planes that hold paint: the targets of those alone
            # (a stack's whole would cost seconds for each stroke)
            planes = np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1))
        painted = _painted_values(lab if planes is None else lab[planes])
        with self._lock:
            known = self._classes
        run = self._run
        current = run.model if run is not None else self._base
        named = (dict(zip(current.class_values, current.class_names))
                 if current is not None else {})
        if run is None and self._base is not None:
            values = classes_to_continue(self._base, painted)[0]
        else:
            values = tuple(sorted(painted | set(known or ())))
        names = tuple(str(named.get(v, self._names.get(v, d)))
                      for v, d in zip(values, default_class_names(values)))
        self._labels = lab
        if len(painted) < 2:
            with self._lock:
                self._pending = None
                self._trains = False
            self.waiting_for = "paint at least two classes"
            return False
        image, painted_lab = self._norm, lab
        if planes is not None:
            image, painted_lab = self._norm[:, planes], lab[planes]
        data = _assemble([(image, painted_lab)],
                         labels_kind="scribbles", class_values=values, class_names=names,
                         dims=self.dims, rng=np.random.default_rng(0),
                         validation_fraction=0.0, validation_block=64)
        with self._lock:
            self._pending = data
            self._classes = values
            self._trains = True
        self.waiting_for = ""
        self._wake.set()
        return True

    def offer_labels(self, labels: np.ndarray) -> None:
        """Hand over the newest labels without waiting (a GUI's way): the loop takes them in
        before its next step (:meth:`update_labels` there); labels offered earlier and not yet
        taken in are dropped. ``labels`` is copied when it is taken in, on the loop's thread:
        a GUI may offer the array it goes on painting into (a stroke painted meanwhile is
        taken in with the next offer), and its own thread copies nothing. A refusal is kept in
        :attr:`error` (empty when the newest labels were taken in)."""
        with self._lock:
            self._offered = labels
            running = self._running
        self._wake.set()
        if not running:
            self._take_offered()

    def _take_offered(self) -> None:
        with self._lock:
            labels, self._offered = self._offered, None
        if labels is None:
            return
        try:
            self.update_labels(labels)  # checked and copied here, on the loop's thread
            self.error = ""
        except InputError as exc:
            self.error = str(exc)

    # ------------------------------------------------------------------ the loop

    @property
    def running(self) -> bool:
        """Whether the loop is running (on any thread)."""
        return self._running

    @property
    def step(self) -> int:
        """Training steps done, over all runs of the loop."""
        run = self._run
        return 0 if run is None else run.step

    @property
    def loss(self) -> float:
        """Mean training loss of the last few steps (0 before the first)."""
        run = self._run
        return 0.0 if run is None else run.recent_loss()

    @property
    def training_data(self) -> TrainingData | None:
        """What the loop samples from now (None before two classes were painted)."""
        run = self._run
        return None if run is None else run.data

    def missed_text(self, pred: LivePrediction) -> str | None:
        """The warning naming each painted class that ``pred`` gives to fewer than half of
        its strokes in the region (:func:`~paintseg.training.messages.missed_text`), or None;
        always None before :data:`MISSED_AFTER_STEPS` training steps."""
        data = self.training_data
        if data is None or pred.step < MISSED_AFTER_STEPS:
            return None
        return missed_text(pred.agreement, dict(zip(data.class_values, data.class_names)),
                           subject="the live model", where=" in view")

    @property
    def seconds(self) -> float:
        """Seconds the loop has run, over all its runs."""
        return self._seconds

    def start(self) -> None:
        """Run the loop on a thread of its own (see :meth:`run`); :meth:`stop` ends it and
        :meth:`start` resumes it where it stopped."""
        with self._lock:
            if self._running or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self.run, name="paintseg-live",
                                            daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the loop to end after the current step, and wait for a thread started by
        :meth:`start` to end (at most ``timeout`` seconds). The weights are kept: :meth:`start`
        or :meth:`run` goes on from them."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def run(self, should_stop: Callable[[], bool] | None = None,
            on_step: Callable[[LiveSession], None] | None = None) -> None:
        """Train until :meth:`stop` is called or ``should_stop()`` is true, on the calling
        thread, doing what other threads ask for (predictions, snapshots) between steps.

        Parameters
        ----------
        should_stop : callable, optional
            Polled between steps.
        on_step : callable, optional
            Called with the session after each step (on this thread).

        Raises
        ------
        RuntimeError
            The loop already runs.
        """
        with self._lock:
            if self._running:
                raise RuntimeError("the live session's loop already runs")
            self._running = True
            self._loop_thread = threading.current_thread()
            self._stop.clear()
        t0 = time.perf_counter()
        done = self._seconds
        keep_freed_memory()
        try:
            with flush_denormals():
                spent = self.spent
                while not (self._stop.is_set() or (should_stop is not None and should_stop())):
                    t = time.perf_counter()
                    self._take_offered()
                    self._take_pending()
                    t1 = time.perf_counter()
                    self._serve()
                    t2 = time.perf_counter()
                    spent["labels"] += t1 - t
                    spent["requests"] += t2 - t1
                    if self._run is None or not self._trains:
                        self._wake.wait(0.05)
                        self._wake.clear()
                        continue
                    run = self._run
                    run.train_step(live_learning_rate(self._config.learning_rate,
                                                      run.step - self._run_steps))
                    spent["training"] += time.perf_counter() - t2
                    self._seconds = done + time.perf_counter() - t0
                    if on_step is not None:
                        on_step(self)
        finally:
            self._seconds = done + time.perf_counter() - t0
            with self._lock:
                self._running = False
                self._loop_thread = None
            self._serve()  # what was asked for while the loop ended

    def _serve(self) -> None:
        while True:
            try:
                fn, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)

    def _take_pending(self) -> None:
        with self._lock:
            data, self._pending = self._pending, None
        if data is None:
            return
        run = self._run
        if run is not None and tuple(data.class_values) == tuple(run.model.class_values):
            run.use_data(data)
            return
        if run is None and self._base is None:
            model = model_for_training(None, data, in_channels=self._channels,
                                       preset=self._preset, seed=self._config.seed)
        else:  # the base model, or the current one, for the classes painted now
            start = self._base if run is None else self._snapshot()
            model = model_for_training(start, data, in_channels=self._channels,
                                       preset=self._preset, seed=self._config.seed)
        steps = 0 if run is None else run.step
        self._run = TrainingRun(model, data, self._config, device=self._device)
        self._run.step = steps  # steps count on over the session
        self._run_steps = steps

    def submit(self, fn: Callable[[], T], *, inline: bool = True) -> Future:
        """Run ``fn()`` on the loop's thread between two steps while the loop runs (here and
        now otherwise, or not at all with ``inline=False``); its result or exception is the
        returned future's. For work that must not run beside the training (torch) or that a
        GUI must not wait for.

        With ``inline=False``, a call made while the loop does not run (before it starts,
        after it stopped) returns a cancelled future and runs nothing: a GUI thread that asks
        for a prediction as the loop ends must not compute it itself."""
        with self._lock:
            handed = self._running and threading.current_thread() is not self._loop_thread
            fut: Future = Future()
            if handed:
                self._requests.put((fn, fut))
        if handed:
            self._wake.set()
            return fut
        if not inline:
            fut.cancel()
            return fut
        fut.set_running_or_notify_cancel()
        try:
            with flush_denormals():
                self._take_pending()
                fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)
        return fut

    def _call(self, fn: Callable[[], T], timeout: float | None) -> T:
        return self.submit(fn).result(timeout)

    # ------------------------------------------------------------------ results

    def _snapshot(self) -> PaintsegModel:
        run = self._run
        if run is None:
            raise InputError(f"{self.name}: nothing trained yet: {self.waiting_for}")
        model = run.model
        out = PaintsegModel(network=run.current_network(), config=model.config,
                            normalization=model.normalization,
                            class_values=model.class_values, class_names=model.class_names,
                            provenance=copy.deepcopy(model.provenance))
        record = run.record(stopped=False, seconds=self._seconds)
        record["live"] = True
        out.provenance.setdefault("training", []).append(record)
        if run.step > 0:
            out.provenance.pop(_NEW_OUTPUT_LAYER, None)
        return out

    def model(self, *, timeout: float | None = None) -> PaintsegModel:
        """The model as it is now (the averaged weights), a copy on the CPU with this
        session in its training record: a normal checkpoint's content.

        Raises
        ------
        InputError
            Nothing trained yet (fewer than two classes painted so far).
        """
        return self._call(self._snapshot, timeout)

    def save(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> Path:
        """Save :meth:`model` as a checkpoint (atomically); returns its path."""
        return save_model(self.model(timeout=timeout), path)

    def predict(self, region: Sequence[slice] | None = None, *,
                background_class: int | None = 1,
                timeout: float | None = None) -> LivePrediction:
        """The current weights' labels and uncertainty on ``region`` (default: the whole
        image), predicted with the context around it that the network sees.

        Parameters
        ----------
        region : sequence of slice, optional
            Over the image's spatial axes (``(z, y, x)`` for a stack: with a 2D model, slices
            are predicted one by one).
        background_class : int or None
            Class written as 0 in the labels (None: every class as its value).
        timeout : float, optional
            Seconds to wait for the loop to get to it.

        Raises
        ------
        InputError
            Nothing trained yet, or ``region`` is not inside the image.
        """
        full = tuple(slice(0, n) for n in self._spatial)
        region = full if region is None else tuple(region)
        if len(region) != len(self._spatial):
            raise InputError(f"{self.name}: a region over {len(self._spatial)} axes is needed, "
                             f"got {len(region)}")
        norm_region = []
        for sl, n in zip(region, self._spatial):
            a, b, stride = sl.indices(n)
            if stride != 1 or b <= a:
                raise InputError(f"{self.name}: region {region} is not a non-empty box inside "
                                 f"the image of shape {self._spatial}")
            norm_region.append(slice(a, b))
        box = tuple(norm_region)
        return self._call(lambda: self._predict(box, background_class), timeout)

    def predict_async(self, region: Sequence[slice] | None = None, *,
                      background_class: int | None = 1, inline: bool = True) -> Future:
        """:meth:`predict` without waiting: a future of the :class:`LivePrediction` (or of
        the error). Where the loop does not run, the prediction is made here and now, or with
        ``inline=False`` not at all (the future is cancelled; see :meth:`submit`)."""
        return self.submit(lambda: self.predict(region, background_class=background_class),
                           inline=inline)

    def _predict(self, region: tuple[slice, ...], background_class: int | None
                 ) -> LivePrediction:
        from ..inference import model_halo, segment

        model = self._snapshot()  # this prediction's own copy, never handed out: it may
        if model.network.filters is not None:  # share the views' features with the session
            model.network.filters.memo = self._features
        halo = model_halo(model, "blend")
        spatial = len(self._spatial)
        # context around the region: on the axes the network convolves over
        context = tuple(
            slice(max(sl.start - halo, 0), min(sl.stop + halo, n))
            if ax >= spatial - model.config.dims else sl
            for ax, (sl, n) in enumerate(zip(region, self._spatial))
        )
        crop = self._image[context]
        axes = ("ZYX" if spatial == 3 else "YX") + "C"
        result = segment(crop, model, axes=axes, device=self._device,
                         background_class=None, return_probabilities=True,
                         intensity_range=self._range, snap=0)
        inner = tuple(slice(sl.start - c.start, sl.stop - c.start)
                      for sl, c in zip(region, context))
        probs = np.asarray(result.probabilities)[(slice(None), *inner)]
        top2 = np.sort(probs, axis=0)[-2:] if probs.shape[0] > 1 else np.stack(
            [np.zeros_like(probs[0]), probs[0]])
        uncertainty = (1.0 - (top2[1] - top2[0])).astype(np.float32)
        labels = np.asarray(result.labels)[inner]
        agreement = agreement_in(labels, self._labels[region], min_pixels=AGREEMENT_MIN_PIXELS)
        if background_class is not None:
            labels = np.where(labels == background_class, 0, labels).astype(labels.dtype)
        return LivePrediction(labels, uncertainty, region, self.step, agreement)
