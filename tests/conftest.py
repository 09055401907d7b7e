from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from paintseg.config import ModelConfig
from paintseg.model import new_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src" / "paintseg" / "sample_data"


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


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def balls3d_model() -> Path:
    """A small 3D instance model for blurred balls (trained by scripts/train_test_model3d.py)."""
    return ROOT / "tests" / "data" / "balls3d.pt"


@pytest.fixture(scope="session")
def balls3d(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 48 x 96 x 96 volume of balls the model never saw (another seed), and its labels."""
    image, labels = _script("train_test_model3d").balls((48, 96, 96), 45, seed=3)
    path = tmp_path_factory.mktemp("balls") / "balls.tif"
    tifffile.imwrite(path, image, metadata={"axes": "ZYX"})
    return path, labels


@pytest.fixture
def without_onnx(monkeypatch):
    """Packages written without ONNX weights, as where onnx is not installed (their export
    is most of a package's time; the starter's package in test_exchange.py tests them)."""
    import paintseg.exchange

    monkeypatch.setattr(paintseg.exchange, "_onnx_weights",
                        lambda *a, notes, **k: notes.append("no ONNX weights (test)") or False)
