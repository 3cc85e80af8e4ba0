"""Prometheus metrics of the service, on a registry of its own.

A private :class:`~prometheus_client.CollectorRegistry` per app keeps two services in one
process (as in tests) from sharing counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """Counters, gauges and histograms the service updates; ``render()`` is the scrape body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "tanbr_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.predictions = Counter(
            "tanbr_predictions", "Texts served (one per text of a batch)", registry=r
        )
        self.feedback = Counter(
            "tanbr_feedback", "Feedback acknowledged, by kind", ["kind"], registry=r
        )
        self.merges = Counter("tanbr_merges", "Merged models built and swapped in", registry=r)
        self.policy_updates = Counter(
            "tanbr_policy_updates", "Policy updates made from feedback", registry=r
        )
        self.slot = Gauge("tanbr_slot", "Id of the slot now serving", registry=r)
        self.slot_requests = Gauge(
            "tanbr_slot_requests", "Texts served so far in the current slot", registry=r
        )
        self.last_reward = Gauge(
            "tanbr_last_reward", "Reward of the latest policy update", registry=r
        )
        self.request_latency = Histogram(
            "tanbr_predict_latency_seconds",
            "Wall time of POST /v1/predict, queueing included",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_latency = Histogram(
            "tanbr_model_latency_seconds",
            "Wall time of one model forward over a micro-batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tanbr_batch_size",
            "Texts per micro-batch sent through the model",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.merge_latency = Histogram(
            "tanbr_merge_seconds",
            "Time to build one merged model (off the request path)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
