"""Folder batches: failures isolated, outputs complete or absent, reruns resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from paintseg.batch import (
    FileResult,
    SegmentSettings,
    collect_inputs,
    iter_batch,
    output_complete,
    output_paths,
    segment_file,
)
from paintseg.cli import main
from paintseg.config import ModelConfig, TileConfig
from paintseg.errors import InputError
from paintseg.inference import segment_labels
from paintseg.io import read_image
from paintseg.model import load_model, new_model, save_model


@pytest.fixture
def model_file(tmp_path):
    return save_model(new_model(ModelConfig(depth=3, base_features=8), seed=0), tmp_path / "m.pt")


def _folder(tmp_path: Path, nuclei2d: np.ndarray) -> Path:
    """Good crops in two sub-folders, a corrupt file, a wrong-dimensional file, a text file."""
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    tifffile.imwrite(src / "a" / "one.tif", nuclei2d[:200, :240])
    tifffile.imwrite(src / "a" / "two.tif", nuclei2d[200:, :])
    tifffile.imwrite(src / "b" / "three.tiff", nuclei2d[:, 100:260])
    raw = (src / "a" / "one.tif").read_bytes()
    (src / "b" / "corrupt.tif").write_bytes(raw[: len(raw) // 3])
    tifffile.imwrite(src / "b" / "line.tif", np.arange(50, dtype=np.uint8))  # 1D
    (src / "notes.txt").write_text("not an image")
    return src


def test_folder_batch_isolates_failures_and_reports(tmp_path, model_file, nuclei2d):
    src = _folder(tmp_path, nuclei2d)
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    rc = main(["segment", str(src), "--model", str(model_file), "--out", str(out),
               "--report", str(report), "-q"])
    assert rc == 1  # something failed
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/one_labels.tif", "a/two_labels.tif", "b/three_labels.tif"]
    data = json.loads(report.read_text())
    assert (data["total"], data["done"], data["failed"], data["skipped"]) == (5, 3, 2, 0)
    reasons = {Path(f["source"]).name: f["reason"] for f in data["files"]
               if f["status"] == "failed"}
    assert set(reasons) == {"corrupt.tif", "line.tif"}
    assert "corrupt.tif" in reasons["corrupt.tif"] and "truncated" in reasons["corrupt.tif"]
    assert "line.tif" in reasons["line.tif"]
    # each output equals the library call on the same image
    model = load_model(model_file)
    ref = segment_labels(read_image(src / "b" / "three.tiff"), model)
    np.testing.assert_array_equal(tifffile.imread(out / "b" / "three_labels.tif"), ref.labels)
    # a rerun skips what is complete and still reports the bad files
    rc = main(["segment", str(src), "--model", str(model_file), "--out", str(out),
               "--report", str(report), "-q"])
    assert rc == 1
    data = json.loads(report.read_text())
    assert (data["done"], data["skipped"], data["failed"]) == (0, 3, 2)


def test_incomplete_output_is_redone(tmp_path, small_model, nuclei2d):
    tifffile.imwrite(tmp_path / "img.tif", nuclei2d[:128, :128])
    job = collect_inputs([tmp_path / "img.tif"])[0]
    out = tmp_path / "out"
    out.mkdir()
    labels = output_paths(job, out)["labels"]
    # a file under the final name that is not a complete output: wrong shape, then truncated
    tifffile.imwrite(labels, np.zeros((10, 10), np.uint8))
    assert not output_complete(labels, (128, 128))
    r = segment_file(job, small_model, out_dir=out)
    assert r.status == "done" and output_complete(labels, (128, 128))
    good = tifffile.imread(labels)
    raw = labels.read_bytes()
    labels.write_bytes(raw[: len(raw) - 2000])
    assert not output_complete(labels, (128, 128))
    assert segment_file(job, small_model, out_dir=out).status == "done"
    np.testing.assert_array_equal(tifffile.imread(labels), good)
    assert segment_file(job, small_model, out_dir=out).status == "skipped"
    assert segment_file(job, small_model, out_dir=out, overwrite=True).status == "done"


def test_stop_between_tiles_leaves_no_partial_file(tmp_path, small_model, nuclei2d):
    for k in range(3):
        tifffile.imwrite(tmp_path / f"img{k}.tif", nuclei2d)
    jobs = collect_inputs([tmp_path], pattern="img*.tif")
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # during the first or second file

    out = tmp_path / "out"
    out.mkdir()
    results = list(iter_batch(jobs, small_model, out_dir=out, should_stop=stop,
                              settings=SegmentSettings(tiles=TileConfig(tile=64))))
    assert all(isinstance(r, FileResult) and r.status == "done" for r in results)
    assert len(results) < 3
    left = sorted(p.name for p in out.iterdir())
    assert left == [f"img{k}_labels.tif" for k in range(len(results))]  # no temporary files


def test_inputs_that_would_collide_are_refused(tmp_path, nuclei2d):
    (tmp_path / "x").mkdir()
    tifffile.imwrite(tmp_path / "x" / "a.tif", nuclei2d[:32, :32])
    tifffile.imwrite(tmp_path / "x" / "a.tiff", nuclei2d[:32, :32])
    with pytest.raises(InputError, match="same outputs"):
        collect_inputs([tmp_path / "x"])
    with pytest.raises(InputError, match="no file matches"):
        collect_inputs([tmp_path / "x"], pattern="*.png")


def test_killed_run_resumes_to_the_same_outputs(tmp_path, model_file, nuclei2d):
    """SIGKILL a batch midway; the rerun completes it, equal to an uninterrupted run."""
    src = tmp_path / "in"
    src.mkdir()
    for k in range(6):
        tifffile.imwrite(src / f"img{k}.tif", np.roll(nuclei2d, 37 * k, axis=1))
    cmd = [sys.executable, "-m", "paintseg.cli", "segment", str(src), "--model", str(model_file),
           "-q", "--tile", "128"]
    ref = tmp_path / "ref"
    subprocess.run(cmd + ["--out", str(ref)], check=True, timeout=300)
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["--out", str(out)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and len(list(out.glob("*_labels.tif"))) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("*_labels.tif"))
    assert 2 <= len(finished) < 6, finished
    for name in finished:  # whatever carries a final name is complete
        np.testing.assert_array_equal(tifffile.imread(out / name), tifffile.imread(ref / name))
    report = tmp_path / "r.json"
    subprocess.run(cmd + ["--out", str(out), "--report", str(report)], check=True, timeout=300)
    data = json.loads(report.read_text())
    assert data["skipped"] == len(finished) and data["done"] == 6 - len(finished)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in ref.iterdir())
    for p in ref.iterdir():
        np.testing.assert_array_equal(tifffile.imread(out / p.name), tifffile.imread(p))


def test_local_dask_cluster_gives_identical_labels(tmp_path, model_file, nuclei2d):
    """2 worker processes: byte-identical outputs to the single-process run, the model loaded
    once per worker, a bad file reported."""
    pytest.importorskip("distributed")
    from paintseg.batch import BatchStats, run_batch

    src = tmp_path / "in"
    src.mkdir()
    for k in range(5):
        tifffile.imwrite(src / f"img{k}.tif", np.roll(nuclei2d, 61 * k, axis=0)[:384])
    (src / "zz_bad.tif").write_text("not a tiff")
    jobs = collect_inputs([src])
    ref = run_batch(jobs, model_file, out_dir=tmp_path / "one")
    stats = BatchStats()
    seen = []
    par = run_batch(jobs, model_file, out_dir=tmp_path / "two", workers=2, stats=stats,
                    on_result=seen.append)
    assert [r.status for r in par] == [r.status for r in ref] == ["done"] * 5 + ["failed"]
    assert "not a TIFF" in par[-1].reason and len(seen) == 6
    for r in ref[:5]:
        name = Path(r.labels).name
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert stats.workers == 2 and stats.loads and set(stats.loads.values()) == {1}
    # the CLI takes the same path
    rc = main(["segment", str(src), "--model", str(model_file), "--out", str(tmp_path / "cli"),
               "--workers", "2", "-q"])
    assert rc == 1
    for r in ref[:5]:
        name = Path(r.labels).name
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


@pytest.fixture
def small_stack(tmp_path, nuclei3d_path):
    """The sample stack cropped to 60 x 128 x 128 (quick to segment)."""
    path = tmp_path / "stack" / "nuclei3d.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, tifffile.imread(nuclei3d_path)[:, 64:192, 64:192],
                     metadata={"axes": "ZYX"})
    return path


def test_one_stack_in_blocks_on_the_cluster_is_identical(tmp_path, small_stack):
    """A stack larger than the block size is cut into blocks of slices on 2 workers; the
    labels equal the whole-file run byte for byte (semantic and instance output)."""
    pytest.importorskip("distributed")
    from paintseg.batch import BatchStats, run_batch

    jobs = collect_inputs([small_stack])  # 60 x 128 x 128 uint16, 2 MB
    # blocks of 10 slices (instances: 196 KB of probabilities a slice) and 16 (semantic)
    for output, block in (("instances", 2 * 2**20), ("semantic", 2**19)):
        settings = SegmentSettings(output=output)
        ref = run_batch(jobs, "nuclei", out_dir=tmp_path / f"one_{output}", settings=settings)
        seen = []
        stats = BatchStats()
        par = run_batch(jobs, "nuclei", out_dir=tmp_path / f"blocks_{output}", workers=2,
                        settings=settings, block_bytes=block, stats=stats,
                        on_result=seen.append)
        assert par[0].status == "done" and " blocks" in par[0].messages[0], par[0]
        assert int(par[0].messages[0].split()[2]) >= 4
        assert len(seen) == 1 and len(stats.loads) == 2  # both workers took blocks
        a = Path(ref[0].labels).read_bytes()
        b = Path(par[0].labels).read_bytes()
        assert tifffile.imread(par[0].labels).shape == (60, 128, 128)
        np.testing.assert_array_equal(tifffile.imread(par[0].labels),
                                      tifffile.imread(ref[0].labels))
        assert a == b
        assert sorted(p.name for p in (tmp_path / f"blocks_{output}").iterdir()) == [
            "nuclei3d_labels.tif"]  # no block files left


def test_ome_zarr_output_equals_tiff_and_resumes(tmp_path, model_file, nuclei2d, nuclei3d_path):
    zarr = pytest.importorskip("zarr")
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", nuclei2d[:200])
    (src / "stack.tif").symlink_to(nuclei3d_path)
    for fmt in ("tiff", "zarr"):
        rc = main(["segment", str(src), "--model", str(model_file), "--out", str(tmp_path / fmt),
                   "--format", fmt, "--probabilities", "-q"])
        assert rc == 0
    for stem in ("a", "stack"):
        group = zarr.open_group(str(tmp_path / "zarr" / f"{stem}_labels.ome.zarr"), mode="r")
        assert group.attrs["multiscales"][0]["version"] == "0.4"
        np.testing.assert_array_equal(group["0"][...],
                                      tifffile.imread(tmp_path / "tiff" / f"{stem}_labels.tif"))
        probs = zarr.open_group(str(tmp_path / "zarr" / f"{stem}_probabilities.ome.zarr"))["0"]
        np.testing.assert_array_equal(
            probs[...], tifffile.imread(tmp_path / "tiff" / f"{stem}_probabilities.tif"))
    # complete outputs are skipped; a damaged one (a chunk missing) is redone
    report = tmp_path / "r.json"
    assert main(["segment", str(src), "--model", str(model_file), "--out", str(tmp_path / "zarr"),
                 "--format", "zarr", "--probabilities", "-q", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["skipped"] == 2
    import shutil

    chunk = tmp_path / "zarr" / "stack_labels.ome.zarr" / "0" / "59.0.0"
    assert chunk.exists()
    chunk.unlink()
    shutil.rmtree(tmp_path / "zarr" / "a_labels.ome.zarr" / "0")
    assert main(["segment", str(src), "--model", str(model_file), "--out", str(tmp_path / "zarr"),
                 "--format", "zarr", "--probabilities", "-q", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["done"] == 2 and data["skipped"] == 0
    for stem in ("a", "stack"):
        np.testing.assert_array_equal(
            zarr.open_group(str(tmp_path / "zarr" / f"{stem}_labels.ome.zarr"))["0"][...],
            tifffile.imread(tmp_path / "tiff" / f"{stem}_labels.tif"))


def test_instance_output_of_a_large_stack_runs_in_blocks_in_process(tmp_path, small_stack):
    """Instance output keeps class probabilities in memory: a stack whose probabilities exceed
    the block size is done block by block, with the same labels as in one piece."""
    job = collect_inputs([small_stack])[0]
    model = load_model("nuclei")
    whole = segment_file(job, model, out_dir=tmp_path / "whole", block_bytes=0)
    blocks = segment_file(job, model, out_dir=tmp_path / "blocks", block_bytes=2 * 2**20)
    assert whole.status == blocks.status == "done"
    # 60 slices of 128x128, 3 classes: 0.5 MB of probabilities and working memory each
    assert blocks.messages == ["segmented in 15 blocks"]
    assert Path(whole.labels).read_bytes() == Path(blocks.labels).read_bytes()
    assert [p.name for p in (tmp_path / "blocks").iterdir()] == ["nuclei3d_labels.tif"]


# tiles of 24 planes (halo 8): blocks of a volume's class labels are cut at tile borders
_TILES3D = TileConfig(tile=24, halo=8)


def _borders(job, model, settings, block_bytes):
    from paintseg.batch import _inspect, _plan_blocks

    plan = _plan_blocks(_inspect(job, model, settings), model, settings, block_bytes, "x", "cpu")
    return plan, [b for _a, b in plan.ranges[:-1]]


def test_3d_instances_in_blocks_with_halos_match_the_whole_volume(tmp_path, balls3d,
                                                                  balls3d_model):
    """A 3D model's instance output of one volume, done in blocks of Z planes with halos
    (bounded memory), finds the objects of the whole-volume run: objects crossing a block
    border are joined into one, and the scores against the truth are the same."""
    from paintseg.metrics import instance_scores

    path, truth = balls3d
    model = load_model(balls3d_model)
    job = collect_inputs([path])[0]
    settings = SegmentSettings(min_size=30)
    # 96 x 96 planes of 3 probabilities + work (295 KB): 42 planes, less 2 x 13 of halo
    block_bytes = 12 * 2**20
    plan, borders = _borders(job, model, settings, block_bytes)
    assert plan.volume and plan.instances and plan.overlap >= 10 and len(borders) >= 1
    whole = segment_file(job, model, out_dir=tmp_path / "whole", settings=settings,
                         block_bytes=0)
    blocks = segment_file(job, model, out_dir=tmp_path / "blocks", settings=settings,
                          block_bytes=block_bytes)
    assert blocks.messages == [f"segmented in {len(plan.ranges)} blocks with halos, joined"]
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == ["balls_labels.tif"]
    a, b = tifffile.imread(whole.labels), tifffile.imread(blocks.labels)
    assert a.shape == b.shape == truth.shape
    crossing = set().union(*(set(np.unique(a[z - 1])) & set(np.unique(a[z])) for z in borders))
    crossing -= {0}
    assert len(crossing) >= 3  # the borders cut objects, so joining is exercised
    for obj in crossing:  # each is one object in the blocked result too
        assert len(set(np.unique(b[a == obj])) - {0}) == 1
    same = instance_scores(b, a)
    assert same["f1"][4] >= 0.95, same  # at IoU 0.7
    s_whole, s_blocks = instance_scores(a, truth), instance_scores(b, truth)
    assert s_whole["f1"][0] > 0.6
    assert abs(s_whole["f1"][0] - s_blocks["f1"][0]) <= 0.03
    assert b.max() == len(np.unique(b)) - 1  # numbered 1..N
    assert np.bincount(b.ravel())[1:].min() >= 30  # small objects removed after joining
    # the command line does the same with --block
    assert main(["segment", str(path), "--model", str(balls3d_model), "--out",
                 str(tmp_path / "cli"), "--block", "12M", "-q"]) == 0
    assert (tmp_path / "cli" / "balls_labels.tif").read_bytes() == Path(blocks.labels).read_bytes()


def test_3d_model_volume_in_blocks_on_the_cluster_is_identical(tmp_path, balls3d,
                                                               balls3d_model):
    """One volume of a 3D model, cut into blocks of Z planes with their halos on 2 workers:
    class labels equal the single-process whole-volume run; instance labels equal the
    single-process blocked run, byte for byte."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from paintseg.batch import BatchStats, run_batch

    path, _truth = balls3d
    jobs = collect_inputs([path])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        # semantic: blocks of 18 KB planes; instances: as in the test above
        for output, block_bytes in (("semantic", 2**18), ("instances", 12 * 2**20)):
            settings = SegmentSettings(output=output, tiles=_TILES3D)
            ref = run_batch(jobs, balls3d_model, out_dir=tmp_path / f"one_{output}",
                            settings=settings, block_bytes=block_bytes)
            stats = BatchStats()
            par = run_batch(jobs, balls3d_model, out_dir=tmp_path / f"par_{output}",
                            settings=settings, scheduler=client, block_bytes=block_bytes,
                            stats=stats)
            assert par[0].status == "done" and "blocks" in par[0].messages[0], par[0]
            assert len(stats.loads) == 2  # both workers took blocks
            assert ("blocks" in " ".join(ref[0].messages)) == (output == "instances")
            assert Path(par[0].labels).read_bytes() == Path(ref[0].labels).read_bytes()
            assert sorted(p.name for p in (tmp_path / f"par_{output}").iterdir()) == [
                "balls_labels.tif"]


def test_stitching_joins_objects_where_the_halos_agree(tmp_path):
    """Objects of two blocks that share most of their voxels in the common planes become one
    (its size counted over both blocks for the minimum size); others stay apart."""
    from paintseg.blocks import stitch_instances

    # planes 0..3 belong to block 0, planes 4..7 to block 1; both segmented planes 2..5
    vol0 = np.zeros((6, 8, 8), np.uint16)  # block 0 saw planes 0..5
    vol1 = np.zeros((6, 8, 8), np.uint16)  # block 1 saw planes 2..7
    vol0[1:6, 0:3, 0:3] = 1  # crosses the border; 5 planes x 9 voxels
    vol1[0:4, 0:3, 0:3] = 2  # the same object as block 1 sees it
    vol0[2:4, 5:8, 5:8] = 2  # in block 0 only (planes 2, 3)
    vol1[2:4, 5:8, 0:2] = 1  # in block 1 only, touches nothing of block 0
    vol1[2:3, 5:6, 5:6] = 3  # a 1-voxel overlap with block 0's object 2: not the same
    parts = []
    for k, (core, lo, hi) in enumerate([(vol0[:4], vol0[:0], vol0[2:]),
                                        (vol1[2:], vol1[:4], vol1[6:])]):
        part = tmp_path / f"b{k}.npz"
        np.savez(part, labels=core, halo_lo=lo, halo_hi=hi, sizes=np.bincount(core.ravel()))
        parts.append(part)
    luts, count = stitch_instances(parts, [2, 3], min_size=0)
    assert luts[0][1] == luts[1][2] != 0  # joined
    assert len({luts[0][2], luts[1][1], luts[1][3], luts[0][1]}) == 4 and count == 4
    # the joined object has 3 x 9 voxels in block 0's planes and 2 x 9 in block 1's
    luts, count = stitch_instances(parts, [2, 3], min_size=40)
    assert luts[0][1] == luts[1][2] == 1 and count == 1 and luts[0][2] == luts[1][1] == 0
