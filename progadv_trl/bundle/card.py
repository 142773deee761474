"""The bundle's model card (README.md with YAML front matter), written from the manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path


def _looks_like_hub_id(name) -> bool:
    """`base_model` in a model card must name a Hub repo; a local training path would be rejected there."""
    return (
        isinstance(name, str)
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None
        and not Path(name).exists()
    )


def model_card(manifest: dict) -> str:
    pol, ref = manifest["policy"], manifest["reference"]
    base = next((b for b in (ref.get("repo_id"), ref.get("source"), pol.get("source")) if _looks_like_hub_id(b)), None)
    tags = ["progadv_trl", "progress-advantage", "trl", "critic", "process-reward-model", "agents"]
    if pol["kind"] == "lora":
        tags.append("lora")
    front = ["---", "library_name: progadv_trl"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")
    sc = manifest["scoring"]["config"]
    tr = manifest.get("training") or {}
    prov = manifest.get("provenance") or {}
    lines = [
        "",
        "# Progress-advantage critic",
        "",
        "A step-level critic for LLM agent trajectories, read from an RL-trained policy and the reference its KL "
        "term anchored it to:",
        "",
        "    A_t = beta * sum over the tokens of agent step t of (log pi_theta - log pi_ref)",
        "",
        "## Use",
        "",
        "```python",
        "from progadv_trl.critic import ProgressCritic",
        "",
        'critic = ProgressCritic.from_pretrained("path/to/this/bundle")',
        "scores = critic.score(trajectories)            # per-step advantages + trajectory scores",
        "best = critic.best_of_n(trajectories)          # per group, the trajectory most likely to succeed",
        "```",
        "",
        "or `progadv score --bundle BUNDLE TRAJ.jsonl -o OUT.jsonl`; `progadv inspect BUNDLE` verifies every file.",
        "",
        "## Contents",
        "",
        f"- policy: {pol['kind']}" + (f" (adapter on `{pol.get('source')}`)" if pol["kind"] == "lora" else f" (`{pol.get('source')}`)"),
        "- reference: "
        + (
            f"recorded by identity: `{ref.get('repo_id')}` at `{ref.get('revision')}` (fetch it; hashes are checked)"
            if ref["kind"] == "identity"
            else ("the policy's base model, adapter disabled" if ref.get("is_policy_base") else f"full weights (`{ref.get('source')}`)")
        ),
        f"- scoring defaults: beta={sc['beta']}, token reduction `{sc['token_reduction']}`, step reduction "
        f"`{sc['step_reduction']}`, temperature {sc['temperature']}, max_length {manifest.get('max_length')}",
        f"- variant: `{sc.get('variant', 'progress_advantage')}` (clip {sc.get('clip')}, support threshold "
        f"{sc.get('support_threshold')})",
        f"- training: beta={tr.get('beta')}, sampling temperature={tr.get('temperature')}, "
        f"trainer {prov.get('trainer_class')}, step {prov.get('global_step')}, seed {prov.get('seed')}",
        f"- success calibration: {'yes' if manifest.get('calibration') else 'no'}",
    ]
    hm = manifest.get("heldout_metrics")
    if hm:
        lines += ["", "## Held-out metrics at export", "", "```json", json.dumps(hm, indent=2), "```"]
    lines += [
        "",
        "## Trust",
        "",
        "`manifest.json` lists the sha256 of every file, the library versions and the tokenizer's vocabulary and "
        "chat-template hashes; loading checks them and refuses pickle weights and remote code.",
        "",
    ]
    return "\n".join(front + lines)

