"""Tiled inference reproduces untiled inference; weights, reflection and streaming behave."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from paintseg.config import ModelConfig, TileConfig
from paintseg.errors import StopRequested
from paintseg.inference import segment
from paintseg.model import exact_halo, new_model
from paintseg.tiling import (
    plan_tiles,
    predict_tiled,
    read_window,
    reflect_indices,
    window_weight,
)


def _predictor(net):
    def predict(x):
        with torch.inference_mode():
            return torch.softmax(net(x), 1)

    return predict


def _untiled(img, net, halo, align):
    """Reference: one window over the whole (reflect-extended) image."""
    plan = plan_tiles(img.shape[1:], tile=10**6, halo=halo, align=align)
    assert plan.n_tiles == 1
    return predict_tiled(img, _predictor(net), classes=net.config.classes, plan=plan)


# (dims, spatial shape, tile): odd sizes, tiles larger than the image, 1-pixel-thin images
SHAPES = [
    (2, (64, 64), 16),
    (2, (77, 101), 16),
    (2, (1, 53), 8),
    (2, (53, 1), 8),
    (2, (1, 1), 8),
    (2, (30, 45), 1000),
    (2, (200, 37), 24),
    (3, (13, 21, 30), 8),
    (3, (1, 17, 9), 4),
    (3, (9, 9, 40), 1000),
]


@pytest.mark.parametrize("dims,shape,tile", SHAPES)
def test_exact_tiled_equals_untiled(dims, shape, tile):
    cfg = ModelConfig(dims=dims, depth=2, base_features=4, classes=3)
    net = new_model(cfg, seed=3).network
    img = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    halo = exact_halo(cfg)
    ref = _untiled(img, net, halo, cfg.align)
    plan = plan_tiles(shape, tile=tile, halo=halo, align=cfg.align)
    out = predict_tiled(img, _predictor(net), classes=3, plan=plan, batch_size=3)
    assert out.shape == (3, *shape)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_too_small_halo_is_not_exact():
    """The exact test can fail: with no halo, tiles see zero padding and differ."""
    cfg = ModelConfig(dims=2, depth=2, base_features=4)
    net = new_model(cfg, seed=3).network
    img = np.random.default_rng(1).normal(size=(1, 64, 64)).astype(np.float32)
    ref = _untiled(img, net, exact_halo(cfg), cfg.align)
    plan = plan_tiles((64, 64), tile=16, halo=0, align=cfg.align)
    out = predict_tiled(img, _predictor(net), classes=2, plan=plan)
    assert np.abs(out - ref).max() > 1e-3


def test_exact_mode_through_segment_on_real_image(nuclei2d, small_model):
    whole = segment(nuclei2d, small_model, tiles=TileConfig(tile=4096, mode="exact"),
                    return_probabilities=True)
    assert whole.plan.n_tiles == 1
    tiled = segment(nuclei2d, small_model, tiles=TileConfig(tile=96, mode="exact", batch_size=5),
                    return_probabilities=True)
    assert tiled.plan.n_tiles == 36
    np.testing.assert_allclose(tiled.probabilities, whole.probabilities, atol=1e-4, rtol=0)
    assert (tiled.labels == whole.labels).mean() > 0.9999


@pytest.mark.parametrize("seed", [0, 1])
def test_blend_mode_close_to_untiled_on_real_image(nuclei2d, seed):
    """Blended tiles (default mode, 32-px halo) against the plain forward pass on the whole
    image. Stated tolerance: probabilities within 0.01, labels agree on >= 99.9% of pixels
    (measured with random weights, the hardest case: many near-ties). In float32: what is
    measured is the tiling."""
    model = new_model(ModelConfig(dims=2, depth=4, base_features=16), seed=seed)
    lo, hi = np.percentile(nuclei2d, (1, 99.8))
    x = torch.from_numpy(((nuclei2d - lo) / (hi - lo)).astype(np.float32))[None, None]
    with torch.inference_mode():
        ref = torch.softmax(model.network(x), 1)[0].numpy()
    ref_labels = np.array([0, 2])[ref.argmax(0)]
    fp32 = TileConfig(precision="float32")
    default = segment(nuclei2d, model, return_probabilities=True, tiles=fp32)
    assert default.plan.n_tiles == 1  # fits in memory: one window, the forward pass itself
    np.testing.assert_allclose(default.probabilities, ref, atol=1e-5)
    for tile, n in ((128, 16), (256, 4)):
        tiled = segment(nuclei2d, model, tiles=TileConfig(tile=tile, precision="float32"),
                        return_probabilities=True, snap=0)  # the arg-max labels, as ref_labels
        assert tiled.plan.n_tiles == n and tiled.plan.halo[-1] == 32
        diff = np.abs(tiled.probabilities - ref)
        assert diff.max() < 0.01, diff.max()
        assert diff.mean() < 5e-4
        assert (tiled.labels == ref_labels).mean() >= 0.999


def test_blend_weights_partition_of_unity():
    plan = plan_tiles((100, 90), tile=32, halo=16, align=16, blend=8)
    w = window_weight(plan)
    acc = np.zeros((100 + 64, 90 + 64))
    for origin in plan.tiles():
        sl = tuple(slice(o - h + 32, o - h + 32 + n)
                   for o, h, n in zip(origin, plan.halo, plan.window))
        acc[sl] += w
    inner = acc[32:132, 32:122]
    # every pixel gets at least half weight per axis from its own core
    assert inner.min() >= 0.5**2
    # inside the image, away from its border and from the shifted last tile, neighbours'
    # weights sum to exactly one
    assert plan.starts == ((0, 32, 64, 80), (0, 32, 64))
    np.testing.assert_allclose(inner[8:56, 8:82], 1.0, atol=1e-6)


@pytest.mark.parametrize("size", [1, 2, 5, 17])
def test_reflect_indices_match_numpy_pad(size):
    a = np.arange(size)
    pad = 40
    expected = np.pad(a, pad, mode="reflect") if size > 1 else np.full(size + 2 * pad, 0)
    np.testing.assert_array_equal(a[reflect_indices(-pad, size + pad, size)], expected)


def test_read_window_from_memmap_zarr_dask(tmp_path):
    img = np.random.default_rng(0).integers(0, 1000, (2, 23, 31)).astype(np.uint16)
    mm = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=img.dtype, shape=img.shape)
    mm[:] = img
    z = zarr.array(img, chunks=(1, 8, 8))
    d = da.from_array(img, chunks=(1, 10, 10))
    padded = np.pad(img, ((0, 0), (20, 20), (20, 20)), mode="reflect")
    for src in (img, mm, z, d):
        win = read_window(src, (-7, 25), (40, 19))
        np.testing.assert_array_equal(win, padded[:, 13:53, 45:64])


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_streaming_flushes_slabs_in_order(batch_size):
    """Output is handed over slab by slab along the first axis, each region exactly once,
    also when batches span rows."""
    cfg = ModelConfig(dims=2, depth=2, base_features=4)
    net = new_model(cfg, seed=0).network
    img = np.random.default_rng(0).normal(size=(1, 100, 40)).astype(np.float32)
    plan = plan_tiles((100, 40), tile=16, halo=8, align=4, blend=4)
    regions = []
    out = np.zeros((2, 100, 40), np.float32)

    def sink(region, block):
        regions.append((region[0].start, region[0].stop))
        out[(slice(None), *region)] = block.numpy()

    predict_tiled(img, _predictor(net), classes=2, plan=plan, sink=sink, batch_size=batch_size)
    ref = predict_tiled(img, _predictor(net), classes=2, plan=plan)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert regions[0][0] == 0 and regions[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(regions, regions[1:]))
    if batch_size == 1:
        assert len(regions) == len(plan.starts[0])
        assert max(b - a for a, b in regions) <= 16 + 2 * 4


def test_progress_and_stop():
    cfg = ModelConfig(dims=2, depth=2, base_features=4)
    net = new_model(cfg, seed=0).network
    img = np.zeros((1, 64, 64), np.float32)
    plan = plan_tiles((64, 64), tile=16, halo=8, align=4)
    seen = []
    predict_tiled(img, _predictor(net), classes=2, plan=plan, batch_size=4,
                  progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (16, 16) and len(seen) == 4
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(StopRequested):
        predict_tiled(img, _predictor(net), classes=2, plan=plan, batch_size=1, should_stop=stop)
    assert len(calls) == 3


@pytest.mark.parametrize("norm", ["layer", "weight"])
@pytest.mark.parametrize("dims,shape,tile", [(2, (70, 90), 16), (3, (12, 20, 26), 8)])
def test_exact_with_filter_bank(dims, shape, tile, norm):
    """The fixed multiscale filters in front of the U-Net keep tiling exact, with per-pixel
    layer norm and with standardised weights (no statistics of the input either)."""
    cfg = ModelConfig(dims=dims, depth=2, base_features=4, features=(1.0, 2.0), norm=norm)
    net = new_model(cfg, seed=0).network
    img = np.random.default_rng(2).normal(size=(1, *shape)).astype(np.float32)
    halo = exact_halo(cfg)
    ref = _untiled(img, net, halo, cfg.align)
    plan = plan_tiles(shape, tile=tile, halo=halo, align=cfg.align)
    assert plan.n_tiles > 1
    out = predict_tiled(img, _predictor(net), classes=2, plan=plan, batch_size=4)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("inner", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_block_of_rows_equals_the_same_rows_of_the_whole(inner, batch_size):
    """A block (rows a:b of the first axis) run alone gives the same numbers, bit for bit, as
    those rows of a whole-image run: what a cluster task computes for one huge stack."""
    rng = np.random.default_rng(0)
    img = rng.random((1, 70, 50, 40)).astype(np.float32)
    conv = torch.nn.Conv3d(1, 3, 5, padding=2)
    plan = plan_tiles(img.shape[1:], tile=16, halo=8, align=8, blend=4, inner=inner)
    full = predict_tiled(img, _predictor(conv), classes=3, plan=plan, batch_size=batch_size)
    seen = []
    for rows in [(0, 70), (0, 5), (13, 37), (30, 31), (60, 70), (69, 70)]:
        part = predict_tiled(img, _predictor(conv), classes=3, plan=plan, batch_size=batch_size,
                             rows=rows, progress=lambda d, t: seen.append((d, t)))
        assert part.shape == (3, rows[1] - rows[0], 50, 40)
        np.testing.assert_array_equal(part, full[:, rows[0]:rows[1]])
        assert seen[-1][0] == seen[-1][1] < plan.n_tiles or rows == (0, 70)
    with pytest.raises(ValueError, match="not a range"):
        predict_tiled(img, _predictor(conv), classes=3, plan=plan, rows=(40, 40))
