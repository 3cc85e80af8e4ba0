"""Policies over continuous action spaces: Tanbr and the baselines it must beat.

Every policy has two verbs, ``select(context) -> action`` and
``update(context, action, reward, *, type_rewards=None)``, takes an explicit
``numpy.random.Generator`` and survives a pickle round trip. Build one by name with
:func:`make_policy`::

    policy = make_policy("tanbr", space=Simplex(4), context_dim=4, rng=np.random.default_rng(0))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tanbr.bandit.base import ActionSpace, Policy, PolicyFactory
from tanbr.bandit.egreedy import EpsilonGreedyGrid
from tanbr.bandit.hoo import HOO
from tanbr.bandit.linucb import LinUCBGrid
from tanbr.bandit.neural_grid import NeuralGrid, neural_grid_anchored
from tanbr.bandit.nucb import NeuralUCBRandom, nucb_anchored
from tanbr.bandit.partition import PartitionTree
from tanbr.bandit.simple import FixedPolicy, PlugIn, RandomPolicy
from tanbr.bandit.spaces import Box, Simplex, SparseSimplex, lattice
from tanbr.bandit.tanbr import Tanbr
from tanbr.bandit.tanbr_paper import TanbrPaper

POLICIES: dict[str, PolicyFactory] = {
    "tanbr": Tanbr,
    "tanbr-paper": TanbrPaper,
    "nucb": NeuralUCBRandom,
    "nucb-anchored": nucb_anchored,
    "neural-grid": NeuralGrid,
    "neural-grid-anchored": neural_grid_anchored,
    "hoo": HOO,
    "linucb-grid": LinUCBGrid,
    "egreedy-grid": EpsilonGreedyGrid,
    "random": RandomPolicy,
    "fixed": FixedPolicy,
    "plug-in": PlugIn,
}


def make_policy(
    name: str,
    *,
    space: ActionSpace,
    context_dim: int,
    rng: np.random.Generator,
    **params: Any,
) -> Policy:
    """Build the policy registered as ``name``; ``params`` are its keyword hyperparameters."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    try:
        return POLICIES[name](space=space, context_dim=context_dim, rng=rng, **params)
    except TypeError as err:  # an unknown keyword: name it instead of a traceback
        raise ValueError(f"bad parameters for policy {name!r}: {err}") from err


__all__ = [
    "HOO",
    "POLICIES",
    "ActionSpace",
    "Box",
    "EpsilonGreedyGrid",
    "FixedPolicy",
    "LinUCBGrid",
    "NeuralGrid",
    "NeuralUCBRandom",
    "PartitionTree",
    "PlugIn",
    "Policy",
    "PolicyFactory",
    "RandomPolicy",
    "Simplex",
    "SparseSimplex",
    "Tanbr",
    "TanbrPaper",
    "lattice",
    "make_policy",
]
