"""What :func:`~paintseg.training.iter_train` yields: typed progress events."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class EventKind(enum.Enum):
    """What a :class:`TrainEvent` reports."""

    STEP = "step"
    VALIDATION = "validation"
    DONE = "done"


@dataclass
class TrainEvent:
    """Progress of :func:`iter_train`.

    Attributes
    ----------
    kind : EventKind
    step : int
        Optimisation steps done.
    loss : float
        Training loss of the last step on the painted pixels (mean over the last few for
        DONE); the anchor's term (``TrainConfig.anchor``) is not in it, so that a continued
        run's loss compares with the first run's.
    elapsed : float
        Seconds since the start.
    eta : float or None
        Seconds left (time budget or steps).
    fraction : float
        Share of the budget used, 0..1.
    validation : dict or None
        ``{"loss", "mean_iou", "iou": {class value: IoU}}`` on held-out painted pixels.
    best_step : int or None
        Step whose weights are kept (0: the starting weights).
    stopped : bool
        DONE only: the user stopped the run.
    """

    kind: EventKind
    step: int
    loss: float
    elapsed: float
    eta: float | None
    fraction: float
    validation: dict[str, Any] | None = None
    best_step: int | None = None
    stopped: bool = False
