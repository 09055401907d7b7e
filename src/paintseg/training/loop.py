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

from ..config import TrainConfig
from ..devices import flush_denormals, resolve_device
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
)
from .targets import IGNORE

# An earlier validation must beat the latest weights by more than this mean IoU on held-out
# painted pixels, and have a lower loss, for the earlier weights to be kept. A few held-out
# strokes give a noisy score: with 0.02 and IoU alone, 30 s runs on DSB2018 kept weights from
# step 28 of 159 (IoU 0.64 on the unpainted half, against 0.76 for the final weights).
_BEST_TOLERANCE = 0.05



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
    """Train ``model`` in place on ``data``, yielding progress events.

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
    with flush_denormals():
        yield from _train(model, data, config, device=device, should_stop=should_stop,
                          step_every=step_every)


def _train(
    model: PaintsegModel,
    data: TrainingData,
    config: TrainConfig | None,
    *,
    device: str | torch.device,
    should_stop: Callable[[], bool] | None,
    step_every: float,
) -> Iterator[TrainEvent]:
    """The body of :func:`iter_train`."""
    cfg = config or TrainConfig()
    seconds, steps = cfg.budget
    dev = resolve_device(device)
    if tuple(model.class_values) != tuple(data.class_values):
        raise InputError(
            f"the model's classes {list(model.class_values)} differ from the painted classes "
            f"{list(data.class_values)}; adapt the model first"
        )
    if model.config.dims != data.dims:
        raise InputError(f"a {model.config.dims}D model cannot train on {data.dims}D patches")
    check_channels(model, data.items[0].image.shape[0])
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    psize = cfg.patch_size or (64 if data.dims == 2 else 32)
    batch = cfg.batch_size or (16 if data.dims == 2 else 4)
    align = model.config.align
    psize = max(align, int(math.ceil(psize / align) * align))
    size = (psize,) * data.dims
    net = model.network.to_device(dev)
    net.train()
    k = len(data.class_values)
    freq = data.counts.astype(np.float64) + 1.0
    weights_np = (1.0 / np.sqrt(freq))
    weights_np = weights_np / weights_np.mean()
    weights = torch.tensor(weights_np, dtype=torch.float32, device=dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    val, held = _val_batches(data, size, np.random.default_rng(
        0 if cfg.seed is None else cfg.seed)) if data.has_validation else ([], np.zeros(0))
    # the keep-best rule decides only on enough held-out pixels of every painted class; a
    # model that was never trained (a new U-Net, or one with a new output layer) never
    # returns its starting weights
    decides = bool(val) and bool(np.all(held[data.counts > 0] >= MIN_HELD_OUT))
    fresh = not continues_training(model)
    best_state = copy.deepcopy({kk: v.detach().cpu() for kk, v in net.state_dict().items()})
    ema_net = copy.deepcopy(net) if cfg.ema > 0 else None
    # continuing a trained model: its own predictions on the unpainted pixels are a soft
    # target, so that new strokes change the result where they must and little elsewhere;
    # with every pixel painted there is nothing to hold, and its forward pass is skipped
    teacher = copy.deepcopy(net).eval() if holds_to_predictions(model, data, anchor=cfg.anchor) \
        else None
    shift = intensity_shift(cfg, data, anchored=teacher is not None)
    eval_net = ema_net if ema_net is not None else net
    best_step = 0
    history: dict[int, tuple[float, float]] = {}  # step -> (mean IoU, loss) of its validation
    t0 = time.perf_counter()
    last_report = last_val = t0
    step = 0
    # the last losses, left on the device and read only when reported: reading each step's
    # would make the host wait for the GPU every step
    recent: collections.deque[torch.Tensor] = collections.deque(maxlen=10)
    stopped = False
    warmup = 10

    def recent_loss() -> float:
        return float(torch.stack(tuple(recent)).mean()) if recent else 0.0

    def fraction() -> float:
        parts = []
        if seconds is not None:
            parts.append((time.perf_counter() - t0) / seconds)
        if steps is not None:
            parts.append(step / steps)
        return min(1.0, max(parts))

    def eta() -> float | None:
        f = fraction()
        el = time.perf_counter() - t0
        return el / f - el if f > 0 else None

    def validate_now() -> TrainEvent:
        nonlocal best_step, best_state
        result = _validate(eval_net, val, dev, k, data.class_values, weights)
        earlier = history.values() if decides else ()
        if not _clearly_beaten(result["mean_iou"], result["loss"], earlier):
            best_step = step
            if step > 0:  # step 0: best_state already holds the starting weights
                best_state = {kk: v.detach().cpu().clone()
                              for kk, v in eval_net.state_dict().items()}
        if step > 0 or not fresh:  # a new U-Net's starting weights are never a candidate
            history[step] = (result["mean_iou"], result["loss"])
        return TrainEvent(EventKind.VALIDATION, step, recent_loss(),
                          time.perf_counter() - t0, eta(), fraction(), result, best_step)

    if val:  # score the starting weights: a retrain must beat them
        yield validate_now()
    try:
        while fraction() < 1.0:
            if should_stop is not None and should_stop():
                stopped = True
                break
            f = fraction()
            lr = (cfg.learning_rate * min(1.0, (step + 1) / warmup)
                  * 0.5 * (1 + math.cos(math.pi * f)))
            for group in opt.param_groups:
                group["lr"] = max(lr, cfg.learning_rate * 0.02)
            xb_np, yb_np = _sample_batch(data, batch, size, rng)
            xb = torch.from_numpy(xb_np).to(dev)
            yb = torch.from_numpy(yb_np).to(dev)
            if cfg.augment != "none":
                xb, yb = _augment(xb, yb, gen, full=cfg.augment == "full")
            # the network sees the patch with a brightness offset; the anchor's starting model
            # the patch as it is, so the anchor keeps what the start predicts on the image
            shown = _shift_intensity(xb, gen, shift) if shift > 0 else xb
            # each member of the network fits the targets on its own (one member: the U-Net)
            members = net.member_logits(shown)
            painted_loss = sum(masked_loss(logits, yb, class_weights=weights,
                                           dice_weight=cfg.dice_weight)
                               for logits in members) / len(members)
            loss = painted_loss
            if teacher is not None:
                with torch.no_grad():
                    start_probs = torch.softmax(teacher(xb), 1)
                loss = loss + cfg.anchor * sum(anchor_loss(logits, start_probs, yb)
                                               for logits in members) / len(members)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema_net is not None:
                with torch.no_grad():
                    decay = min(cfg.ema, (1 + step) / (10 + step))
                    for pe, pn in zip(ema_net.parameters(), net.parameters()):
                        pe.lerp_(pn, 1 - decay)
                    # buffers (batch-norm statistics) are not averaged but follow the network;
                    # only the training network runs in train mode and updates them
                    for be, bn in zip(ema_net.buffers(), net.buffers()):
                        be.copy_(bn)
            step += 1
            recent.append(painted_loss.detach())  # reported: comparable across runs
            now = time.perf_counter()
            if now - last_report >= step_every:
                last_report = now
                yield TrainEvent(EventKind.STEP, step, float(recent[-1]), now - t0, eta(),
                                 fraction(), best_step=best_step if val else None)
            if val and now - last_val >= cfg.validate_every:
                last_val = now
                yield validate_now()
    finally:
        net.train(False)
    if val and step not in history and (not stopped or (fresh and best_step == 0 and step > 0)):
        yield validate_now()  # the last weights, unless just scored (or stopped, where a new
        # U-Net has nothing better kept)
    if val:
        net.load_state_dict(best_state)
    elif ema_net is not None and step > 0:
        net.load_state_dict(ema_net.state_dict())
    elif stopped and step == 0:
        net.load_state_dict(best_state)
    net.eval()
    net.to_device("cpu")
    model.provenance.setdefault("training", []).append({
        "steps": step,
        "seconds": round(time.perf_counter() - t0, 1),
        "best_step": best_step if val else step,
        "stopped": stopped,
        "patch": psize,
        "batch": batch,
        "device": str(dev),
        "painted_pixels": [int(c) for c in data.counts],
        "painted_share": round(painted_share(data), 4),
        "anchor": cfg.anchor if teacher is not None else 0.0,
        "intensity_shift": shift,
        "validation_iou": round(history[best_step][0], 4) if best_step in history else None,
    })
    if step > 0:
        model.provenance.pop(_NEW_OUTPUT_LAYER, None)  # trained now
    if data.object_diameter is not None:
        model.provenance["object_diameter"] = round(data.object_diameter, 2)
    yield TrainEvent(EventKind.DONE, step, recent_loss(),
                     time.perf_counter() - t0, 0.0, 1.0, None,
                     best_step if val else step, stopped)
