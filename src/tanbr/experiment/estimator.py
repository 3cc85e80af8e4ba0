"""Task-mix estimation from unlabeled requests.

The label-free estimator clusters request signatures (the model's own gate probabilities and/or
the frozen encoder's pooled states, see :class:`~tanbr.backend.default.DefaultBackend`) with
k-means into K task types, fitted on unlabeled history and refined online (sequential k-means).
A slot's mix is a forecast from the cluster frequencies of past slots (EMA or Holt's linear
trend), sharpened by the head of the current slot when the system may read it:

    mix = (counts(head) + s * forecast) / (|head| + s)

i.e. the forecast acts as a Dirichlet prior of strength ``s`` on the head's cluster counts.

:class:`TagEstimator` reads the true task tags and exists only as a baseline (the "oracle
estimator"). :func:`match_clusters` maps clusters to tasks by Hungarian matching on
calibration data, for evaluation (TV distance) only: nothing the system decides with uses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tanbr.experiment.novelty import NoveltyDetector, OnlineProfile

log = logging.getLogger(__name__)

FORECASTS = ("ema", "holt", "last")


def _check_signatures(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"signatures must be a 2-D array (n, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"signatures have {x.shape[1]} features, the estimator was fit on {dim}")
    if not np.isfinite(x).all():
        raise ValueError("signatures contain NaN or inf")
    return x


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return np.asarray(x / np.maximum(norms, 1e-12))


# --- k-means ------------------------------------------------------------------------------------


def _sq_dists(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return np.asarray(np.maximum(d, 0.0))


def kmeans(
    x: np.ndarray, k: int, *, rng: np.random.Generator, restarts: int = 4, iters: int = 100
) -> tuple[np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding; the best of ``restarts`` runs.

    Returns the centres (k, d) and the inertia (sum of squared distances).
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n_samples, got k={k}, n={n}")
    best: tuple[np.ndarray, float] | None = None
    for _ in range(restarts):
        centers = x[[int(rng.integers(n))]]  # (1, d)
        for _ in range(1, k):  # k-means++: next centre with probability ~ D(x)^2
            d2 = _sq_dists(x, centers).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centers = np.vstack([centers, x[int(rng.choice(n, p=p))]])
        for _ in range(iters):
            assign = _sq_dists(x, centers).argmin(1)  # (n,)
            new = centers.copy()
            for j in range(k):
                members = x[assign == j]
                if len(members):
                    new[j] = members.mean(0)
                else:  # re-seed an empty cluster at the worst-served point
                    new[j] = x[int(_sq_dists(x, new).min(1).argmax())]
            if np.allclose(new, centers, atol=1e-9):
                centers = new
                break
            centers = new
        inertia = float(_sq_dists(x, centers).min(1).sum())
        if best is None or inertia < best[1]:
            best = (centers, inertia)
    assert best is not None
    return best


def silhouette(x: np.ndarray, assign: np.ndarray) -> float:
    """Mean silhouette coefficient (exact, O(n^2); call it on a subsample)."""
    labels = np.unique(assign)
    if len(labels) < 2:
        return -1.0
    d = np.sqrt(_sq_dists(x, x))  # (n, n)
    n = x.shape[0]
    a = np.zeros(n)
    b = np.full(n, np.inf)
    for j in labels:
        mask = assign == j
        mean_d = d[:, mask].sum(1)
        own = mask.sum()
        a = np.where(mask, mean_d / max(own - 1, 1), a)
        b = np.where(mask, b, np.minimum(b, mean_d / own))
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
    sizes = np.bincount(assign)
    s[sizes[assign] == 1] = 0.0
    return float(s.mean())


def choose_n_types(
    x: np.ndarray, *, rng: np.random.Generator, max_types: int = 10, sample: int = 1500
) -> int:
    """Discover K from unlabeled signatures: the K in 2..max_types with the best silhouette."""
    idx = rng.choice(x.shape[0], size=min(sample, x.shape[0]), replace=False)
    xs = x[idx]
    scores = {}
    for k in range(2, min(max_types, xs.shape[0] - 1) + 1):
        centers, _ = kmeans(xs, k, rng=rng, restarts=2)
        scores[k] = silhouette(xs, _sq_dists(xs, centers).argmin(1))
    best = max(scores, key=lambda k: scores[k])
    log.info(
        "discovered %d task types (silhouette %s)",
        best,
        {k: round(v, 3) for k, v in scores.items()},
    )
    return best


# --- forecasting --------------------------------------------------------------------------------


@dataclass
class Forecaster:
    """Forecast the next slot's mix from past slots' frequencies.

    ``ema``: level <- (1 - alpha) level + alpha freq. ``holt``: the same level plus a damped
    trend (beta), projected one slot ahead and clipped back onto the simplex. ``last``: the
    previous slot's frequencies.
    """

    n_types: int
    kind: str = "ema"
    alpha: float = 0.5
    beta: float = 0.2
    level: np.ndarray | None = None
    trend: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in FORECASTS:
            raise ValueError(f"forecast must be one of {FORECASTS}, got {self.kind!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")

    def forecast(self) -> np.ndarray:
        if self.level is None:
            return np.full(self.n_types, 1.0 / self.n_types)
        f = self.level if self.trend is None else self.level + self.trend
        f = np.clip(f, 0.0, None)
        total = f.sum()
        return f / total if total > 0 else np.full(self.n_types, 1.0 / self.n_types)

    def update(self, freq: np.ndarray) -> None:
        if self.level is None or self.kind == "last":
            self.level = freq.copy()
            return
        prev = self.level
        self.level = (1.0 - self.alpha) * (prev + (self.trend if self.trend is not None else 0.0))
        self.level = self.level + self.alpha * freq
        if self.kind == "holt":
            step = self.level - prev
            old = self.trend if self.trend is not None else np.zeros_like(step)
            self.trend = 0.8 * ((1.0 - self.beta) * old + self.beta * step)  # damped trend

    def grow(self, share: float) -> None:
        """Add a task type with ``share`` of the level (the others scaled down to make room)."""
        self.n_types += 1
        if self.level is not None:
            self.level = np.append((1.0 - share) * self.level, share)
        if self.trend is not None:
            self.trend = np.append(self.trend, 0.0)


def _blend(counts: np.ndarray, n: int, forecast: np.ndarray, strength: float) -> np.ndarray:
    if n == 0:
        return forecast
    mix = (counts + strength * forecast) / (n + strength)
    return np.asarray(mix / mix.sum())


# --- estimators ---------------------------------------------------------------------------------


class ClusterEstimator:
    """Label-free: k-means task types over request signatures, refined online.

    Parameters
    ----------
    n_types
        K, the number of task types; ``None`` discovers it by silhouette at :meth:`fit`.
    forecast, alpha, beta
        How past slots' cluster frequencies forecast the next slot (see :class:`Forecaster`).
    prior_strength
        Weight (in requests) of the forecast against the head of the current slot.
    online_rate
        Cap on the sequential k-means step (each centre moves by 1 / its count, at least this
        much, towards its new members) so that clusters follow slow drift of the signatures.
    normalize
        L2-normalise signatures before clustering (cosine geometry).
    """

    name = "cluster"
    reads_tags = False

    def __init__(
        self,
        *,
        rng: np.random.Generator,
        n_types: int | None = None,
        forecast: str = "ema",
        alpha: float = 0.5,
        beta: float = 0.2,
        prior_strength: float = 16.0,
        online_rate: float = 0.01,
        normalize: bool = True,
        restarts: int = 4,
        max_types: int = 10,
    ) -> None:
        if n_types is not None and n_types < 2:
            raise ValueError(f"n_types must be >= 2 (or None to discover it), got {n_types}")
        if not (math.isfinite(prior_strength) and prior_strength >= 0):
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        if not 0.0 <= online_rate <= 1.0:
            raise ValueError(f"online_rate must be in [0, 1], got {online_rate}")
        self.rng = rng
        self.n_types = n_types or 0
        self._forecast_args = (forecast, alpha, beta)
        Forecaster(2, forecast, alpha, beta)  # validates early
        self.prior_strength = prior_strength
        self.online_rate = online_rate
        self.normalize = normalize
        self.restarts = restarts
        self.max_types = max_types
        self.centers: np.ndarray | None = None  # (K, d)
        self.counts: np.ndarray | None = None  # (K,) members seen per centre
        self.forecaster: Forecaster | None = None

    def _prep(self, x: np.ndarray) -> np.ndarray:
        dim = None if self.centers is None else self.centers.shape[1]
        x = _check_signatures(x, dim)
        return _normalize_rows(x) if self.normalize else x

    def fit(self, signatures: np.ndarray) -> ClusterEstimator:
        """Fit the task types on unlabeled history (e.g. the calibration split, tags dropped)."""
        x = _check_signatures(signatures)
        x = _normalize_rows(x) if self.normalize else x
        if self.n_types == 0:
            self.n_types = choose_n_types(x, rng=self.rng, max_types=self.max_types)
        if x.shape[0] < self.n_types:
            raise ValueError(f"need at least n_types={self.n_types} signatures, got {x.shape[0]}")
        self.centers, _ = kmeans(x, self.n_types, rng=self.rng, restarts=self.restarts)
        self.forecaster = Forecaster(self.n_types, *self._forecast_args)
        self.counts = np.bincount(self.assign(signatures), minlength=self.n_types).astype(float)
        return self

    def _require_fit(self) -> tuple[np.ndarray, Forecaster]:
        if self.centers is None or self.forecaster is None:
            raise ValueError("the cluster estimator is not fitted: call fit() on unlabeled history")
        return self.centers, self.forecaster

    def assign(self, signatures: np.ndarray) -> np.ndarray:
        """(n,) the task type of each request."""
        centers, _ = self._require_fit()
        return np.asarray(_sq_dists(self._prep(signatures), centers).argmin(1), dtype=np.int64)

    def estimate(self, head: np.ndarray | None, *, tasks: np.ndarray | None = None) -> np.ndarray:
        if tasks is not None:
            raise ValueError("the cluster estimator is label-free: it never takes task tags")
        _, forecaster = self._require_fit()
        forecast = forecaster.forecast()
        if head is None or len(head) == 0:
            return forecast
        counts = np.bincount(self.assign(head), minlength=self.n_types).astype(float)
        return _blend(counts, len(head), forecast, self.prior_strength)

    def observe(self, signatures: np.ndarray, *, tasks: np.ndarray | None = None) -> None:
        if tasks is not None:
            raise ValueError("the cluster estimator is label-free: it never takes task tags")
        centers, forecaster = self._require_fit()
        assert self.counts is not None
        x = self._prep(signatures)
        if x.shape[0] == 0:
            return
        assign = _sq_dists(x, centers).argmin(1)
        freq = np.bincount(assign, minlength=self.n_types).astype(float)
        forecaster.update(freq / freq.sum())
        for j in np.flatnonzero(freq):  # sequential k-means step towards the new members
            self.counts[j] += freq[j]
            rate = max(self.online_rate, freq[j] / self.counts[j])
            centers[j] += rate * (x[assign == j].mean(0) - centers[j])


class ReadoutEstimator:
    """Label-free: task types found once with the full MoE, read out on the served path.

    At set-up the calibration requests (tags dropped) are clustered on a rich signature that
    needs the full MoE (every block's gates and the head's task probabilities), which is paid
    once, offline. A multinomial logistic read-out then learns those types from a cheap
    signature that the served path computes anyway (the pooled input of the first MoE block:
    no expert runs). A slot's mix is the maximum a posteriori mixture weight of the head's
    read-out posteriors, by the EM prior correction of Saerens et al. (2002), with the forecast
    as a Dirichlet prior of strength ``s``:

        w_ik = p(k | x_i) pi_k / pi0_k  (normalised over k),
        pi   <- (sum_i w_ik + s * forecast_k) / (|head| + s),

    where p(k | x) is the read-out's posterior under the calibration prior pi0. Counting hard
    assignments would carry the read-out's confusions straight into the mix; re-weighting the
    posteriors by the slot's own prior moves ambiguous requests towards the types the slot is
    made of.

    Parameters
    ----------
    forecast, alpha, beta
        How past slots' type frequencies forecast the next slot (see :class:`Forecaster`).
    prior_strength
        Weight (in requests) of the forecast against the head of the current slot.
    readout_c
        Inverse L2 strength of the logistic read-out (scikit-learn's ``C``).
    em_iters
        Cap on the EM iterations (it converges in a handful).
    """

    name = "readout"
    reads_tags = False

    def __init__(
        self,
        *,
        rng: np.random.Generator | None = None,
        forecast: str = "ema",
        alpha: float = 0.5,
        beta: float = 0.2,
        prior_strength: float = 16.0,
        readout_c: float = 0.01,
        em_iters: int = 50,
        novelty: NoveltyDetector | None = None,
        profile_budget: int = 8,
        full_pass_ms: float = 0.0,
    ) -> None:
        if not (math.isfinite(prior_strength) and prior_strength >= 0):
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        if profile_budget < 1:
            raise ValueError(f"profile_budget must be >= 1, got {profile_budget}")
        if not (math.isfinite(readout_c) and readout_c > 0):
            raise ValueError(f"readout_c must be > 0, got {readout_c}")
        if em_iters < 1:
            raise ValueError(f"em_iters must be >= 1, got {em_iters}")
        self._forecast_args = (forecast, alpha, beta)
        Forecaster(2, forecast, alpha, beta)  # validates early
        self.prior_strength = prior_strength
        self.readout_c = readout_c
        self.em_iters = em_iters
        self.n_types = 0
        self.readout: Any = None  # scikit-learn pipeline: scaler + logistic regression
        self.prior0: np.ndarray | None = None  # (K,) calibration prior of the types
        self.forecaster: Forecaster | None = None
        self._dim = 0
        self.novelty = novelty
        self.profile_budget = profile_budget
        self.full_pass_ms = full_pass_ms  # charged per request of a profile's gate pass
        self.profiles: list[OnlineProfile] = []  # of the opened types, in order

    def fit(self, signatures: np.ndarray, types: np.ndarray) -> ReadoutEstimator:
        """Learn the read-out of the task ``types`` (n,) from the cheap ``signatures`` (n, d)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = _check_signatures(signatures)
        types = np.asarray(types, dtype=np.int64)
        if types.shape != (x.shape[0],):
            raise ValueError(f"types must be ({x.shape[0]},), one per signature, got {types.shape}")
        k = int(types.max()) + 1 if types.size else 0
        present = np.unique(types)
        if types.min(initial=0) < 0 or len(present) < 2 or len(present) != k:
            raise ValueError(
                f"types must number the task types 0..K-1 with K >= 2, each with a member; "
                f"got {present.tolist()}"
            )
        self.readout = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.readout_c, max_iter=5000)
        ).fit(x, types)
        self.n_types = k
        self._dim = x.shape[1]
        self.prior0 = np.bincount(types, minlength=k) / len(types)
        self.forecaster = Forecaster(k, *self._forecast_args)
        if self.novelty is not None:
            self.novelty.fit(x, types)
        return self

    def _require_fit(self) -> tuple[Any, np.ndarray, Forecaster]:
        if self.readout is None or self.prior0 is None or self.forecaster is None:
            raise ValueError("the read-out estimator is not fitted: call fit() on calibration data")
        return self.readout, self.prior0, self.forecaster

    def posteriors(self, signatures: np.ndarray) -> np.ndarray:
        """(n, K) each request's type posterior under the calibration prior."""
        readout, _, _ = self._require_fit()
        x = _check_signatures(signatures, self._dim)
        if x.shape[0] == 0:
            return np.zeros((0, self.n_types))
        return np.asarray(readout.predict_proba(x), dtype=np.float64)

    @property
    def n_new(self) -> int:
        """Task types opened online beside the K of calibration (see :mod:`.novelty`)."""
        return 0 if self.novelty is None else len(self.novelty.new)

    def likelihoods(self, signatures: np.ndarray) -> np.ndarray:
        """(n, K + J) each request's likelihood of each type, up to a per-request factor.

        Known types: the read-out posterior over the calibration prior, p(k | x) / pi0_k.
        Once types have been opened, a request nearer to an opened type's centre than to every
        known one belongs to that type alone (one-hot), the others to the known types."""
        _, prior0, _ = self._require_fit()
        lik = self.posteriors(signatures) / np.maximum(prior0, 1e-12)  # (n, K)
        if self.n_new == 0:
            return np.asarray(lik)
        assert self.novelty is not None
        nearest = self.novelty.nearest(signatures)  # (n,) 0..K+J-1
        out = np.zeros((lik.shape[0], self.n_types + self.n_new))
        known = nearest < self.n_types
        out[known, : self.n_types] = lik[known]
        out[np.flatnonzero(~known), nearest[~known]] = 1.0
        return out

    def _em(self, lik: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
        """The MAP mixture weights of likelihoods ``lik`` (n, K') under Dirichlet(strength *
        prior)."""
        pi = prior.copy()
        n = lik.shape[0]
        for _ in range(self.em_iters):
            w = lik * pi  # (n, K')
            w /= np.maximum(w.sum(1, keepdims=True), 1e-300)
            new = (w.sum(0) + strength * prior) / (n + strength)
            done = np.abs(new - pi).max() < 1e-7
            pi = new
            if done:
                break
        return np.asarray(pi / pi.sum())

    def estimate(self, head: np.ndarray | None, *, tasks: np.ndarray | None = None) -> np.ndarray:
        """The mix (K + J,) of the coming slot: the K calibration types, then the J opened."""
        if tasks is not None:
            raise ValueError("the read-out estimator is label-free: it never takes task tags")
        _, _, forecaster = self._require_fit()
        forecast = forecaster.forecast()
        if head is None or len(head) == 0:
            return forecast
        return self._em(self.likelihoods(head), forecast, self.prior_strength)

    def known_mix(self, signatures: np.ndarray) -> np.ndarray:
        """(K,) what the known types alone make of a batch (EM, no prior)."""
        _, prior0, forecaster = self._require_fit()
        start = forecaster.forecast()[: self.n_types]
        start = start / start.sum() if start.sum() > 0 else prior0
        lik = self.posteriors(signatures) / np.maximum(prior0, 1e-12)
        return self._em(lik, start, 0.0)

    def observe(self, signatures: np.ndarray, *, tasks: np.ndarray | None = None) -> None:
        if tasks is not None:
            raise ValueError("the read-out estimator is label-free: it never takes task tags")
        _, _, forecaster = self._require_fit()
        x = _check_signatures(signatures, self._dim)
        if x.shape[0] == 0:
            return
        forecaster.update(self._em(self.likelihoods(x), forecaster.forecast(), 0.0))
        if self.novelty is None:
            return
        opening = self.novelty.observe(x, self.known_mix)
        if opening is not None:  # the forecast gives the new type the share it explains
            forecaster.grow(float(np.clip(opening.excess, 0.0, 1.0)))
            self.profiles.append(OnlineProfile())

    def assign(self, signatures: np.ndarray) -> np.ndarray:
        """(n,) each request's most likely type: 0..K-1 known, K.. the opened ones."""
        lik = self.likelihoods(signatures)
        _, prior0, _ = self._require_fit()
        prior = np.concatenate([prior0, np.full(self.n_new, 1.0)])
        return np.asarray((lik * prior).argmax(1), dtype=np.int64)

    def profile_wants(self, signatures: np.ndarray) -> np.ndarray:
        """Indices of observed requests whose full-MoE gate probabilities the opened types'
        profiles still need: up to ``profile_budget`` per slot, of types not yet stable."""
        if self.n_new == 0 or all(p.stable for p in self.profiles):
            return np.zeros(0, dtype=np.int64)
        types = self.assign(signatures)
        want = [
            np.flatnonzero(types == self.n_types + j)
            for j, p in enumerate(self.profiles)
            if not p.stable
        ]
        idx = np.concatenate(want) if want else np.zeros(0, dtype=np.int64)
        return np.asarray(np.sort(idx[: self.profile_budget]), dtype=np.int64)

    def learn_profiles(self, signatures: np.ndarray, gates: Mapping[str, np.ndarray]) -> None:
        """Add the full-MoE gate probabilities (per block (n, E)) of requests with these
        ``signatures`` (n, d) to the profiles of the opened types they belong to."""
        types = self.assign(signatures)
        for j, profile in enumerate(self.profiles):
            rows = types == self.n_types + j
            if rows.any() and not profile.stable:
                profile.add({name: np.asarray(p)[rows] for name, p in gates.items()})
                if profile.stable:
                    log.info("profile of new task type %d stable after %d requests",
                             self.n_types + j, profile.n)  # fmt: skip

    def new_profiles(self) -> list[dict[str, np.ndarray] | None]:
        """Each opened type's profile so far (None before its first gate pass)."""
        return [p.mean() for p in self.profiles]


class TagEstimator:
    """The oracle estimator (a baseline only): counts the true task tags of the head."""

    name = "oracle"
    reads_tags = True

    def __init__(
        self,
        *,
        n_types: int,
        forecast: str = "ema",
        alpha: float = 0.5,
        beta: float = 0.2,
        prior_strength: float = 16.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        if n_types < 1:
            raise ValueError(f"n_types must be >= 1, got {n_types}")
        self.n_types = n_types
        self.prior_strength = prior_strength
        self.forecaster = Forecaster(n_types, forecast, alpha, beta)

    def fit(self, signatures: np.ndarray) -> TagEstimator:
        return self

    def _counts(self, tasks: np.ndarray | None) -> np.ndarray:
        if tasks is None:
            raise ValueError("the oracle estimator reads task tags: pass tasks")
        tasks = np.asarray(tasks, dtype=np.int64)
        if tasks.size and (tasks.min() < 0 or tasks.max() >= self.n_types):
            raise ValueError(f"task index out of range 0..{self.n_types - 1}")
        return np.bincount(tasks, minlength=self.n_types).astype(float)

    def estimate(self, head: np.ndarray | None, *, tasks: np.ndarray | None = None) -> np.ndarray:
        forecast = self.forecaster.forecast()
        if head is None or len(head) == 0:
            return forecast
        return _blend(self._counts(tasks), len(head), forecast, self.prior_strength)

    def observe(self, signatures: np.ndarray, *, tasks: np.ndarray | None = None) -> None:
        counts = self._counts(tasks)
        if counts.sum() > 0:
            self.forecaster.update(counts / counts.sum())


EstimatorFactory = Callable[..., "ClusterEstimator | ReadoutEstimator | TagEstimator"]

ESTIMATORS: dict[str, EstimatorFactory] = {
    "cluster": ClusterEstimator,
    "readout": ReadoutEstimator,
    "oracle": TagEstimator,
}


# --- evaluation only ----------------------------------------------------------------------------


def match_clusters(assign: np.ndarray, tasks: np.ndarray, n_types: int, n_tasks: int) -> np.ndarray:
    """(n_types,) the task each task type stands for: Hungarian matching on the contingency
    table (maximum agreement); types left over when K > n_tasks map to their majority task.

    Reads tags: for evaluation (TV distance) only.
    """
    from scipy.optimize import linear_sum_assignment

    table = np.zeros((n_types, n_tasks))
    np.add.at(table, (np.asarray(assign), np.asarray(tasks)), 1.0)
    rows, cols = linear_sum_assignment(-table)
    mapping = table.argmax(1)
    mapping[rows] = cols
    return np.asarray(mapping, dtype=np.int64)


def to_tasks(mix: np.ndarray, mapping: np.ndarray, n_tasks: int) -> np.ndarray:
    """Map a mix over task types onto the true tasks."""
    return np.bincount(mapping, weights=np.asarray(mix, dtype=float), minlength=n_tasks)


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance between two mixes."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())
