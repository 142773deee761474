"""DeepSpeed ZeRO-3 on two CPU processes (DS_ACCELERATOR=cpu, gloo): the gather the bundle export uses and the held-out
scoring context (training/sharded.py), against the same model unsharded. Not a TRL run: accelerate launches
DeepSpeed only without --cpu. Run by tests/test_zero3_dist.py when deepspeed is installed.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/dist_zero3.py MODEL_DIR OUT_DIR
"""

import json
import os
import sys
from pathlib import Path


def main(model_dir: str, out_dir: str):
    import deepspeed
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.demo.tiny import make_trajectory
    from progadv_trl.engine import ProgressScorer
    from progadv_trl.rendering import render
    from progadv_trl.training import sharded
    from progadv_trl.trajectories import load_trajectories

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # a policy that differs from its reference
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    plain.load_state_dict(model.state_dict())
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "SGD", "params": {"lr": 0.01}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    res = {"rank": rank, "kind": sharded.kind(engine), "local_head_numel": engine.module.lm_head.weight.numel()}
    full = sharded.full_model(engine, is_main=rank == 0)
    if rank == 0:
        a, b = full.state_dict(), plain.state_dict()
        res["full_equal"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rendered = [render(t, tok) for t in load_trajectories([make_trajectory(i, n_turns=2) for i in range(3)]).trajectories]
    with sharded.scoring_context(engine):
        got = ProgressScorer(engine.module, tok, ref, batch_tokens=2**62, share_prefix=False).token_stats(rendered)
    want = ProgressScorer(plain, tok, ref, batch_tokens=2**62, share_prefix=False).token_stats(rendered)
    res["scoring_max_diff"] = max(float(np.abs(x.policy_logp - y.policy_logp).max()) for x, y in zip(got, want))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
