"""Scoring as generated (`rendering.render_as_generated`): what it costs, and what a run says once about how it
rendered. The rows themselves are built in `rendering.py` and run over one KV cache per trajectory in `prefix.py`."""

from __future__ import annotations

import functools

from .rendering import Rendered
from .trajectories import Trajectory


def distinct_tokens(rows: list[Rendered]) -> int:
    """Tokens a trajectory's as-generated rows hold that the previous row does not begin with: what running them over
    one KV cache (`prefix.Chain`) costs per model, each shared token once (the benchmark's bound counts these)."""
    n, prev = 0, []
    for r in rows:
        ids = r.input_ids
        c = next((k for k, (a, b) in enumerate(zip(ids, prev)) if a != b), min(len(ids), len(prev)))
        n += len(ids) - c
        prev = ids
    return n


@functools.lru_cache(maxsize=1)
def _trl_templates() -> dict[str, str]:
    from pathlib import Path

    try:
        import trl
    except ImportError:  # pragma: no cover - trl is a dependency
        return {}
    return {p.read_text(): p.stem for p in sorted((Path(trl.__file__).parent / "chat_templates").glob("*.jinja"))}


def template_name(tokenizer) -> str:
    """"TRL's qwen3.jinja" when the tokenizer's chat template is one TRL ships, else "the tokenizer's chat template"."""
    name = _trl_templates().get(getattr(tokenizer, "chat_template", None) or "")
    return f"the chat template (TRL's {name}.jinja)" if name else "the tokenizer's chat template"


def rendering_notices(tokenizer, trajectories: list[Trajectory], rendered: list[Rendered], rendering: str) -> list[tuple[str, str]]:
    """(kind, message) a run says once: "as_generated" (trajectories scored as generated: why, and the cost) and
    "dropped" (steps whose message the template renders only in part, the first one named)."""
    out = []
    gen = [r for r in rendered if r.rows is not None]
    if gen and rendering == "auto":
        cost, whole = sum(distinct_tokens(r.rows) for r in gen), sum(len(r.input_ids) for r in gen)
        out.append(("as_generated", f"{template_name(tokenizer)} rewrites earlier turns (e.g. drops their reasoning), so a whole "
                   f"conversation is not what the model read: {len(gen)} of {len(rendered)} trajectories are scored as "
                   "generated, each step in its own context (render(messages[:t], add_generation_prompt=True) + the "
                   f"turn). Cost: {cost} distinct tokens through each model instead of {whole} "
                   f"({cost / max(whole, 1):.2f}x; shared context runs once)"))  # fmt: skip
    lost = [(t, r.message_indices[j], parts) for t, r in zip(trajectories, rendered) for j, parts in sorted(r.dropped.items())]
    if lost:
        t, mi, parts = lost[0]
        more = f" (and {len(lost) - 1} more step{'s' if len(lost) > 2 else ''})" if len(lost) > 1 else ""
        out.append(("dropped", f"{template_name(tokenizer)} renders the {' and '.join(parts)} of message {mi} of {t.label} "
                   f"nowhere in its turn{more}: those steps are scored without it and flagged `dropped`; "
                   "strict (--strict) refuses them"))  # fmt: skip
    return out
