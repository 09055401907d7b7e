"""Colour and multi-channel images, and more than two classes, from strokes, end to end.

The image is scikit-image's bundled immunohistochemistry picture (``skimage.data.ihc``, RGB,
512 x 512: brown DAB-stained tissue, blue haematoxylin nuclei in pale stroma). A script paints
strokes from classes derived from its colours by colour deconvolution: 1 = stroma, 2 = blue
nuclei, 3 = brown tissue.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from paintseg.cli import main
from paintseg.metrics import semantic_scores
from paintseg.model import load_model

NAMES = ("stroma", "nuclei", "DAB")


@pytest.fixture(scope="module")
def ihc():
    """The RGB picture and its colour classes (1 stroma, 2 nuclei, 3 DAB)."""
    from skimage import color, data, filters

    rgb = data.immunohistochemistry()
    hed = color.rgb2hed(rgb)
    dab = filters.gaussian(hed[..., 2], sigma=2)
    dab = dab > filters.threshold_otsu(dab)
    haem = filters.gaussian(hed[..., 0], sigma=1)
    nuclei = ~dab & (haem > filters.threshold_otsu(haem[~dab]))
    truth = np.where(dab, 3, np.where(nuclei, 2, 1)).astype(np.uint8)
    return rgb, truth


def paint(truth: np.ndarray, *, per_class: int, seed: int = 0) -> np.ndarray:
    """Short strokes (3 x 9 px) inside each class of the left half, ``per_class`` each."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(truth.shape, np.uint8)
    w = truth.shape[1] // 2
    for value in np.unique(truth):
        inside = ndi.binary_erosion(truth == value, iterations=1)
        inside[:, w - 9:] = False
        pts = np.argwhere(inside)
        for y, x in pts[rng.choice(len(pts), size=per_class, replace=False)]:
            win = (slice(y - 1, y + 2), slice(x, x + 9))
            lab[win][inside[win]] = value
    return lab


def test_rgb_strokes_of_three_classes_train_and_segment(tmp_path, ihc, capsys):
    rgb, truth = ihc
    img_path, lab_path, model_path = tmp_path / "ihc.tif", tmp_path / "strokes.tif", \
        tmp_path / "ihc.pt"
    tifffile.imwrite(img_path, rgb, photometric="rgb")
    strokes = paint(truth, per_class=40)
    tifffile.imwrite(lab_path, strokes)
    assert main(["train", str(img_path), str(lab_path), "--out", str(model_path),
                 "--steps", "150", "--seed", "0", "--class-names", ",".join(NAMES), "-q"]) == 0
    model = load_model(model_path)
    assert model.config.in_channels == 3
    assert model.class_values == (1, 2, 3) and model.class_names == NAMES
    out = tmp_path / "out"
    assert main(["segment", str(img_path), "--model", str(model_path), "--out", str(out),
                 "--output", "semantic", "-q"]) == 0
    labels = tifffile.imread(out / "ihc_labels.tif")
    assert labels.shape == truth.shape
    classes = np.where(labels == 0, 1, labels)  # the background class is written as 0
    # it follows the strokes, and the colours on the half nobody painted
    painted = strokes > 0
    assert (classes[painted] == strokes[painted]).mean() > 0.9
    right = np.s_[:, truth.shape[1] // 2:]
    iou = semantic_scores(classes[right], truth[right], classes=[1, 2, 3])["iou"]
    # stroma and DAB near 0.8-0.9; the small nuclei are the hard class (0.28 here)
    assert min(iou.values()) > 0.2 and np.mean(list(iou.values())) > 0.6, iou
    err = capsys.readouterr().err
    assert "warning" not in err, err


def test_two_channel_images_train_and_segment(tmp_path, ihc):
    """Two channels (the haematoxylin and DAB stains unmixed from the picture, as a
    two-channel fluorescence image, CYX): trained and segmented with the same channels."""
    from skimage import color

    rgb, truth = ihc
    hed = color.rgb2hed(rgb)
    two = np.stack([hed[..., 0], hed[..., 2]]).astype(np.float32)
    img_path, lab_path, model_path = tmp_path / "two.tif", tmp_path / "strokes.tif", \
        tmp_path / "two.pt"
    tifffile.imwrite(img_path, two, metadata={"axes": "CYX"})
    strokes = paint(truth, per_class=40, seed=1)
    tifffile.imwrite(lab_path, strokes)
    assert main(["train", str(img_path), str(lab_path), "--out", str(model_path),
                 "--steps", "150", "--seed", "0", "--axes", "CYX", "-q"]) == 0
    assert load_model(model_path).config.in_channels == 2
    out = tmp_path / "out"
    assert main(["segment", str(img_path), "--model", str(model_path), "--out", str(out),
                 "--axes", "CYX", "--output", "semantic", "-q"]) == 0
    classes = tifffile.imread(out / "two_labels.tif")
    classes = np.where(classes == 0, 1, classes)
    right = np.s_[:, truth.shape[1] // 2:]
    iou = semantic_scores(classes[right], truth[right], classes=[1, 2, 3])["iou"]
    assert min(iou.values()) > 0.5, iou


def test_class_names_must_match_the_classes(tmp_path, ihc, capsys):
    rgb, truth = ihc
    img_path, lab_path = tmp_path / "ihc.tif", tmp_path / "strokes.tif"
    tifffile.imwrite(img_path, rgb, photometric="rgb")
    tifffile.imwrite(lab_path, paint(truth, per_class=5))
    out = tmp_path / "m.pt"
    assert main(["train", str(img_path), str(lab_path), "--out", str(out), "--steps", "1",
                 "--class-names", "stroma,,DAB", "-q"]) == 2
    assert "--class-names 'stroma,,DAB': a name is empty" in capsys.readouterr().err
    # fewer names than classes: the others keep their default names
    assert main(["train", str(img_path), str(lab_path), "--out", str(out), "--steps", "1",
                 "--class-names", "stroma", "-q"]) == 0
    assert load_model(out).class_names == ("stroma", "class 2", "class 3")


def test_class_names_given_with_spaces_are_told_how_to_write_them(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "img.tif", "strokes.tif", "--out", "m.pt", "--class-names", "background",
              "membrane", "mitochondria"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'membrane mitochondria' was left over" in err
    assert "--class-names background,membrane,mitochondria" in err
    with pytest.raises(SystemExit):  # any other stray word is reported as before
        main(["train", "img.tif", "strokes.tif", "--out", "m.pt", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
