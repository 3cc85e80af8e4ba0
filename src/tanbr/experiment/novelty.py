"""New task types met mid-stream: detect them, open them, learn their profiles.

The read-out estimator knows the K task types found in calibration. When requests of a task
that calibration never contained start arriving, the read-out still spreads them over the K
known types, and the mix it reports is wrong by the new task's whole share. Per-request
outlier scores do not catch this on the default model: a held-out task's served-path
signatures (``input0``) lie inside the known types' spread (Mahalanobis or k-NN distances flag
well under 20% of them at a 1% false-alarm rate). What does separate it is its own centre:
the nearest-centre rule over the K known centres plus the new task's mean puts 74-90% of its
requests on that mean and only 0.3-4% of the known requests (measured on the six held-out
tasks, standardised ``input0``). So the detector looks for a centre, not for outliers:

1. **Candidate.** The standardised signatures of the last ``window`` slots are split in two
   halves A and B (alternate requests). A free centre is fitted on A by k-means with the K
   known centres held fixed (seeded by D^2 sampling against the known centres, best of
   ``restarts``); it captures the requests that are nearer to it than to every known centre.
2. **Test on held-out data.** On B, the captured share is compared with what the known types
   alone would give: sum_k pi_k r_k, where r_k is the share of calibration type k that the
   candidate captures and pi the EM mix of B over the known types. A one-sided binomial test
   at level ``level`` and an excess of at least ``excess`` make the candidate.
3. **Distinct.** A candidate whose captured requests would mostly go to an already opened
   type without it is that type's fringe, not another type: it is dropped.
4. **Confirmation.** The candidate opens as a new type only if the next slot's requests,
   which it has never seen, confirm it (binomial level ``confirm_level``, the same excess).
   A stream dominated by one known type can pass the first test by chance once; it seldom
   passes twice on fresh data.

An opened type keeps its centre (the mean of the requests it captured in the window); the
known centres and the read-out are never touched, so no old type is re-labelled. Its profile
(expert usage) is learned online from a budgeted full-MoE gate pass on a few of its requests
per slot (:class:`OnlineProfile`), charged to the estimator's cost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binom

log = logging.getLogger(__name__)


def _sq_dists(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return np.asarray(np.maximum(d, 0.0))


@dataclass(frozen=True)
class Opening:
    """A new type just opened: its centre (standardised space) and the evidence for it."""

    centre: np.ndarray
    excess: float  # captured share minus what the known types explain, on confirming data
    n_captured: int


@dataclass
class _Candidate:
    centre: np.ndarray
    rates: np.ndarray  # (K,) share of each calibration type it captures


class NoveltyDetector:
    """Finds a cluster of the stream that the known task types do not explain (see module).

    Parameters
    ----------
    window
        Slots of signatures the candidate is fitted and tested on.
    level, confirm_level
        Binomial test levels of the candidate (on held-out half B) and of its confirmation
        (on the next slot).
    excess
        Least captured share above the known types' expectation for either test.
    restarts, iters
        Seeds and Lloyd steps of the free centre's k-means.
    max_new
        Cap on the types opened over a run.
    min_captured
        Least requests a candidate must capture in half A.
    """

    def __init__(
        self,
        *,
        window: int = 4,
        level: float = 1e-6,
        confirm_level: float = 1e-3,
        excess: float = 0.05,
        restarts: int = 8,
        iters: int = 10,
        max_new: int = 2,
        min_captured: int = 16,
        seed: int = 0,
    ) -> None:
        if window < 1:
            raise ValueError(f"novelty window must be >= 1 slot, got {window}")
        if not (0 < level < 1 and 0 < confirm_level < 1):
            raise ValueError(f"novelty levels must be in (0, 1), got {level}, {confirm_level}")
        if not 0 <= excess < 1:
            raise ValueError(f"novelty excess must be in [0, 1), got {excess}")
        self.window = window
        self.level = level
        self.confirm_level = confirm_level
        self.excess = excess
        self.restarts = restarts
        self.iters = iters
        self.max_new = max_new
        self.min_captured = min_captured
        self.rng = np.random.default_rng(seed)
        self.mean: np.ndarray | None = None  # (d,) standardisation of the signatures
        self.scale: np.ndarray | None = None
        self.known: np.ndarray | None = None  # (K, d) known types' centres
        self.new: list[np.ndarray] = []  # opened types' centres
        self._calib: np.ndarray | None = None  # (n, d) standardised calibration signatures
        self._calib_types: np.ndarray | None = None
        self._calib_d: np.ndarray | None = None  # (n,) nearest known centre's squared distance
        self._window: list[np.ndarray] = []
        self._candidate: _Candidate | None = None

    def fit(self, signatures: np.ndarray, types: np.ndarray) -> NoveltyDetector:
        """Standardise on calibration and take each known type's centre there."""
        x = np.asarray(signatures, dtype=np.float64)
        types = np.asarray(types, dtype=np.int64)
        self.mean = x.mean(0)
        self.scale = np.maximum(x.std(0), 1e-8)
        z = self.standardise(x)
        k = int(types.max()) + 1
        self.known = np.stack([z[types == j].mean(0) for j in range(k)])
        self._calib, self._calib_types = z, types
        self._calib_d = _sq_dists(z, self.known).min(1)
        return self

    @property
    def n_known(self) -> int:
        return 0 if self.known is None else len(self.known)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None or self.scale is None:
            raise ValueError("the novelty detector is not fitted: call fit() on calibration")
        return np.asarray((np.asarray(x, dtype=np.float64) - self.mean) / self.scale)

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """(n,) each request's nearest centre: 0..K-1 known, K.. the opened types."""
        assert self.known is not None
        centres = np.vstack([self.known, *self.new]) if self.new else self.known
        return np.asarray(_sq_dists(self.standardise(x), centres).argmin(1), dtype=np.int64)

    def _rates(self, centre: np.ndarray) -> np.ndarray:
        """(K,) the share of each calibration type that ``centre`` captures."""
        assert self._calib is not None and self._calib_types is not None
        assert self._calib_d is not None
        captured = ((self._calib - centre) ** 2).sum(1) < self._calib_d
        k = self.n_known
        hits = np.bincount(self._calib_types, weights=captured.astype(float), minlength=k)
        return np.asarray(hits / np.maximum(np.bincount(self._calib_types, minlength=k), 1))

    def _captures(self, z: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Requests nearer to ``centre`` than to every known and opened centre."""
        assert self.known is not None
        others = np.vstack([self.known, *self.new]) if self.new else self.known
        return np.asarray(((z - centre) ** 2).sum(1) < _sq_dists(z, others).min(1))

    def _passes(self, captured: np.ndarray, expected: float, level: float) -> tuple[bool, float]:
        n, m = int(captured.sum()), len(captured)
        share = n / max(m, 1)
        p = float(binom.sf(n - 1, m, max(expected, 1e-3))) if n else 1.0
        return p < level and share - expected >= self.excess, share - expected

    def observe(
        self, signatures: np.ndarray, known_mix: Callable[[np.ndarray], np.ndarray]
    ) -> Opening | None:
        """Add a served slot's signatures (n, d); returns the type opened, if any.

        ``known_mix(signatures)`` is the estimator's EM mix of a batch over the K known types
        (what the known types alone make of it)."""
        if self.known is None:
            raise ValueError("the novelty detector is not fitted: call fit() on calibration")
        x = np.asarray(signatures, dtype=np.float64)
        if x.shape[0] == 0:
            return None
        z = self.standardise(x)
        self._window = [*self._window, z][-self.window :]
        opened = None
        if self._candidate is not None:  # confirmation on data the candidate never saw
            cand, self._candidate = self._candidate, None
            captured = self._captures(z, cand.centre)
            ok, excess = self._passes(
                captured, float(known_mix(x) @ cand.rates), self.confirm_level
            )
            if ok:
                opened = self._open(cand.centre, excess, int(captured.sum()))
        if opened is None and len(self.new) < self.max_new:
            self._candidate = self._search(np.vstack(self._window), known_mix)
        return opened

    def _open(self, centre: np.ndarray, excess: float, n: int) -> Opening:
        window = np.vstack(self._window)
        captured = self._captures(window, centre)
        if captured.sum() >= self.min_captured:  # the centre of what it explains
            centre = window[captured].mean(0)
        self.new.append(centre)
        self._window = []  # the next search starts on data the new type can explain
        log.info(
            "opened new task type %d: excess share %.3f, %d requests captured",
            self.n_known + len(self.new) - 1, excess, n,
        )  # fmt: skip
        return Opening(centre, excess, n)

    def _search(
        self, z: np.ndarray, known_mix: Callable[[np.ndarray], np.ndarray]
    ) -> _Candidate | None:
        """The best free centre fitted on half A, kept if half B supports it."""
        assert self.known is not None
        half = np.arange(len(z)) % 2 == 0
        a, b = z[half], z[~half]
        others = np.vstack([self.known, *self.new]) if self.new else self.known
        da = _sq_dists(a, others).min(1)
        if len(a) < self.min_captured or da.sum() <= 0:
            return None
        raw = z * self.scale + self.mean  # the estimator's EM reads raw signatures
        mix_a = known_mix(raw[half])
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for _ in range(self.restarts):
            centre = a[int(self.rng.choice(len(a), p=da / da.sum()))]
            for _ in range(self.iters):
                captured = ((a - centre) ** 2).sum(1) < da
                if captured.sum() == 0:
                    break
                new = a[captured].mean(0)
                if np.allclose(new, centre):
                    break
                centre = new
            captured = ((a - centre) ** 2).sum(1) < da
            if captured.sum() < self.min_captured:
                continue
            rates = self._rates(centre)
            gain = float(captured.mean() - mix_a @ rates)
            if best is None or gain > best[0]:
                best = (gain, centre, rates)
        if best is None:
            return None
        _, centre, rates = best
        if self.new:  # the fringe of a type already opened is not another one
            taken = _sq_dists(a[self._captures(a, centre)], others).argmin(1)
            if len(taken) and (taken >= self.n_known).mean() >= 0.5:
                return None
        ok, _ = self._passes(
            self._captures(b, centre), float(known_mix(raw[~half]) @ rates), self.level
        )
        return _Candidate(centre, rates) if ok else None


@dataclass
class OnlineProfile:
    """A new type's expert usage, the running mean of full-MoE gate probabilities of its
    requests, learned a few requests per slot until it stabilises.

    Stable: at least ``min_requests`` seen and the last batch moved no block's coefficients
    by more than ``tol`` (max absolute change of the normalised mean)."""

    min_requests: int = 32
    tol: float = 0.01
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    n: int = 0
    stable: bool = False

    def mean(self) -> dict[str, np.ndarray] | None:
        if self.n == 0:
            return None
        return {name: s / s.sum() for name, s in self.sums.items()}

    def add(self, gates: Mapping[str, np.ndarray]) -> None:
        before = self.mean()
        counts = set()
        for name, probs in gates.items():
            probs = np.asarray(probs, dtype=np.float64)  # (m, E)
            self.sums[name] = self.sums.get(name, 0.0) + probs.sum(0)
            counts.add(probs.shape[0])
        if len(counts) != 1:
            raise ValueError(f"every block's gate probabilities need the same rows, got {counts}")
        self.n += counts.pop()
        after = self.mean()
        assert after is not None
        if before is not None and self.n >= self.min_requests:
            moved = max(float(np.abs(after[k] - before[k]).max()) for k in after)
            self.stable = moved < self.tol


# --- how the policies go on working --------------------------------------------------------------


def split_mix(mix: np.ndarray, n_known: int) -> tuple[np.ndarray, np.ndarray]:
    """The policies' context (the mix over the K known types, renormalised) and the mass of
    the opened types (J,)."""
    mix = np.asarray(mix, dtype=np.float64)
    if mix.shape[0] <= n_known:
        return mix, np.zeros(0)
    known, new = mix[:n_known], mix[n_known:]
    total = known.sum()
    context = known / total if total > 0 else np.full(n_known, 1.0 / n_known)
    return np.asarray(context), np.asarray(new)


def with_new_types(
    plan: Mapping[str, np.ndarray],
    new_mass: np.ndarray,
    profiles: list[dict[str, np.ndarray] | None],
) -> dict[str, np.ndarray]:
    """The plan with each opened type's profile mixed in by its estimated mass:
    ``c_l = (1 - m) c_l(action) + sum_j m_j U_{l,j}``, m the mass of the types whose profile
    exists (a type with no gate pass yet leaves its mass to the policy's plan)."""
    out = {name: np.asarray(c, dtype=np.float64) for name, c in plan.items()}
    have = [(float(m), p) for m, p in zip(new_mass, profiles, strict=True) if p is not None]
    total = sum(m for m, _ in have)
    if total <= 0:
        return out
    for name in out:
        mixed = (1.0 - total) * out[name]
        for m, profile in have:
            mixed = mixed + m * profile[name]
        out[name] = mixed / mixed.sum()
    return out
