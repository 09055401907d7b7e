"""TIFF reading (axes, memory mapping, errors) and atomic writing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from paintseg.errors import InputError, OutputError
from paintseg.io import (
    OutputTiff,
    check_output_folder,
    label_dtype,
    list_images,
    read_image,
    write_tiff,
)


def test_sample_images_are_memory_mapped_or_read(nuclei2d_path, nuclei3d_path):
    img = read_image(nuclei2d_path)
    assert img.axes == "YX" and img.shape == (512, 512) and img.storage == "file"
    stack = read_image(nuclei3d_path)
    assert stack.axes == "ZYX" and stack.shape == (60, 256, 256)


@pytest.mark.parametrize(
    "shape,kwargs,axes",
    [
        ((20, 30, 3), {"photometric": "rgb"}, "YXC"),
        ((4, 2, 20, 30), {"imagej": True, "metadata": {"axes": "ZCYX"}}, "ZCYX"),
        ((5, 20, 30), {"photometric": "minisblack", "metadata": {"axes": "TYX"}}, "TYX"),
        ((5, 20, 30), {"photometric": "minisblack"}, "ZYX"),
        ((3, 4, 20, 30), {"photometric": "minisblack"}, "TZYX"),
    ],
)
def test_axes_from_metadata(tmp_path, shape, kwargs, axes):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint16), **kwargs)
    assert read_image(path).axes == axes


def test_axes_override_and_errors(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((3, 20, 30), np.uint8), photometric="minisblack")
    assert read_image(path, axes="CYX").axes == "CYX"
    with pytest.raises(InputError, match="have 2 letters for 3 dimensions"):
        read_image(path, axes="YX")
    with pytest.raises(InputError, match="at most once"):
        read_image(path, axes="YYX")


def test_compressed_file_is_read(tmp_path):
    a = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    tifffile.imwrite(tmp_path / "z.tif", a, compression="zlib")
    img = read_image(tmp_path / "z.tif")
    np.testing.assert_array_equal(np.asarray(img.data), a)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_text("hello"), "not a TIFF file"),
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_bytes(b"II*\x00" + bytes(range(256)) * 20), "corrupt TIFF"),
        (lambda p: tifffile.imwrite(p, np.zeros((0, 10), np.uint8)), "empty image"),
        (lambda p: tifffile.imwrite(p, np.zeros((4, 4), np.complex64)), "unsupported pixel type"),
    ],
)
def test_bad_files(tmp_path, make, message):
    path = tmp_path / "bad.tif"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make(path)
    with pytest.raises(InputError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_files(tmp_path, nuclei2d_path):
    raw = nuclei2d_path.read_bytes()
    (tmp_path / "t.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated TIFF"):
        read_image(tmp_path / "t.tif")
    noise = np.random.default_rng(0).integers(0, 999, (256, 256)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", noise, compression="zlib")
    raw = (tmp_path / "c.tif").read_bytes()
    (tmp_path / "ct.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="corrupt TIFF"):
        read_image(tmp_path / "ct.tif")


def test_output_tiff_is_atomic(tmp_path):
    out = tmp_path / "labels.tif"
    with OutputTiff(out, (10, 20), np.uint8, axes="YX") as f:
        f.array[:] = 7
        assert not out.exists()
        f.commit()
    assert read_image(out).axes == "YX"
    np.testing.assert_array_equal(tifffile.imread(out), np.full((10, 20), 7, np.uint8))
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)
    with pytest.raises(RuntimeError):
        with OutputTiff(tmp_path / "never.tif", (10, 20), np.uint8, axes="YX") as f:
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_write_tiff_and_dtype(tmp_path):
    write_tiff(tmp_path / "a.tif", np.ones((3, 4), np.uint16), axes="YX")
    assert tifffile.imread(tmp_path / "a.tif").dtype == np.uint16
    assert label_dtype(2) == np.uint8 and label_dtype(300) == np.uint16
    assert label_dtype(70000) == np.uint32


def test_check_output_folder(tmp_path):
    assert check_output_folder(tmp_path / "new" / "deep").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot create output folder"):
        check_output_folder(tmp_path / "file" / "sub")


def test_list_images(tmp_path):
    for name in ["b.tif", "a.TIFF", "sub/c.tif", ".hidden.tif", "notes.txt", ".x.partial.tif"]:
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_text("")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.TIFF", "b.tif", "sub/c.tif"]


@pytest.mark.parametrize(
    "key",
    [
        (...,),
        (2,),
        (slice(1, 3), slice(4, 9), slice(None)),
        (slice(None), slice(2, 3), slice(5, 17)),
        (1, slice(None, None, 3), slice(1, None, 4)),
        (slice(0, 0),),
        (-1, -2),
        (slice(None), 0, slice(None)),
    ],
)
def test_raw_array_reads_like_numpy(tmp_path, key):
    from paintseg.io import RawArray

    a = np.arange(4 * 10 * 19, dtype=np.uint16).reshape(4, 10, 19)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack")
    img = read_image(tmp_path / "a.tif")
    assert isinstance(img.data, RawArray)
    np.testing.assert_array_equal(img.data[key], a[key])


def test_raw_array_big_endian(tmp_path):
    a = np.arange(300, dtype=">u2").reshape(15, 20)
    tifffile.imwrite(tmp_path / "be.tif", a, byteorder=">")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "be.tif").data[3:7]), a[3:7])


def test_raw_array_writes(tmp_path):
    out = tmp_path / "o.tif"
    f = OutputTiff(out, (3, 8, 9), np.float32, axes="CYX")
    f.array[:, 2:5] = np.ones((3, 3, 9), np.float32)
    f.array[1, 0, 1:4] = 7
    f.commit()
    ref = np.zeros((3, 8, 9), np.float32)
    ref[:, 2:5] = 1
    ref[1, 0, 1:4] = 7
    np.testing.assert_array_equal(tifffile.imread(out), ref)


def test_bigtiff_above_the_classic_tiff_limit(tmp_path, monkeypatch):
    import paintseg.io as pio

    monkeypatch.setattr(pio, "_BIGTIFF_LIMIT", 1000)  # as if the output were over 4 GB
    with OutputTiff(tmp_path / "big.tif", (4, 30, 40), np.uint8, axes="ZYX") as f:
        f.array[:] = 3
        f.commit()
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.is_bigtiff
        assert tif.series[0].shape == (4, 30, 40)
        assert (tif.asarray() == 3).all()
    monkeypatch.setattr(pio, "_BIGTIFF_LIMIT", 2**32 - 2**25)
    with OutputTiff(tmp_path / "small.tif", (4, 30, 40), np.uint8, axes="ZYX") as f:
        f.commit()
    with tifffile.TiffFile(tmp_path / "small.tif") as tif:
        assert not tif.is_bigtiff
