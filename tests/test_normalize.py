"""Intensity percentiles: the histogram path for 8- and 16-bit images equals np.percentile."""

from __future__ import annotations

import numpy as np
import pytest

from paintseg.config import NormConfig
from paintseg.normalize import percentile_range


def _reference(image: np.ndarray, norm: NormConfig) -> tuple[np.ndarray, np.ndarray]:
    flat = image.reshape(image.shape[0], -1).astype(np.float32)
    lo, hi = np.percentile(flat, (norm.low, norm.high), axis=1).astype(np.float32)
    return lo, hi


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.bool_])
@pytest.mark.parametrize("size", [1, 2, 7, 1001, 65536])
@pytest.mark.parametrize("q", [(1.0, 99.8), (0.0, 100.0), (37.3, 50.0)])
def test_integer_percentiles_equal_numpy(dtype, size, q):
    rng = np.random.default_rng(size)
    if dtype is np.bool_:
        img = rng.integers(0, 2, (2, size)).astype(bool)
    else:
        info = np.iinfo(dtype)
        img = rng.integers(info.min, int(info.max) + 1, (2, size)).astype(dtype)
    norm = NormConfig(low=q[0], high=q[1])
    lo, hi = percentile_range(img, norm)
    ref_lo, ref_hi = _reference(img, norm)
    assert lo.dtype == hi.dtype == np.float32
    np.testing.assert_array_equal(lo, ref_lo)
    np.testing.assert_array_equal(hi, ref_hi)


def test_percentiles_of_the_real_image_equal_numpy(nuclei2d):
    norm = NormConfig()
    img = nuclei2d[np.newaxis]
    assert img.dtype == np.uint16
    for got, ref in zip(percentile_range(img, norm), _reference(img, norm)):
        np.testing.assert_array_equal(got, ref)
    # the float path gives the same numbers
    for got, ref in zip(percentile_range(img.astype(np.float32), norm), _reference(img, norm)):
        np.testing.assert_array_equal(got, ref)


def test_skewed_16_bit_image_with_few_bright_pixels():
    # most pixels dark, a few saturated: the high percentile falls between two far values
    img = np.full((1, 100, 100), 100, np.uint16)
    img[0, 0, :20] = 65535  # 0.2%: rank 9979.002 of 10000 lies between 100 and 65535
    norm = NormConfig(low=1.0, high=99.8)
    for got, ref in zip(percentile_range(img, norm), _reference(img, norm)):
        np.testing.assert_array_equal(got, ref)
