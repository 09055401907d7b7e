"""Choosing the torch device: CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .errors import PaintsegError

__all__ = ["resolve_device", "describe_device", "memory_available", "amp_dtype", "flush_denormals",
           "keep_freed_memory", "glibc", "cpu_has_bf16_units", "training_autocast",
           "inference_autocast", "type_name", "describe_precision"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"`` into a usable device.

    ``"auto"`` picks CUDA when a GPU is visible, then MPS, then the CPU. Asking for a device
    this machine lacks raises :class:`PaintsegError` saying why.
    """
    if isinstance(name, torch.device):
        return name
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support (install a CUDA build of torch, see README)"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise PaintsegError(f"device {name!r} requested but {why}")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PaintsegError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        return dev
    if name == "mps":
        if not _mps_available():
            raise PaintsegError("device 'mps' requested but Apple MPS is not available here")
        return torch.device("mps")
    raise PaintsegError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)}")


def describe_device(device: torch.device) -> str:
    """A short human-readable name, e.g. ``cuda:0 (NVIDIA H100, 80 GiB)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return f"cuda:{idx} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


def memory_available(device: torch.device) -> int:
    """Bytes of memory free for work on ``device`` (host memory for CPU and MPS)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type of a CUDA device (bf16 where it has it, else fp16); None
    (float32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX: ``amx_bf16`` among
    the flags of Linux's ``/proc/cpuinfo``). False where that cannot be read (other systems)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def training_autocast(device: torch.device, precision: str) -> torch.dtype | None:
    """The number type a training step runs its U-Nets in on ``device``
    (:attr:`~paintseg.config.TrainConfig.precision`); None for float32.

    ``"auto"`` is bfloat16 on a CPU with bfloat16 matrix units (:func:`cpu_has_bf16_units`)
    and float32 elsewhere (GPUs included: not measured there yet). ``"bfloat16"`` on a CUDA
    device without bfloat16 support, or on Apple MPS, raises
    :class:`~paintseg.errors.PaintsegError`.
    """
    if precision == "auto":
        return _cpu_units_type(device)
    return _explicit_precision(device, precision, "training")


def inference_autocast(device: torch.device, precision: str, *,
                       exact: bool = False) -> torch.dtype | None:
    """The number type segmentation runs its U-Nets in on ``device``
    (:attr:`~paintseg.config.TileConfig.precision`); None for float32.

    ``"auto"`` is float32 for ``exact`` tiling (its output equals untiled inference in
    float32); otherwise :func:`amp_dtype` on a CUDA device, bfloat16 on a CPU with bfloat16
    matrix units (:func:`cpu_has_bf16_units`) and float32 elsewhere (Apple MPS included).
    ``"bfloat16"`` on a CUDA device without bfloat16 support, or on Apple MPS, raises
    :class:`~paintseg.errors.PaintsegError`.
    """
    if precision == "auto":
        if exact:
            return None
        return amp_dtype(device) if device.type == "cuda" else _cpu_units_type(device)
    return _explicit_precision(device, precision, "segmentation")


def type_name(dtype: torch.dtype | None) -> str:
    """``"float32"`` for None (no autocast), else the type's name (``"bfloat16"``)."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def describe_precision(device: torch.device) -> str:
    """The number types the U-Nets run in on ``device`` by default (precision ``"auto"``),
    e.g. ``"U-Nets in bfloat16"`` or ``"U-Nets in bfloat16 to segment, float32 to train"``."""
    seg = type_name(inference_autocast(device, "auto"))
    train = type_name(training_autocast(device, "auto"))
    return f"U-Nets in {seg}" if seg == train else f"U-Nets in {seg} to segment, {train} to train"


def _cpu_units_type(device: torch.device) -> torch.dtype | None:
    """bfloat16 on a CPU with bfloat16 matrix units, else None (float32)."""
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_units() else None


def _explicit_precision(device: torch.device, precision: str, task: str
                        ) -> torch.dtype | None:
    """The type of ``precision`` ``"float32"`` (None) or ``"bfloat16"`` on ``device``."""
    if precision == "float32":
        return None
    if precision != "bfloat16":
        raise ValueError(f"unknown precision {precision!r}")
    if device.type == "mps" or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        raise PaintsegError(f"{task} in bfloat16 is not supported on "
                            f"{describe_device(device)}; use precision float32")
    return torch.bfloat16


_flushing = threading.local()  # per thread: how many flush_denormals blocks are open


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Inside, the CPU treats denormal floats as zero (the calling thread and torch's intra-op
    threads); leaving the outermost block restores torch's default. Blocks may nest (inference
    inside training).

    Leaky-ReLU networks produce many tiny negative values whose products underflow into
    denormals, which x86 CPUs compute many times slower than normal floats. Where the CPU
    does not support the setting, nothing changes.
    """
    depth = getattr(_flushing, "depth", 0)
    supported = torch.set_flush_denormal(True) if depth == 0 else False
    _flushing.depth = depth + 1
    try:
        yield
    finally:
        _flushing.depth = depth
        if supported:
            torch.set_flush_denormal(False)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCKS_UP_TO = 512 * 2**20  # allocations up to this size come from the heap
_KEEP_FREE_UP_TO = 2**30  # free memory at the heap's top kept for the next allocations


@functools.cache
def keep_freed_memory() -> bool:
    """Have the C allocator keep the memory the process frees for its next allocations
    (Linux with glibc); True where it does. Called once per process, by the first
    segmentation or training; later calls change nothing.

    By default glibc maps each block above its threshold (128 KB at first, rising to at
    most 32 MB) as fresh pages of the operating system and returns them when freed, and
    trims the heap's top once 128 KB lie free there, so every forward pass over a large
    plane pays again for the kernel to map and zero its activations. Here blocks up to
    512 MB come from the heap, and up to 1 GB of free memory at its top stays in the process
    (reused by the next plane, window or training step, not returned to the system). The
    peak is what the largest step needs, as before; the process keeps that much between
    jobs. Elsewhere (macOS, Windows, musl) nothing changes.
    """
    libc = glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_UP_TO)) \
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_UP_TO))


def glibc() -> Any:
    """The C library as a :class:`ctypes.CDLL` where it is glibc on Linux, else None."""
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
