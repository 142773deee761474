"""Local stand-ins for a model hub and a dataset: a tiny random model, a prompt dataset folder and held-out
trajectories, so that recipes/grpo_progadv.yaml runs anywhere, offline, in a minute.

    python recipes/tiny_assets.py progadv_tiny

writes progadv_tiny/model (a Qwen2-style model + tokenizer, saved with save_pretrained), progadv_tiny/prompts/
train.jsonl (GRPO prompts, conversational) and progadv_tiny/heldout.jsonl (labelled trajectories in the core format,
for the callback's held-out figures). Point the YAML at your own model, dataset and trajectories instead.
"""

import json
import sys
from pathlib import Path

from progadv_trl.demo.tiny import build_model, build_tokenizer, make_trajectory


def main(out: str, n_prompts: int = 64, n_heldout: int = 7) -> None:
    root = Path(out)
    if not (root / "model" / "config.json").is_file():
        tok = build_tokenizer(root / "model")
        build_model(tok, root / "model")
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    with open(root / "prompts" / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_prompts):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Weather in city {i}?"}]}) + "\n")
    # 7: not a multiple of the number of processes, so the ranks' shards differ in size (the callback pads them)
    with open(root / "heldout.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_heldout):
            rec = make_trajectory(i, n_turns=1 + i % 3, success=bool(i % 2), failure_step=None if i % 2 else 0,
                                  group=f"g{i // 2}")  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    print(f"tiny model, prompts and held-out trajectories in {root}/", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "progadv_tiny")
