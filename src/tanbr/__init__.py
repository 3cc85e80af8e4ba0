"""Tanbr: task-aware expert merging for online MoE inference.

Each time slot Tanbr estimates the mix of tasks in unlabeled requests, lets a tree-structured
neural contextual bandit (the *policy*) choose how to merge every MoE layer's experts into one,
serves the slot with that merged model and learns from the reward.

The package has three loosely joined worlds:

* :mod:`tanbr.bandit`: policies over continuous action spaces (numpy and a small MLP).
* :mod:`tanbr.model`: MoE discovery, merging and serving on transformers models.
* :mod:`tanbr.experiment`: workloads, the slot loop, reports.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
