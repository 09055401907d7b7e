from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from paintseg.config import ModelConfig
from paintseg.model import new_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data"


@pytest.fixture(autouse=True)
def _no_grad_leak():
    torch.set_grad_enabled(True)
    yield


@pytest.fixture(scope="session")
def nuclei2d() -> np.ndarray:
    return tifffile.imread(SAMPLES / "nuclei2d.tif")


@pytest.fixture(scope="session")
def nuclei2d_path() -> Path:
    return SAMPLES / "nuclei2d.tif"


@pytest.fixture(scope="session")
def nuclei3d_path() -> Path:
    return SAMPLES / "nuclei3d.tif"


@pytest.fixture
def small_model():
    """A small 2D model (depth 3): fast, with a 16-pixel pooling grid."""
    return new_model(ModelConfig(dims=2, depth=3, base_features=8), seed=0)


@pytest.fixture
def small_model_3d():
    return new_model(ModelConfig(dims=3, depth=2, base_features=4), seed=0)
