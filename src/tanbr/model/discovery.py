"""Find the MoE blocks of a model by their structure, not by their class name.

A module is an MoE block when it has a child called ``experts`` and a token gate beside it.
Two expert layouts are understood:

* ``fused-gated`` / ``fused``: the transformers 5 experts module, one 3-D tensor per
  projection over all experts (``gate_up_proj (E, 2I, H)`` or ``up_proj (E, I, H)``, and
  ``down_proj (E, H, I)``, optional ``*_bias``), as in Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V3, PhiMoE and the project's default model;
* ``per-expert``: an ``nn.ModuleList`` / ``nn.ModuleDict`` of identical expert modules, as in
  SwitchTransformers (``experts.expert_{i}``) or a hand-written MoE.

Everything else a block may hold must be understood too, because the merged block replaces the
whole block: always-on shared experts (``shared_expert`` / ``shared_experts``) and their sigmoid
gate (``shared_expert_gate``) are kept; any other child with parameters makes the block
unsupported, with a message naming it, rather than silently dropping it.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

FUSED_GATED = "fused-gated"
FUSED = "fused"
PER_EXPERT = "per-expert"
LAYOUTS = (FUSED_GATED, FUSED, PER_EXPERT)

_GATE_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_SHARED_GATE_NAMES = ("shared_expert_gate",)
_EXPERT_KEY = re.compile(r"^(?:expert_)?(\d+)$")


class UnsupportedModelError(ValueError):
    """The model has no MoE block, or a block whose layout the merging engine cannot handle."""


@dataclass(frozen=True)
class Target:
    """One tensor of the merged dense expert: its name inside the merged module and shape."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class MoEBlock:
    """A view of one MoE block found in a model.

    ``name`` is the module path (the key of the block in a plan); the other paths are full
    module paths inside the same model, so modules are looked up by name, never held.

    Parameters
    ----------
    name
        Module path of the block, e.g. ``"model.layers.0.mlp"``.
    n_experts
        Number of routed experts E.
    layout
        ``"fused-gated"``, ``"fused"`` or ``"per-expert"``.
    experts_name
        Module path of the experts container.
    gate_name
        Module path of the module owning the token gate's ``weight`` (E, H) (and maybe ``bias``).
    hidden_size
        Input (and output) width H of an expert.
    targets
        The tensors of one expert, i.e. of the merged dense expert, in a fixed order.
    score_fn
        ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3 style gates): how gate logits become
        probabilities when they are recorded or used for soft merging.
    top_k
        Experts per token in the original block, when the block says so.
    routed_scale
        Constant factor on the routed experts' output (DeepSeek-V3's ``routed_scaling_factor``).
    shared_names
        Always-on shared expert modules, added to the output unchanged.
    shared_gate_name
        Module path of the sigmoid gate of the shared expert, if any.
    has_bias, is_transposed, split_gate_up
        Fused-layout flags: biases present; weights stored (E, in, out); ``gate_up_proj`` is
        ``[gate; up]`` stacked along the output dimension (merged in two row pieces).
    outputs
        1 when the block returns its hidden states, n when it returns an n-tuple starting with
        them (the merged block then returns the hidden states and n - 1 ``None``).
    """

    name: str
    n_experts: int
    layout: str
    experts_name: str
    gate_name: str
    hidden_size: int
    targets: tuple[Target, ...]
    score_fn: str = "softmax"
    top_k: int | None = None
    routed_scale: float = 1.0
    shared_names: tuple[str, ...] = ()
    shared_gate_name: str | None = None
    has_bias: bool = False
    is_transposed: bool = False
    split_gate_up: bool = False
    outputs: int = 1
    dtype: torch.dtype = torch.float32

    @property
    def fused(self) -> bool:
        return self.layout in (FUSED_GATED, FUSED)

    @property
    def expert_numel(self) -> int:
        """Parameters of one expert (= of the merged dense expert)."""
        total = 0
        for t in self.targets:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Support:
    """Whether the merging engine handles a model, and why not when it does not."""

    ok: bool
    reason: str


# --- discovery --------------------------------------------------------------------------------


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks of ``model`` in module order.

    Raises
    ------
    UnsupportedModelError
        When no block is found, or when a block with an ``experts`` child cannot be merged; the
        message names the module and what was missing.
    """
    blocks: list[MoEBlock] = []
    for name, module in model.named_modules():
        original = getattr(module, "merged_from", None)  # a merged block describes its original
        if isinstance(original, nn.Module):
            module = original
        experts = module._modules.get("experts")
        if experts is None:
            continue
        blocks.append(_describe_block(name, module, experts))
    if not blocks:
        raise UnsupportedModelError(
            f"no MoE block found in {type(model).__name__}: no module has an `experts` child "
            "(fused expert tensors gate_up_proj/up_proj + down_proj, or a list of expert modules)"
        )
    logger.debug("found %d MoE blocks (%s)", len(blocks), blocks[0].layout)
    return blocks


def supports(model: nn.Module) -> Support:
    """Whether :func:`find_moe_blocks` succeeds on ``model``; never raises."""
    try:
        blocks = find_moe_blocks(model)
    except UnsupportedModelError as err:
        return Support(ok=False, reason=str(err))
    except Exception as err:  # a broken model must not crash a capability check
        return Support(ok=False, reason=f"{type(err).__name__}: {err}")
    layouts = sorted({b.layout for b in blocks})
    return Support(ok=True, reason=f"{len(blocks)} MoE blocks ({', '.join(layouts)})")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at path ``name`` (``""``: the model itself).

    A merged block stands where its original was; paths into the original (its experts) are
    followed through the merged block's ``merged_from``.
    """
    module = model
    for part in name.split(".") if name else []:
        child = module._modules.get(part)
        if child is None:
            original = getattr(module, "merged_from", None)
            child = original._modules.get(part) if isinstance(original, nn.Module) else None
        if child is None:
            raise AttributeError(f"{type(model).__name__} has no module {name!r} (at {part!r})")
        module = child
    return module


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it holds it."""
    head, _, attr = name.rpartition(".")
    return get_module(model, head), attr


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _describe_block(name: str, block: nn.Module, experts: nn.Module) -> MoEBlock:
    where = f"MoE block {name!r} ({type(block).__name__})"
    fused = _fused_params(experts)
    if fused is not None:
        layout, n_experts, hidden, targets, flags, dtype = _describe_fused(where, experts, fused)
    elif isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        layout = PER_EXPERT
        n_experts, hidden, targets, dtype = _describe_per_expert(where, experts)
        flags = {"has_bias": False, "is_transposed": False, "split_gate_up": False}
    else:
        raise UnsupportedModelError(
            f"{where}: its `experts` ({type(experts).__name__}) has neither fused expert tensors "
            "(3-D gate_up_proj or up_proj, and down_proj) nor a ModuleList/ModuleDict of experts"
        )

    outputs = _check_forward(where, block)
    gate_rel, gate_module = _find_gate(where, block, n_experts, hidden)
    shared, shared_gate = _shared_children(where, block, gate_rel)
    top_k = _first_int(block, gate_module, "top_k", "num_experts_per_tok")
    scale = getattr(gate_module, "routed_scaling_factor", None)
    if scale is None:
        scale = getattr(block, "routed_scaling_factor", None)
    score_fn = "softmax"
    if hasattr(gate_module, "e_score_correction_bias") or getattr(
        gate_module, "scoring_func", "softmax"
    ) in ("sigmoid",):
        score_fn = "sigmoid"
    return MoEBlock(
        name=name,
        n_experts=n_experts,
        layout=layout,
        experts_name=_join(name, "experts"),
        gate_name=_join(name, gate_rel),
        hidden_size=hidden,
        targets=targets,
        score_fn=score_fn,
        top_k=top_k,
        routed_scale=1.0 if scale is None else float(scale),
        shared_names=tuple(_join(name, s) for s in shared),
        shared_gate_name=_join(name, shared_gate) if shared_gate else None,
        outputs=outputs,
        dtype=dtype,
        **flags,
    )


def _check_forward(where: str, block: nn.Module) -> int:
    """How many values the block's forward returns (1: a tensor; n: a tuple, hidden states first).

    The merged block is called like the original, ``forward(hidden_states)``, and must return
    the same structure: GPT-OSS's block returns ``(hidden_states, router_scores)`` and its
    decoder layer unpacks two values, so a bare tensor would be unpacked along the batch.
    """
    forward = type(block).forward
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return 1
    params = list(sig.parameters.values())[1:]  # after self
    extra = [p.name for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if extra:
        raise UnsupportedModelError(
            f"{where}: its forward takes {extra} besides the hidden states; a merged block "
            "takes the hidden states only"
        )
    arities = _return_arities(forward)
    if not arities:  # no source: trust the annotation
        text = str(getattr(sig.return_annotation, "__name__", sig.return_annotation))
        if re.match(r"(typing\.)?tuple\b", text, re.IGNORECASE):
            raise UnsupportedModelError(
                f"{where}: its forward returns {text} of unknown length; cannot mirror it"
            )
        return 1
    if len(arities) > 1:
        raise UnsupportedModelError(
            f"{where}: its forward returns tuples of different lengths {sorted(arities)}"
        )
    return arities.pop()


def _return_arities(forward: Any) -> set[int]:
    """Lengths of the values returned by a function, read from its source (1 = not a tuple)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return set()
    func = tree.body[0]
    arities = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Return) and node.value is not None:
            value = node.value
            arities.add(len(value.elts) if isinstance(value, ast.Tuple) else 1)
    return arities


def _fused_params(experts: nn.Module) -> dict[str, torch.Tensor] | None:
    params: dict[str, torch.Tensor] = dict(experts.named_parameters(recurse=False))
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    if down is None or up is None or down.dim() != 3 or up.dim() != 3:
        return None
    return params


def _describe_fused(
    where: str, experts: nn.Module, params: dict[str, torch.Tensor]
) -> tuple[str, int, int, tuple[Target, ...], dict[str, bool], torch.dtype]:
    has_gate = bool(getattr(experts, "has_gate", "gate_up_proj" in params))
    up_name = "gate_up_proj" if has_gate else "up_proj"
    if up_name not in params:
        raise UnsupportedModelError(
            f"{where}: experts say has_gate={has_gate} but hold no `{up_name}` tensor"
        )
    up, down = params[up_name], params["down_proj"]
    transposed = bool(getattr(experts, "is_transposed", False))
    n_experts = up.shape[0]
    if down.shape[0] != n_experts:
        raise UnsupportedModelError(
            f"{where}: {up_name} has {n_experts} experts but down_proj has {down.shape[0]}"
        )
    # (E, out, in) unless transposed (E, in, out)
    up_out, hidden = (up.shape[2], up.shape[1]) if transposed else (up.shape[1], up.shape[2])
    down_out, down_in = (
        (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    )
    inner = up_out // 2 if has_gate else up_out
    if down_out != hidden or down_in != inner:
        raise UnsupportedModelError(
            f"{where}: down_proj shape {tuple(down.shape)} does not match {up_name} "
            f"{tuple(up.shape)} (hidden {hidden}, intermediate {inner})"
        )
    has_act = isinstance(getattr(experts, "act_fn", None), nn.Module)
    custom_gate = has_gate and "_apply_gate" in type(experts).__dict__  # e.g. GPT-OSS's clamped GLU
    if not has_act and not custom_gate:
        raise UnsupportedModelError(f"{where}: fused experts have no `act_fn` module")
    has_bias = bool(getattr(experts, "has_bias", f"{up_name}_bias" in params))
    targets = [Target(up_name, tuple(up.shape[1:])), Target("down_proj", tuple(down.shape[1:]))]
    if has_bias:
        for t in (up_name, "down_proj"):
            bias = params.get(f"{t}_bias")
            if bias is None or bias.dim() != 2 or bias.shape[0] != n_experts:
                raise UnsupportedModelError(
                    f"{where}: experts say has_bias but `{t}_bias` is missing"
                )
            targets.append(Target(f"{t}_bias", tuple(bias.shape[1:])))
    extra = set(params) - {t.name for t in targets}
    if extra:
        raise UnsupportedModelError(
            f"{where}: fused experts hold tensors the merge does not know: {sorted(extra)}"
        )
    concatenated = bool(getattr(experts, "is_concatenated", True))
    flags = {
        "has_bias": has_bias,
        "is_transposed": transposed,
        "split_gate_up": has_gate and concatenated and not transposed,
    }
    layout = FUSED_GATED if has_gate else FUSED
    return layout, n_experts, hidden, tuple(targets), flags, up.dtype


def _describe_per_expert(
    where: str, experts: nn.Module
) -> tuple[int, int, tuple[Target, ...], torch.dtype]:
    children = list(experts.named_children())
    if len(children) < 2:
        raise UnsupportedModelError(
            f"{where}: `experts` holds {len(children)} module(s), need >= 2"
        )
    for i, (key, _) in enumerate(children):
        m = _EXPERT_KEY.match(key)
        if m is None or int(m.group(1)) != i:
            raise UnsupportedModelError(
                f"{where}: expert keys must be 0..E-1 or expert_0..expert_{{E-1}}, got {key!r}"
            )
    first = children[0][1]
    shapes = [(n, tuple(p.shape)) for n, p in first.named_parameters()]
    if not shapes:
        raise UnsupportedModelError(f"{where}: expert modules have no parameters")
    for key, child in children[1:]:
        if (
            type(child) is not type(first)
            or [(n, tuple(p.shape)) for n, p in child.named_parameters()] != shapes
        ):
            raise UnsupportedModelError(
                f"{where}: expert {key!r} differs in class or parameter shapes from the first"
            )
    weights = [s for n, s in shapes if len(s) == 2]
    hidden = weights[0][1] if weights else shapes[0][1][-1]
    dtype = next(first.parameters()).dtype
    return len(children), hidden, tuple(Target(n, s) for n, s in shapes), dtype


def _find_gate(where: str, block: nn.Module, n_experts: int, hidden: int) -> tuple[str, nn.Module]:
    """The module owning the gate weight (E, H): ``gate``/``router`` first, then any child."""
    names = [n for n in _GATE_NAMES if n in block._modules]
    names += [
        n for n in block._modules if n not in names and n != "experts" and n not in _SHARED_NAMES
    ]
    for child_name in names:
        child = block._modules[child_name]
        if child is None:
            continue
        for sub_name, sub in child.named_modules():
            w = sub._parameters.get("weight")
            if w is not None and tuple(w.shape) == (n_experts, hidden):
                return _join(child_name, sub_name), sub
    raise UnsupportedModelError(
        f"{where}: no token gate found: expected a child `gate` or `router` holding a weight of "
        f"shape (E={n_experts}, H={hidden})"
    )


def _shared_children(where: str, block: nn.Module, gate_rel: str) -> tuple[list[str], str | None]:
    gate_child = gate_rel.split(".")[0]
    shared: list[str] = []
    shared_gate: str | None = None
    for child_name, child in block.named_children():
        if child_name in ("experts", gate_child):
            continue
        if child_name in _SHARED_NAMES:
            shared.append(child_name)
        elif child_name in _SHARED_GATE_NAMES:
            shared_gate = child_name
        elif any(True for _ in child.parameters()):
            raise UnsupportedModelError(
                f"{where}: child {child_name!r} ({type(child).__name__}) has parameters but is "
                "neither the gate, the experts nor a shared expert; merging would drop it"
            )
    if shared_gate is not None and not shared:
        raise UnsupportedModelError(f"{where}: has {shared_gate!r} but no shared expert")
    return shared, shared_gate


def _first_int(*objs_and_names: object) -> int | None:
    objs = [o for o in objs_and_names if not isinstance(o, str)]
    names = [n for n in objs_and_names if isinstance(n, str)]
    for obj in objs:
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None
