"""TIFF input and output.

Inputs are read on demand (positional reads of the bytes a window needs) when the file allows
it (uncompressed, contiguous), through zarr when it is compressed and large, and into memory
otherwise; nothing is loaded until a window of it is needed. Reads and writes do not map the
file into memory, so resident memory stays bounded by the tile size, not the stack size.
Outputs are written to a temporary file in the destination folder and renamed into place when
complete, so a file with the final name is always whole.

Axes use the letters ``T`` (time), ``Z``, ``C`` (channels), ``Y``, ``X``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .config import axes_letters, distinct_axes
from .errors import InputError, OutputError

__all__ = [
    "ImageData",
    "RawArray",
    "read_image",
    "parse_axes",
    "guess_axes",
    "label_dtype",
    "label_values",
    "OutputTiff",
    "write_tiff",
    "list_images",
    "check_output_folder",
    "publish",
    "atomic_path",
]

_IN_MEMORY_LIMIT = 1 << 30  # compressed files above this are read lazily through zarr
_BIGTIFF_LIMIT = 2**32 - 2**25


class RawArray:
    """A C-contiguous array stored in a file at an offset, read and written with pread/pwrite.

    Unlike ``numpy.memmap`` nothing is mapped into the process, so reading a stack larger than
    memory does not grow the resident memory of the process (the OS page cache still serves
    repeated reads). Supports basic indexing: one int or slice (any step) per axis.

    Parameters
    ----------
    path : path-like
        The file.
    offset : int
        Byte offset of element 0.
    shape : sequence of int
        Array shape.
    dtype : numpy dtype
        Element type (byte order included).
    writable : bool
        Open for writing too.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        offset: int,
        shape: Sequence[int],
        dtype: Any,
        *,
        writable: bool = False,
    ) -> None:
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - closing at exit must never raise
            pass

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def _normalise(self, key: Any) -> tuple[list[tuple[int, int]], list[Any], list[int]]:
        if key is Ellipsis:
            key = ()
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise IndexError(f"too many indices for an array of shape {self.shape}")
        bounds, post, squeeze = [], [], []
        for axis, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
                bounds.append((i, i + 1))
                post.append(slice(None))
                squeeze.append(axis)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    raise IndexError("negative steps are not supported")
                stop = max(start, stop)
                bounds.append((start, stop))
                post.append(slice(None, None, step) if step != 1 else slice(None))
            else:
                raise IndexError(f"unsupported index {k!r}")
        return bounds, post, squeeze

    def _runs(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
        """(file offset, nbytes, position in the block) of each contiguous run."""
        # first axis j after which every axis is taken whole
        j = self.ndim - 1
        while j > 0 and bounds[j] == (0, self.shape[j]):
            j -= 1
        strides = [int(np.prod(self.shape[a + 1 :])) for a in range(self.ndim)]
        run = (bounds[j][1] - bounds[j][0]) * strides[j]
        lead = [range(lo, hi) for lo, hi in bounds[:j]]
        for pos, idx in enumerate(np.ndindex(*[len(r) for r in lead]) if lead else [()]):
            flat = sum((lead[a][i]) * strides[a] for a, i in enumerate(idx))
            flat += bounds[j][0] * strides[j]
            yield self.offset + flat * self.dtype.itemsize, run * self.dtype.itemsize, pos * run

    def __getitem__(self, key: Any) -> np.ndarray:
        bounds, post, squeeze = self._normalise(key)
        shape = tuple(hi - lo for lo, hi in bounds)
        out = np.empty(int(np.prod(shape)), dtype=self.dtype)
        if out.size:
            buf = out.view(np.uint8)
            isz = self.dtype.itemsize
            for off, nbytes, pos in self._runs(bounds):
                got = os.preadv(self._fd, [memoryview(buf[pos * isz : pos * isz + nbytes])], off)
                if got != nbytes:
                    raise InputError(f"{self.path}: truncated file (short read at byte {off})")
        out = out.reshape(shape)[tuple(post)]
        return out.squeeze(axis=tuple(squeeze)) if squeeze else out

    def __setitem__(self, key: Any, value: Any) -> None:
        bounds, post, squeeze = self._normalise(key)
        if any(p != slice(None) for p in post):
            raise IndexError("writing with a step is not supported")
        shape = tuple(hi - lo for lo, hi in bounds)
        block = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=self.dtype), shape))
        buf = block.reshape(-1).view(np.uint8)
        isz = self.dtype.itemsize
        for off, nbytes, pos in self._runs(bounds):
            os.pwrite(self._fd, memoryview(buf[pos * isz : pos * isz + nbytes]), off)

    def flush(self) -> None:
        os.fsync(self._fd)


@dataclass
class ImageData:
    """An image as read from disk, not yet loaded.

    Attributes
    ----------
    data : array-like
        Numpy array, :class:`RawArray` or zarr array, axes in file order.
    axes : str
        One letter of ``"TZCYX"`` per axis of ``data``.
    path : Path or None
        The file it came from.
    storage : str
        ``"file"`` (read on demand with pread), ``"zarr"`` or ``"memory"``.
    """

    data: Any
    axes: str
    path: Path | None = None
    storage: str = "memory"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def channels(self) -> int:
        return self.shape[self.axes.index("C")] if "C" in self.axes else 1

    def describe(self) -> str:
        dims = " x ".join(f"{a}={s}" for a, s in zip(self.axes, self.shape))
        return f"{dims}, {np.dtype(self.data.dtype).name}, {self.storage}"


def parse_axes(axes: str, ndim: int, *, where: str = "image") -> str:
    """Check a user-given axes string (letters of ``TZCYX``, each once, ending with ``YX``)."""
    axes = axes_letters(axes)
    if len(axes) != ndim:
        raise InputError(f"{where}: axes {axes!r} have {len(axes)} letters for {ndim} dimensions")
    if not distinct_axes(axes):
        raise InputError(f"{where}: axes {axes!r} must use each of T, Z, C, Y, X at most once")
    if "Y" not in axes or "X" not in axes:
        if ndim < 2:
            raise InputError(f"{where}: a {ndim}-dimensional array is not an image (it needs "
                             "at least Y and X)")
        raise InputError(f"{where}: axes {axes!r} must contain Y and X")
    return axes


def guess_axes(shape: Sequence[int], *, rgb: bool = False) -> str:
    """Axes of an array without metadata: YX, ZYX, TZYX (plus a last C axis when ``rgb``)."""
    n = len(shape) - (1 if rgb else 0)
    base = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(n)
    if base is None:
        raise InputError(f"cannot guess the axes of an array of shape {tuple(shape)}")
    return base + ("C" if rgb else "")


def _axes_from_tiff(file_axes: str, shape: Sequence[int], path: Path) -> str:
    """Map tifffile's axes letters to TZCYX; unknown leading axes become Z, then T."""
    out: list[str | None] = []
    for letter in file_axes:
        if letter in "YX":
            out.append(letter)
        elif letter in "SC":
            out.append("C")
        elif letter in "ZT":
            out.append(letter)
        else:
            out.append(None)
    # two channel-like axes (e.g. RGB samples in a multi-channel file) cannot be handled
    if out.count("C") > 1:
        raise InputError(f"{path}: more than one channel axis in {file_axes!r}; pass --axes")
    for i in reversed(range(len(out))):
        if out[i] is None:
            for candidate in "ZT":
                if candidate not in out:
                    out[i] = candidate
                    break
            else:
                raise InputError(
                    f"{path}: cannot tell what the axes {file_axes!r} of shape {tuple(shape)} "
                    "are; pass them explicitly (e.g. --axes TZYX)"
                )
    axes = "".join(a for a in out if a is not None)
    return parse_axes(axes, len(shape), where=str(path))


def read_image(
    path: str | os.PathLike[str], *, axes: str | None = None, lazy: bool = True
) -> ImageData:
    """Open a TIFF / OME-TIFF image without loading it.

    Parameters
    ----------
    path : path-like
        The file.
    axes : str, optional
        Override the axes found in the metadata (letters of ``TZCYX``, e.g. ``"ZCYX"``).
    lazy : bool
        If False, load the data into memory.

    Raises
    ------
    InputError
        Missing file, not a TIFF, corrupt or truncated TIFF, empty image, unsupported dtype.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    log = _TiffLog()
    try:
        with log, tifffile.TiffFile(path) as tif:
            series = tif.series[0] if tif.series else None
            if series is None or len(series.shape) == 0:
                detail = f" ({log.messages[-1][:200]})" if log.messages else ""
                raise InputError(f"{path}: corrupt TIFF: no readable image{detail}")
            shape = tuple(int(s) for s in series.shape)
            dtype = np.dtype(series.dtype)
            file_axes = series.axes
            offset = series.dataoffset
    except InputError:
        raise
    except tifffile.TiffFileError as exc:
        raise InputError(f"{path}: not a TIFF file or its header is corrupt ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault
        raise InputError(f"{path}: corrupt TIFF ({exc.__class__.__name__}: {exc})") from None
    if log.messages and offset is None:
        raise InputError(f"{path}: corrupt TIFF ({log.messages[0][:200]})")
    if min(shape) == 0:
        raise InputError(f"{path}: empty image (shape {shape})")
    if dtype.kind not in "buif":
        raise InputError(f"{path}: unsupported pixel type {dtype}")
    axes = (
        parse_axes(axes, len(shape), where=str(path))
        if axes
        else _axes_from_tiff(file_axes, shape, path)
    )
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if offset is not None and offset + nbytes > size:
        raise InputError(
            f"{path}: truncated TIFF: the image needs {nbytes:,} bytes from offset {offset:,} "
            f"but the file has {size:,} bytes"
        )
    data: Any
    storage = "memory"
    data = None
    if offset is not None:
        data = RawArray(path, offset, shape, dtype.newbyteorder(_byteorder(path)))
        storage = "file"
    if data is None:
        if nbytes > _IN_MEMORY_LIMIT and lazy:
            try:
                import zarr

                store = tifffile.imread(path, aszarr=True)
                data = zarr.open(store, mode="r")
                storage = "zarr"
            except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault
                raise InputError(f"{path}: cannot open lazily: {exc}") from None
        else:
            data = _read_all(path)
    if tuple(data.shape) != shape:
        data = np.asarray(data).reshape(shape)
    if not lazy and storage != "memory":
        data = np.asarray(data[...])
        storage = "memory"
    return ImageData(data=data, axes=axes, path=path, storage=storage)


class _TiffLog(logging.Handler):
    """Collects tifffile's error log (instead of letting it flood stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.messages.append(record.getMessage())

    def __enter__(self) -> _TiffLog:
        self._logger = logging.getLogger("tifffile")
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


def _byteorder(path: Path) -> str:
    with open(path, "rb") as fh:
        return "<" if fh.read(2) == b"II" else ">"


def _read_all(path: Path) -> np.ndarray:
    with _TiffLog() as log:
        try:
            data = tifffile.imread(path)
        except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault
            raise InputError(f"{path}: corrupt TIFF ({exc.__class__.__name__}: {exc})") from None
    if log.messages:
        raise InputError(f"{path}: corrupt TIFF ({log.messages[0][:200]})")
    return data


def _default_mode() -> int:
    """Permissions a newly created file would get (mkstemp creates files with 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Give ``tmp`` normal permissions and rename it to ``path`` atomically."""
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def label_values(class_values: Sequence[int], background_class: int | None = 1) -> list[int]:
    """Label value written for each class: its class value, 0 for the background class."""
    return [0 if v == background_class else int(v) for v in class_values]


def label_dtype(max_value: int) -> np.dtype:
    """Smallest unsigned integer type holding ``0..max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"label value {max_value} too large")


def check_output_folder(folder: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Make sure ``folder`` exists (creating it if asked) and is writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} exists and is not a folder")
    if not folder.exists():
        if not create:
            raise OutputError(f"output folder {folder} does not exist")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {folder}: {exc.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".paintseg-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable: {exc.strerror}") from None
    return folder


class OutputTiff:
    """A TIFF being written in place (``.array``, a writable :class:`RawArray`), renamed when
    committed.

    Use as a context manager: on an exception the temporary file is removed and nothing
    appears under the final name.

    Parameters
    ----------
    path : path-like
        Final name.
    shape : sequence of int
        Array shape.
    dtype : numpy dtype
        Pixel type.
    axes : str
        Axes letters, stored in the metadata.
    """

    def __init__(
        self, path: str | os.PathLike[str], shape: Sequence[int], dtype: Any, *, axes: str
    ) -> None:
        self.path = Path(path)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".partial.tif", dir=self.path.parent
        )
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            offset, _ = tifffile.imwrite(
                self.tmp,
                shape=tuple(shape),
                dtype=dtype,
                bigtiff=nbytes > _BIGTIFF_LIMIT,
                photometric="minisblack",
                metadata={"axes": axes},
                returnoffset=True,
            )
            self.array = RawArray(self.tmp, offset, shape, dtype.newbyteorder("<"), writable=True)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> Path:
        """Flush and rename to the final name."""
        self.array.flush()
        self.array.close()
        return publish(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the temporary file."""
        if hasattr(self, "array"):
            self.array.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> OutputTiff:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


class OutputZarr:
    """An OME-Zarr image (NGFF 0.4, zarr format 2, one resolution) written under a temporary
    folder name and renamed when committed, like :class:`OutputTiff`. napari opens it lazily.

    Parameters
    ----------
    path : path-like
        Final folder name (``....ome.zarr``).
    shape, dtype, axes
        As for :class:`OutputTiff`; chunks are whole planes of at most 1024 x 1024 pixels.
    labels : bool
        Mark it as a label image (NGFF ``image-label``).
    """

    def __init__(self, path: str | os.PathLike[str], shape: Sequence[int], dtype: Any, *,
                 axes: str, labels: bool = True) -> None:
        try:
            import zarr
        except ImportError:
            raise OutputError("OME-Zarr output needs zarr: pip install zarr") from None
        self.path = Path(path)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                         dir=self.path.parent))
        try:
            group = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
            shape = tuple(int(s) for s in shape)
            chunks = tuple([1] * (len(shape) - 2) + [min(s, 1024) for s in shape[-2:]])
            # every chunk is stored, zeros included, so a missing chunk file means damage
            self.array = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype,
                                            fill_value=0, config={"write_empty_chunks": True})
            kinds = {"T": "time", "C": "channel"}
            group.attrs["multiscales"] = [{
                "version": "0.4",
                "name": self.path.name,
                "axes": [{"name": a.lower(), "type": kinds.get(a, "space")} for a in axes],
                "datasets": [{"path": "0", "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * len(shape)}]}],
            }]
            if labels:
                group.attrs["image-label"] = {"version": "0.4"}
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def commit(self) -> Path:
        """Rename the finished folder to its final name (replacing an older one)."""
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> OutputZarr:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def open_output(path: str | os.PathLike[str], shape: Sequence[int], dtype: Any, *, axes: str,
                fmt: str = "tiff") -> OutputTiff | OutputZarr:
    """A new output image in ``fmt`` (``"tiff"`` or ``"zarr"``), written atomically."""
    if fmt == "zarr":
        return OutputZarr(path, shape, dtype, axes=axes)
    if fmt == "tiff":
        return OutputTiff(path, shape, dtype, axes=axes)
    raise ValueError(f"output format must be 'tiff' or 'zarr', got {fmt!r}")


def write_tiff(
    path: str | os.PathLike[str], array: np.ndarray, *, axes: str, compression: str | None = None
) -> Path:
    """Write an in-memory array atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path, suffix=".partial.tif") as tmp:
        tifffile.imwrite(
            tmp,
            array,
            bigtiff=array.nbytes > _BIGTIFF_LIMIT,
            photometric="minisblack",
            metadata={"axes": axes},
            compression=compression,
        )
    return path


def list_images(
    folder: str | os.PathLike[str], *, pattern: str = "*.tif*", recursive: bool = True
) -> Iterator[Path]:
    """TIFF files under ``folder`` matching ``pattern``, sorted, hidden and partial files
    skipped."""
    folder = Path(folder)
    paths = folder.rglob("*") if recursive else folder.glob("*")
    for p in sorted(paths):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if fnmatch.fnmatch(p.name.lower(), pattern.lower()):
            yield p
