"""Class borders snapped to image edges: postprocess.snap_to_edges and its use by segment()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from paintseg.config import NormConfig, SegmentSettings, TileConfig
from paintseg.errors import ConfigError
from paintseg.inference import segment, segment_labels
from paintseg.normalize import percentile_range
from paintseg.postprocess import snap_planes, snap_to_edges

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "paintseg" / "sample_data"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _shrunk_probabilities(truth: np.ndarray, *, by: int, p_band: float) -> np.ndarray:
    """(2, Y, X) probabilities whose arg-max is ``truth`` eroded by ``by`` pixels, unsure
    (``p_band``) within 6 pixels of that border, confident elsewhere: a stroke model's
    result with its borders inside the objects."""
    obj = ndi.binary_erosion(truth, iterations=by)
    near = ndi.binary_dilation(obj, iterations=6) & ~ndi.binary_erosion(obj, iterations=6)
    p = np.where(obj, 0.99, 0.01)
    p[near] = np.where(obj[near], p_band, 1 - p_band)
    return np.stack([1 - p, p]).astype(np.float32)


@pytest.fixture(scope="module")
def dsb_crop():
    """The real DSB2018 nuclei image (a crop of its bottom half), normalised, and its nuclei
    mask."""
    img = tifffile.imread(SAMPLES / "nuclei2d.tif")[256:512, :256].astype(np.float32)
    truth = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")[256:512, :256] > 0
    lo, hi = percentile_range(img[np.newaxis], NormConfig())
    return ((img - lo[0]) / (hi[0] - lo[0]))[np.newaxis], truth


def test_snap_moves_shrunk_borders_to_real_nuclei_edges(dsb_crop):
    image, truth = dsb_crop
    probs = _shrunk_probabilities(truth, by=2, p_band=0.7)
    argmax = probs.argmax(0) == 1
    snapped = snap_to_edges(probs, image, snap=8) == 1
    assert _iou(argmax, truth) < 0.75
    assert _iou(snapped, truth) > _iou(argmax, truth) + 0.05
    # confident pixels never move, and no pixel moves farther than `snap` from the border
    confident = probs.max(0) >= 0.98
    np.testing.assert_array_equal(snapped[confident], argmax[confident])
    moved = snapped != argmax
    to_border = np.where(argmax, ndi.distance_transform_edt(argmax),
                         ndi.distance_transform_edt(~argmax))
    assert moved.any() and to_border[moved].max() <= 8


def test_snap_zero_and_single_class_are_the_argmax(dsb_crop):
    image, truth = dsb_crop
    probs = _shrunk_probabilities(truth, by=2, p_band=0.7)
    np.testing.assert_array_equal(snap_to_edges(probs, image, snap=0), probs.argmax(0))
    one = np.stack([np.full(truth.shape, 0.6), np.full(truth.shape, 0.4)]).astype(np.float32)
    np.testing.assert_array_equal(snap_to_edges(one, image, snap=8), 0)
    with pytest.raises(ValueError, match="snap must be 0 or more"):
        snap_to_edges(probs, image, snap=-1)
    with pytest.raises(ValueError, match=r"\(2, 100, 256\) and \(1, 256, 256\)"):
        snap_to_edges(probs[:, :100], image, snap=8)


def test_three_classes_snap_each_border(dsb_crop):
    image, truth = dsb_crop
    two = _shrunk_probabilities(truth, by=2, p_band=0.7)
    # a third class (value 3) on the right half of the objects: borders between all classes
    three = np.zeros((3, *truth.shape), np.float32)
    right = np.zeros(truth.shape, bool)
    right[:, 128:] = True
    three[0] = two[0]
    three[1] = np.where(right, 0, two[1])
    three[2] = np.where(right, two[1], 0)
    out = snap_to_edges(three, image, snap=8)
    assert set(np.unique(out)) == {0, 1, 2}
    assert _iou(out > 0, truth) > _iou(three.argmax(0) > 0, truth) + 0.05
    assert not (out[:, :120] == 2).any()  # class 3 stays on its side


def test_segment_snaps_a_stack_plane_by_plane_whatever_the_tiling(nuclei3d_path, small_model):
    stack = tifffile.imread(nuclei3d_path)[28:31]
    whole = segment(stack, small_model, axes="ZYX", return_probabilities=True,
                    tiles=TileConfig(tile=1024, mode="exact"))
    tiled = segment(stack, small_model, axes="ZYX", tiles=TileConfig(tile=64, mode="exact"))
    argmax = segment(stack, small_model, axes="ZYX", snap=0)
    assert tiled.plan.n_tiles > whole.plan.n_tiles == 3  # one window per plane
    # exact tiling: equal up to float rounding, which can flip a tie of the watershed
    assert (tiled.labels != whole.labels).mean() < 1e-4
    # the labels are the snap of the probabilities, plane by plane
    lo, hi = percentile_range(stack[np.newaxis], small_model.normalization)
    image = ((stack - lo[0]) / (hi[0] - lo[0]))[np.newaxis].astype(np.float32)
    expected = snap_planes(whole.probabilities, image, snap=8) + 1  # class values 1, 2
    expected[expected == 1] = 0  # background written as 0
    np.testing.assert_array_equal(whole.labels, expected)
    assert (argmax.labels != whole.labels).any()


def test_segment_snaps_a_single_image_once_all_its_rows_are_in(nuclei2d, small_model):
    img = nuclei2d[:320, :256]
    probs_out = np.zeros((2, 320, 256), np.float32)
    tiled = segment(img, small_model, tiles=TileConfig(tile=64, mode="exact"),
                    probabilities_out=probs_out)
    whole = segment(img, small_model, tiles=TileConfig(tile=1024, mode="exact"),
                    return_probabilities=True)
    assert tiled.plan.n_tiles > 4
    assert (tiled.labels != whole.labels).mean() < 1e-4
    np.testing.assert_allclose(probs_out, whole.probabilities, atol=1e-4)
    np.testing.assert_allclose(probs_out.sum(0), 1, atol=1e-4)  # probabilities, not labels


def test_instances_and_3d_models_are_not_snapped(small_model_3d, nuclei3d_path):
    vol = tifffile.imread(nuclei3d_path)[:8, :64, :64]
    snapped = segment(vol, small_model_3d, axes="ZYX")
    plain = segment(vol, small_model_3d, axes="ZYX", snap=0)
    np.testing.assert_array_equal(snapped.labels, plain.labels)


def test_snap_setting_is_checked():
    with pytest.raises(ConfigError, match=r"snap \(pixels\) must be >= 0, got -2"):
        SegmentSettings(snap=-2)


def test_a_model_trained_on_dense_labels_is_not_snapped_by_default(nuclei2d, small_model):
    """The snap's default follows the model's last training run: 8 px after strokes (or with
    no record, as the starter), none after dense labels; a snap the user sets is kept."""
    import copy

    from paintseg.config import SNAP_PIXELS
    from paintseg.inference import default_snap

    img = nuclei2d[:128, :128]
    dense = copy.deepcopy(small_model)
    dense.provenance["training"] = [{"painted_share": 0.2}, {"painted_share": 1.0}]
    strokes = copy.deepcopy(small_model)
    strokes.provenance["training"] = [{"painted_share": 0.013}]
    assert default_snap(dense) == 0 and default_snap(strokes) == SNAP_PIXELS
    auto = SegmentSettings(output="semantic")
    np.testing.assert_array_equal(segment_labels(img, dense, auto).labels,
                                  segment(img, dense, snap=0).labels)
    np.testing.assert_array_equal(segment_labels(img, strokes, auto).labels,
                                  segment(img, strokes, snap=SNAP_PIXELS).labels)
    np.testing.assert_array_equal(segment_labels(img, dense, auto.replace(snap=4)).labels,
                                  segment(img, dense, snap=4).labels)


def test_segment_labels_passes_snap(nuclei2d, small_model):
    img = nuclei2d[:128, :128]
    a = segment_labels(img, small_model, SegmentSettings(output="semantic", snap=0)).labels
    b = segment(img, small_model, snap=0).labels
    np.testing.assert_array_equal(a, b)
    c = segment_labels(img, small_model, SegmentSettings(output="semantic")).labels
    np.testing.assert_array_equal(c, segment(img, small_model).labels)


def test_a_rescaled_image_is_snapped_at_full_resolution(nuclei2d, small_model, monkeypatch):
    from paintseg import postprocess

    # the untrained model's classes are speckle, thin everywhere: snapped as if they were not
    monkeypatch.setattr(postprocess, "thin_classes", lambda *a, **k: [])
    img = nuclei2d[:200, :200]
    res = segment(img, small_model, scale=0.5, return_probabilities=True)
    plain = segment(img, small_model, scale=0.5, snap=0, return_probabilities=True)
    np.testing.assert_allclose(res.probabilities, plain.probabilities)
    assert res.labels.shape == (200, 200)
    lo, hi = percentile_range(img[np.newaxis], small_model.normalization)
    image = ((img - lo[0]) / (hi[0] - lo[0]))[np.newaxis].astype(np.float32)
    expected = np.array([0, 2])[snap_to_edges(res.probabilities, image, snap=8)]
    np.testing.assert_array_equal(res.labels, expected)
    assert (res.labels != plain.labels).any()


def test_thin_classes_are_measured_by_their_width():
    from paintseg.postprocess import thin_classes

    yy, xx = np.mgrid[:200, :200]
    index = np.zeros((200, 200), np.int64)
    index[20:34] = 1  # a line 14 px wide: thin at snap 8 (narrower than 16, and long)
    index[60:78] = 2  # 18 px wide: not
    index[(yy - 140) ** 2 + (xx - 60) ** 2 < 7**2] = 3  # a disc 14 px across: not a line
    index[130:136, 120:190] = 4  # a short line, 6 x 70: thin
    assert thin_classes(index, snap=8) == [1, 4]
    assert thin_classes(index, snap=6) == [4]
    assert thin_classes(np.zeros((9, 9), np.int64), snap=8) == []  # fills the image
    with pytest.raises(ValueError, match=r"2D class map expected, got shape \(2, 9, 9\)"):
        thin_classes(np.zeros((2, 9, 9), np.int64))
    # real structures: the DSB2018 nuclei are not thin, even shrunk by 3 px; their outlines
    # (2 px) are
    truth = tifffile.imread(SAMPLES / "nuclei2d_instances.tif") > 0
    outline = truth & ~ndi.binary_erosion(truth, iterations=2)
    assert thin_classes(np.where(outline, 2, truth.astype(np.int64)), snap=8) == [2]
    assert thin_classes(ndi.binary_erosion(truth, iterations=3).astype(np.int64)) == []


def test_a_thin_class_is_never_moved():
    """A model's outline class (2 px) drawn 1 px inside the real cells3d nuclei's edges,
    unsure everywhere near a border: snapping would pull it onto the edges, moving it; it
    stays where the model put it, and so does every border within the snap distance."""
    from paintseg.postprocess import thin_classes

    img = tifffile.imread(SAMPLES / "nuclei3d.tif")[30].astype(np.float32)
    truth = tifffile.imread(SAMPLES / "nuclei3d_labels.tif")[30] > 0
    lo, hi = percentile_range(img[np.newaxis], NormConfig())
    image = ((img - lo[0]) / (hi[0] - lo[0]))[np.newaxis]
    inner = ndi.binary_erosion(truth, iterations=1)
    core = ndi.binary_erosion(truth, iterations=3)
    index = np.where(core, 1, np.where(inner, 2, 0))
    probs = np.full((3, *truth.shape), 0.2, np.float32)
    np.put_along_axis(probs, index[None], 0.6, axis=0)  # arg-max = index, unsure everywhere
    assert 2 in thin_classes(index, snap=8)
    np.testing.assert_array_equal(snap_to_edges(probs, image, snap=8), index)
    # without the outline class, the nuclei 1 px inside their edges do snap
    p2 = np.where(inner[None] == np.array([False, True])[:, None, None], 0.6, 0.4)
    snapped = snap_to_edges(p2.astype(np.float32), image, snap=8)
    assert (snapped != inner).any()


def _distances_by_class(index: np.ndarray) -> np.ndarray:
    """Each pixel's distance to another class by one distance transform per class."""
    distance = np.zeros(index.shape)
    for k in np.unique(index):
        distance[index == k] = ndi.distance_transform_edt(index == k)[index == k]
    return distance


def test_distances_up_to_a_cap_are_exact():
    """The snap's distances to another class (one pass over rows, then the rows within the
    cap) equal a distance transform of each class wherever they are at most the cap, and are
    infinite beyond it: on the real DSB2018 and cells3d nuclei with their outlines as a third
    class, and on speckle of 2 to 5 classes."""
    from paintseg.postprocess import _distance_at, _distance_up_to, _row_distance

    truth = tifffile.imread(SAMPLES / "nuclei2d_instances.tif")
    cells3d = tifffile.imread(SAMPLES / "nuclei3d_labels.tif")[30]
    rng = np.random.default_rng(0)
    maps = [(truth > 0).astype(np.int64),
            np.where(ndi.morphological_gradient(truth, size=3) > 0, 2, truth > 0),
            (cells3d > 0).astype(np.int64)]
    maps += [rng.integers(0, k, (37, 53)) for k in (2, 3, 5)]
    maps += [np.kron(rng.integers(0, 3, (9, 12)), np.ones((7, 5), np.int64))]
    for index in maps:
        exact = _distances_by_class(index)
        classes = index.astype(np.uint8)
        rows = _row_distance(classes)
        for cap in (1, 4, 8, 16):
            near = exact <= cap
            got = _distance_up_to(classes, rows, cap=cap)
            np.testing.assert_array_equal(got[near], exact[near])
            assert np.isinf(got[~near]).all()
            mask = rng.random(index.shape) < 0.1
            np.testing.assert_array_equal(_distance_at(classes, rows, mask, cap=cap),
                                          got[mask])


def test_a_median_width_across_the_snap_distance_is_measured_exactly():
    """Two strips, 10 and 19 px wide, whose skeletons have as many pixels each: the median of
    their widths lies between their middle values, one under the snap distance (5 px from
    another class) and one beyond it (9 px), measured only in that case. Both strips are
    one thin class at snap 8 (width 14), as with exact distances everywhere; with the second
    strip 18 px wide and 1 px longer, the middle values are 8 and 9: not thin (width 17)."""
    from skimage.morphology import skeletonize

    from paintseg.postprocess import thin_classes

    index = np.zeros((100, 160), np.int64)
    index[10:20, 10:110] = 1
    index[50:69, 10:119] = 1
    skeleton = skeletonize(index == 1)
    half = np.sort(_distances_by_class(index)[skeleton])
    assert len(half) % 2 == 0
    assert (half[len(half) // 2 - 1], half[len(half) // 2]) == (5, 9)
    assert thin_classes(index, snap=8) == [1]
    assert thin_classes(index, snap=8, distance=_distances_by_class(index)) == [1]
    index[50:69, 10:119] = 0
    index[50:68, 10:120] = 1
    half = np.sort(_distances_by_class(index)[skeletonize(index == 1)])
    assert (half[len(half) // 2 - 1], half[len(half) // 2]) == (8, 9)
    assert thin_classes(index, snap=8) == []


@pytest.mark.parametrize("plane", [0, 1, 2, 3])
def test_the_band_is_flooded_as_from_the_whole_plane(dsb_crop, small_model, plane):
    """The snap floods only the band and its ring of seeds, and tests classes for thin lines
    only until no band is left: the same classes as a watershed seeded from every pixel
    outside the band once every thin class's surroundings left it, on real images (the
    DSB2018 crop with shrunk nuclei; an untrained network's many borders on the cells3d
    slice; nuclei outlines, thin, beside the rest alone and beside the nuclei), with thin
    classes measured from the snap's own distances as from their own."""
    from skimage.filters import gaussian, sobel
    from skimage.segmentation import watershed

    from paintseg.postprocess import _flood_band, _seeds_of_enclosed_regions, thin_classes

    if plane in (0, 2, 3):
        image, truth = dsb_crop
        probs = _shrunk_probabilities(truth, by=2, p_band=0.7)
        if plane > 1:  # a 2 px outline class, unsure, inside the nuclei's edges
            outline = truth & ~ndi.binary_erosion(truth, iterations=2)
            index = np.where(outline, 1, 0) if plane == 2 else np.where(
                outline, 2, truth.astype(int))
            probs = np.full((index.max() + 1, *truth.shape), 0.2, np.float32)
            np.put_along_axis(probs, index[None], 0.6, axis=0)
    else:
        img = tifffile.imread(SAMPLES / "nuclei3d.tif")[30].astype(np.float32)
        lo, hi = percentile_range(img[np.newaxis], NormConfig())
        image = ((img - lo[0]) / (hi[0] - lo[0]))[np.newaxis]
        probs = segment(img, small_model, axes="YX", return_probabilities=True,
                        snap=0).probabilities
    index = probs.argmax(0)
    distance = _distances_by_class(index)
    band = (distance <= 8) & (probs.max(0) < 0.98)
    assert 0.02 < band.mean() < 0.9  # borders to decide, and seeds
    grad = sobel(image[0])
    whole = watershed(grad, markers=np.where(band, 0, index + 1)) - 1
    np.testing.assert_array_equal(_flood_band(grad, index.copy(), band), whole)
    thin = thin_classes(index, snap=8)
    assert thin_classes(index, snap=8, distance=distance) == thin
    if plane != 1:  # (the untrained network's are whatever it gives)
        assert thin == {0: [], 2: [1], 3: [2]}[plane]
    band &= ndi.distance_transform_edt(~np.isin(index, thin)) > 8
    band &= ~_seeds_of_enclosed_regions(index, band, distance, wider_than=8)  # (tested below)
    grad = sobel(gaussian(image[0], sigma=1.0, preserve_range=True))
    whole = watershed(grad, markers=np.where(band, 0, index + 1)) - 1
    np.testing.assert_array_equal(snap_to_edges(probs, image, snap=8), whole)


@pytest.mark.parametrize("by", [0, 2])
def test_an_unsure_model_loses_no_object_to_the_snap(dsb_crop, by):
    """A model unsure everywhere (0.7), its nuclei as drawn or 2 px too small, on the real
    DSB2018 crop: every pixel of a small nucleus is within the snap distance of a border, and
    such a nucleus once had no seed and was flooded by the background (8 of 29 nuclei lost
    as drawn, 12 when shrunk, below the arg-max). Each region wider than the snap distance
    keeps its innermost pixel as a seed: none of them is lost, and the snapped nuclei are
    closer to the truth than when shrunk."""
    from paintseg.postprocess import _seeds_of_enclosed_regions

    image, truth = dsb_crop
    drawn = ndi.binary_erosion(truth, iterations=by) if by else truth
    p = np.where(drawn, 0.7, 0.3)
    probs = np.stack([1 - p, p]).astype(np.float32)
    snapped = snap_to_edges(probs, image, snap=8) == 1
    regions, n = ndi.label(drawn)
    distance = np.where(drawn, ndi.distance_transform_edt(drawn),
                        ndi.distance_transform_edt(~drawn))
    wide = ndi.maximum(distance, regions, np.arange(1, n + 1)) > 4
    assert n > 20 and wide.sum() > 15
    assert np.all(np.bincount(regions[snapped], minlength=n + 1)[1:][wide] > 0)
    if by:
        assert _iou(snapped, truth) > _iou(drawn, truth) + 0.03
    # the seed of an enclosed region wider than 8 px is its innermost pixel; regions reaching
    # out of the band, and specks, get none
    band = distance <= 8
    seeds = _seeds_of_enclosed_regions(drawn.astype(np.int64), band, distance, wider_than=8)
    inside = np.bincount(regions[~band], minlength=n + 1)[1:] == 0
    owner = regions[seeds & drawn]  # one seed in each enclosed wide nucleus, none elsewhere
    np.testing.assert_array_equal(np.sort(owner), np.flatnonzero(inside & wide) + 1)
    assert len(owner) > 0 and (inside & ~wide).any()
    np.testing.assert_array_equal(distance[seeds & drawn], ndi.maximum(distance, regions, owner))
