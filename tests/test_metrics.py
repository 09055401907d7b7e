"""Metrics and postprocessing on the real DSB2018 instance mask."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from paintseg.metrics import instance_scores, semantic_scores
from paintseg.postprocess import filter_instances, instances_from_probabilities, semantic_labels


@pytest.fixture(scope="module")
def gt(request):
    from pathlib import Path

    samples = Path(__file__).parents[1] / "src" / "paintseg" / "sample_data"
    return tifffile.imread(samples / "nuclei2d_instances.tif")


def test_instance_scores_identity_and_degradations(gt):
    s = instance_scores(gt, gt)
    assert s["n_true"] == 125 and s["ap"] == [1.0] * 9 and s["f1"][0] == 1.0
    # drop 25 objects: recall 100/125 at every threshold, precision 1
    dropped = gt.copy()
    for v in np.unique(gt)[1:26]:
        dropped[gt == v] = 0
    d = instance_scores(dropped, gt)
    assert d["tp"][0] == 100 and d["fn"][0] == 25 and d["fp"][0] == 0
    assert d["ap"][0] == pytest.approx(100 / 125)
    assert d["f1"][0] == pytest.approx(2 * 100 / (2 * 100 + 25))
    # relabelling does not matter; merging two touching objects costs a match
    perm = np.random.default_rng(0).permutation(int(gt.max()) + 1)
    perm[0] = 0
    assert instance_scores(perm[gt], gt)["ap"][0] == 1.0


def test_instance_scores_thresholds():
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 1  # IoU 12/16 = 0.75
    s = instance_scores(pred, gt, thresholds=(0.5, 0.75, 0.8))
    assert s["tp"] == [1, 1, 0]
    assert instance_scores(np.zeros_like(gt), gt)["ap"] == [0.0] * 9


def test_semantic_scores():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 2, 2, 2]])
    s = semantic_scores(pred, gt)
    assert s["iou"] == {1: 0.5, 2: 2 / 3}
    assert s["dice"][1] == pytest.approx(2 / 3)
    assert s["accuracy"] == 0.75
    m = semantic_scores(pred, gt, mask=np.array([[True, False, True, True]]))
    assert m["iou"] == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="differs"):
        semantic_scores(pred, gt[:, :3])


def test_watershed_recovers_instances_from_ideal_probabilities(gt):
    from skimage.segmentation import find_boundaries

    bound = find_boundaries(gt, mode="inner") & (gt > 0)
    probs = np.zeros((3, *gt.shape), np.float32)
    probs[0] = gt == 0
    probs[1] = (gt > 0) & ~bound
    probs[2] = bound
    inst = instances_from_probabilities(probs, min_size=4)
    s = instance_scores(inst, gt)
    assert s["f1"][0] > 0.95  # touching nuclei are separated by the boundary class
    sem = semantic_labels(probs, (1, 2, 3))
    assert set(np.unique(sem)) == {0, 2, 3}


def test_filter_instances():
    a = np.zeros((20, 20), int)
    a[2:10, 2:10] = 5
    a[5, 5] = 0  # a 1-pixel hole
    a[15:17, 15:17] = 9  # 4 pixels
    before = a.copy()
    out = filter_instances(a, min_size=5, fill_holes=2)
    np.testing.assert_array_equal(a, before)
    assert set(np.unique(out)) == {0, 1} and (out == 1).sum() == 64
