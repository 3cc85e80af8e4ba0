"""The OpenAI-compatible API of a served language model: completions, chat, models.

``POST /v1/completions`` and ``POST /v1/chat/completions`` take the fields OpenAI's clients
send (``model``, ``prompt`` / ``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``,
``seed``, ``n`` = 1, ``stream``, ``stream_options``) and answer with OpenAI's objects; a stream
is server-sent events, one ``data: {chunk}`` per piece of text and a final ``data: [DONE]``.
``GET /v1/models`` names the served model. Every answer also says which ``slot`` (and so which
merged model) generated it; its ``id`` takes feedback at ``POST /v1/feedback``.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
or unsupported parameter, 404 for an unknown model, 413 for an oversized body, 503 when the
service is overloaded, 500 only for a fault of the service. Parameters OpenAI knows but this
service does not implement are accepted at their neutral value and refused otherwise, so a
client never gets silently different behaviour.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypedDict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tanbr.serve.batcher import ServiceBusyError
from tanbr.serve.generation import (
    Delta,
    Event,
    Failed,
    Finished,
    GenerationConfig,
    GenerationEngine,
    GenerationError,
    GenerationJob,
    SamplingParams,
    Started,
)

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions endpoint
_SEED_RANGE = (-(2**63), 2**63 - 1)


def is_openai_path(path: str) -> bool:
    """Whether errors on ``path`` take OpenAI's shape."""
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS)


class OpenAIError(GenerationError):
    """An error answered in OpenAI's shape (the route's own checks; the engine's errors carry
    the same fields)."""


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI's API writes it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    elif status == 404 and code is None:
        kind = "not_found_error"
    elif status == 503:
        kind = "service_unavailable"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- request schemas ------------------------------------------------------------------------

_REQUEST = ConfigDict(extra="forbid", strict=True)

MaxTokens = Annotated[int | None, Field(description="tokens to generate at most")]
Temperature = Annotated[float | None, Field(description="0 is greedy; in [0, 2] (default 1)")]
TopP = Annotated[float | None, Field(description="nucleus sampling mass in (0, 1] (default 1)")]
Stop = Annotated[
    str | list[str] | None,
    Field(description="up to 4 sequences that end the text (not included in it)"),
]


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool | None = Field(
        default=None, description="send a last chunk with the token counts"
    )


class _Sampling(BaseModel):
    """The fields completions and chat share."""

    model_config = _REQUEST

    model: str = Field(description="the served model's id (see GET /v1/models)")
    max_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    stop: Stop = None
    seed: int | None = Field(default=None, description="makes sampling reproducible")
    n: int | None = Field(default=None, description="choices per request: only 1")
    stream: bool | None = Field(default=None, description="answer with server-sent events")
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted and ignored")
    # known to OpenAI's API, accepted at their neutral value only
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    #: field -> its neutral values (anything else is refused as unsupported)
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "logit_bias": ({},),
        "logprobs": (False, 0),
    }

    def unsupported(self) -> tuple[str, Any] | None:
        """The first field set to a value this service does not implement."""
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and value not in neutral:
                return name, value
        return None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: continue a prompt."""

    prompt: str | list[Any] = Field(description="the text to continue (one string)")
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.NEUTRAL,
        "echo": (False,),
        "best_of": (1,),
    }


class TextPart(BaseModel):
    model_config = _REQUEST

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _REQUEST

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the assistant's next message in a conversation."""

    messages: list[ChatMessage] = Field(description="the conversation so far")
    max_completion_tokens: MaxTokens = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.NEUTRAL,
        "top_logprobs": (0,),
        "tools": ([],),
        "tool_choice": ("none",),
        "response_format": ({"type": "text"},),
        "parallel_tool_calls": (False,),
    }


# --- response schemas -----------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """A ``text_completion`` (also each chunk of its stream, with ``usage`` left out)."""

    id: str = Field(description="the request id: give it to POST /v1/feedback")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    slot: int = Field(description="the slot whose merged model generated the text")
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str = Field(description="the request id: give it to POST /v1/feedback")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    slot: int = Field(description="the slot whose merged model generated the message")
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    slot: int
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tanbr"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "a bad or unsupported parameter"},
    404: {"description": "unknown model"},
    413: {"description": "request body too large"},
    503: {"description": "overloaded or starting"},
}


# --- the routes -----------------------------------------------------------------------------


def openai_router() -> APIRouter:
    """The routes; they find the engine, the model id and the limits on ``app.state``."""
    router = APIRouter(tags=["OpenAI-compatible"])

    @router.get("/v1/models", response_model=ModelList)
    def list_models(request: Request) -> ModelList:
        """The served model (one)."""
        return ModelList(data=[_card(request)])

    @router.get("/v1/models/{model}", response_model=ModelCard, responses=_ERRORS)
    def get_model(model: str, request: Request) -> ModelCard:
        _check_model(request, model)
        return _card(request)

    @router.post("/v1/completions", response_model=Completion, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Continue ``prompt`` with the current slot's merged model."""
        engine = _engine(request)
        _check_model(request, body.model)
        params = _params(body, body.max_tokens, _cap(request), default=None)
        prompt = _prompt(body.prompt)
        job_id = f"cmpl-{uuid.uuid4().hex}"
        return await _generate(request, engine, job_id, params, body, prompt=prompt)

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """The assistant's reply to ``messages``, rendered by the model's chat template."""
        engine = _engine(request)
        _check_model(request, body.model)
        if not request.app.state.chat_template:
            raise OpenAIError(
                400,
                f"model {body.model!r} has no chat template, so it cannot hold a chat; use"
                " POST /v1/completions with a prompt",
                code="chat_template_missing",
            )
        if (
            body.max_tokens is not None
            and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens
        ):
            raise OpenAIError(
                400,
                "max_tokens and max_completion_tokens disagree; give one of them",
                param="max_completion_tokens",
            )
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else None
        wanted = wanted if wanted is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = _params(body, wanted, _cap(request), default="fit", param=param)
        messages = _messages(body.messages)
        job_id = f"chatcmpl-{uuid.uuid4().hex}"
        return await _generate(request, engine, job_id, params, body, messages=messages)

    return router


def _engine(request: Request) -> GenerationEngine:
    if getattr(request.app.state, "manager", None) is None:
        raise OpenAIError(503, "the service is starting")
    engine: GenerationEngine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise OpenAIError(
            400,
            "the served model is a classifier, not a language model: use POST /v1/predict",
            code="unsupported_model",
        )
    return engine


def _card(request: Request) -> ModelCard:
    return ModelCard(id=request.app.state.model_id, created=request.app.state.model_created)


def _check_model(request: Request, model: str) -> None:
    served = request.app.state.model_id
    if model != served:
        raise OpenAIError(
            404,
            f"the model {model!r} does not exist; this service serves {served!r}",
            param="model",
            code="model_not_found",
        )


def _cap(request: Request) -> int:
    generation: GenerationConfig = request.app.state.config.generation
    return generation.max_tokens_cap


def _params(
    body: _Sampling,
    max_tokens: int | None,
    cap: int,
    *,
    default: Literal["fit"] | None,
    param: str = "max_tokens",
) -> SamplingParams:
    """The sampling parameters, each checked with a message that names it."""
    unsupported = body.unsupported()
    if unsupported is not None:
        name, value = unsupported
        raise OpenAIError(
            400,
            f"{name}={value!r} is not supported by this service (leave it out)",
            param=name,
            code="unsupported_parameter",
        )
    if body.n is not None and body.n != 1:
        raise OpenAIError(
            400,
            f"n must be 1: this service generates one choice per request (got {body.n})",
            param="n",
            code="unsupported_value",
        )
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
    if max_tokens is not None and max_tokens > cap:
        raise OpenAIError(
            400,
            f"{param} is {max_tokens}; this service generates at most {cap} tokens per request",
            param=param,
        )
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    if not 0.0 <= temperature <= 2.0:
        raise OpenAIError(
            400, f"temperature must be in [0, 2], got {body.temperature}", param="temperature"
        )
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    if not 0.0 < top_p <= 1.0:
        raise OpenAIError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
    stop = _stop(body.stop)
    if body.seed is not None and not _SEED_RANGE[0] <= body.seed <= _SEED_RANGE[1]:
        raise OpenAIError(400, f"seed must be a 64-bit integer, got {body.seed}", param="seed")
    fit = max_tokens is None and default == "fit"
    if max_tokens is None:
        max_tokens = cap if fit else min(COMPLETION_DEFAULT_MAX_TOKENS, cap)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=body.seed,
        fit=fit,
    )


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 4:
        raise OpenAIError(400, f"stop has {len(items)} sequences; at most 4", param="stop")
    if any(not s for s in items):
        raise OpenAIError(400, "stop sequences must not be empty", param="stop")
    return tuple(dict.fromkeys(items))


def _prompt(prompt: str | list[Any]) -> str:
    """One prompt string (a list holding one string is accepted, as OpenAI's API does)."""
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(p, str) for p in prompt):
            raise OpenAIError(
                400,
                f"prompt holds {len(prompt)} prompts; send one prompt per request",
                param="prompt",
                code="unsupported_value",
            )
        else:
            raise OpenAIError(
                400,
                "prompt must be a string (token ids and empty lists are not accepted)",
                param="prompt",
            )
    if not prompt.strip():
        raise OpenAIError(400, "prompt is empty (or only whitespace)", param="prompt")
    _check_unicode(prompt, "prompt")
    return prompt


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise OpenAIError(400, "messages is empty: send at least one message", param="messages")
    out = []
    for i, message in enumerate(messages):
        text = message.text()
        _check_unicode(text, f"messages[{i}].content")
        out.append({"role": message.role, "content": text})
    if not any(m["content"].strip() for m in out):
        raise OpenAIError(400, "every message is empty", param="messages")
    return out


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise OpenAIError(
            400,
            f"{param} is not valid Unicode (a lone surrogate at position {err.start})",
            param=param,
        ) from None


async def _generate(
    request: Request,
    engine: GenerationEngine,
    job_id: str,
    params: SamplingParams,
    body: _Sampling,
    *,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
) -> Response:
    """Queue the job, wait until it is admitted (errors of the prompt are still a 4xx then),
    and answer whole or as a stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    cancelled = threading.Event()

    def sink(event: Event) -> None:  # on the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody listens
            cancelled.set()

    job = GenerationJob(
        request_id=job_id,
        params=params,
        sink=sink,
        prompt=prompt,
        messages=messages,
        cancelled=cancelled,
    )
    try:
        engine.submit(job)
    except ServiceBusyError as err:
        raise OpenAIError(503, str(err)) from None
    try:
        first = await events.get()
    except BaseException:
        cancelled.set()
        raise
    if isinstance(first, Failed):
        raise _as_openai(first.error)
    assert isinstance(first, Started)
    chat = messages is not None
    answer = _Answer(job_id, request.app.state.model_id, first.slot, chat=chat)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(answer, events, cancelled, include_usage=include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    parts: list[str] = []
    try:
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise _as_openai(event.error)
            elif isinstance(event, Finished):
                return JSONResponse(answer.whole("".join(parts), event))
    finally:
        cancelled.set()  # (a no-op once finished; frees the replica if the client left)


class _Head(TypedDict):
    id: str
    created: int
    model: str
    slot: int


class _Answer:
    """Builds one request's response objects (whole, or chunk by chunk)."""

    def __init__(self, job_id: str, model: str, slot: int, *, chat: bool) -> None:
        self.id = job_id
        self.model = model
        self.slot = slot
        self.chat = chat
        self.created = int(time.time())

    def head(self) -> _Head:
        return {"id": self.id, "created": self.created, "model": self.model, "slot": self.slot}

    def whole(self, text: str, end: Finished) -> dict[str, Any]:
        usage = _usage(end)
        reason = _reason(end.finish_reason)
        head = self.head()
        if self.chat:
            return ChatCompletion(
                **head,
                choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)],
                usage=usage,
            ).model_dump()
        return Completion(
            **head, choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage
        ).model_dump()

    def chunk(
        self,
        text: str | None,
        *,
        finish: Finished | None = None,
        first: bool = False,
        usage: Usage | None = None,
    ) -> str:
        """One ``data:`` line of the stream."""
        head = self.head()
        reason = None if finish is None else _reason(finish.finish_reason)
        model: BaseModel
        if self.chat:
            delta = ChatDelta(role="assistant", content="") if first else ChatDelta(content=text)
            choices = (
                [] if usage is not None else [ChatChunkChoice(delta=delta, finish_reason=reason)]
            )
            if finish is not None:
                choices = [ChatChunkChoice(delta=ChatDelta(), finish_reason=reason)]
            model = ChatCompletionChunk(**head, choices=choices, usage=usage)
        else:
            choices_t = (
                []
                if usage is not None
                else [CompletionChoice(text=text or "", finish_reason=reason)]
            )
            model = Completion(**head, choices=choices_t, usage=usage)
        exclude = None if usage is not None else {"usage"}
        return f"data: {model.model_dump_json(exclude=exclude)}\n\n"


async def _stream(
    answer: _Answer,
    events: asyncio.Queue[Event],
    cancelled: threading.Event,
    *,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI's clients read them; a client that leaves mid-stream
    cancels its generation (its replica is freed)."""
    try:
        if answer.chat:
            yield answer.chunk(None, first=True)
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield answer.chunk(event.text)
            elif isinstance(event, Finished):
                yield answer.chunk("", finish=event)
                if include_usage:
                    yield answer.chunk(None, usage=_usage(event))
                break
            elif isinstance(event, Failed):
                err = event.error
                body = error_body(err.status, err.message, param=err.param, code=err.code)
                yield f"data: {_json(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _usage(end: Finished) -> Usage:
    return Usage(
        prompt_tokens=end.prompt_tokens,
        completion_tokens=end.completion_tokens,
        total_tokens=end.prompt_tokens + end.completion_tokens,
    )


def _reason(reason: str) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


def _as_openai(err: GenerationError) -> OpenAIError:
    return OpenAIError(err.status, err.message, param=err.param, code=err.code)
