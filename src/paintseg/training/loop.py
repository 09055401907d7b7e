"""The training loop: steps, EMA weights, validation on held-out painted pixels and the
rule that keeps earlier weights only when they were clearly better."""

from __future__ import annotations

import collections
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..config import SMOOTHNESS_RAMP_STEPS, TrainConfig
from ..devices import (
    flush_denormals,
    keep_freed_memory,
    resolve_device,
    training_autocast,
    type_name,
)
from ..errors import InputError
from ..model import PaintsegModel
from .augment import _augment, _shift_intensity
from .data import (
    TrainingData,
    _crop_pair,
    _in_plane,
    _sample_batch,
    _window,
    check_channels,
    painted_share,
)
from .events import EventKind, TrainEvent
from .losses import (
    _NEW_OUTPUT_LAYER,
    anchor_loss,
    continues_training,
    holds_to_predictions,
    intensity_shift,
    masked_loss,
    smoothness_loss,
)
from .targets import IGNORE

# An earlier validation must beat the latest weights by more than this mean IoU on held-out
# painted pixels, and have a lower loss, for the earlier weights to be kept. A few held-out
# strokes give a noisy score: with 0.02 and IoU alone, 30 s runs on DSB2018 kept weights from
# step 28 of 159 (IoU 0.64 on the unpainted half, against 0.76 for the final weights).
_BEST_TOLERANCE = 0.05

#: Steps over which a run's learning rate rises to its peak (a normal run and a live one).
WARMUP_STEPS = 10


def cosine_rate(peak: float, step: int, fraction: float, *, floor: float = 0.0) -> float:
    """The learning rate of step ``step``: ``peak`` reached over :data:`WARMUP_STEPS`, times
    a cosine from 1 at ``fraction`` 0 down to ``floor`` at ``fraction`` 1."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * fraction)))


def _val_batches(data: TrainingData, size: tuple[int, ...], rng: np.random.Generator,
                 max_patches: int = 16) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Fixed patches over the held-out pixels (targets outside the hold-out ignored), their
    centres drawn evenly over the classes with held-out pixels, so that a class painted little
    is scored too; and the number of distinct held-out pixels of each class inside them."""
    k = len(data.class_values)
    where = {c: [np.argwhere(it.val_mask & (it.targets == c)) for it in data.items]
             for c in range(k)}
    present = [c for c in range(k) if any(len(w) for w in where[c])]
    covered = [np.zeros(it.targets.shape, bool) for it in data.items]
    out = []
    for c in present:
        n = np.array([len(w) for w in where[c]], dtype=float)
        for _ in range(max(1, max_patches // len(present))):
            i = int(rng.choice(len(n), p=n / n.sum()))
            it = data.items[i]
            centre = where[c][i][rng.integers(int(n[i]))]
            plane, cc = _in_plane(data.dims, it.targets.ndim, centre)
            start = tuple(int(v - s // 2) for v, s in zip(cc, size))
            val_t = np.where(it.val_mask[plane], it.targets[plane], IGNORE)
            out.append(_crop_pair(it.image[(slice(None), *plane)], val_t, start, size))
            src, _ = _window(start, size, val_t.shape)
            covered[i][plane][src] |= val_t[src] >= 0
    held = np.zeros(k, dtype=np.int64)
    for it, cov in zip(data.items, covered):
        held += np.bincount(it.targets[cov], minlength=k)
    return out, held


def _validate(net: torch.nn.Module, batches: list[tuple[np.ndarray, np.ndarray]],
              device: torch.device, classes: int, class_values: tuple[int, ...],
              weights: torch.Tensor) -> dict[str, Any]:
    net.eval()
    inter = np.zeros(classes)
    union = np.zeros(classes)
    held = np.zeros(classes)  # held-out pixels per class
    losses = []
    with torch.inference_mode():
        for k in range(0, len(batches), 8):
            xb = torch.from_numpy(np.stack([b[0] for b in batches[k : k + 8]])).to(device)
            yb = torch.from_numpy(np.stack([b[1] for b in batches[k : k + 8]])).to(device)
            logits = net(xb)
            losses.append(float(masked_loss(logits, yb, class_weights=weights)))
            pred = logits.argmax(1)
            valid = yb >= 0
            for c in range(classes):
                p, g = (pred == c) & valid, (yb == c) & valid
                inter[c] += float((p & g).sum())
                union[c] += float((p | g).sum())
                held[c] += float(g.sum())
    net.train()
    # only the classes with held-out pixels: a class nobody painted (the starter model's
    # boundary) scored 0 wherever it was predicted, and its 0 in the mean made the starting
    # weights (1.0 without any) look clearly better than any later step that predicts it
    iou = {int(class_values[c]): inter[c] / union[c] for c in range(classes) if held[c] > 0}
    return {"loss": float(np.mean(losses)), "mean_iou": float(np.mean(list(iou.values()))),
            "iou": iou}


# The keep-best rule (:func:`_clearly_beaten`) decides only where every painted class has at
# least this many distinct held-out pixels in the validation patches; with fewer, one stroke
# more or less moves a class's IoU by more than the rule's tolerance, and the latest weights
# are kept.
MIN_HELD_OUT = 200


def _clearly_beaten(mean_iou: float, loss: float, history: Iterable[tuple[float, float]],
                    *, tolerance: float = _BEST_TOLERANCE) -> bool:
    """Whether an earlier validation was clearly better than the latest one.

    Parameters
    ----------
    mean_iou, loss : float
        The latest validation's mean IoU and loss on held-out painted pixels.
    history : iterable of (float, float)
        Earlier validations' ``(mean_iou, loss)``.
    tolerance : float
        How much higher the earlier mean IoU must be.

    Returns
    -------
    bool
        True when some earlier validation had a mean IoU more than ``tolerance`` higher *and*
        a lower loss; the latest weights are then not kept.
    """
    return any(m > mean_iou + tolerance and lo < loss for m, lo in history)

def iter_train(
    model: PaintsegModel,
    data: TrainingData,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    should_stop: Callable[[], bool] | None = None,
    step_every: float = 0.5,
) -> Iterator[TrainEvent]:
    """Train ``model`` in place on ``data``, yielding progress events. The first call in a
    process keeps the memory it frees (:func:`~paintseg.devices.keep_freed_memory`).

    Parameters
    ----------
    model : PaintsegModel
        Its classes must match ``data.class_values`` (see :func:`adapt_model`).
    data : TrainingData
        From :func:`prepare_data`.
    config : TrainConfig
        Budget, batch, learning rate, validation, seed.
    device : str or torch.device
        Where to train.
    should_stop : callable, optional
        Polled between steps; True ends the run early (best weights kept, DONE has
        ``stopped=True``).
    step_every : float
        Seconds between STEP events (every step is run; only the reporting is thinned).

    Yields
    ------
    TrainEvent
        STEP and VALIDATION events, then one DONE event.
    """
    keep_freed_memory()
    with flush_denormals():
        yield from _train(model, data, config, device=device, should_stop=should_stop,
                          step_every=step_every)


class TrainingRun:
    """One training run's state: the network, its optimiser and averaged (EMA) weights, the
    data it samples from, and the validation that decides which weights are kept.

    :func:`iter_train` drives it with a budget and a cosine schedule; a live session
    (:class:`~paintseg.training.live.LiveSession`) drives it step by step while the user
    paints, swapping its data in between (:meth:`use_data`). All of its torch work must run
    on one thread.

    Parameters
    ----------
    model : PaintsegModel
        Trained in place; its classes must match ``data.class_values``.
    data : TrainingData
        What to sample from (replaceable with :meth:`use_data`).
    config : TrainConfig
        Batch, patch size, learning rate, EMA, anchor, seed (its budget is the caller's).
    device : torch.device
        Where to train.

    Raises
    ------
    InputError
        The model's classes, dimensionality or channels do not fit ``data``.
    """

    def __init__(self, model: PaintsegModel, data: TrainingData, config: TrainConfig, *,
                 device: torch.device) -> None:
        cfg = self.config = config
        self.model = model
        self.device = dev = device
        self._check(data)
        self.data = data
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        psize = cfg.patch_size or (64 if data.dims == 2 else 32)
        self.batch = cfg.batch_size or (16 if data.dims == 2 else 4)
        align = model.config.align
        self.patch = max(align, int(math.ceil(psize / align) * align))
        self.size = (self.patch,) * data.dims
        self.net = net = model.network.to_device(dev)
        net.train()
        self.weights = self._class_weights(data)
        # the U-Nets' layers in bfloat16 where the CPU multiplies it in hardware
        self.autocast = training_autocast(dev, cfg.precision)
        self.opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate,
                                     weight_decay=cfg.weight_decay)
        self.val, held = _val_batches(data, self.size, np.random.default_rng(
            0 if cfg.seed is None else cfg.seed)) if data.has_validation else ([], np.zeros(0))
        # the keep-best rule decides only on enough held-out pixels of every painted class; a
        # model that was never trained (a new U-Net, or one with a new output layer) never
        # returns its starting weights
        self.decides = bool(self.val) and bool(np.all(held[data.counts > 0] >= MIN_HELD_OUT))
        self.fresh = not continues_training(model)
        self.best_state = copy.deepcopy({kk: v.detach().cpu()
                                         for kk, v in net.state_dict().items()})
        # the weights whose gradient is clipped as one (grad_clip): each member's
        self.member_weights = net.member_parameters()
        self.ema_net = copy.deepcopy(net) if cfg.ema > 0 else None
        # continuing a trained model: its own predictions on the unpainted pixels are a soft
        # target, so that new strokes change the result where they must and little elsewhere;
        # with every pixel painted there is nothing to hold, and its forward pass is skipped
        self.teacher = copy.deepcopy(net).eval() if holds_to_predictions(
            model, data, anchor=cfg.anchor) else None
        self.shift = intensity_shift(cfg, data, anchored=self.teacher is not None)
        self.eval_net = self.ema_net if self.ema_net is not None else net
        self.best_step = 0
        # step -> (mean IoU, loss) of its validation
        self.history: dict[int, tuple[float, float]] = {}
        self.step = 0
        # the last losses, left on the device and read only when reported: reading each
        # step's would make the host wait for the GPU every step
        self.recent: collections.deque[torch.Tensor] = collections.deque(maxlen=10)

    def _check(self, data: TrainingData) -> None:
        model = self.model
        if tuple(model.class_values) != tuple(data.class_values):
            raise InputError(
                f"the model's classes {list(model.class_values)} differ from the painted "
                f"classes {list(data.class_values)}; adapt the model first"
            )
        if model.config.dims != data.dims:
            raise InputError(f"a {model.config.dims}D model cannot train on {data.dims}D "
                             "patches")
        check_channels(model, data.items[0].image.shape[0])

    def _class_weights(self, data: TrainingData) -> torch.Tensor:
        freq = data.counts.astype(np.float64) + 1.0
        w = 1.0 / np.sqrt(freq)
        return torch.tensor(w / w.mean(), dtype=torch.float32, device=self.device)

    def use_data(self, data: TrainingData) -> None:
        """Sample from ``data`` from the next step on (same classes, dimensionality and
        channels; the optimiser, the averaged weights and the validation patches stay)."""
        self._check(data)
        self.data = data
        self.weights = self._class_weights(data)

    def recent_loss(self) -> float:
        """Mean training loss of the last few steps (0 before the first)."""
        return float(torch.stack(tuple(self.recent)).mean()) if self.recent else 0.0

    def train_step(self, lr: float) -> None:
        """One optimisation step at learning rate ``lr`` on a batch sampled from the data,
        then the averaged weights' update."""
        cfg, net, gen = self.config, self.net, self.gen
        for group in self.opt.param_groups:
            group["lr"] = lr
        xb_np, yb_np = _sample_batch(self.data, self.batch, self.size, self.rng)
        xb = torch.from_numpy(xb_np).to(self.device)
        yb = torch.from_numpy(yb_np).to(self.device)
        if cfg.augment != "none":
            xb, yb = _augment(xb, yb, gen, full=cfg.augment == "full")
        # the network sees the patch with a brightness offset; the anchor's starting model
        # the patch as it is, so the anchor keeps what the start predicts on the image
        shown = _shift_intensity(xb, gen, self.shift) if self.shift > 0 else xb
        # each member of the network fits the targets on its own (one member: the U-Net)
        members = net.member_logits(shown, autocast=self.autocast)
        painted_loss = sum(masked_loss(logits, yb, class_weights=self.weights,
                                       dice_weight=cfg.dice_weight)
                           for logits in members) / len(members)
        loss = painted_loss
        if cfg.smoothness > 0:  # on the patch as it is (a brightness offset cancels)
            weight = cfg.smoothness * min(1.0, self.step / SMOOTHNESS_RAMP_STEPS)
            loss = loss + weight * sum(smoothness_loss(logits, xb)
                                       for logits in members) / len(members)
        if self.teacher is not None:
            with torch.no_grad():
                start_probs = torch.softmax(self.teacher(xb), 1)
            loss = loss + cfg.anchor * sum(anchor_loss(logits, start_probs, yb)
                                           for logits in members) / len(members)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            # each member's gradient on its own, as if it trained alone: its loss above is
            # divided by the number of members, and so is the limit
            limit = cfg.grad_clip / len(self.member_weights)
            for weights in self.member_weights:
                torch.nn.utils.clip_grad_norm_(weights, limit)
        self.opt.step()
        if self.ema_net is not None:
            with torch.no_grad():
                decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
                for pe, pn in zip(self.ema_net.parameters(), net.parameters()):
                    pe.lerp_(pn, 1 - decay)
                # buffers (batch-norm statistics) are not averaged but follow the network;
                # only the training network runs in train mode and updates them
                for be, bn in zip(self.ema_net.buffers(), net.buffers()):
                    be.copy_(bn)
        self.step += 1
        self.recent.append(painted_loss.detach())  # reported: comparable across runs

    def validate(self) -> dict[str, Any]:
        """Score the averaged weights on the held-out patches and apply the keep-best rule
        (the latest weights are kept unless an earlier validation was clearly better)."""
        data = self.data
        result = _validate(self.eval_net, self.val, self.device, len(data.class_values),
                           data.class_values, self.weights)
        earlier = self.history.values() if self.decides else ()
        if not _clearly_beaten(result["mean_iou"], result["loss"], earlier):
            self.best_step = self.step
            if self.step > 0:  # step 0: best_state already holds the starting weights
                self.best_state = {kk: v.detach().cpu().clone()
                                   for kk, v in self.eval_net.state_dict().items()}
        if self.step > 0 or not self.fresh:  # a new U-Net's start is never a candidate
            self.history[self.step] = (result["mean_iou"], result["loss"])
        return result

    def current_network(self) -> torch.nn.Module:
        """A copy of the averaged weights' network as it is now, on the CPU, in eval mode."""
        return copy.deepcopy(self.eval_net).to_device("cpu").eval()

    def record(self, *, stopped: bool, seconds: float) -> dict[str, Any]:
        """This run's entry in the model's training record (``provenance["training"]``)."""
        return {
            "steps": self.step,
            "seconds": round(seconds, 1),
            "best_step": self.best_step if self.val else self.step,
            "stopped": stopped,
            "patch": self.patch,
            "batch": self.batch,
            "device": str(self.device),
            "images": list(self.data.names),
            "painted_pixels": [int(c) for c in self.data.counts],
            "painted_share": round(painted_share(self.data), 4),
            "anchor": self.config.anchor if self.teacher is not None else 0.0,
            "intensity_shift": self.shift,
            "smoothness": self.config.smoothness,
            "grad_clip": self.config.grad_clip,
            "precision": type_name(self.autocast),
            "validation_iou": (round(self.history[self.best_step][0], 4)
                               if self.best_step in self.history else None),
        }

    def finish(self, *, stopped: bool, seconds: float) -> None:
        """Put the kept weights into the model (on the CPU, eval mode) and add this run to
        its training record."""
        net, data, step = self.net, self.data, self.step
        net.train(False)
        if self.val:
            net.load_state_dict(self.best_state)
        elif self.ema_net is not None and step > 0:
            net.load_state_dict(self.ema_net.state_dict())
        elif stopped and step == 0:
            net.load_state_dict(self.best_state)
        net.eval()
        net.to_device("cpu")
        model = self.model
        model.provenance.setdefault("training", []).append(
            self.record(stopped=stopped, seconds=seconds))
        if step > 0:
            model.provenance.pop(_NEW_OUTPUT_LAYER, None)  # trained now
        if data.object_diameter is not None:
            model.provenance["object_diameter"] = round(data.object_diameter, 2)


def _train(
    model: PaintsegModel,
    data: TrainingData,
    config: TrainConfig | None,
    *,
    device: str | torch.device,
    should_stop: Callable[[], bool] | None,
    step_every: float,
) -> Iterator[TrainEvent]:
    """The body of :func:`iter_train`: a :class:`TrainingRun` driven over the budget, with a
    warm-up and a cosine decay of the learning rate."""
    cfg = config or TrainConfig()
    seconds, steps = cfg.budget
    run = TrainingRun(model, data, cfg, device=resolve_device(device))
    val = bool(run.val)
    t0 = time.perf_counter()
    last_report = last_val = t0
    stopped = False

    def fraction() -> float:
        parts = []
        if seconds is not None:
            parts.append((time.perf_counter() - t0) / seconds)
        if steps is not None:
            parts.append(run.step / steps)
        return min(1.0, max(parts))

    def event(kind: EventKind, result: dict[str, Any] | None = None) -> TrainEvent:
        f = fraction()
        el = time.perf_counter() - t0
        loss = float(run.recent[-1]) if kind is EventKind.STEP else run.recent_loss()
        return TrainEvent(kind, run.step, loss, el, el / f - el if f > 0 else None, f, result,
                          run.best_step if val or kind is not EventKind.STEP else None)

    if val:  # score the starting weights: a retrain must beat them
        yield event(EventKind.VALIDATION, run.validate())
    try:
        while fraction() < 1.0:
            if should_stop is not None and should_stop():
                stopped = True
                break
            lr = cosine_rate(cfg.learning_rate, run.step, fraction())
            run.train_step(max(lr, cfg.learning_rate * 0.02))
            now = time.perf_counter()
            if now - last_report >= step_every:
                last_report = now
                yield event(EventKind.STEP)
            if val and now - last_val >= cfg.validate_every:
                last_val = now
                yield event(EventKind.VALIDATION, run.validate())
    finally:
        run.net.train(False)
    step = run.step
    if val and step not in run.history and (
            not stopped or (run.fresh and run.best_step == 0 and step > 0)):
        # the last weights, unless just scored (or stopped, where a new U-Net has nothing
        # better kept)
        yield event(EventKind.VALIDATION, run.validate())
    run.finish(stopped=stopped, seconds=time.perf_counter() - t0)
    yield TrainEvent(EventKind.DONE, step, run.recent_loss(),
                     time.perf_counter() - t0, 0.0, 1.0, None,
                     run.best_step if val else step, stopped)
