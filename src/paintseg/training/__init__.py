"""Fine-tune a U-Net on what the user painted.

Painted labels: 0 = not annotated (never in the loss), 1..K = class value. A dense instance
segmentation becomes background / object / boundary targets (the U-Net paper's way of
separating touching objects), from which :mod:`paintseg.postprocess` recovers instances.

:func:`iter_train` is a generator: it yields :class:`TrainEvent` objects (step, loss,
validation, elapsed, ETA) and honours a stop request between steps, so the same loop serves the
CLI, the napari thread worker and the tests. Training validates on held-out painted pixels,
the starting weights included, and ends (or stops) with the latest weights unless earlier ones
were clearly better there (see :mod:`.loop`), so a retrain cannot silently return something
worse than what it started from. Continuing a trained model also holds it to its own
predictions on the unpainted pixels (:func:`anchor_loss`), so that correction strokes change the
result where they are painted and little elsewhere.

The package's modules follow the steps of a run:

- :mod:`.presets`: the networks a new U-Net gets (``fast``, ``accurate``) and what strokes
  change in them;
- :mod:`.targets`: training targets from strokes or from instance labels;
- :mod:`.data`: normalised images, held-out blocks, patch sampling;
- :mod:`.augment`: flips, rotations, intensity, noise, deformation;
- :mod:`.losses`: the loss on painted pixels and the anchor of a continued model;
- :mod:`.loop`: :class:`TrainingRun` (one run's steps, averaged weights and validation),
  :func:`iter_train` and the rule for the weights kept;
- :mod:`.live`: :class:`LiveSession`, training while the user paints;
- :mod:`.events`: :class:`TrainEvent`, what the loop yields;
- :mod:`.messages`: what the CLI and napari tell the user about a run;
- :mod:`.prepare`: from painted images to a model ready to train, and :func:`train`.

Everything a caller needs is imported here; the modules' other names are internal.
"""

from __future__ import annotations

from .data import TrainingData, check_channels, median_diameter, painted_share, prepare_data
from .events import EventKind, TrainEvent
from .live import LivePrediction, LiveSession
from .loop import MIN_HELD_OUT, TrainingRun, iter_train
from .losses import (
    anchor_loss,
    continues_training,
    holds_to_predictions,
    intensity_shift,
    masked_loss,
    smoothness_loss,
)
from .messages import (
    COLLAPSED,
    DISAGREEMENT,
    agreement_in,
    collapse_text,
    continue_by_default,
    disagreement_text,
    kept_weights_text,
    missed_text,
    painted_agreement,
)
from .prepare import (
    adapt_model,
    brightness_separability,
    classes_to_continue,
    model_for_training,
    prepare_training,
    train,
)
from .presets import (
    BRIGHTNESS_SEPARATES,
    PRESETS,
    PRESETS_3D,
    STROKES_2D,
    STROKES_DERIVATIVE_GAIN,
    STROKES_ONE_MEMBER_FROM,
    STROKES_ONE_MEMBER_NORM,
    preset_config,
)
from .targets import IGNORE, INSTANCE_CLASSES, INSTANCE_NAMES, instance_targets, scribble_targets

__all__ = [
    "EventKind",
    "TrainEvent",
    "TrainingData",
    "scribble_targets",
    "instance_targets",
    "prepare_data",
    "masked_loss",
    "anchor_loss",
    "continues_training",
    "intensity_shift",
    "smoothness_loss",
    "iter_train",
    "TrainingRun",
    "LiveSession",
    "LivePrediction",
    "train",
    "PRESETS",
    "PRESETS_3D",
    "STROKES_2D",
    "STROKES_DERIVATIVE_GAIN",
    "STROKES_ONE_MEMBER_FROM",
    "STROKES_ONE_MEMBER_NORM",
    "BRIGHTNESS_SEPARATES",
    "preset_config",
    "classes_to_continue",
    "model_for_training",
    "adapt_model",
    "brightness_separability",
    "prepare_training",
    "median_diameter",
    "painted_share",
    "kept_weights_text",
    "continue_by_default",
    "check_channels",
    "disagreement_text",
    "holds_to_predictions",
    "painted_agreement",
    "collapse_text",
    "agreement_in",
    "missed_text",
    "DISAGREEMENT",
    "COLLAPSED",
    "MIN_HELD_OUT",
    "IGNORE",
    "INSTANCE_CLASSES",
    "INSTANCE_NAMES",
]
