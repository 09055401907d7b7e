"""File > Open Sample > paintseg: small real images shipped with the package."""

from __future__ import annotations

from importlib.resources import as_file, files
from typing import Any

import tifffile

__all__ = ["nuclei_2d", "nuclei_3d", "sample_path"]


def _read(name: str) -> Any:
    with as_file(files("paintseg") / "sample_data" / name) as path:
        return tifffile.imread(path)


def sample_path(name: str) -> str:
    """Path of a bundled sample file (e.g. ``"nuclei2d.tif"``)."""
    return str(files("paintseg") / "sample_data" / name)


def nuclei_2d() -> list[tuple[Any, dict[str, Any], str]]:
    """Nuclei from the 2018 Data Science Bowl (512x512, fluorescence)."""
    return [(_read("nuclei2d.tif"), {"name": "nuclei2d"}, "image")]


def nuclei_3d() -> list[tuple[Any, dict[str, Any], str]]:
    """Confocal nuclei stack (60x256x256, ZYX) from scikit-image's cells3d."""
    return [(_read("nuclei3d.tif"), {"name": "nuclei3d"}, "image")]
