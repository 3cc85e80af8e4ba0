"""A transformers MoE causal language model (``*ForCausalLM``) as a backend.

A request's text is a prompt. What the model predicts for it is its greedy next token
(:attr:`~tanbr.backend.protocol.Prediction.ids`); the label-free proxy compares that token with
the full MoE's (``reference``). :meth:`HFCausalLMBackend.nll` measures how likely the model as
set finds a reference continuation of the prompt (or, with no continuation, the text itself):
the ``likelihood`` scorer's raw material. Prompts longer than ``max_length`` tokens keep their
end, the part the next token depends on.

Logits are computed only where they are read (the model's ``logits_to_keep``), so that a large
vocabulary costs one row per request, not one per token.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from tanbr.backend.hf import HFBackend
from tanbr.backend.protocol import Prediction
from tanbr.backend.requests import Requests
from tanbr.backend.tokenizer import Batch, encode, pad_batches


class HFCausalLMBackend(HFBackend):
    """Serves a transformers MoE ``*ForCausalLM`` checkpoint.

    ``predict`` gives each prompt's greedy next-token id (``ids``; ``probs`` is (n, 0));
    ``reference`` the full MoE's; ``gates+head`` equals ``gates`` (a language model has no
    class head). ``nll_batch_size`` bounds the requests scored per forward pass by
    :meth:`nll`, whose logits cover every scored token. See
    :class:`~tanbr.backend.hf.HFBackend` for the other parameters.
    """

    kind = "lm"

    def __init__(
        self, loaded: Any, tokenizer: Any, *, nll_batch_size: int = 8, **kwargs: Any
    ) -> None:
        if nll_batch_size < 1:
            raise ValueError(f"nll_batch_size must be >= 1, got {nll_batch_size}")
        super().__init__(loaded, tokenizer, **kwargs)
        self.tokenizer.truncation_side = "left"  # a prompt keeps its end
        self.nll_batch_size = nll_batch_size
        self.nll_ms = 0.0  # time spent in nll, for reports
        self._nll_memo: dict[bytes, dict[tuple[int, str | None], float]] = {}
        self._forward_args = frozenset(inspect.signature(self.model.forward).parameters)

    def _caches(self) -> list[dict[Any, Any]]:
        return [*super()._caches(), self._nll_memo]

    @property
    def vocab_size(self) -> int:
        """The tokens each position chooses from (ln of it: the loss of a uniform guess)."""
        model: Any = self.model  # a transformers model: its config names the vocabulary
        return int(model.config.vocab_size)

    def _outputs(self, batch: Batch) -> np.ndarray:
        """(b,) int64 the greedy next token after each prompt."""
        last = batch.last.unsqueeze(1)  # (b, 1) one position per request
        logits = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            logits_to_keep=last,
        ).logits  # (b, 1, V)
        return np.asarray(logits[:, -1].argmax(dim=-1).numpy(), dtype=np.int64)

    def _head(self, batch: Batch) -> np.ndarray:
        self._body()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        return np.zeros((batch.input_ids.shape[0], 0))

    def _empty_outputs(self) -> np.ndarray:
        return np.zeros((0,), dtype=np.int64)

    def _prediction(self, values: np.ndarray, latency_ms: float, merge_ms: float) -> Prediction:
        ids = np.asarray(values, dtype=np.int64)
        return Prediction(np.zeros((len(ids), 0), dtype=np.float32), latency_ms, merge_ms, ids=ids)

    def nll(self, requests: Requests, targets: Sequence[str | None]) -> np.ndarray:
        """(n,) mean negative log-likelihood per token, under the model as currently set.

        With a target, the target's tokens are scored as the continuation of the request's
        prompt; with None, the request's own text is scored (each token given those before
        it, the first given the tokenizer's begin-of-sequence token when it has one): a
        label-free likelihood. Memoised per (served model, request row, target) with ``memo``.
        """
        targets = tuple(targets)
        if len(targets) != len(requests):
            raise ValueError(f"nll: {len(targets)} targets for {len(requests)} requests")
        rows = self._rows(requests)
        if not self.memo or rows is None:
            self.served.sync()
            return self._nll(requests.texts, targets)
        cache = self._nll_memo.setdefault(self.served.key(), {})
        keys = list(zip(rows, targets, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        if todo:
            self.served.sync()
            fresh = self._nll([self.texts[r] for r, _ in todo], [t for _, t in todo])
            cache.update(zip(todo, fresh.tolist(), strict=True))
        return np.array([cache[k] for k in keys], dtype=np.float64)

    def _nll(self, texts: Sequence[str], targets: Sequence[str | None]) -> np.ndarray:
        sequences, starts = [], []
        for i, (text, target) in enumerate(zip(texts, targets, strict=True)):
            ids, start = self._scored_ids(text, target)
            if len(ids) - start < 1:
                what = "its text" if target is None else f"its target {target!r}"
                raise ValueError(f"nll: request {i}: {what} has no token to score")
            sequences.append(ids)
            starts.append(start)
        return self._nll_sequences(sequences, starts)

    def _nll_sequences(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> np.ndarray:
        """(n,) mean NLL per token of ``sequences[i][starts[i]:]`` given what precedes it."""
        t0 = time.perf_counter()
        out = np.zeros(len(sequences), dtype=np.float64)
        pad = int(self.tokenizer.pad_token_id)
        with torch.inference_mode():
            for batch in pad_batches(sequences, self.nll_batch_size, pad):
                if self.merger.mode == "soft":
                    self.merger.set_token_mask(batch.attention_mask)
                # position t predicts token t + 1: keep the positions before each scored token
                width = batch.input_ids.shape[1]
                first = torch.as_tensor([starts[p] for p in batch.pos.tolist()])  # (b,)
                cols = torch.arange(width)
                scored = (cols >= first[:, None]) & (cols < batch.lengths[:, None])  # (b, T)
                keep = torch.zeros_like(scored)
                keep[:, :-1] = scored[:, 1:]
                logits = self.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    use_cache=False,
                    logits_to_keep=keep,
                ).logits  # (sum of scored tokens, V), row-major over (b, T)
                logp = torch.log_softmax(logits.float(), dim=-1)
                tokens = batch.input_ids[scored]  # the scored tokens, in the same order
                losses = -logp.gather(1, tokens[:, None]).squeeze(1).double()
                owner = scored.nonzero()[:, 0]  # the request of each scored token
                sums = torch.zeros(len(batch.pos), dtype=torch.float64).index_add_(0, owner, losses)
                out[batch.pos] = (sums / scored.sum(dim=1)).numpy()
        self.nll_ms += (time.perf_counter() - t0) * 1e3
        return out

    def _scored_ids(self, text: str, target: str | None) -> tuple[list[int], int]:
        """Token ids of prompt and target (or of the text alone), and where scoring starts
        (at least 1: a scored token needs a token before it)."""
        prompt = self._encode([text])[0]
        start_token = self.tokenizer.bos_token_id
        if start_token is None:
            start_token = self.tokenizer.eos_token_id
        if target is None:
            bos = self.tokenizer.bos_token_id
            if bos is not None and (not prompt or prompt[0] != bos):
                prompt = [int(bos), *prompt][: self.max_length]
            return prompt, 1
        cont = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        if len(prompt) + len(cont) > self.max_length:  # keep the prompt's end, and its start token
            room = max(2, self.max_length - len(cont))
            prompt = encode(self.tokenizer, [text], max_length=room)[0]
            cont = cont[: max(1, self.max_length - len(prompt))]
        if not prompt and start_token is not None:
            prompt = [int(start_token)]  # an empty prompt: the target starts a sequence
        if not prompt:
            raise ValueError(f"nll: prompt {text!r} has no token and the tokenizer no start token")
        return [*prompt, *cont], len(prompt)

    # --- generation: one sequence at a time, each with its own KV cache ----------------------

    @property
    def context_length(self) -> int:
        """Tokens a prompt and its continuation may hold together."""
        return self.max_length

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Tokens that end a continuation: the tokenizer's end of sequence, and the model's
        (a generation config may name several)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list | tuple):
            ids.update(int(i) for i in configured)
        return frozenset(ids)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (None: the model has none, so no chat)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text of a conversation, with the cue for the assistant's turn."""
        if self.chat_template is None:
            raise ValueError(f"{self.path.name} has no chat template")
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def encode_prompt(self, text: str, *, special_tokens: bool = True) -> list[int]:
        """A prompt's token ids, whole (a generation refuses a prompt too long for the
        context rather than cutting it); ``special_tokens`` False for a rendered chat, whose
        template writes its own."""
        ids = self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens left out."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def next_logits(self, ids: Sequence[int], cache: Any | None) -> tuple[torch.Tensor, Any]:
        """(V,) float32 logits of the token after ``ids``, and the KV cache of the whole
        sequence. ``cache`` holds the sequence before ``ids`` (None: ``ids`` is a new prompt,
        and the model is first set as the last merge / restore asked)."""
        if cache is None:
            self.served.sync()
        input_ids = torch.as_tensor([list(ids)], dtype=torch.long)  # (1, t)
        with torch.inference_mode():
            if self.merger.mode == "soft":
                self.merger.set_token_mask(torch.ones_like(input_ids))
            # transformers renamed ``past_key_values`` to ``cache`` (5.2x); speak either
            name = "cache" if "cache" in self._forward_args else "past_key_values"
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{name: cache})
        kept = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits[0, -1].float(), kept

    def decode_batch(self) -> DecodeBatch:
        """An empty batch of sequences decoded together, one token each per step."""
        return DecodeBatch(self)

    def nll_ids(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """(n,) mean NLL per token of each continuation's exact token ids given its prompt's,
        under the model as currently set (a served continuation, scored as it was served)."""
        if len(prompts) != len(continuations):
            raise ValueError(f"nll_ids: {len(continuations)} continuations for {len(prompts)}")
        sequences, starts = [], []
        for i, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
            if not prompt or not cont:
                raise ValueError(f"nll_ids: request {i} needs a prompt token and a continuation")
            sequences.append([*prompt, *cont][: self.max_length])
            starts.append(len(prompt))
        self.served.sync()
        return self._nll_sequences(sequences, starts)

    def reference_nll_ids(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """:meth:`nll_ids` under the full MoE (the label-free reward of served generations).

        A memory-lean model streams the full MoE (each block's experts read as it runs and
        dropped after), so scoring a sample never makes a merged service hold every expert.
        The model is left on the full MoE: the next merge replaces it.
        """
        self.served.want_full(streamed=True)
        return self.nll_ids(prompts, continuations)


class DecodeBatch:
    """Sequences of one model decoded together: one forward pass per step for all of them.

    Their KV caches live in one batch cache, left-padded to a common length and masked, each
    row with its own positions. A sequence joins with the cache of its prompt
    (:meth:`HFCausalLMBackend.next_logits`) and leaves by its row; between changes, a step
    appends one column in place. On a CPU the per-module overhead of a small model dominates
    a one-token forward pass, so a step for b sequences costs little more than for one.
    Models whose caches are not plain key/value tensors per layer (a sliding window) step
    their sequences one by one.
    """

    def __init__(self, backend: HFCausalLMBackend) -> None:
        self.backend = backend
        self.cache: Any = None  # the batch's cache (b rows), or per-row caches (fallback)
        self.rows: list[Any] = []  # fallback: one cache per row
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (b, T): 1 where a row has a token
        self.plain = True

    def __len__(self) -> int:
        return int(self.mask.shape[0]) if self.plain else len(self.rows)

    def add(self, cache: Any) -> None:
        """Append a sequence (the KV cache of its tokens so far) as the last row."""
        if not _plain_cache(cache) or not self.plain:
            self._fallback()
            self.rows.append(cache)
            return
        n = int(cache.get_seq_length())
        if len(self) == 0:
            self.cache = cache
            self.mask = torch.ones(1, n, dtype=torch.long)
            return
        length = int(self.mask.shape[1])
        if n > length:  # the batch grows to the left
            for layer in self.cache.layers:
                layer.keys = _left_pad(layer.keys, n)
                layer.values = _left_pad(layer.values, n)
            self.mask = torch.nn.functional.pad(self.mask, (n - length, 0))
            length = n
        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, _left_pad(new.keys, length)])
            mine.values = torch.cat([mine.values, _left_pad(new.values, length)])
        row = torch.zeros(1, length, dtype=torch.long)
        row[0, length - n :] = 1
        self.mask = torch.cat([self.mask, row])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); the others' sequences have ended."""
        if not self.plain:
            self.rows = [self.rows[i] for i in rows]
            return
        if not rows:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        index = torch.as_tensor(list(rows), dtype=torch.long)
        mask = self.mask[index]
        pad = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())  # columns no row uses
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, pad:]
            layer.values = layer.values[index, :, pad:]
        self.mask = mask[:, pad:]

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """(b, V) float32 logits after feeding row i the token ``tokens[i]``."""
        if len(tokens) != len(self):
            raise ValueError(f"step: {len(tokens)} tokens for a batch of {len(self)}")
        backend = self.backend
        if not self.plain:
            out = [backend.next_logits([t], c) for t, c in zip(tokens, self.rows, strict=True)]
            self.rows = [c for _, c in out]
            return torch.stack([logits for logits, _ in out])
        input_ids = torch.as_tensor(list(tokens), dtype=torch.long)[:, None]  # (b, 1)
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's own next position
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        with torch.inference_mode():
            if backend.merger.mode == "soft":
                backend.merger.set_token_mask(torch.ones_like(input_ids))
            name = "cache" if "cache" in backend._forward_args else "past_key_values"
            out = backend.model(
                input_ids=input_ids,
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{name: self.cache},
            )
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]
        logits: torch.Tensor = out.logits[:, -1].float()
        return logits

    def _fallback(self) -> None:
        """Step rows one by one from now on (a cache that cannot be batched)."""
        if self.plain and len(self) > 0:
            raise ValueError("a batch of plain caches cannot take a sliding-window cache")
        self.plain = False


def _plain_cache(cache: Any) -> bool:
    """Whether a KV cache is one plain key/value tensor pair per layer (no sliding window)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """(1, h, n, d) keys or values left-padded with zeros to (1, h, length, d)."""
    return torch.nn.functional.pad(x, (0, 0, length - x.shape[-2], 0))
