"""Plans: what a merge is asked to build, per MoE block, and the checks they must pass.

A plan maps each block name to its coeffs, in one of two forms:

* ``(E,)`` -- one merged expert: a point of the simplex over the block's E experts;
* ``(m, E)`` -- m merged experts (a grouped merge): row g holds the coeffs of merged expert g,
  a point of the simplex. The rows' supports (the experts with a weight > 0) must be disjoint:
  they are the groups, a partition of some of the experts. An expert in no group (a zero
  column) is dropped: its parameters are not read and its gate probability counts for no group.

The group of a merged expert is its support, whatever the size of the weights inside it: the
weights only shape the parameter average, and the router scores a group by the sum of its
members' gate probabilities (see :class:`~tanbr.model.blocks.GroupedBlock`).

A block's value may also be :class:`MergedWeights`: the merged dense expert's tensors
themselves, for merges that are not a weighted average with one scalar per expert (RegMean,
Fisher-weighted averaging, see :mod:`tanbr.model.static_merges`). :func:`validate_merge_plan`
checks plans that mix both kinds; :func:`validate_plan` stays the check of coeffs plans.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from tanbr.model.discovery import MoEBlock

SUM_ATOL = 1e-5  # how far from 1 the coeffs of a block may sum (float32 rounding of policies)

Groups = Sequence[Sequence[int]]


@dataclass(frozen=True, eq=False)
class MergedWeights:
    """One block's merged dense expert given by its tensors instead of coeffs.

    ``tensors`` maps every target of the block (:attr:`MoEBlock.targets`: ``gate_up_proj``,
    ``down_proj``, biases, or a per-expert module's parameter names) to a tensor of exactly that
    target's shape, in the layout the experts store it (transposed layouts stay transposed).
    Merges that are not one weighted average per expert (RegMean, Fisher-weighted averaging)
    produce this; :meth:`~tanbr.model.merge.Merger.apply` installs it as it installs a coeffs
    merge. ``method`` names the merge that made it, for logs. ``build_ms``: the time computing
    the tensors took when they are computed per decision (task-aware RegMean solves them from
    the action): a backend charges it to the merge that installs them, as a coeffs merge's
    weighted average is charged; 0 for a static merge, computed once in the set-up. ``key``:
    bytes that identify the tensors, given by a maker that knows what determines them (task-
    aware RegMean: its statistics and the action), so that a memo need not hash the tensors;
    empty when it does not.
    """

    tensors: Mapping[str, Any]
    method: str = ""
    build_ms: float = 0.0
    key: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, Mapping):
            raise ValueError(
                f"merged weights map target names to tensors, got {type(self.tensors).__name__}"
            )
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any], str, float, bytes]]:
        """Pickled as a plain dict (a mapping proxy does not pickle): the experiment's worker
        processes receive the static merges' weights."""
        return (MergedWeights, (dict(self.tensors), self.method, self.build_ms, self.key))

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (what installing them copies)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


PlanValue = np.ndarray | MergedWeights  # a validated plan value: coeffs, or merged weights


def validate_coeffs(coeffs: Any, n_experts: int, *, block: str = "") -> np.ndarray:
    """Check one block's coeffs, ``(E,)`` or ``(m, E)``; return them as float64, each row
    renormalised to sum 1, in the shape given.

    Raises
    ------
    ValueError
        Naming the block (and the row) and the problem: not an array of numbers of shape
        (E,) or (m, E), NaN or infinity, a negative weight, a row whose sum is not 1 (beyond
        ``SUM_ATOL``), or two rows sharing an expert.
    """
    where = f" of block {block!r}" if block else ""
    if isinstance(coeffs, MergedWeights):
        raise ValueError(
            f"block {block!r}: merged weights where coeffs are expected; a plan with merged "
            "weights is checked by validate_merge_plan and served by Merger.apply"
        )
    try:
        arr = np.asarray(coeffs, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"coeffs{where} are not an array of numbers: {coeffs!r}") from err
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"coeffs{where} must be (E,) or (m, E) for m merged experts, got shape {arr.shape}"
        )
    if arr.shape[-1] != n_experts:
        raise ValueError(
            f"coeffs{where} have {arr.shape[-1]} weights per row, the block has {n_experts}"
        )
    if arr.ndim == 2 and arr.shape[0] == 0:
        raise ValueError(f"coeffs{where} have no row: a grouped merge needs m >= 1 rows")
    if not np.isfinite(arr).all():
        raise ValueError(f"coeffs{where} contain NaN or infinity: {arr.tolist()}")
    if (arr < 0).any():
        raise ValueError(f"coeffs{where} must be non-negative, got {arr.tolist()}")
    rows = arr.reshape(-1, n_experts)
    totals = rows.sum(axis=1)
    for g, total in enumerate(totals):
        if abs(float(total) - 1.0) > SUM_ATOL:
            row = f" row {g}" if arr.ndim == 2 else ""
            raise ValueError(
                f"coeffs{where}{row} must sum to 1 (a point of the simplex), got {total:.6g}"
            )
    if arr.ndim == 2:
        owners = (rows > 0).sum(axis=0)
        if (owners > 1).any():
            e = int(np.argmax(owners > 1))
            shared = [int(g) for g in np.flatnonzero(rows[:, e] > 0)]
            raise ValueError(
                f"coeffs{where}: rows {shared} all give weight to expert {e}; the rows of a "
                "grouped merge must have disjoint supports (each expert in one group at most)"
            )
    return np.asarray((rows / totals[:, None]).reshape(arr.shape))


def validate_plan(plan: Mapping[str, Any], blocks: Sequence[MoEBlock]) -> dict[str, np.ndarray]:
    """Check a plan (block name -> coeffs (E,) or (m, E)) against the model's blocks; every
    block is needed."""
    known = _check_names(plan, blocks)
    return {name: validate_coeffs(plan[name], b.n_experts, block=name) for name, b in known.items()}


def _check_names(plan: Mapping[str, Any], blocks: Sequence[MoEBlock]) -> dict[str, MoEBlock]:
    """The plan names every block of the model and nothing else; returns name -> block."""
    if not isinstance(plan, Mapping):
        raise ValueError(f"a plan maps block names to coeffs, got {type(plan).__name__}")
    known = {b.name: b for b in blocks}
    unknown = [k for k in plan if k not in known]
    if unknown:
        hint = difflib.get_close_matches(str(unknown[0]), list(known), n=1)
        near = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"plan names unknown block(s) {unknown}{near}; the model's blocks are "
            f"{list(known)[:4]}{' ...' if len(known) > 4 else ''}"
        )
    missing = [name for name in known if name not in plan]
    if missing:
        raise ValueError(f"plan has no coeffs for block(s) {missing}")
    return known


def uniform_plan(blocks: Sequence[MoEBlock]) -> dict[str, np.ndarray]:
    """Equal weight on every expert of every block."""
    return {b.name: np.full(b.n_experts, 1.0 / b.n_experts) for b in blocks}


def one_hot_plan(blocks: Sequence[MoEBlock], expert: int) -> dict[str, np.ndarray]:
    """All weight on one expert index in every block."""
    plan = {}
    for b in blocks:
        if not 0 <= expert < b.n_experts:
            raise ValueError(
                f"expert must be in [0, {b.n_experts}) for block {b.name!r}, got {expert}"
            )
        plan[b.name] = np.eye(b.n_experts)[expert]
    return plan


# --- grouped plans ----------------------------------------------------------------------------


def identity_plan(blocks: Sequence[MoEBlock]) -> dict[str, np.ndarray]:
    """m = E: every expert its own group, ``(E, E)`` identity coeffs in every block.

    Served with ``group_top_k`` equal to the model's top-k, this is the full MoE again (exactly
    so for gates that renormalise their top-k weights; see docs/merging.md).
    """
    return {b.name: np.eye(b.n_experts) for b in blocks}


def groups_of(coeffs: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """The groups of validated coeffs: the support of each row (one row for ``(E,)``)."""
    rows = np.atleast_2d(coeffs)
    return tuple(tuple(int(e) for e in np.flatnonzero(row > 0)) for row in rows)


def group_coeffs(
    coeffs: Any, groups: Groups, *, n_experts: int | None = None, block: str = ""
) -> np.ndarray:
    """Split one block's coeffs (E,) over a grouping: an ``(m, E)`` grouped value.

    Row g is ``coeffs`` restricted to group g and renormalised. A group on which ``coeffs`` has
    no weight gets equal weights over its members (its merged expert is their plain average),
    so that every group keeps a merged expert and the router keeps all m choices.

    Raises
    ------
    ValueError
        When the coeffs are not a point of the simplex, or a group is empty, names an expert
        outside [0, E), or shares an expert with another group.
    """
    where = f" of block {block!r}" if block else ""
    n = int(np.asarray(coeffs).shape[-1]) if n_experts is None else n_experts
    c = validate_coeffs(coeffs, n, block=block)
    if c.ndim != 1:
        raise ValueError(f"group_coeffs{where} splits coeffs (E,), got shape {c.shape}")
    if len(groups) == 0:
        raise ValueError(f"groups{where} are empty: a grouped merge needs m >= 1 groups")
    seen: dict[int, int] = {}
    out = np.zeros((len(groups), n))
    for g, members in enumerate(groups):
        idx = [int(e) for e in members]
        if not idx:
            raise ValueError(f"group {g}{where} has no expert")
        for e in idx:
            if not 0 <= e < n:
                raise ValueError(f"group {g}{where} names expert {e}, outside [0, {n})")
            if e in seen:
                raise ValueError(f"groups {seen[e]} and {g}{where} both hold expert {e}")
            seen[e] = g
        mass = c[idx].sum()
        out[g, idx] = c[idx] / mass if mass > 0 else 1.0 / len(idx)
    return out


def grouped_plan(
    plan: Mapping[str, Any], groups: Groups | Mapping[str, Groups]
) -> dict[str, np.ndarray]:
    """Split every block's coeffs (E,) over a grouping (one for all blocks, or one per block
    name) with :func:`group_coeffs`."""
    out = {}
    for name, coeffs in plan.items():
        if isinstance(groups, Mapping):
            if name not in groups:
                raise ValueError(f"no groups given for block {name!r}")
            these = groups[name]
        else:
            these = groups
        out[name] = group_coeffs(coeffs, these, block=name)
    return out


# --- merged weights ---------------------------------------------------------------------------


def validate_weights(value: MergedWeights, block: MoEBlock) -> MergedWeights:
    """Check one block's merged weights; return them as tensors of the block's dtype.

    The tensors are detached, on the CPU and cast to the block's dtype (they are copied into
    the merged expert when installed, so the caller's tensors are never aliased).

    Raises
    ------
    ValueError
        Naming the block and the target: a target missing or unknown, a value that is not a
        floating-point tensor, a shape other than the target's, NaN or infinity (also after
        the cast, e.g. a float64 value beyond the range of float16).
    """
    where = f"merged weights of block {block.name!r}"
    names = [t.name for t in block.targets]
    given = list(value.tensors)
    missing = [n for n in names if n not in value.tensors]
    if missing:
        raise ValueError(f"{where} miss target(s) {missing}; the block's targets are {names}")
    extra = [n for n in given if n not in names]
    if extra:
        hint = difflib.get_close_matches(str(extra[0]), names, n=1)
        near = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"{where} name unknown target(s) {extra}{near}; the block's targets are {names}"
        )
    out: dict[str, torch.Tensor] = {}
    for target in block.targets:
        raw = value.tensors[target.name]
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(raw)
        if not isinstance(raw, torch.Tensor):
            raise ValueError(
                f"{where}: target {target.name!r} is not a tensor (got {type(raw).__name__})"
            )
        if not raw.is_floating_point():
            raise ValueError(
                f"{where}: target {target.name!r} must be floating point, got {raw.dtype}"
            )
        if tuple(raw.shape) != target.shape:
            raise ValueError(
                f"{where}: target {target.name!r} has shape {tuple(raw.shape)}, expected "
                f"{target.shape}"
            )
        t = raw.detach().to(device="cpu", dtype=block.dtype)
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            cast = f" after the cast to {block.dtype}" if raw.dtype != block.dtype else ""
            raise ValueError(
                f"{where}: target {target.name!r} has {bad} NaN or infinite value(s){cast}"
            )
        out[target.name] = t
    return MergedWeights(out, method=value.method, build_ms=value.build_ms, key=value.key)


def validate_merge_plan(
    plan: Mapping[str, Any], blocks: Sequence[MoEBlock]
) -> dict[str, PlanValue]:
    """Check a plan whose values are coeffs ((E,) or (m, E)) or :class:`MergedWeights`, each
    block its own kind, against the model's blocks; every block is needed. Coeffs get the
    checks of :func:`validate_plan`, merged weights those of :func:`validate_weights`."""
    known = _check_names(plan, blocks)
    out: dict[str, PlanValue] = {}
    for name, block in known.items():
        value = plan[name]
        if isinstance(value, MergedWeights):
            out[name] = validate_weights(value, block)
        else:
            out[name] = validate_coeffs(value, block.n_experts, block=name)
    return out
