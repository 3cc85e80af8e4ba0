"""Geometry of the binary partition: exact coverage and geometric shrinkage of diameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tanbr.bandit.partition import PartitionTree, split_to_depth
from tanbr.bandit.spaces import Box, Simplex


def grow_randomly(tree: PartitionTree, n_splits: int, rng: np.random.Generator) -> None:
    for _ in range(n_splits):
        leaves = tree.leaves()
        tree.split(int(rng.choice(leaves)))


def check_exact_cover(tree: PartitionTree, rng: np.random.Generator, n_points: int = 300) -> None:
    leaves = tree.leaves()
    # Volumes of the leaves add up to the whole space ...
    assert math.isclose(sum(tree.volume(int(n)) for n in leaves), 1.0, rel_tol=1e-9)
    # ... every leaf lies inside the space ...
    for n in leaves:
        verts = tree.vertices(int(n))
        if isinstance(tree.space, Simplex):
            assert all(tree.space.contains(v) for v in verts)
        else:
            assert tree.space.contains(verts[0]) and tree.space.contains(verts[1])
    # ... and a random point lies in exactly one leaf (cuts have measure zero), the one
    # that ``locate`` finds.
    points = tree.space.sample(rng, n_points)
    for p in points:
        owners = [int(n) for n in leaves if tree.contains(int(n), p)]
        assert owners == [tree.locate(p)]


@pytest.mark.parametrize("k", [2, 3, 4, 6, 8])
def test_simplex_tree_covers_the_space_exactly_at_every_step(k: int) -> None:
    rng = np.random.default_rng(k)
    tree = PartitionTree(Simplex(k))
    check_exact_cover(tree, rng, 20)
    for _ in range(8):
        grow_randomly(tree, 10, rng)
        check_exact_cover(tree, rng, 40)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_box_tree_covers_the_space_exactly_at_every_step(d: int) -> None:
    rng = np.random.default_rng(d)
    tree = PartitionTree(Box(low=tuple(-np.arange(1, d + 1.0)), high=tuple(np.ones(d) * 2)))
    for _ in range(8):
        grow_randomly(tree, 10, rng)
        check_exact_cover(tree, rng, 40)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 7), seed=st.integers(0, 2**16), n=st.integers(0, 40))
def test_children_halve_their_parent_and_share_its_vertices(k: int, seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    tree = PartitionTree(Simplex(k))
    grow_randomly(tree, n, rng)
    for node in range(tree.n_nodes):
        kids = tree.children(node)
        if kids is None:
            continue
        parent_v = tree.vertices(node)
        for child in kids:
            assert tree.volume(child) == pytest.approx(tree.volume(node) / 2, rel=1e-9)
            assert tree.depth(child) == tree.depth(node) + 1
            # a child keeps all but one vertex; the new one is the midpoint of the longest edge
            shared = sum(any(np.allclose(v, w) for w in parent_v) for v in tree.vertices(child))
            assert shared == k - 1
        new = [v for v in tree.vertices(kids[0]) if not any(np.allclose(v, w) for w in parent_v)]
        pairs = [(a, b) for i, a in enumerate(parent_v) for b in parent_v[i + 1 :]]
        longest = max(np.linalg.norm(a - b) for a, b in pairs)
        assert any(
            np.allclose((a + b) / 2, new[0]) and np.isclose(np.linalg.norm(a - b), longest)
            for a, b in pairs
        )


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7, 8])
def test_simplex_diameters_shrink_geometrically(k: int) -> None:
    """Longest-edge bisection: every n = K-1 levels shrink the diameter by sqrt(3)/2 at least
    (Kearfott, 1978), and on average diameters halve every n levels."""
    n = k - 1
    rng = np.random.default_rng(100 + k)
    for _ in range(10):
        tree = PartitionTree(Simplex(k))
        node, diams = 0, [tree.diameter(0)]
        for _ in range(6 * n):
            node = tree.split(node)[int(rng.integers(2))]
            diams.append(tree.diameter(node))
        d = np.array(diams)
        assert np.all(d[n:] <= math.sqrt(3) / 2 * d[:-n] + 1e-12)
        bound = d[0] * (math.sqrt(3) / 2) ** (np.arange(len(d)) // n)
        assert np.all(d <= bound + 1e-12)
    if k <= 4:  # uniform refinement: after 3n levels every cell is below half the root
        tree = PartitionTree(Simplex(k))
        split_to_depth(tree, 3 * n)
        assert max(tree.diameter(int(v)) for v in tree.leaves()) <= tree.diameter(0) / 2 + 1e-12


@pytest.mark.parametrize("d", [1, 2, 4])
def test_box_diameters_halve_every_d_levels(d: int) -> None:
    tree = PartitionTree(Box(low=(0.0,) * d, high=tuple(float(i + 1) for i in range(d))))
    split_to_depth(tree, 2 * d + 1)
    for node in range(tree.n_nodes):
        h = tree.depth(node)
        assert tree.diameter(node) <= tree.diameter(0) * 0.5 ** (h // d) + 1e-12


def test_centres_are_inside_and_on_their_own_cut() -> None:
    """A centre is interior to its cell; after a split it lies on the cut (so policies match
    a late action to the node by its centre, not to a child)."""
    for space in (Simplex(4), Box(low=(0.0, 0.0), high=(1.0, 2.0))):
        tree = PartitionTree(space)
        c = tree.center(0)
        a, b = tree.split(0)
        assert tree.contains(a, c) and tree.contains(b, c)
        assert tree.locate(c) == a  # points on a cut go to the first child
        assert not np.allclose(tree.center(a), c)


def test_sampled_points_fall_in_their_cell() -> None:
    rng = np.random.default_rng(0)
    for space in (Simplex(5), Box(low=(0.0, -1.0, 2.0), high=(1.0, 1.0, 3.0))):
        tree = PartitionTree(space)
        grow_randomly(tree, 30, rng)
        leaves = tree.leaves()
        for _ in range(5):
            points = tree.sample(leaves, rng)
            assert [tree.locate(p) for p in points] == leaves.tolist()


def test_bad_input_is_rejected() -> None:
    tree = PartitionTree(Simplex(3))
    with pytest.raises(ValueError, match="not in the space"):
        tree.locate(np.array([0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="not in the space"):
        tree.locate(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="no node"):
        tree.split(5)
    tree.split(0)
    with pytest.raises(ValueError, match="already split"):
        tree.split(0)
    with pytest.raises(ValueError, match="Simplex, SparseSimplex or Box"):
        PartitionTree("simplex")  # type: ignore[arg-type]
