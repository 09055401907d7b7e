"""Losses on the painted pixels, the anchor to a continued model's own predictions, and
the rules that decide when they apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import STROKES_INTENSITY_SHIFT, TrainConfig
from ..model import PaintsegModel
from .data import TrainingData
from .targets import IGNORE

# provenance key set while a model's output layer is new (untrained)
_NEW_OUTPUT_LAYER = "new_output_layer"



def masked_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Class-weighted cross-entropy plus soft Dice, both over annotated pixels only.

    Pixels with target -1 contribute nothing to the loss nor to its gradient.
    """
    # no test of the values on the host (``if valid.any()``, boolean indexing): on a GPU each
    # would wait for the device; with nothing annotated every sum is 0 and the loss is 0
    valid = targets >= 0
    t = targets.clamp_min(0)
    ce = F.cross_entropy(logits, t, weight=class_weights, reduction="none") * valid
    total = (class_weights[t] * valid).sum() if class_weights is not None else valid.sum()
    ce = ce.sum() / total.float().clamp_min(1e-8)
    if dice_weight <= 0:
        return ce
    probs = torch.softmax(logits, 1)
    k = logits.shape[1]
    onehot = F.one_hot(t, k).movedim(-1, 1).float()
    m = valid.unsqueeze(1).float()
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot * m).sum(dims)
    denom = ((probs + onehot) * m).sum(dims)
    present = ((onehot * m).sum(dims) > 0).float()  # classes annotated in this batch
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    dice_loss = ((1 - dice) * present).sum() / present.sum().clamp_min(1)
    return ce + dice_weight * dice_loss


def smoothness_loss(logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Contrast-weighted Potts term between neighbouring pixels, over every pixel of a patch.

    For each pair of neighbours ``i, j`` along each axis, ``w_ij * (1 - p_i . p_j)`` where
    ``p`` are the class probabilities and ``w_ij = exp(-d_ij^2 / (2 beta))``, ``d_ij`` the
    difference of the pair's (normalised) intensities over the channels and ``beta`` the mean
    ``d^2`` of the patch (as in GrabCut). A label change costs much in flat regions and little
    across an edge, so unpainted borders settle on edges (a regularised loss for scribbles,
    Tang et al., ECCV 2018).

    Parameters
    ----------
    logits : Tensor
        The network's output, (N, K, *spatial).
    image : Tensor
        The network's input, (N, C, *spatial).

    Returns
    -------
    Tensor
        The mean of the term over the pairs, averaged over the axes; in [0, 1].
    """
    probs = torch.softmax(logits, 1)
    spatial = tuple(range(1, logits.ndim - 1))  # of the channel-summed differences
    total = logits.new_zeros(())
    for d in range(2, logits.ndim):
        n = logits.shape[d]
        same = (probs.narrow(d, 0, n - 1) * probs.narrow(d, 1, n - 1)).sum(1)
        diff2 = (image.narrow(d, 0, n - 1) - image.narrow(d, 1, n - 1)).square().sum(1)
        beta = diff2.mean(dim=spatial, keepdim=True).clamp_min(1e-8)
        total = total + (torch.exp(-diff2 / (2 * beta)) * (1 - same)).mean()
    return total / (logits.ndim - 2)


def anchor_loss(logits: torch.Tensor, start_probs: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the starting weights' probabilities, over unpainted pixels only.

    Parameters
    ----------
    logits : Tensor
        The network's output, (N, K, *spatial).
    start_probs : Tensor
        The starting weights' class probabilities on the same input, (N, K, *spatial).
    targets : Tensor
        Training targets, (N, *spatial): a class index where painted, -2 where painted but
        held out for validation, -1 where not painted. Only -1 pixels count.

    Returns
    -------
    Tensor
        The mean over the unpainted pixels (0 if there are none). Painted pixels, held-out
        ones included, contribute nothing to it nor to its gradient.
    """
    free = (targets == IGNORE).float()
    ce = -(start_probs * torch.log_softmax(logits, 1)).sum(1)
    return (ce * free).sum() / free.sum().clamp_min(1)


def _has_unpainted(data: TrainingData) -> bool:
    """Whether any pixel of the training images is unpainted (dense instance labels have none:
    there, the anchor would only see the reflected margins of patches at the image border)."""
    return any(bool((it.targets == IGNORE).any()) for it in data.items)


def intensity_shift(config: TrainConfig, data: TrainingData, *, anchored: bool = False) -> float:
    """The brightness offset's half-width a run uses.

    Parameters
    ----------
    config : TrainConfig
        The run's settings; a set ``config.intensity_shift`` is used as it is.
    data : TrainingData
        Its training data.
    anchored : bool
        Whether the run holds the unpainted pixels to the starting model's predictions
        (:func:`holds_to_predictions`).

    Returns
    -------
    float
        Where ``config.intensity_shift`` is None:
        :data:`~paintseg.config.STROKES_INTENSITY_SHIFT` for strokes (some pixel unpainted) on
        a run that is not anchored, and 0 for dense labels and for anchored runs (correction
        rounds: there the starting model has decided the unpainted gap, and the offset lowered
        the rounds' gains). A live session sets ``config.intensity_shift`` itself
        (:data:`~paintseg.training.live.LIVE_INTENSITY_SHIFT`), so it never reaches this rule.
    """
    if config.intensity_shift is not None:
        return float(config.intensity_shift)
    return STROKES_INTENSITY_SHIFT if not anchored and _has_unpainted(data) else 0.0


def continues_training(model: PaintsegModel) -> bool:
    """Whether ``model`` was trained before with its current output layer (its provenance
    lists a training run and :func:`adapt_model` has not given it a new output layer since):
    then training it again anchors it to its own predictions (``TrainConfig.anchor``)."""
    return bool(model.provenance.get("training")) and not model.provenance.get(
        _NEW_OUTPUT_LAYER)


def holds_to_predictions(model: PaintsegModel, data: TrainingData, *,
                         anchor: float) -> bool:
    """Whether training ``model`` on ``data`` holds the unpainted pixels to its predictions.

    Parameters
    ----------
    model : PaintsegModel
        The model about to be trained.
    data : TrainingData
        Its training data.
    anchor : float
        ``TrainConfig.anchor``, the weight of :func:`anchor_loss`.

    Returns
    -------
    bool
        True when ``anchor`` is positive, the model continues a training run
        (:func:`continues_training`) and some training pixel is unpainted.
    """
    return anchor > 0 and continues_training(model) and _has_unpainted(data)
