"""Text generation on the slot's merged model: sampling, stop sequences, streaming, KV caches.

One engine thread runs every generation in flight, one token each per round (iteration-level
scheduling, as vLLM and TGI do): a new request is admitted between two rounds, so it waits for
at most one round, not for the others to finish, and a long generation never holds the rest
back. Each generation is *pinned* at admission to the replica that serves then (a
:class:`~tanbr.serve.slots.Lease`); its prompt is prefilled alone, then it joins that replica's
:class:`~tanbr.backend.protocol.DecodeBatch`, whose KV cache holds every sequence of the
replica, and each round is one forward pass per replica for all its sequences. A generation
runs to its end on its replica's merged model even if a slot boundary swaps replicas meanwhile,
and the boundary re-merges that replica only once its last generation has finished (the slot
manager counts them). Batching changes the floating-point sums a little, so a seeded sampled
continuation is reproducible for the same batch of companions (alone: always), not under any
load.

The text of a continuation is decoded incrementally (a window of the last tokens, so that a
token whose text depends on its neighbours is decoded with them) and streamed as it becomes
final: a tail that could still turn into a stop sequence, or an incomplete UTF-8 character, is
held back until it cannot. A generation ends at a stop token of the model ("stop"), at a stop
sequence, which is not part of the text ("stop"), or after ``max_tokens`` ("length").
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tanbr.backend.protocol import DecodeBatch, GenerativeBackend
from tanbr.serve.batcher import ServiceBusyError
from tanbr.serve.ledger import Completion
from tanbr.serve.service import GenerativeService
from tanbr.serve.slots import Lease

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
_DECODE_WINDOW = 6  # tokens before the new one decoded with it (their text may depend on it)
_NUCLEUS_FIRST = 64  # tokens looked at first for the top_p nucleus


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Limits of the generation engine.

    ``max_tokens_cap``: the largest ``max_tokens`` a request may ask for; ``max_running``:
    generations in flight at once (more wait in a queue of ``max_queue``, then 503).
    """

    max_tokens_cap: int = 512
    max_running: int = 64
    max_queue: int = 256

    def __post_init__(self) -> None:
        if self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one continuation is drawn: ``temperature`` 0 is greedy; ``top_p`` < 1 samples from
    the smallest set of tokens whose probability reaches it; ``seed`` makes sampling
    reproducible (the same prompt, seed and merged model give the same text). ``fit``: the
    client set no length, so ``max_tokens`` shrinks to the room the context has left instead
    of refusing a prompt that leaves less."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    fit: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(not s for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} non-empty sequences")


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id drawn from ``logits`` (V,) as ``params`` say.

    One uniform draw against the cumulative distribution (``torch.multinomial`` costs ten
    times as much on a CPU for one draw); the nucleus of ``top_p`` is found among the top
    64 tokens, widened only when they hold less than ``top_p`` (a full sort is the slow part).
    """
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    ids: torch.Tensor | None = None
    if params.top_p < 1.0:
        k = min(_NUCLEUS_FIRST, probs.numel())
        while True:
            top, idx = torch.topk(probs, k)  # descending
            mass = torch.cumsum(top, dim=0)
            if float(mass[-1]) >= params.top_p or k == probs.numel():
                break
            k = min(4 * k, probs.numel())
        keep = (mass - top) < params.top_p  # the first is always kept
        probs, ids = top[keep], idx[keep]
    cdf = torch.cumsum(probs, dim=0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u, right=True)), cdf.numel() - 1)
    return int(ids[i]) if ids is not None else i


class TextStream:
    """The text of a continuation as its tokens come, and the part of it that is final.

    ``push`` adds a token; ``take`` returns the text that may be sent now and whether a stop
    sequence ended it (the stop sequence itself is never sent).
    """

    def __init__(
        self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int], stop: Sequence[str]
    ) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-_DECODE_WINDOW:])  # context for the first token's text
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(stop)
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of ``text`` already taken

    def push(self, token: int) -> None:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def take(self, *, final: bool = False) -> tuple[str, bool]:
        """The text that became final since the last call, and whether a stop sequence hit."""
        hits = [i for s in self._stop if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final:
            end, stopped = len(self.text), False
        else:
            end, stopped = len(self.text) - self._held_back(), False
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta, stopped

    def _held_back(self) -> int:
        """Characters at the end that could still begin a stop sequence."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


# --- what the engine tells a request's listener -----------------------------------------------


@dataclass(frozen=True)
class Started:
    """The request was admitted: the slot whose merged model generates it, its prompt size."""

    slot: int
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    """Final text of the continuation, in order."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end: why, and the token counts (stored, so the id now takes feedback)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerationError(Exception):
    """A request the engine cannot serve: ``status`` 4xx for the client's mistake (``param``,
    ``code`` as OpenAI's API names them), 5xx for a fault or an overload."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Failed:
    error: GenerationError


Event = Started | Delta | Finished | Failed


@dataclass(eq=False)
class GenerationJob:
    """One request for the engine: a prompt, or chat ``messages`` the model's template renders.

    ``sink`` receives the events (from the engine thread); ``cancelled`` is set by the request's
    side when nobody listens any more (a client gone mid-stream), which frees its replica.
    """

    request_id: str
    params: SamplingParams
    sink: Callable[[Event], None]
    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a generation job needs exactly one of prompt and messages")


@dataclass(eq=False)
class _Running:
    job: GenerationJob
    lease: Lease
    backend: GenerativeBackend
    prompt: str
    prompt_ids: list[int]
    stream: TextStream
    generator: torch.Generator
    logits: torch.Tensor  # (V,) of the next token
    max_tokens: int
    output: list[int] = field(default_factory=list)
    logprob: float = 0.0  # sum of log p(token) under the serving model (temperature 1)
    model_ms: float = 0.0


@dataclass(eq=False)
class _Cohort:
    """The generations pinned to one replica, in the order of their rows in ``batch``."""

    batch: DecodeBatch
    members: list[_Running] = field(default_factory=list)


class GenerationEngine:
    """The thread that generates every admitted request, one token each per round."""

    def __init__(self, manager: GenerativeService, config: GenerationConfig) -> None:
        if not manager.generative:
            raise ValueError("the generation engine needs a language model (kind 'lm')")
        self.manager = manager
        self.config = config
        self._queue: queue.Queue[GenerationJob | None] = queue.Queue(maxsize=config.max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cohorts: dict[int, _Cohort] = {}  # id of the replica -> its generations
        self.running = 0

    # --- lifecycle and the request side ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tanbr-generator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End every generation in flight (their clients get a 503) and stop the thread."""
        self._stopping = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            logger.warning("generation queue full at shutdown")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: GenerationJob) -> None:
        """Queue a request; it is admitted at the start of the next round."""
        if self._stopping:
            raise ServiceBusyError("the service is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServiceBusyError(
                f"generation queue is full ({self.config.max_queue} requests waiting)"
            ) from None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # --- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                jobs: list[GenerationJob | None] = []
                if self.running == 0:
                    jobs.append(self._queue.get())  # idle: wait for work
                while self.running + len(jobs) < self.config.max_running:
                    try:
                        jobs.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if None in jobs:
                    self._shutdown([j for j in jobs if j is not None])
                    return
                for job in jobs:
                    assert job is not None
                    self._admit(job)
                for key in list(self._cohorts):
                    self._round(self._cohorts[key])
                    if not self._cohorts[key].members:
                        del self._cohorts[key]
                self.running = sum(len(c.members) for c in self._cohorts.values())

    def _admit(self, job: GenerationJob) -> None:
        """Pin the job to the replica serving now, render and check its prompt, prefill it,
        and add it to that replica's batch."""
        if job.cancelled.is_set():
            return
        try:
            lease = self.manager.lease()
        except ServiceBusyError as err:
            job.sink(Failed(GenerationError(503, str(err))))
            return
        backend = lease.backend
        assert isinstance(backend, GenerativeBackend)
        try:
            prompt, ids, max_tokens = self._prompt(job, backend)
            job.sink(Started(lease.slot, len(ids)))
            t0 = time.perf_counter()
            logits, cache = backend.next_logits(ids, None)  # the prompt's KV cache
            model_ms = (time.perf_counter() - t0) * 1e3
            cohort = self._cohorts.get(id(lease.replica))
            if cohort is None:
                cohort = self._cohorts[id(lease.replica)] = _Cohort(backend.decode_batch())
            cohort.batch.add(cache)
        except GenerationError as err:
            self.manager.release(lease)
            job.sink(Failed(err))
            return
        except Exception:
            logger.exception("prefill failed for %s", job.request_id)
            self.manager.release(lease)
            job.sink(Failed(GenerationError(500, "the model failed on this request")))
            return
        seed = job.params.seed if job.params.seed is not None else secrets.randbits(63)
        cohort.members.append(
            _Running(
                job=job,
                lease=lease,
                backend=backend,
                prompt=prompt,
                prompt_ids=ids,
                stream=TextStream(backend.decode, ids, job.params.stop),
                generator=torch.Generator().manual_seed(seed),
                logits=logits,
                max_tokens=max_tokens,
                model_ms=model_ms,
            )
        )

    def _round(self, cohort: _Cohort) -> None:
        """Each generation of a replica draws its next token; those that go on are run one
        step, together."""
        going = [i for i, r in enumerate(cohort.members) if not self._advance(r)]
        members = [cohort.members[i] for i in going]
        try:
            cohort.batch.keep(going)
            if not members:
                cohort.members = []
                return
            t0 = time.perf_counter()
            logits = cohort.batch.step([r.output[-1] for r in members])
            share = (time.perf_counter() - t0) * 1e3 / len(members)
        except Exception:
            logger.exception("a decoding step failed for %d generations", len(members))
            for r in members:
                self.manager.release(r.lease)
                r.job.sink(Failed(GenerationError(500, "the model failed on this request")))
            cohort.members = []
            cohort.batch.keep([])
            return
        for r, row in zip(members, logits, strict=True):
            r.logits = row
            r.model_ms += share
        cohort.members = members

    def _prompt(self, job: GenerationJob, backend: GenerativeBackend) -> tuple[str, list[int], int]:
        """The prompt text and ids, and how many tokens may follow them."""
        if job.messages is not None:
            try:
                prompt = backend.render_chat(job.messages)
            except Exception as err:  # a template may refuse a conversation (jinja raises)
                raise GenerationError(
                    400, f"the chat template refused the messages: {err}", param="messages"
                ) from None
            ids = backend.encode_prompt(prompt, special_tokens=False)
        else:
            assert job.prompt is not None
            prompt = job.prompt
            ids = backend.encode_prompt(prompt)
        param = "messages" if job.messages is not None else "prompt"
        if not ids:
            raise GenerationError(400, f"the {param} has no token", param=param)
        limit = backend.context_length
        max_tokens = job.params.max_tokens
        if job.params.fit:
            max_tokens = min(max_tokens, limit - len(ids))
        wanted = len(ids) + max(1, max_tokens)
        if wanted > limit:
            raise GenerationError(
                400,
                f"this model's maximum context length is {limit} tokens; the {param} has"
                f" {len(ids)} and max_tokens asks for {max(1, max_tokens)} more ({wanted})",
                param=param if len(ids) >= limit else "max_tokens",
                code="context_length_exceeded",
            )
        return prompt, ids, max_tokens

    def _advance(self, r: _Running) -> bool:
        """Draw one token and send what became final; True when the generation has ended."""
        if r.job.cancelled.is_set():
            self.manager.release(r.lease)
            logger.debug("%s cancelled after %d tokens", r.job.request_id, len(r.output))
            return True
        try:
            token = sample_token(r.logits, r.job.params, r.generator)
            r.output.append(token)
            r.logprob += float(torch.log_softmax(r.logits.float(), dim=-1)[token])
            finish: str | None = None
            if token in r.backend.stop_token_ids:
                finish = "stop"
            else:
                r.stream.push(token)
            final = finish is not None or len(r.output) >= r.max_tokens
            delta, stopped = r.stream.take(final=final)
            if stopped:
                finish = "stop"
            elif finish is None and final:
                finish = "length"
            if delta:
                r.job.sink(Delta(delta))
            if finish is not None:
                self._finish(r, finish)
                return True
        except Exception:
            logger.exception("generation failed for %s", r.job.request_id)
            self.manager.release(r.lease)
            r.job.sink(Failed(GenerationError(500, "the model failed on this request")))
            return True
        return False

    def _finish(self, r: _Running, reason: str) -> None:
        """Record the completion durably (its id then takes feedback), free its replica, and
        tell the client (in that order)."""
        completion = Completion(
            request_id=r.job.request_id,
            slot=r.lease.slot,
            prompt=r.prompt,
            prompt_ids=tuple(r.prompt_ids),
            output_ids=tuple(r.output),
            text=r.stream.text[: r.stream.sent],
            finish_reason=reason,
            served_nll=-r.logprob / len(r.output),
        )
        try:
            self.manager.complete(completion, model_ms=r.model_ms)
        except Exception:
            logger.exception("recording %s failed", r.job.request_id)
            self.manager.release(r.lease)
            r.job.sink(Failed(GenerationError(500, "the completion could not be recorded")))
            return
        self.manager.release(r.lease)
        r.job.sink(Finished(reason, len(r.prompt_ids), len(r.output)))

    def _shutdown(self, waiting: list[GenerationJob]) -> None:
        error = GenerationError(503, "the service is shutting down")
        for cohort in self._cohorts.values():
            for r in cohort.members:
                self.manager.release(r.lease)
                r.job.sink(Failed(error))
        self._cohorts.clear()
        for job in waiting:
            job.sink(Failed(error))
        while True:
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                break
            if late is not None:
                late.sink(Failed(error))
        self.running = 0
