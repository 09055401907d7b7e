"""How much a model about to be continued agrees with the strokes, as the warning before
continuing measures it (``paintseg.training.painted_agreement``: the share of the pixels painted
as each class that the model predicts as that class).

The benchmark's strokes (``interactive.py``), 5 draws each:

- the bundled starter model on DSB2018, on DSB2018 with inverted contrast (dark nuclei on a
  bright background, data unlike its own) and on the cells3d stack;
- a new U-Net after a first round of ``--budget`` seconds, with correction strokes in its
  errors added to its strokes (as ``interactive.py --rounds 2`` paints them), and those
  correction strokes alone.

Usage::

    python benchmarks/agreement.py [--budget 30] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse

import numpy as np
from interactive import add_corrections, dataset

from paintseg.config import TrainConfig
from paintseg.inference import segment
from paintseg.model import load_model
from paintseg.training import DISAGREEMENT, iter_train, painted_agreement, prepare_training


def agreement(model, pairs, seed: int) -> str:
    try:
        data, model = prepare_training(pairs, base=model, dims=2, in_channels=1, seed=seed)
    except ValueError as exc:  # e.g. corrections of one class only
        return f"not trainable alone ({str(exc).split(';')[0]})"
    share = painted_agreement(model, data, device="cpu")
    low = " <- warned" if min(share.values()) < DISAGREEMENT else ""
    return ", ".join(f"class {c} {v:.0%}" for c, v in share.items()) + low


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=30.0, help="first round, seconds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    starter = load_model("nuclei")
    print(f"warning below {DISAGREEMENT:.0%} for a painted class (1 background, 2 object)")
    for name in ("dsb2018", "dsb2018-inverted", "nuclei3d"):
        for seed in args.seeds:
            train, _, _ = dataset(name, np.random.default_rng(seed))
            print(f"starter on {name}, seed {seed}: {agreement(starter, train, seed)}", flush=True)
    for name in ("nuclei3d", "dsb2018"):
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            train, _, (k, fz, fix_gt) = dataset(name, rng, corrections=True)
            painted = sum(int((lab > 0).sum()) for _, lab in train)
            data, model = prepare_training(train, base=None, dims=2, in_channels=1,
                                           preset="fast", seed=seed)
            for _ in iter_train(model, data, TrainConfig(time_budget=args.budget, seed=seed),
                                device="cpu"):
                pass
            img, lab = train[k][0], train[k][1].copy()
            pred = segment(img if fz is None else img[fz], model, axes="YX", device="cpu").labels
            plane = lab if fz is None else lab[fz]
            new = add_corrections(plane, pred, fix_gt, painted=painted, rng=rng)
            only = np.zeros_like(lab)
            (only if fz is None else only[fz])[new] = plane[new]
            print(f"round 2 on {name}, seed {seed}: with its strokes "
                  f"{agreement(model, [(img, lab)], seed)}; corrections alone "
                  f"{agreement(model, [(img, only)], seed)}", flush=True)


if __name__ == "__main__":
    main()
