"""segment(): the shared entry point of CLI, batch and GUI."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from paintseg.config import ModelConfig, TileConfig
from paintseg.errors import InputError, StopRequested
from paintseg.inference import AxesView, choose_tiling, segment
from paintseg.io import read_image
from paintseg.model import new_model


def test_2d_model_on_stack_is_slice_by_slice(nuclei3d_path, small_model):
    stack = read_image(nuclei3d_path)
    data = np.asarray(stack.data[20:26])
    calls = []
    forward = small_model.network.forward
    small_model.network.forward = lambda x, **kw: calls.append(x.shape[0]) or forward(x, **kw)
    res = segment(data, small_model, axes="ZYX", return_probabilities=True,
                  tiles=TileConfig(batch_size=4))
    small_model.network.forward = forward
    assert res.axes == "ZYX" and res.labels.shape == (6, 256, 256)
    assert calls == [4, 2]  # slices are batched together
    lazy = segment(zarr.array(data, chunks=(1, 64, 64)), small_model, axes="ZYX",
                   return_probabilities=True)
    np.testing.assert_array_equal(lazy.labels, res.labels)


def test_stack_slices_equal_individual_images_with_same_normalisation(small_model):
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(4, 70, 90)).astype(np.float32)
    stack[:, 0, 0] = -10  # same percentiles in every slice and in the whole stack
    stack[:, 0, 1] = 10
    small_model.normalization = type(small_model.normalization)(low=0, high=100)
    res = segment(stack, small_model, axes="ZYX", return_probabilities=True)
    for z in range(4):
        one = segment(stack[z], small_model, axes="YX", return_probabilities=True)
        np.testing.assert_allclose(res.probabilities[:, z], one.probabilities, atol=1e-5)


def test_3d_model_on_volume(small_model_3d, nuclei3d_path):
    vol = np.asarray(read_image(nuclei3d_path).data[:12, :64, :80])
    res = segment(vol, small_model_3d, axes="ZYX", tiles=TileConfig(tile=32, mode="exact"),
                  return_probabilities=True)
    whole = segment(vol, small_model_3d, axes="ZYX", tiles=TileConfig(tile=1000, mode="exact"),
                    return_probabilities=True)
    assert res.plan.n_tiles > 1 and whole.plan.n_tiles == 1
    np.testing.assert_allclose(res.probabilities, whole.probabilities, atol=1e-4)
    tzyx = np.stack([vol, vol[::-1]])
    both = segment(tzyx, small_model_3d, axes="TZYX")
    assert both.axes == "TZYX" and both.labels.shape == (2, 12, 64, 80)


def test_channels(small_model):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    with pytest.raises(InputError, match=r"image has 3 channel\(s\).*model expects 1"):
        segment(rgb, small_model, axes="YXC")
    model3 = new_model(ModelConfig(in_channels=3, depth=2, base_features=4), seed=0)
    res = segment(rgb, model3, axes="YXC")
    assert res.labels.shape == (40, 50) and res.axes == "YX"
    res2 = segment(np.moveaxis(rgb, -1, 0), model3, axes="CYX")
    np.testing.assert_array_equal(res.labels, res2.labels)


def test_wrong_dimensional_model(small_model_3d):
    with pytest.raises(InputError, match="model is 3D but the image has no Z axis"):
        segment(np.zeros((30, 30), np.float32), small_model_3d, axes="YX")


def test_nan_and_empty(small_model):
    a = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    a[5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        segment(a, small_model)
    with pytest.raises(InputError, match="empty image"):
        segment(np.zeros((0, 5), np.float32), small_model)


def test_nan_outside_percentile_sample_is_caught_per_tile(small_model):
    from paintseg.config import NormConfig

    small_model.normalization = NormConfig(max_samples=1000)
    a = np.random.default_rng(0).normal(size=(8, 128, 128)).astype(np.float32)
    a[3, 1, 1] = np.inf  # strided sample skips odd rows/columns
    with pytest.raises(InputError, match="tile at"):
        segment(a, small_model, axes="ZYX")


def test_input_never_modified_and_labels_mapped(nuclei2d):
    model = new_model(ModelConfig(depth=2, base_features=4, classes=3), seed=0,
                      class_values=(1, 4, 9))
    before = nuclei2d.copy()
    # snap=0: the arg-max class (borders snapped to edges: tests/test_snap.py)
    res = segment(nuclei2d, model, return_probabilities=True, snap=0)
    np.testing.assert_array_equal(nuclei2d, before)
    assert set(np.unique(res.labels)) <= {0, 4, 9}
    keep = segment(nuclei2d, model, background_class=None)
    assert set(np.unique(keep.labels)) <= {1, 4, 9}
    np.testing.assert_allclose(res.probabilities.sum(0), 1, atol=1e-5)
    argmax = np.array([0, 4, 9])[res.probabilities.argmax(0)]
    np.testing.assert_array_equal(argmax, res.labels)


def test_constant_image_is_not_an_error(small_model):
    res = segment(np.full((40, 40), 7, np.uint8), small_model)
    assert res.messages and "constant" in res.messages[0]


def test_stop_flag(small_model, nuclei2d):
    with pytest.raises(StopRequested):
        segment(nuclei2d, small_model, tiles=TileConfig(tile=64), should_stop=lambda: True)


def test_tiling_choice_follows_memory_budget():
    cfg = ModelConfig(depth=4, base_features=32)
    tile, halo, batch = choose_tiling((2048, 2048), cfg, TileConfig(), budget=8 * 2**30)
    assert tile == 2048 and halo == 32  # the whole image fits
    tile, halo, batch = choose_tiling((2048, 2048), cfg, TileConfig(), budget=2**28)
    assert tile < 2048 and tile % 16 == 0 and batch >= 1
    tile, halo, batch = choose_tiling((2048, 2048), cfg, TileConfig(mode="exact"), budget=2**30)
    assert halo == 128


def test_axes_view_reorders_lazily():
    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # Z C Y X
    v = AxesView(a, "ZCYX", "CZYX")
    assert v.shape == (3, 2, 4, 5)
    np.testing.assert_array_equal(v[:, 1, 1:3], np.transpose(a, (1, 0, 2, 3))[:, 1, 1:3])
    w = AxesView(a[:, 0], "ZYX", "CZYX")
    assert w.shape == (1, 2, 4, 5)
    np.testing.assert_array_equal(w[...], a[:, 0][None])


def test_memmap_output(tmp_path, nuclei2d_path, small_model):
    img = read_image(nuclei2d_path)
    out = tifffile.memmap(tmp_path / "o.tif", shape=(512, 512), dtype=np.uint8)
    res = segment(img, small_model, labels_out=out)
    assert res.labels is out
    ref = segment(np.asarray(img.data), small_model)
    np.testing.assert_array_equal(np.asarray(out), ref.labels)


def test_out_of_memory_back_off_sequence():
    """On CUDA OOM: halve the batch, then the tile (one per batch), then fall back to the CPU."""
    import torch

    from paintseg.config import TileConfig
    from paintseg.inference import after_oom

    asked = TileConfig(tile=None, batch_size=None)
    cfg, dev, used = asked, torch.device("cuda"), {"tile": 512, "batch": 8}
    seen = []
    while dev.type == "cuda":
        cfg, dev, note = after_oom(cfg, asked, used_tile=used["tile"], used_batch=used["batch"],
                                   align=16, device=dev)
        seen.append((cfg.batch_size, cfg.tile, dev.type))
        used = {"tile": cfg.tile or used["tile"], "batch": cfg.batch_size}
        assert "out of memory" in note
    assert seen == [(4, None, "cuda"), (2, None, "cuda"), (1, None, "cuda"),
                    (1, 256, "cuda"), (1, 128, "cuda"), (1, 64, "cuda"), (1, 32, "cuda"),
                    (None, None, "cpu")]
    assert "using the CPU" in note


def test_oom_retry_runs_again_with_what_after_oom_chooses():
    """The retry object reruns an attempt after each CUDA out-of-memory error with smaller
    settings, ends on the CPU, keeps a note per retry and lets other errors through."""
    import torch

    from paintseg.config import TileConfig
    from paintseg.inference import OomRetry

    asked = TileConfig(tile=None, batch_size=None)
    retry = OomRetry(asked, torch.device("cuda"), align=16)
    tried = []

    def attempt(dev, tiles):
        tried.append((dev.type, tiles.batch_size, tiles.tile))
        retry.ran_with(tile=tiles.tile or 64, batch=tiles.batch_size or 2)
        if dev.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return "done"

    assert retry.run(attempt) == "done"
    assert tried == [("cuda", None, None), ("cuda", 1, None), ("cuda", 1, 32), ("cpu", None, None)]
    assert retry.device.type == "cpu" and len(retry.notes) == 3
    assert retry.notes[-1].endswith("using the CPU")

    def broken(dev, tiles):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        OomRetry(asked, torch.device("cuda"), align=16).run(broken)


def test_window_merger_blends_rows_and_frees_them():
    """The merger's slabs, flushed row by row, equal one blend of the whole image; rows once
    flushed are no longer held."""
    import torch

    from paintseg.tiling import ArraySink, WindowMerger, plan_tiles, window_weight

    plan = plan_tiles((40, 33), tile=16, halo=4, blend=4)
    rng = np.random.default_rng(0)
    preds = {tuple(i): torch.from_numpy(rng.random((2, *plan.window), dtype=np.float32))
             for i in np.ndindex(*[len(st) for st in plan.starts])}
    sink = ArraySink(2, (0, 40), (33,))
    merger = WindowMerger(plan, classes=2, device=torch.device("cpu"), sink=sink, rows=(0, 40),
                          start=0)
    held = []
    for index, pred in preds.items():
        merger.aggregate(pred, index)
        if index[1] == len(plan.starts[1]) - 1 and index[0] + 1 < len(plan.starts[0]):
            nxt = plan.starts[0][index[0] + 1] - plan.halo[0]
            merger.flush(max(nxt, 0))
            held.append(merger.acc.shape[1] if merger.acc is not None else 0)
    merger.finalize()
    assert merger.acc is None and max(held) < 40
    # the same blend in one array: windows placed with their weights, then divided
    pad = 32
    acc, wsum = np.zeros((2, 40 + 2 * pad, 33 + 2 * pad)), np.zeros((40 + 2 * pad, 33 + 2 * pad))
    for index, pred in preds.items():
        y, x = (plan.starts[a][i] - plan.halo[a] + pad for a, i in enumerate(index))
        w = window_weight(plan, index)
        acc[:, y:y + plan.window[0], x:x + plan.window[1]] += pred.numpy() * w
        wsum[y:y + plan.window[0], x:x + plan.window[1]] += w
    ref = acc[:, pad:pad + 40, pad:pad + 33] / np.maximum(wsum[pad:pad + 40, pad:pad + 33], 1e-12)
    np.testing.assert_allclose(sink.array, ref, rtol=1e-5, atol=1e-6)


def test_a_block_of_a_volume_equals_the_whole_run(small_model_3d, nuclei3d_path):
    """With the whole volume's tiling (resolve_tiles) and intensity range, segmenting Z planes
    a:b alone equals planes a:b of the whole run: labels and probabilities, bit for bit."""
    from paintseg.inference import resolve_tiles
    from paintseg.normalize import percentile_range

    img = tifffile.imread(nuclei3d_path)[:40, :96, :80]
    tiles = resolve_tiles(img.shape, small_model_3d, TileConfig(tile=16), device="cpu")
    assert tiles.tile == 16 and tiles.halo > 0 and tiles.batch_size >= 1
    whole = segment(img, small_model_3d, tiles=tiles, device="cpu", return_probabilities=True)
    lo_hi = percentile_range(img[np.newaxis], small_model_3d.normalization)
    for rows in [(0, 9), (16, 32), (39, 40)]:
        part = segment(img, small_model_3d, tiles=tiles, device="cpu", rows=rows,
                       intensity_range=lo_hi, return_probabilities=True)
        np.testing.assert_array_equal(part.labels, whole.labels[rows[0]:rows[1]])
        np.testing.assert_array_equal(part.probabilities,
                                      whole.probabilities[:, rows[0]:rows[1]])


def test_auto_tiling_uses_one_window_without_halo_when_the_image_fits(small_model_3d,
                                                                      monkeypatch):
    """A volume that fits the memory budget is one window with no halo (no reflected
    context to compute), and the tiling does not change with small changes of free memory
    (the blocks of one stack, planned in one process and run in others, need the same)."""
    import paintseg.inference as inference

    tiles = inference.resolve_tiles((60, 256, 256), small_model_3d,
                                    TileConfig(memory_budget=2**30), device="cpu")
    assert tiles.tile == 256 and tiles.halo == 0
    big = []
    for free in (9.1e9, 9.9e9, 20e9):
        monkeypatch.setattr(inference, "memory_available", lambda _dev, f=free: f)
        big.append(inference.resolve_tiles((600, 1024, 1024), small_model_3d, device="cpu"))
    assert big[0] == big[1] != big[2]
    assert big[0].tile < 1024 and big[0].halo > 0


def test_cpu_batches_stay_small_and_give_the_same_labels(nuclei3d_path, small_model):
    """On the CPU, planes are batched up to a quarter megapixel (one plane at least: batches
    of several megapixels ran slower there), and the labels are those of any other batch
    size (the real cells3d slices)."""
    from paintseg.inference import resolve_tiles

    assert resolve_tiles((8, 768, 1024), small_model, device="cpu").batch_size == 1
    assert resolve_tiles((16, 256, 256), small_model, device="cpu").batch_size == 4
    assert resolve_tiles((16, 64, 64), small_model, device="cpu").batch_size == 32  # at most
    data = np.asarray(read_image(nuclei3d_path).data[24:32])
    auto = segment(data, small_model, axes="ZYX", return_probabilities=True)
    for batch in (1, 8):
        other = segment(data, small_model, axes="ZYX", return_probabilities=True,
                        tiles=TileConfig(batch_size=batch))
        np.testing.assert_array_equal(other.labels, auto.labels)
        np.testing.assert_allclose(other.probabilities, auto.probabilities, atol=1e-5)


def test_bfloat16_labels_agree_with_float32_on_real_data(nuclei2d, monkeypatch):
    """Mixed precision (the default on a CPU with bfloat16 units and on CUDA) against float32,
    with the bundled starter on the sample nuclei image: semantic labels and instances agree
    on >= 99.9 % of pixels, the object count within one; ``auto`` is bfloat16 exactly where
    the CPU has the units, and float32 in exact mode."""
    from paintseg import devices
    from paintseg.config import SegmentSettings
    from paintseg.inference import segment_labels
    from paintseg.model import load_model

    model = load_model("nuclei")
    runs = {}
    for precision in ("float32", "bfloat16"):
        tiles = TileConfig(precision=precision)
        runs[precision] = (
            segment(nuclei2d, model, tiles=tiles, return_probabilities=True),
            segment_labels(nuclei2d, model, SegmentSettings(axes="YX", tiles=tiles)).labels)
    (sem32, inst32), (sem16, inst16) = runs["float32"], runs["bfloat16"]
    assert sem16.probabilities.dtype == np.float32
    assert 0 < np.abs(sem16.probabilities - sem32.probabilities).max() < 0.05
    assert np.mean(sem16.labels == sem32.labels) >= 0.999
    assert np.mean((inst16 > 0) == (inst32 > 0)) >= 0.999
    assert abs(int(inst16.max()) - int(inst32.max())) <= 1 and inst32.max() > 50
    for units, want in ((True, sem16), (False, sem32)):
        monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda units=units: units)
        auto = segment(nuclei2d, model, return_probabilities=True)
        np.testing.assert_array_equal(auto.probabilities, want.probabilities)
        exact = TileConfig(mode="exact", tile=4096)
        assert devices.inference_autocast(devices.resolve_device("cpu"), "auto",
                                          exact=True) is None
        np.testing.assert_array_equal(
            segment(nuclei2d, model, tiles=exact, return_probabilities=True).probabilities,
            segment(nuclei2d, model, return_probabilities=True,
                    tiles=TileConfig(mode="exact", tile=4096, precision="float32")
                    ).probabilities)


def test_precision_of_segmentation_is_checked():
    import torch

    from paintseg import devices
    from paintseg.config import ConfigError

    with pytest.raises(ConfigError, match="precision must be one of"):
        TileConfig(precision="half")
    with pytest.raises(devices.PaintsegError, match="segmentation in bfloat16 is not supported"):
        devices.inference_autocast(torch.device("mps"), "bfloat16")
    assert devices.inference_autocast(torch.device("mps"), "auto") is None
    assert devices.inference_autocast(torch.device("cpu"), "float32") is None
