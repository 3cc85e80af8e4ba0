"""Tables from run folders: the comparison table and the targets Tanbr is held to.

Works from ``summary.json`` alone (no model code), so ``tanbr report`` is instant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATIC = ("uniform", "frequency", "regmean", "fisher")
NOT_CONTENDERS = ("tanbr", "full-moe", *STATIC, "task-oracle", "slot-oracle", "smear")


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


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """One formatted row per policy, best accuracy first (references at the end)."""
    policies = summary["policies"]
    refs = ("slot-oracle", "task-oracle", "full-moe")
    order = sorted(
        policies,
        key=lambda n: (n in refs, -(policies[n]["accuracy"] or policies[n].get("reward") or 0.0)),
    )
    lm = any(p.get("loss") is not None for p in policies.values())
    out = []
    for name in order:
        p = policies[name]
        acc = _fmt(p["accuracy"], ".4f")
        ci = p.get("accuracy_ci95")
        if ci:
            acc += f" ±{(ci[1] - ci[0]) / 2:.3f}"
        losses = {"loss": _fmt(p.get("loss"), ".3f"), "ppl": _fmt(p.get("perplexity"), ".1f")}
        out.append(
            {
                "policy": name,
                "accuracy": acc,
                **(losses if lm else {}),
                "reward": _fmt(p.get("reward"), ".4f"),
                "of oracle": _fmt(p.get("of_slot_oracle"), ".1%"),
                "regret": _fmt(p["regret"], ".2f"),
                "path p50 ms": _fmt(p["latency_p50_ms"], ".1f"),
                "path p95 ms": _fmt(p["latency_p95_ms"], ".1f"),
                "MoE p50 ms": _fmt(p.get("moe_latency_p50_ms"), ".1f"),
                "est ms/req": _fmt(p.get("estimator_ms_per_request"), ".3f"),
                "model RSS MiB": _mib(p.get("model_rss_bytes")),
                "params MiB": _mib(p.get("param_bytes")),
                "merge ms": _fmt(p["merge_ms"], ".2f"),
            }
        )
    return out


def format_task_losses(summary: Mapping[str, Any]) -> str:
    """A language model's loss per true task and policy, as Markdown ("" for a classifier)."""
    policies = {n: p for n, p in summary["policies"].items() if p.get("task_loss")}
    if not policies:
        return ""
    tasks = list(next(iter(policies.values()))["task_loss"])
    lines = ["| policy | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, p in policies.items():
        cells = [_fmt(p["task_loss"].get(t), ".3f") for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    out.append(
        f"estimator TV distance (mean over slots): {_fmt(tv, '.4f')}"
        f" (signature {summary.get('signature', '?')}, {summary.get('dtype', '?')})"
    )
    if summary.get("wall_s") is not None:
        out.append(f"wall time: {summary['wall_s']:.0f} s")
    return "\n".join(out)


def targets(
    summary: Mapping[str, Any], policy: str = "tanbr"
) -> list[tuple[str, bool | None, str]]:
    """The targets of the demo, checked: (description, met or None if not measurable, figures)."""
    p = summary["policies"]
    if policy not in p or p[policy]["accuracy"] is None:
        return []  # no truth came back (an unlabeled stream): nothing to hold it to
    me = p[policy]
    out: list[tuple[str, bool | None, str]] = []

    def check(desc: str, ok: bool | None, figures: str) -> None:
        out.append((desc, ok, figures))

    share = me.get("of_slot_oracle")
    if share is not None:
        check("accuracy >= 95% of the slot oracle's", share >= 0.95, f"{share:.1%}")
    statics = [p[n]["accuracy"] for n in STATIC if n in p and p[n]["accuracy"] is not None]
    if statics:
        gap = me["accuracy"] - max(statics)
        check(
            "accuracy >= 5 points above the best static merge",
            gap >= 0.05,
            f"{gap * 100:+.1f} points",
        )
    others = {
        n: r["accuracy"]
        for n, r in p.items()
        if n.split("@")[0] not in NOT_CONTENDERS and r["accuracy"] is not None
    }
    if others:
        best = max(others, key=lambda n: others[n])
        check(
            "accuracy above every other bandit policy and plug-in",
            me["accuracy"] > others[best],
            f"best other: {best} {others[best]:.4f}",
        )
    oracle = p.get("slot-oracle", {}).get("regret")
    if oracle is not None:
        check("the slot oracle's own regret is 0", abs(oracle) < 1e-9, f"{oracle:.3g}")
    if "full-moe" in p:
        full = p["full-moe"]
        if me["latency_p50_ms"] and full["latency_p50_ms"]:
            r = 1 - me["latency_p50_ms"] / full["latency_p50_ms"]
            check("whole-path latency p50 >= 30% below full MoE", r >= 0.30, f"{r:.1%} below")
        mine, theirs = me.get("model_rss_bytes"), full.get("model_rss_bytes")
        if mine and theirs:
            r = 1 - mine / theirs
            check("model memory (measured) >= 25% below full MoE", r >= 0.25, f"{r:.1%} below")
    tv = summary.get("estimator_tv")
    check("estimator TV distance <= 0.1", None if tv is None else tv <= 0.1, _fmt(tv, ".4f"))
    budget, wall = summary.get("budget_s"), summary.get("wall_s")
    if budget and wall is not None:
        check(f"wall time <= {budget:.0f} s", wall <= budget, f"{wall:.0f} s")
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
            "Accuracy is the mean slot accuracy over seeds (± half the 95% interval over seeds); "
            "regret is cumulative against the slot oracle on the requests each slot scored; "
            "path latency is the whole served path per batch (tokenize + encoder + MoE layers "
            "+ head, the estimator's signatures and estimate, the decision and the merge "
            "amortised over the slot); MoE latency covers the MoE layers + head alone (cached "
            "lower states); est ms/req is the estimator's cost per request; model RSS is the "
            "measured resident set of a serving process minus that of the runtime alone; params "
            "is the parameter bytes the served model keeps resident; merge ms is the merge time "
            "per slot, amortised.\n"
        )
        parts.append(format_table(summary, markdown=True) + "\n")
        task_losses = format_task_losses(summary)
        if task_losses:
            parts.append(
                "Loss per task (mean NLL per token of the true continuations, nats; loss and "
                "ppl above are the same over all tasks, ppl = exp(loss)):\n\n" + task_losses + "\n"
            )
        checks = format_targets(summary)
        if checks:
            parts.append("### Targets (tanbr)\n\n```\n" + checks + "\n```\n")
        plots = sorted(p.name for p in Path(folder).glob("*.png"))
        parts += [f"![{name}]({name})\n" for name in plots if Path(folder) == path.parent]
    path.write_text("# Tanbr run report\n\n" + "\n".join(parts), encoding="utf-8")
