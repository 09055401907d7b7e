"""Model presets: the networks a new U-Net gets, and what strokes change in them."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ModelConfig
from .targets import _check_labels_kind

PRESETS: dict[str, dict[str, Any]] = {
    # 2D, 2 CPU cores: a step on 16 patches of 64^2 takes ~0.2 s. No normalisation layers:
    # the per-pixel layer norm made the network blind to absolute brightness, and dim
    # out-of-focus haze came out as nuclei (cells3d strokes, held-out IoU 0.77 -> 0.83 with EMA)
    "fast": {"depth": 3, "base_features": 16, "features": (1.0, 2.0, 4.0, 8.0, 16.0),
             "norm": "none"},
    "accurate": {"depth": 4, "base_features": 32, "features": (1.0, 2.0, 4.0, 8.0, 16.0)},
}
# Brightness alone separates the painted classes when one channel's histogram of normalised
# intensity gives this share of their painted pixels their class (class-balanced): midway
# between nuclei, whose strokes score 0.94 (bars across their edges) to 0.999, and the other
# kinds of data of benchmarks/interactive.py, at most 0.89 (EM membranes).
BRIGHTNESS_SEPARATES = 0.92
# The fast preset's derivative gain for strokes where brightness separates the classes, and
# where it does not (shape and texture then tell them apart) for 3 averaged U-Nets (two
# classes); one U-Net there (3 or more classes, dense scribbles) has them at full strength:
# damped x0.3, one U-Net left EM membranes unlearnt among five classes, even on their own
# strokes (benchmarks/RESULTS.md, "Full-strength derivatives for one U-Net").
STROKES_DERIVATIVE_GAIN = (0.1, 0.3)

# What the 2D presets change for strokes (sparse labels; dense labels keep the preset as is).
# Derivative channels x0.1: the network then starts from brightness, as the forest does; 60 s
# of strokes, 5 seeds: cells3d stack IoU 0.881 (was 0.820), DSB2018 0.804 (was 0.816), forest
# 0.871 / 0.795. 3 U-Nets of base 8 trained side by side (a step costs about what one of base
# 16 costs) and averaged: one network's guess where nothing is painted varies much from one
# start to the next; 5 seeds, a slower CPU: cells3d 0.859 (one base-16 U-Net 0.830; its worst
# draw 0.793 against 0.673), DSB2018 0.791 (0.795); forest 0.871 / 0.795 (benchmarks/RESULTS.md).
# Filter scales 1..8 (no sigma 16), paired with 1..16 in one process, 60 s: cells3d seeds 0-4
# 0.900 / 0.886, seeds 5-9 0.842 / 0.799, DSB2018 seeds 0-9 0.812 / 0.806; forest 0.871 /
# 0.864 / 0.791 (benchmarks/RESULTS.md). It also runs ~8% more steps a minute, and the exact
# tiling halo drops from 104 to 80 pixels.
# Leaky ReLUs: with ReLUs, one of the 3 small U-Nets often went silent for good (its last
# layer's 8 channels negative everywhere; it then predicts one constant), which capped the
# average's confidence at about 0.86, so that the snap re-decided every border pixel and a
# third of the work was lost (cells3d draw 1: one member's logits had std 0.16, the others'
# 11 and 13; benchmarks/RESULTS-archive.md, "A silent member").
STROKES_2D: dict[str, dict[str, Any]] = {
    "fast": {"derivative_gain": STROKES_DERIVATIVE_GAIN[0], "base_features": 8, "members": 3,
             "features": (1.0, 2.0, 4.0, 8.0), "activation": "leaky_relu"},
}
# From this many painted classes on, the 2D fast preset for strokes trains one U-Net of base 8
# instead of 3 averaged: the classes share one budget of steps, and one U-Net runs about 2.3x
# the steps of three. Paired, draws 1-2 of the suite: 3 to 5 classes gained on all 6 pairs
# (five EM classes +0.10/+0.13, three +0.05/+0.03, phase-contrast boundaries +0.01/+0.02),
# two classes lost on 6 of 8 (mean -0.012; cells3d -0.03/-0.01), where the average's
# steadiness is worth more than the steps (benchmarks/RESULTS.md, "One U-Net for many classes").
STROKES_ONE_MEMBER_FROM = 3
# One U-Net (these classes, or every pixel of its planes painted: prepare.model_for_training)
# standardises its 3x3 convolutions' weights (``norm="weight"``): without normalisation
# layers the small U-Nets' logits grow into the thousands on some data, and a step's gradient
# with them. Paired, 60 s, 10 draws of strokes: 3-class EM 0.478 -> 0.503 (ahead on 8),
# five EM classes 0.286 -> 0.302 (worst draw 0.191 -> 0.258), phase-contrast boundaries
# 0.281 -> 0.281; dense labels, 2 draws: 3-class EM 0.563 -> 0.679, membranes 0.671 -> 0.709,
# cells 0.717 -> 0.720 (benchmarks/RESULTS.md, "Standardised weights for one U-Net"). Three
# averaged U-Nets keep plain convolutions: on phase-contrast cells they gained on 2 draws of
# 4 and lost on 2.
STROKES_ONE_MEMBER_NORM = "weight"
# 3D: the filter bank pads a patch by 3 sigma on every side (sigma 16: a 32^3 patch became
# 128^3), so filter scales stop at 4; base 8. A step on 4 patches of 32^3 takes ~0.3 s on
# 2 CPU cores (was 4.4 s with the 2D preset on 16 patches).
PRESETS_3D: dict[str, dict[str, Any]] = {
    "fast": {"depth": 3, "base_features": 8, "features": (1.0, 2.0, 4.0), "norm": "none"},
    "accurate": {"depth": 3, "base_features": 16, "features": (1.0, 2.0, 4.0, 8.0)},
}


def preset_config(preset: str, *, dims: int, in_channels: int, classes: int,
                  labels_kind: str = "scribbles") -> ModelConfig:
    """Architecture of a new model: ``"fast"``, ``"accurate"`` or ``"auto"`` (= fast).

    For strokes, the 2D fast preset damps the filter bank's derivative channels (x0.1),
    averages 3 U-Nets of base 8 with leaky ReLUs (one U-Net of base 8 with standardised
    convolution weights from :data:`STROKES_ONE_MEMBER_FROM` classes on:
    :data:`STROKES_ONE_MEMBER_NORM`) and stops its filter scales at sigma 8
    (:data:`STROKES_2D`).
    ``labels_kind="instances"`` (dense labels) keeps one U-Net of base 16 with the derivative
    channels at full strength and scales up to sigma 16. The 3D fast preset keeps its
    derivative channels at full strength too.

    ``auto`` is the fast preset on every device: the accurate one gained little where it won
    and lost much elsewhere (docs/training.md, "Why the training defaults").
    """
    if preset == "auto":
        preset = "fast"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use fast, accurate or auto")
    _check_labels_kind(labels_kind)
    arch = dict((PRESETS_3D if dims == 3 else PRESETS)[preset])
    strokes = _strokes_2d(preset, dims=dims, labels_kind=labels_kind)
    arch.update(strokes)
    cfg = ModelConfig(dims=dims, in_channels=in_channels, classes=classes, **arch)
    if "members" in strokes:
        cfg = _strokes_members(cfg, members_for_classes(strokes["members"], classes=classes))
    return cfg


def _strokes_members(config: ModelConfig, members: int) -> ModelConfig:
    """``config`` (a new 2D fast U-Net for strokes) with ``members`` averaged U-Nets; one
    U-Net standardises its convolutions' weights (:data:`STROKES_ONE_MEMBER_NORM`)."""
    norm = STROKES_ONE_MEMBER_NORM if members == 1 else config.norm
    return dataclasses.replace(config, members=members, norm=norm)


def members_for_classes(members: int, *, classes: int) -> int:
    """How many averaged U-Nets a network of ``members`` keeps for ``classes`` classes: one
    from :data:`STROKES_ONE_MEMBER_FROM` classes on (the classes share one budget of steps,
    and one U-Net takes more steps a second), ``members`` below. A new U-Net for strokes
    (:func:`preset_config`) and a model adapted to more classes (``adapt_model``) follow it."""
    return 1 if classes >= STROKES_ONE_MEMBER_FROM else members


def _strokes_2d(preset: str, *, dims: int, labels_kind: str) -> dict[str, Any]:
    """What :data:`STROKES_2D` changes in ``preset`` (``auto`` = fast) for these labels."""
    if labels_kind != "scribbles" or dims != 2:
        return {}
    return STROKES_2D.get("fast" if preset == "auto" else preset, {})
