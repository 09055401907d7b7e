"""Train the small 3D instance model the tests use (``tests/data/balls3d.pt``).

It segments synthetic blurred balls in noise (:func:`balls`), so that the tests of 3D
instance output (blocks of one volume joined across their borders) see real objects. Trained
on the CPU with a fixed seed and step count (about 2 minutes on 2 cores)::

    python scripts/train_test_model3d.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def balls(shape: tuple[int, int, int], n: int, seed: int, *, radius: tuple[float, float] = (5, 8)
          ) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 volume of ``n`` blurred balls of random brightness in noise, and their labels
    (balls overlap at most 5% of their volume, so some touch)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    grid = np.indices(shape)
    k = 0
    for _ in range(n * 5):
        r = rng.uniform(*radius)
        c = [rng.uniform(r, s - r) for s in shape]
        ball = sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r
        if (labels[ball] > 0).mean() > 0.05:
            continue
        k += 1
        labels[ball & (labels == 0)] = k
        if k == n:
            break
    brightness = rng.uniform(0.6, 1.0, k + 1)
    image = ndi.gaussian_filter((labels > 0) * brightness[labels], 1.0)
    image = image + rng.normal(0, 0.08, shape)
    return (image * 1000 + 200).clip(0, 65535).astype(np.uint16), labels


def main() -> None:
    from paintseg.config import ModelConfig, TrainConfig
    from paintseg.model import new_model, save_model
    from paintseg.training import prepare_data, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "tests" / "data"
                                             / "balls3d.pt"))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    image, labels = balls((40, 96, 96), 40, seed=0)
    data = prepare_data([(image, labels)], dims=3, labels_kind="instances", seed=0)
    cfg = ModelConfig(dims=3, classes=3, depth=2, base_features=8, features=(1.0, 2.0))
    model = new_model(cfg, class_values=data.class_values, class_names=data.class_names, seed=0)
    model.provenance["output"] = "instances"
    done = train(model, data, TrainConfig(steps=args.steps, seed=0, batch_size=4), device="cpu")
    model.provenance["trained_on"] = "synthetic balls (scripts/train_test_model3d.py)"
    save_model(model, args.out)
    print(f"wrote {args.out} ({done.step} steps in {done.elapsed:.0f} s)")


if __name__ == "__main__":
    main()
