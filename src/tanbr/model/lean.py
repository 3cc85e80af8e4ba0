"""Where a merge reads the original experts from: the model itself, or the checkpoint on disk.

Both sources hand the merge the same *pieces*: for a block, a merged tensor (a
:class:`~tanbr.model.discovery.Target`) and an expert e, a list of ``(rows, tensor)`` pairs
saying which rows of the merged tensor that expert tensor contributes to. ``gate_up_proj`` is
always cut into its gate rows and its up rows, whether it lives fused in memory or as
``w1``/``w3`` (``gate_proj``/``up_proj``) files on disk, so a memory-lean merge runs exactly the
same arithmetic as an in-memory one and gives bit-identical weights.

:class:`SafetensorsExpertStore` is the memory-lean source: the serving process keeps no original
expert resident; a merge memory-maps the checkpoint's safetensors (``safe_open``), one block at a
time, reads the pieces it needs and closes the files again, so the mapped pages leave the
process once the block is merged.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tanbr.model.discovery import MoEBlock, get_module

logger = logging.getLogger(__name__)

Piece = tuple[slice, torch.Tensor]  # (rows of the merged target, the expert's tensor for them)
Pieces = Callable[[str, int], list[Piece]]  # (target name, expert) -> pieces

# Roles of legacy per-expert names on disk, for fused in-memory layouts.
_GATED_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}
_GATED_PARTS |= {"w2": "down", "down_proj": "down"}
_PLAIN_PARTS = {"up_proj": "up", "fc1": "up", "wi": "up", "w1": "up"}
_PLAIN_PARTS |= {"down_proj": "down", "fc2": "down", "wo": "down", "w2": "down"}
_PER_EXPERT_KEY = re.compile(r"^(?:expert_)?(\d+)\.(.+)$")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def return_freed_memory(*, collect: bool = True) -> None:
    """Hand freed heap pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere),
    after collecting garbage unless ``collect`` is False. A lean process frees a block's
    experts after reading them, but the allocator keeps what its arenas freed for later
    unless asked: without this a merged service's resident set creeps up slot after slot."""
    if collect:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more with a memory map of
    its own, returned to the system when freed; False where that cannot be set.

    glibc raises this threshold as it frees large blocks (up to 32 MiB), so in a long-running
    lean process the merged experts each slot builds and drops end up in the heap, where
    other objects pin their pages: a merged service held 620 MiB after a load against 553 MiB
    with the threshold fixed at 1 MiB (``tanbr bench serve --model lm --shape medium``). A
    one-token forward pass allocates far less than 1 MiB, so decoding is not affected.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


class ExpertSource(Protocol):
    """Gives a merge the original expert tensors of one block at a time."""

    lean: bool

    def open(self, block: MoEBlock) -> Any:  # a context manager yielding ``Pieces``
        ...


def split_rows(block: MoEBlock, target: str) -> list[slice]:
    """The row pieces of a merged target: gate and up rows for ``gate_up_proj``, else all."""
    shape = next(t.shape for t in block.targets if t.name == target)
    if block.split_gate_up and target in ("gate_up_proj", "gate_up_proj_bias"):
        half = shape[0] // 2
        return [slice(0, half), slice(half, shape[0])]
    return [slice(0, shape[0])]


class ModuleExpertSource:
    """The experts held by the model in memory (the normal, non-lean mode)."""

    lean = False

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    @contextmanager
    def open(self, block: MoEBlock) -> Iterator[Pieces]:
        experts = get_module(self._model, block.experts_name)
        if block.fused:
            params = {t.name: getattr(experts, t.name) for t in block.targets}
            _check_resident(block, params.values())

            def fused(target: str, e: int) -> list[Piece]:
                full = params[target][e]  # (out, in) or (out,)
                return [(rows, full[rows]) for rows in split_rows(block, target)]

            yield fused
        else:
            members = list(experts.children())
            states = [dict(m.named_parameters()) for m in members]
            _check_resident(block, (p for s in states for p in s.values()))

            def per_expert(target: str, e: int) -> list[Piece]:
                t = states[e][target]
                return [(slice(0, t.shape[0]), t)]

            yield per_expert


def _check_resident(block: MoEBlock, tensors: Any) -> None:
    if any(t.is_meta for t in tensors):
        raise RuntimeError(
            f"block {block.name!r}: the original experts are not resident (memory-lean model); "
            "merge from the checkpoint store instead"
        )


# --- memory-lean store over safetensors ---------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """Where one expert piece lives on disk: file, key, and index into a fused tensor."""

    file: str
    key: str
    expert: int | None  # index into a fused (E, ...) tensor, or None for a per-expert tensor
    rows: slice | None  # rows of that tensor (gate / up halves of a fused gate_up)


class SafetensorsExpertStore:
    """The original experts of a checkpoint folder, read on demand from its safetensors.

    Parameters
    ----------
    folder
        The checkpoint folder (``model.safetensors`` or shards with
        ``model.safetensors.index.json``).
    blocks
        The MoE blocks of the model built from that checkpoint.
    rename
        Maps an on-disk key to the model's parameter name (legacy names such as
        ``block_sparse_moe`` -> ``mlp``); identity when omitted.
    """

    lean = True

    def __init__(
        self,
        folder: str | Path,
        blocks: list[MoEBlock],
        *,
        rename: Callable[[str], str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.files = safetensors_files(self.folder)
        rename = rename or (lambda k: k)
        index = _read_index(self.folder, self.files)
        self.expert_keys: set[str] = set()
        self._refs: dict[str, dict[tuple[str, int], list[tuple[slice, _Ref]]]] = {}
        for block in blocks:
            self._refs[block.name] = self._map_block(block, index, rename)

    @contextmanager
    def open(self, block: MoEBlock) -> Iterator[Pieces]:
        refs = self._refs.get(block.name)
        if refs is None:
            raise ValueError(f"block {block.name!r} is not in the store of {self.folder}")
        with ExitStack() as stack:
            handles: dict[str, Any] = {}
            cache: dict[str, torch.Tensor] = {}

            def tensor(ref: _Ref) -> torch.Tensor:
                if ref.key not in cache:
                    if ref.file not in handles:
                        handles[ref.file] = stack.enter_context(
                            open_safetensors(self.folder / ref.file)
                        )
                    cache[ref.key] = handles[ref.file].get_tensor(ref.key)  # mmap, no copy
                t = cache[ref.key]
                if ref.expert is not None:
                    t = t[ref.expert]
                return t[ref.rows] if ref.rows is not None else t

            def pieces(target: str, e: int) -> list[Piece]:
                return [(rows, tensor(ref)) for rows, ref in refs[(target, e)]]

            try:
                yield pieces
            finally:
                cache.clear()  # drop the mapped views before the files close

    def _map_block(
        self, block: MoEBlock, index: Mapping[str, str], rename: Callable[[str], str]
    ) -> dict[tuple[str, int], list[tuple[slice, _Ref]]]:
        prefix = block.experts_name + "."
        refs: dict[tuple[str, int], list[tuple[slice, _Ref]]] = {}
        target_names = {t.name for t in block.targets}
        for key, file in index.items():
            name = rename(key)
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if block.fused and rest in target_names:  # fused (E, ...) tensor on disk
                for e in range(block.n_experts):
                    for rows in split_rows(block, rest):
                        refs.setdefault((rest, e), []).append((rows, _Ref(file, key, e, rows)))
                self.expert_keys.add(key)
                continue
            m = _PER_EXPERT_KEY.match(rest)
            if m is None:
                continue  # e.g. a post-expert norm: not an expert tensor, loaded normally
            e, part = int(m.group(1)), m.group(2)
            if e >= block.n_experts:
                raise ValueError(
                    f"{key}: expert {e} but block {block.name!r} has {block.n_experts}"
                )
            placed = self._place(block, part, key)
            if placed is None:
                continue
            target, rows = placed
            refs.setdefault((target, e), []).append((rows, _Ref(file, key, None, None)))
            self.expert_keys.add(key)
        self._check_complete(block, refs)
        return refs

    def _place(self, block: MoEBlock, part: str, key: str) -> tuple[str, slice] | None:
        """Which merged target (and rows) a per-expert tensor on disk feeds."""
        if not block.fused:
            return (part, slice(0, _shape(block, part)[0])) if _has(block, part) else None
        module, _, kind = part.rpartition(".")
        roles = _GATED_PARTS if block.layout == "fused-gated" else _PLAIN_PARTS
        role = roles.get(module)
        if role is None or kind not in ("weight", "bias"):
            return None
        suffix = "_bias" if kind == "bias" else ""
        if role == "down":
            return "down_proj" + suffix, slice(0, _shape(block, "down_proj" + suffix)[0])
        if block.layout == "fused":
            return "up_proj" + suffix, slice(0, _shape(block, "up_proj" + suffix)[0])
        if not block.split_gate_up:
            raise ValueError(
                f"{key}: per-expert gate/up tensors on disk but block {block.name!r} stores "
                "gate_up_proj transposed or interleaved; lean mode needs a fused checkpoint here"
            )
        gate_rows, up_rows = split_rows(block, "gate_up_proj" + suffix)
        return "gate_up_proj" + suffix, gate_rows if role == "gate" else up_rows

    def _check_complete(
        self, block: MoEBlock, refs: Mapping[tuple[str, int], list[tuple[slice, _Ref]]]
    ) -> None:
        for t in block.targets:
            want = split_rows(block, t.name)
            for e in range(block.n_experts):
                got = sorted((r.start, r.stop) for r, _ in refs.get((t.name, e), []))
                if got != sorted((r.start, r.stop) for r in want):
                    raise ValueError(
                        f"checkpoint {self.folder}: block {block.name!r} expert {e} tensor "
                        f"{t.name!r} is missing or incomplete on disk"
                    )


def _has(block: MoEBlock, name: str) -> bool:
    return any(t.name == name for t in block.targets)


def _shape(block: MoEBlock, name: str) -> tuple[int, ...]:
    for t in block.targets:
        if t.name == name:
            return t.shape
    raise ValueError(f"block {block.name!r} has no tensor {name!r}")


def open_safetensors(path: Path) -> Any:
    """``safe_open`` (memory-mapped) with a ValueError naming the file when it is corrupt."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error type on corrupt headers
        raise ValueError(f"{path}: unreadable safetensors file ({err})") from err


def safetensors_files(folder: Path) -> list[str]:
    """The safetensors files of a checkpoint folder; a clear error when there are none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {folder} (memory-lean mode reads them)")
    return files


def _read_index(folder: Path, files: list[str]) -> dict[str, str]:
    """key -> file, from the shard index or from the files' headers."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ValueError(f"{index_file}: not a safetensors index ({err})") from err
        return {str(k): str(v) for k, v in weight_map.items()}
    out: dict[str, str] = {}
    for file in files:
        with open_safetensors(folder / file) as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                out[key] = file
    return out


def disk_dtype(folder: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor on disk (what ``dtype="auto"`` would pick)."""
    for file in safetensors_files(folder):
        with open_safetensors(folder / file) as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                dtype = _DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32
