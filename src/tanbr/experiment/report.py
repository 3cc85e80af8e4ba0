"""Tables from run folders: the comparison table and the targets Tanbr is held to.

Works from ``summary.json`` alone (no model code), so ``tanbr report`` is instant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATIC = ("uniform", "frequency")
NOT_CONTENDERS = (
    "tanbr",
    "full-moe",
    "uniform",
    "frequency",
    "task-oracle",
    "slot-oracle",
    "smear",
)


def load_summary(folder: str | Path) -> dict[str, Any]:
    """``summary.json`` of a run folder; a clear error if it is missing or corrupt."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a run folder (no summary.json): {folder}")
    try:
        summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt {path}: {err}") from None
    if not isinstance(summary.get("policies"), dict) or not summary["policies"]:
        raise ValueError(f"corrupt {path}: no 'policies' table")
    return summary


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """One formatted row per policy, best accuracy first (references at the end)."""
    policies = summary["policies"]
    detail = summary.get("detail", {})
    oracle = policies.get("slot-oracle", {}).get("accuracy")
    refs = ("slot-oracle", "task-oracle", "full-moe")
    order = sorted(policies, key=lambda n: (n in refs, -(policies[n]["accuracy"] or 0.0)))
    out = []
    for name in order:
        p, d = policies[name], detail.get(name, {})
        share = p["accuracy"] / oracle if oracle else None
        acc = _fmt(p["accuracy"], ".4f")
        if d.get("accuracy_std") is not None and len(d.get("seeds", [])) > 1:
            acc += f" ±{d['accuracy_std']:.3f}"
        out.append(
            {
                "policy": name,
                "accuracy": acc,
                "of oracle": _fmt(share, ".1%"),
                "regret": _fmt(p["regret"], ".2f"),
                "e2e p50 ms": _fmt(p["latency_p50_ms"], ".1f"),
                "e2e p95 ms": _fmt(p["latency_p95_ms"], ".1f"),
                "MoE p50 ms": _fmt(d.get("moe_latency_p50_ms"), ".1f"),
                "memory MiB": _fmt(p["memory_bytes"] / 2**20, ".1f"),
                "merge ms": _fmt(p["merge_ms"], ".2f"),
            }
        )
    return out


def format_table(summary: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The comparison table, aligned for a terminal or as Markdown."""
    table = rows(summary)
    cols = list(table[0])
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols}
    right = [c != "policy" for c in cols]

    def line(values: Sequence[str]) -> str:
        cells = [
            v.rjust(widths[c]) if r else v.ljust(widths[c])
            for v, c, r in zip(values, cols, right, strict=True)
        ]
        return ("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells)

    out = [line(cols)]
    if markdown:
        out.append(
            "|"
            + "|".join(
                ("-" * (widths[c] + 1) + ":") if r else "-" * (widths[c] + 2)
                for c, r in zip(cols, right, strict=True)
            )
            + "|"
        )
    else:
        out.append("  ".join("-" * widths[c] for c in cols))
    out += [line([r[c] for c in cols]) for r in table]
    tv = summary.get("estimator_tv")
    out.append("")
    out.append(f"estimator TV distance (mean over slots): {_fmt(tv, '.4f')}")
    return "\n".join(out)


def targets(
    summary: Mapping[str, Any], policy: str = "tanbr"
) -> list[tuple[str, bool | None, str]]:
    """The targets of the demo, checked: (description, met or None if not measurable, figures)."""
    p = summary["policies"]
    d = summary.get("detail", {})
    if policy not in p:
        return []
    me = p[policy]
    out: list[tuple[str, bool | None, str]] = []

    def check(desc: str, ok: bool | None, figures: str) -> None:
        out.append((desc, ok, figures))

    if "slot-oracle" in p:
        ratio = me["accuracy"] / p["slot-oracle"]["accuracy"]
        check("accuracy >= 95% of the slot oracle's", ratio >= 0.95, f"{ratio:.1%}")
    statics = [p[n]["accuracy"] for n in STATIC if n in p]
    if statics:
        gap = me["accuracy"] - max(statics)
        check(
            "accuracy >= 10 points above the best static merge",
            gap >= 0.10,
            f"+{gap * 100:.1f} points",
        )
    others = {n: r["accuracy"] for n, r in p.items() if n not in NOT_CONTENDERS}
    if others:
        best = max(others, key=lambda n: others[n])
        check(
            "accuracy above every other bandit policy and plug-in",
            me["accuracy"] > others[best],
            f"best other: {best} {others[best]:.4f}",
        )
    if "full-moe" in p:
        full = p["full-moe"]
        if me["latency_p50_ms"] and full["latency_p50_ms"]:
            r = 1 - me["latency_p50_ms"] / full["latency_p50_ms"]
            check("end-to-end latency p50 >= 30% below full MoE", r >= 0.30, f"{r:.1%} below")
        mine, theirs = (
            d.get(policy, {}).get("moe_latency_p50_ms"),
            d.get("full-moe", {}).get("moe_latency_p50_ms"),
        )
        if mine and theirs:
            r = 1 - mine / theirs
            check("MoE layers latency p50 >= 45% below full MoE", r >= 0.45, f"{r:.1%} below")
        r = 1 - me["memory_bytes"] / full["memory_bytes"]
        check("resident memory >= 25% below full MoE", r >= 0.25, f"{r:.1%} below")
    tv = summary.get("estimator_tv")
    check("estimator TV distance <= 0.1", None if tv is None else tv <= 0.1, _fmt(tv, ".4f"))
    return out


def format_targets(summary: Mapping[str, Any], policy: str = "tanbr") -> str:
    lines = []
    for desc, ok, figures in targets(summary, policy):
        mark = "n/a " if ok is None else ("met " if ok else "MISS")
        lines.append(f"[{mark}] {desc}: {figures}")
    return "\n".join(lines)


def write_report(folders: Sequence[str | Path], path: Path) -> None:
    """A Markdown report: one comparison table (and targets) per run folder."""
    parts = []
    for folder in folders:
        summary = load_summary(folder)
        parts.append(f"## {Path(folder).name}\n")
        parts.append(
            "Accuracy is the mean slot accuracy over seeds; regret is cumulative against the slot "
            "oracle; e2e latency covers tokenize + encoder + MoE layers + head on real batches; "
            "MoE latency covers the MoE layers + head on each whole slot (cached lower states); "
            "memory is the parameter bytes the served model keeps resident; merge ms is the mean "
            "merge time per slot.\n"
        )
        parts.append(format_table(summary, markdown=True) + "\n")
        checks = format_targets(summary)
        if checks:
            parts.append("### Targets (tanbr)\n\n```\n" + checks + "\n```\n")
        plots = sorted(p.name for p in Path(folder).glob("*.png"))
        parts += [f"![{name}]({name})\n" for name in plots if Path(folder) == path.parent]
    path.write_text("# Tanbr run report\n\n" + "\n".join(parts), encoding="utf-8")
