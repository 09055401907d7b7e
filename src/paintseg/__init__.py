"""paintseg: interactive microscopy segmentation with a U-Net (napari plugin and CLI).

The core (this package except :mod:`paintseg._napari`) imports neither Qt nor napari.
"""

from __future__ import annotations

__version__ = "0.1.0"
