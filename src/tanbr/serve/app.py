"""The HTTP service: ``create_app(config) -> FastAPI``.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

* ``POST /v1/predict``: one text or a batch -> label, class probabilities, request id, slot id.
* ``POST /v1/feedback``: a request id with its true label, or a reward in [0, 1]; counts for the
  slot that served the request (token-protected when a token is set).
* ``GET /v1/status``: the slot, estimated mix, action and coeffs in use, merges, latencies.
* ``POST /v1/admin/close-slot``: close the current slot now (token-protected).
* ``GET /healthz``, ``GET /metrics`` (Prometheus text format).
* A language model instead serves the OpenAI-compatible ``POST /v1/completions``,
  ``POST /v1/chat/completions`` and ``GET /v1/models`` (:mod:`tanbr.serve.openai_api`).

Every client mistake is a 4xx whose ``detail`` is one sentence naming the problem (OpenAI's
``{"error": {...}}`` on the OpenAI-compatible routes); a 5xx always means a fault of the
service.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tanbr.serve.batcher import ServiceBusyError
from tanbr.serve.generation import GenerationEngine
from tanbr.serve.metrics import CONTENT_TYPE, ServiceMetrics
from tanbr.serve.openai_api import OpenAIError, error_body, is_openai_path, openai_router
from tanbr.serve.replicas import Replicas, ServeConfig, build_replicas
from tanbr.serve.schemas import (
    CloseSlotResponse,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
    StatusResponse,
)
from tanbr.serve.service import GenerativeService, SlotService
from tanbr.serve.slots import SlotManager
from tanbr.serve.state import (
    DuplicateFeedbackError,
    StateLock,
    StateStore,
    UnknownRequestError,
)

logger = logging.getLogger(__name__)

API_VERSION = "1"


class ClientError(Exception):
    """A 4xx with a message naming the problem."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def create_app(
    config: ServeConfig,
    *,
    build: Callable[[ServeConfig], Replicas] | None = None,
    start: Callable[[ServiceMetrics], SlotService] | None = None,
) -> FastAPI:
    """The FastAPI app; the model is loaded and the state resumed when the app starts.

    ``build`` makes the two replicas (defaults to :func:`build_replicas`). ``start`` hands the
    slots to another owner instead (a Ray Serve replica following its controller, which holds
    the state folder): it returns the started slot service.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start is not None:
            try:
                service = await asyncio.to_thread(start, metrics)
            except Exception as err:
                app.state.startup_error = err
                raise
            app.state.manager = service
            app.state.labels = frozenset(service.labels)
            engine = _start_engine(app, service, config)
            try:
                yield
            finally:
                if engine is not None:
                    await asyncio.to_thread(engine.stop)
                await asyncio.to_thread(service.stop)
            return
        make = build
        if make is None:
            make = build_replicas
        lock = StateLock(config.state_dir)
        try:
            lock.acquire()  # one serving process per state folder
            replicas = await asyncio.to_thread(make, config)
            store = StateStore(config.state_dir)
            manager = SlotManager(
                replicas.systems,
                labels=replicas.labels,
                meta=replicas.meta,
                store=store,
                metrics=metrics,
                config=config.slots,
            )
            await asyncio.to_thread(manager.start)
        except Exception as err:  # kept for the command line, which reports it in one line
            lock.release()
            app.state.startup_error = err
            raise
        engine = _start_engine(app, manager, config)
        app.state.manager = manager
        app.state.labels = frozenset(replicas.labels)
        logger.info("serving policy %r, slot %d", manager.policy_name, manager.slot)
        try:
            yield
        finally:
            if engine is not None:
                await asyncio.to_thread(engine.stop)
            await asyncio.to_thread(manager.stop)
            store.close()
            lock.release()

    metrics = ServiceMetrics()
    app = FastAPI(
        title="Tanbr",
        version=API_VERSION,
        summary="Task-aware expert merging for online MoE inference",
        description=__doc__,
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse, "description": "invalid input"}},
    )
    app.state.config = config
    app.state.metrics = metrics
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    _install_error_handlers(app)
    app.include_router(openai_router())

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.http_requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    def manager_of(request: Request) -> SlotService:
        manager: SlotService | None = getattr(request.app.state, "manager", None)
        if manager is None:
            raise HTTPException(503, "the service is starting")
        return manager

    def require_token(request: Request) -> None:
        """Bearer-token check for feedback and admin endpoints (when a token is set)."""
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), config.token.encode()):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    protected: dict[Any, Any] = {
        "dependencies": [Depends(require_token)],
        "responses": {401: {"model": ErrorResponse, "description": "missing or wrong token"}},
    }

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={503: {"model": ErrorResponse, "description": "overloaded or starting"}},
    )
    async def predict(body: PredictRequest, request: Request) -> PredictResponse:
        """Classify one text (``text``) or a batch (``texts``) with the current slot's model."""
        t0 = time.perf_counter()
        texts = body.items()
        _check_texts(texts, config, field="text" if body.text is not None else "texts")
        manager = manager_of(request)
        if manager.generative:
            raise ClientError(
                400,
                "the served model is a language model: use POST /v1/completions or"
                " POST /v1/chat/completions",
            )
        try:
            future = manager.submit(texts)
        except ServiceBusyError as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from None
        answers = await asyncio.wrap_future(future)
        elapsed = time.perf_counter() - t0
        manager.observe_latency(elapsed * 1e3)
        metrics.request_latency.observe(elapsed)
        labels = manager.labels
        return PredictResponse(
            predictions=[
                Prediction(
                    request_id=a.request_id,
                    slot=a.slot,
                    label=a.label,
                    probs=dict(zip(labels, np.round(a.probs, 6).tolist(), strict=True)),
                )
                for a in answers
            ]
        )

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        responses={
            404: {"model": ErrorResponse, "description": "unknown request id"},
            409: {"model": ErrorResponse, "description": "feedback already given"},
            **protected["responses"],
        },
        dependencies=protected["dependencies"],
    )
    def post_feedback(body: FeedbackRequest, request: Request) -> FeedbackResponse:
        """Give a served request's true label (or a reward); durable once acknowledged."""
        manager = manager_of(request)
        if body.label is not None and manager.generative:
            raise ClientError(
                422,
                "the served model is a language model, whose completions have no label: give a"
                " reward in [0, 1] instead",
            )
        if body.label is not None and body.label not in request.app.state.labels:
            examples = ", ".join(repr(x) for x in sorted(request.app.state.labels)[:3])
            raise ClientError(
                422, f"label {body.label!r} is not one of the model's labels (e.g. {examples})"
            )
        try:
            row = manager.feedback(body.request_id, label=body.label, reward=body.reward)
        except UnknownRequestError:
            raise ClientError(404, f"unknown request id {body.request_id!r}") from None
        except DuplicateFeedbackError:
            raise ClientError(
                409, f"feedback for request {body.request_id!r} was already given"
            ) from None
        correct = None if row.label is None else row.label == row.predicted
        reward = row.reward if row.reward is not None else float(bool(correct))
        return FeedbackResponse(
            request_id=row.request_id,
            slot=row.slot,
            reward=reward,
            correct=correct,
            pending=manager.pending_feedback(),
        )

    @app.get("/v1/status", response_model=StatusResponse)
    def status(request: Request) -> dict[str, Any]:
        """The current slot, its mix, action and coeffs, merges so far and latency figures."""
        return manager_of(request).status()

    @app.post(
        "/v1/admin/close-slot",
        response_model=CloseSlotResponse,
        responses=protected["responses"],
        dependencies=protected["dependencies"],
    )
    def close_slot(request: Request) -> CloseSlotResponse:
        """Close the current slot now: learn, decide, re-merge and swap (returns when done)."""
        closed, slot = manager_of(request).close_slot(reason="admin")
        return CloseSlotResponse(closed=closed, slot=slot)

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse, "description": "starting or failed"}},
    )
    def healthz(request: Request) -> HealthResponse:
        """200 once the model serves; 503 while starting or after a failed slot boundary."""
        manager = manager_of(request)
        if manager.failure is not None:
            raise HTTPException(503, f"slot boundary failed: {manager.failure}")
        return HealthResponse(status="ok", slot=manager.slot)

    @app.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _check_texts(texts: Sequence[str], config: ServeConfig, *, field: str) -> None:
    """The configured limits: batch size, empty and oversized texts."""
    if not texts:
        raise ClientError(422, f"{field} is empty: send at least one text")
    if len(texts) > config.max_texts:
        raise ClientError(
            422, f"{field} has {len(texts)} texts; the limit is {config.max_texts} per call"
        )
    for i, text in enumerate(texts):
        where = field if field == "text" else f"{field}[{i}]"
        if not text.strip():
            raise ClientError(422, f"{where} is empty (or only whitespace)")
        if len(text) > config.max_chars:
            raise ClientError(
                422, f"{where} has {len(text)} characters; the limit is {config.max_chars}"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate, sent as a \udXXX escape
            raise ClientError(
                422, f"{where} is not valid Unicode (a lone surrogate at position {err.start})"
            ) from None


def _start_engine(
    app: FastAPI, service: SlotService, config: ServeConfig
) -> GenerationEngine | None:
    """A language model: the generation engine the OpenAI-compatible routes feed."""
    app.state.engine = None
    if not service.generative:
        return None
    manager = cast(GenerativeService, service)  # (generative: it leases model copies)
    engine = GenerationEngine(manager, config.generation)
    engine.start()
    backend = manager.backend
    app.state.model_id = config.model_id(backend.checkpoint)
    app.state.model_created = int(time.time())
    app.state.chat_template = getattr(backend, "chat_template", None) is not None
    app.state.engine = engine
    return engine


def _install_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every error: ``{"detail": "<sentence naming the problem>"}``."""

    def answer(
        request: Request,
        status: int,
        detail: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> JSONResponse:
        if is_openai_path(request.url.path):
            body = error_body(status, detail, param=param, code=code)
        else:
            body = {"detail": detail}
        return JSONResponse(body, status_code=status, headers=headers)

    async def client_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ClientError):
            return await server_error(request, exc)
        return answer(request, exc.status, exc.detail)

    async def openai_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, OpenAIError):
            return await server_error(request, exc)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return answer(
            request, exc.status, exc.message, param=exc.param, code=exc.code, headers=headers
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, RequestValidationError):
            return await server_error(request, exc)
        if is_openai_path(request.url.path):  # OpenAI's API answers 400 for a bad parameter
            message, param = _describe_openai(exc.errors())
            return answer(request, 400, message, param=param)
        return answer(request, 422, _describe(exc.errors()))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):
            return await server_error(request, exc)
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "the body could not be parsed as JSON (it must be UTF-8 encoded JSON)"
        return answer(request, exc.status_code, detail, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(request, 500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(ClientError, client_error)
    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


def _describe_openai(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A validation error in OpenAI's words, and the parameter it is about."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc and first.get("type") != "json_invalid" else None
    if first.get("type") == "extra_forbidden" and param is not None:
        return f"Unrecognized request argument supplied: {param}", param
    return _describe(errors), param


def _describe(errors: Sequence[Any]) -> str:
    """pydantic's error list as one sentence: ``texts[2]: Input should be a valid string``."""
    parts = []
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ""
        for item in loc:
            where += f"[{item}]" if item.isdigit() else (f".{item}" if where else item)
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid"))
        if kind == "json_invalid":
            msg = f"body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
            where = ""
        elif kind == "missing" and not where:
            msg = "a JSON body is required"
        elif kind in ("model_attributes_type", "dict_type") and not where:
            msg = 'the body must be a JSON object, e.g. {"text": "..."}'
        elif kind.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


class _BodyLimit:
    """Reject bodies over ``max_bytes`` with 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._reject(send, declared, scope.get("path", ""))
                    return
        # buffer the body (at most max_bytes), then replay it: chunked bodies are bounded too
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(send, size, scope.get("path", ""))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _reject(self, send: Send, size: int, path: str) -> None:
        detail = (
            f"request body of {size} bytes is over the limit of {self.max_bytes} bytes"
            if size >= 0
            else "invalid Content-Length header"
        )
        status = 413 if size >= 0 else 400
        body = error_body(status, detail) if is_openai_path(path) else {"detail": detail}
        response = JSONResponse(body, status_code=status)
        await response({"type": "http"}, _no_receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive callable that yields ``messages`` first, then defers to ``receive``."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
