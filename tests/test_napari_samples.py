"""File > Open Sample > paintseg in a real napari viewer (needs a display: Xvfb in CI)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.gui

if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    pytest.skip("no display (run under Xvfb, as .ci/run does)", allow_module_level=True)


def test_open_samples_in_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-paintseg", "nuclei2d")
    viewer.open_sample("napari-paintseg", "nuclei3d")
    names = [layer.name for layer in viewer.layers]
    assert names == ["nuclei2d", "nuclei3d"]
    assert viewer.layers["nuclei2d"].data.shape == (512, 512)
    assert viewer.layers["nuclei3d"].data.shape == (60, 256, 256)
    assert viewer.dims.ndim == 3
    viewer.layers["nuclei3d"].visible = False
    shot = viewer.screenshot(str(tmp_path / "samples.png"), canvas_only=True)
    assert shot.shape[-1] == 4 and np.asarray(shot)[..., :3].std() > 5  # the image is drawn
