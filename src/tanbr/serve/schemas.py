"""Wire schemas of the HTTP API (pydantic models; FastAPI derives the OpenAPI docs from them).

Request models are strict (no silent coercion of ``3`` into ``"3"``) and forbid unknown fields,
so a typo in a field name is a 422 that names the field instead of a silently ignored input.
Limits that depend on the service's configuration (text length, batch size) are checked by the
app, which knows them; the schemas check what is always true.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

_STRICT = ConfigDict(extra="forbid", strict=True)

RequestId = Annotated[str, Field(min_length=1, max_length=128, description="id from /v1/predict")]
Reward = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class PredictRequest(BaseModel):
    """One text (``text``) or a batch (``texts``); exactly one of the two."""

    model_config = _STRICT

    text: str | None = Field(default=None, description="a single text to classify")
    texts: list[str] | None = Field(default=None, description="a batch of texts to classify")

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (one text) and 'texts' (a batch)")
        return self

    def items(self) -> list[str]:
        """The texts to serve, in order (a single text is a batch of one)."""
        if self.text is not None:
            return [self.text]
        assert self.texts is not None
        return list(self.texts)


class Prediction(BaseModel):
    """The answer for one text: its id for feedback, the slot that served it, label and probs."""

    request_id: str
    slot: int = Field(description="id of the slot whose merged model served this text")
    label: str = Field(description="the most probable label")
    probs: dict[str, float] = Field(description="probability of every label (sums to 1)")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class FeedbackRequest(BaseModel):
    """Feedback for one served request: its true label, or directly a reward in [0, 1]."""

    model_config = _STRICT

    request_id: RequestId
    label: str | None = Field(default=None, description="the request's true label")
    reward: Reward | None = Field(default=None, description="a reward in [0, 1] instead of a label")

    @model_validator(mode="after")
    def _one_of(self) -> FeedbackRequest:
        if (self.label is None) == (self.reward is None):
            raise ValueError("give exactly one of 'label' (the true label) and 'reward'")
        return self


class FeedbackResponse(BaseModel):
    """Acknowledgement: the feedback is durable and will count for the slot named here."""

    request_id: str
    slot: int = Field(description="the slot that served the request; the feedback counts for it")
    reward: float = Field(description="this request's reward (1/0 for a correct/wrong label)")
    correct: bool | None = Field(description="whether the prediction was right (label feedback)")
    pending: int = Field(description="acknowledged feedback not yet learned by the policy")


class LatencyFigures(BaseModel):
    """Recent latency figures (milliseconds) over a sliding window of requests."""

    window: int = Field(description="number of recent observations summarised")
    predict_p50_ms: float | None
    predict_p99_ms: float | None
    model_p50_ms: float | None = Field(description="model forward per micro-batch, median")
    merge_p50_ms: float | None = Field(description="building one merged model, median")
    boundary_p50_ms: float | None = Field(
        description="a whole slot boundary (learn, estimate, decide, merge, persist), median"
    )
    propagation_p50_ms: float | None = Field(
        default=None,
        description="plan propagation: a slot's decision to the last replica's swap, median",
    )
    propagation_p99_ms: float | None = Field(default=None, description="... its 99th percentile")


class StatusResponse(BaseModel):
    """Where the service stands: the slot, what it serves with, how it has learned."""

    slot: int
    slot_requests: int = Field(description="texts served so far in the current slot")
    slot_age_s: float = Field(description="seconds since the current slot opened")
    slot_size: int = Field(description="a slot closes after this many texts ...")
    slot_seconds: float | None = Field(description="... or after this many seconds")
    policy: str
    kind: str = Field(description="how the slot is served: merge, full (MoE) or soft")
    mix: list[float] = Field(description="estimated task mix (the policy's context)")
    action: list[float] = Field(description="the policy's action for this slot")
    coeffs: dict[str, list[float]] = Field(description="merge coefficients per MoE block")
    merges: int = Field(description="merged models built since the service first started")
    requests: int = Field(description="texts served since the service first started")
    feedback: int = Field(description="feedback acknowledged since the service first started")
    pending_feedback: int
    policy_updates: int
    boundary_busy: bool = Field(
        default=False, description="a slot boundary is due or running (merging, learning)"
    )
    replicas: int = Field(default=1, description="model replicas serving (live ones on Ray)")
    latency: LatencyFigures


class HealthResponse(BaseModel):
    status: str
    slot: int


class CloseSlotResponse(BaseModel):
    """The slot that was closed and the one that now serves."""

    closed: int
    slot: int


class ErrorResponse(BaseModel):
    """Every 4xx carries one sentence naming the problem."""

    detail: str
