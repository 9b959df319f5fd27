#!/usr/bin/env python
"""Gather a Hydra multirun of dtop-eval (or dtop-train) runs into one trade-off table and plot.

    dtop-eval -m model.pruning.threshold=0.8,0.9,0.95,0.98 ckpt_path=<run>/checkpoints/best.ckpt
    python scripts/collect_sweep.py logs/eval/multiruns/<time> [--gmacs gmacs_linear] [--out DIR]

Writes sweep.csv, sweep.md and sweep.png into the multirun dir (:mod:`dtop.sweeps`).
"""

from dtop.sweeps import main

if __name__ == "__main__":
    main()
