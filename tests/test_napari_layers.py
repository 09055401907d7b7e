"""The widget's pure helpers: axes of layer data, the region a user asked for, merging, the
most uncertain box."""

from __future__ import annotations

import numpy as np
import pytest

from paintseg._napari._layers import (
    layer_axes,
    merge_region,
    most_uncertain_box,
    scope_region,
    training_pair,
)
from paintseg.errors import InputError


def test_layer_axes():
    assert layer_axes((5, 6), rgb=False) == "YX"
    assert layer_axes((5, 6, 3), rgb=True) == "YXC"
    assert layer_axes((4, 5, 6), rgb=False) == "ZYX"
    assert layer_axes((2, 4, 5, 6), rgb=False) == "TZYX"
    with pytest.raises(InputError, match="5 dimension"):
        layer_axes((1, 2, 3, 4, 5), rgb=False, name="big")


def test_scope_region():
    shape = (10, 100, 120)
    assert scope_region(shape, scope="whole image", model_dims=2) == tuple(
        slice(0, n) for n in shape)
    cur = (3.4, 50, 60)
    assert scope_region(shape, scope="current slice", model_dims=2, current=cur) == (
        slice(3, 4), slice(0, 100), slice(0, 120))
    # a 3D model needs the whole volume even for "current slice"
    assert scope_region(shape, scope="current slice", model_dims=3, current=cur) == tuple(
        slice(0, n) for n in shape)
    view = np.array([[0, -20.0, 30.2], [9, 40.0, 500.0]])
    assert scope_region(shape, scope="field of view", model_dims=2, current=cur, view=view) == (
        slice(3, 4), slice(0, 41), slice(30, 120))


def test_merge_region_keeps_existing_and_numbers_apart():
    existing = np.zeros((4, 6), np.uint8)
    existing[0, 0] = 7
    before = existing.copy()
    part = np.array([[1, 0], [0, 2]], np.uint8)
    out = merge_region(existing, part, (slice(2, 4), slice(2, 4)), shape=(4, 6), instances=True)
    np.testing.assert_array_equal(existing, before)  # not modified
    assert out[0, 0] == 7 and out[2, 2] == 8 and out[3, 3] == 9 and out[2, 3] == 0
    sem = merge_region(existing, part, (slice(2, 4), slice(2, 4)), shape=(4, 6), instances=False)
    assert sem[2, 2] == 1 and sem[3, 3] == 2
    # a part that needs a wider type than the existing labels
    big = np.full((2, 2), 300, np.uint16)
    wide = merge_region(existing, big, (slice(0, 2), slice(4, 6)), shape=(4, 6), instances=False)
    assert wide.dtype == np.uint16 and wide[0, 5] == 300 and wide[0, 0] == 7
    # no existing layer: zeros elsewhere
    fresh = merge_region(None, part, (slice(0, 2), slice(0, 2)), shape=(4, 6), instances=True)
    assert fresh.sum() == 3 and fresh.shape == (4, 6)


def test_training_pair_copies_and_checks_shapes():
    img = np.zeros((8, 9), np.uint16)
    lab = np.zeros((8, 9), np.uint8)
    x, y = training_pair(img, lab, rgb=False)
    assert x.shape == (8, 9, 1) and y is not lab
    x, y = training_pair(np.zeros((8, 9, 3)), lab, rgb=True)
    assert x.shape == (8, 9, 3)
    with pytest.raises(InputError, match=r"\(8, 9\).*\(8, 10\)"):
        training_pair(np.zeros((8, 10)), lab, rgb=False)


def test_most_uncertain_box_finds_the_unsure_region():
    u = np.zeros((200, 300), np.float32)
    u[150:190, 20:60] = 1.0
    assert most_uncertain_box(u, size=40) == (slice(150, 190), slice(20, 60))
    # near an edge the box stays inside the image; a stack plane keeps its leading axis
    u = np.zeros((1, 100, 100), np.float32)
    u[0, :10, 90:] = 1.0
    assert most_uncertain_box(u, size=20) == (slice(0, 1), slice(0, 20), slice(80, 100))
    # an image smaller than the box: the whole image
    assert most_uncertain_box(np.zeros((30, 20)), size=64) == (slice(0, 30), slice(0, 20))
    with pytest.raises(ValueError, match="2 or more axes"):
        most_uncertain_box(np.zeros(5))
