"""The batched engine against an independent, one-trajectory-at-a-time float64 computation."""

import copy
import math

import numpy as np
import pytest
import torch

from progadv_trl.demo.tiny import WEATHER_TOOL
from progadv_trl.engine import ProgressScorer
from conftest import naive_spans
from progadv_trl.scoring import ScoringConfig
from progadv_trl.trajectories import as_trajectories


def naive_float64(policy, reference, tokenizer, traj, temperature=1.0, topk=20):
    """Per step: sum of log-ratios, and per-token policy stats, with full logits in float64 and no batching.

    Spans come from rendering each turn's prefix separately and tokenizing the *prefix strings* (independent of the
    engine's offset mapping): the action of turn i is tokens [len(tok(prompt_i)), len(tok(upto_i).rstrip())).
    """
    ids, spans = naive_spans(tokenizer, traj)
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(policy(x).logits[0].double() / temperature, -1)
        lr = torch.log_softmax(reference(x).logits[0].double() / temperature, -1)
    steps, pol_tok, topk_tok, mean_tok, top1_tok = [], [], [], [], []
    for s, e in spans:
        tgt = x[0, s:e]
        a = lp[s - 1 : e - 1].gather(-1, tgt[:, None]).squeeze(-1)
        b = lr[s - 1 : e - 1].gather(-1, tgt[:, None]).squeeze(-1)
        steps.append(float((a - b).sum()))
        pol_tok.append(a)
        topk_tok.append(lp[s - 1 : e - 1].topk(topk, -1).values.mean(-1))
        mean_tok.append(lp[s - 1 : e - 1].mean(-1))
        top1_tok.append(lp[s - 1 : e - 1].max(-1).values)
    naive_float64.top1 = torch.cat(top1_tok)  # the plausibility constraint's reference point, per action token
    return steps, torch.cat(pol_tok), torch.cat(topk_tok), torch.cat(mean_tok), lp.shape[-1]


def _double(m):
    return copy.deepcopy(m).double().eval()


def _check_agreement(scores, trajs, pol64, ref64, tokenizer, beta=1.0, stats=None):
    """`stats`: the engine's TokenStats of the same trajectories (`scorer.token_stats`), checked token by token."""
    for j, (sc, tr) in enumerate(zip(scores, trajs)):
        steps, pol_tok, topk_tok, mean_tok, V = naive_float64(pol64, ref64, tokenizer, tr)
        top1 = naive_float64.top1
        if stats is not None:  # the policy's top-1 log-prob at every action token, from the same pass
            np.testing.assert_allclose(stats[j].policy_top1_logp, top1.numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(stats[j].policy_logp, pol_tok.numpy(), atol=1e-5, rtol=0)
        # per step: the plausibility gap (worst token below the top choice) and the plausible variant's values
        gaps, at = [], 0
        for (s, e) in naive_spans(tokenizer, tr)[1]:
            gaps.append(float((top1[at : at + e - s] - pol_tok[at : at + e - s]).max()))
            at += e - s
        np.testing.assert_allclose([s.gap for s in sc.steps], gaps, atol=1e-5, rtol=0)
        bound = -math.log(sc.plausibility_alpha)
        want = [beta * a if g <= bound else -(1e6 + g - bound) for a, g in zip(steps, gaps)]
        np.testing.assert_allclose(sc.step_variants["progress_advantage_plausible"], want, atol=1e-4, rtol=0)
        got = [s.advantage for s in sc.steps]
        assert len(got) == len(steps)
        np.testing.assert_allclose(got, [beta * s for s in steps], atol=1e-4, rtol=0)
        assert sum(s.tokens for s in sc.steps) == pol_tok.numel()
        # baselines from the same passes
        np.testing.assert_allclose(sc.baselines["policy_logprob"], float(pol_tok.mean()), atol=1e-5)
        np.testing.assert_allclose(sc.baselines["self_certainty"], float((-math.log(V) - mean_tok).mean()), atol=1e-5)
        conf = -topk_tok
        np.testing.assert_allclose(sc.baselines["deepconf_tail"], float(conf[-64:].mean()), atol=1e-5)


def test_full_policy_agrees_with_float64(tiny_models, tiny_tokenizer, trajectories):
    pol, ref = tiny_models
    # batch_tokens small enough to force several batches of different padded lengths
    scorer = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(beta=0.5), batch_tokens=1500)
    assert len(scorer._batches(scorer.render(trajectories)[1])) > 1
    scores = scorer.score(trajectories)
    assert [s.id for s in scores] == [t["id"] for t in trajectories]
    stats = scorer.token_stats(scorer.render(trajectories)[1])
    _check_agreement(scores, trajectories, _double(pol), _double(ref), tiny_tokenizer, beta=0.5, stats=stats)
    # the policy really differs from the reference, so the check above is not 0 == 0
    assert max(abs(s.advantage) for sc in scores for s in sc.steps) > 0.1
    # and the plausibility check is not vacuous: a random tiny model's tokens are mostly not its argmax
    assert max(s.gap for sc in scores for s in sc.steps) > 0.1


def test_lora_policy_agrees_with_float64(tiny_models, tiny_tokenizer, trajectories):
    from peft import LoraConfig, get_peft_model

    _, ref = tiny_models
    peft_model = get_peft_model(copy.deepcopy(ref), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.eval()
    scorer = ProgressScorer(peft_model, tiny_tokenizer)  # reference = adapter disabled
    scores = scorer.score(trajectories)
    stats = scorer.token_stats(scorer.render(trajectories)[1])
    merged = copy.deepcopy(peft_model).merge_and_unload().double().eval()
    _check_agreement(scores, trajectories, merged, _double(ref), tiny_tokenizer, stats=stats)
    assert max(abs(s.advantage) for sc in scores for s in sc.steps) > 0.01
    # disabling the adapter left it enabled afterwards
    assert not peft_model.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters


def test_batching_does_not_change_scores(tiny_models, tiny_tokenizer, trajectories):
    pol, ref = tiny_models
    one = ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=1).score(trajectories)
    many = ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=10**6).score(trajectories)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.advantages, b.advantages, atol=1e-4)


def test_batch_budget_by_device(tiny_models, tiny_tokenizer, trajectories):
    pol, ref = tiny_models
    from progadv_trl.engine import CPU_BATCH_TOKENS

    cpu = ProgressScorer(pol, tiny_tokenizer, ref, share_prefix=False)
    assert cpu.batch_budget() == CPU_BATCH_TOKENS  # a CPU: small batches (a long rollout alone, short ones together)
    _, rendered = cpu.render(trajectories)
    one = ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=1, share_prefix=False)
    assert all(len(b) == 1 for b in one._batches(rendered)) and len(one._batches(rendered)) == len(rendered)
    for b in cpu._batches(rendered):  # never more padded tokens than the budget, unless a trajectory alone
        assert len(b) == 1 or len(b) * max(len(rendered[i].input_ids) for i in b) <= CPU_BATCH_TOKENS
    wide = ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=10**6, share_prefix=False)
    assert wide.batch_budget() == 10**6 and len(wide._batches(rendered)) == 1


def test_reductions_and_token_ratios(tiny_models, tiny_tokenizer, trajectories):
    pol, ref = tiny_models
    base = ProgressScorer(pol, tiny_tokenizer, ref).score(trajectories[:3], with_token_ratios=True)
    mean = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(token_reduction="mean", step_reduction="min"))
    res = mean.score(trajectories[:3])
    for b, m in zip(base, res):
        ratios = [np.array(r) for r in b.token_log_ratios]
        np.testing.assert_allclose([r.sum() for r in ratios], b.advantages, atol=1e-6)
        np.testing.assert_allclose(m.advantages, [r.mean() for r in ratios], atol=1e-5)
        assert m.score == pytest.approx(min(r.mean() for r in ratios), abs=1e-5)
        assert b.score == pytest.approx(sum(r.sum() for r in ratios), abs=1e-5)


def test_truncated_steps_are_marked_not_zeroed(tiny_models, tiny_tokenizer):
    from conftest import make_trajectory

    pol, ref = tiny_models
    tr = [make_trajectory(1, n_turns=4)]
    full = ProgressScorer(pol, tiny_tokenizer, ref).score(tr)[0]
    cut = ProgressScorer(pol, tiny_tokenizer, ref, max_length=150).score(tr)[0]
    assert cut.truncation is not None and cut.truncation["kept_tokens"] == 150
    assert any(s.truncated for s in cut.steps)
    dropped = set(cut.truncation["dropped_steps"])
    for s in cut.steps:
        if s.index in dropped:
            assert math.isnan(s.advantage) and s.tokens == 0
        elif not s.truncated:
            assert s.tokens == full.steps[s.index].tokens
    # the last step keeps all its tokens
    assert not cut.steps[-1].truncated and cut.steps[-1].tokens == full.steps[-1].tokens
    assert not math.isnan(cut.score)


def test_scorer_needs_a_reference(tiny_models, tiny_tokenizer):
    pol, _ = tiny_models
    with pytest.raises(ValueError, match="no reference"):
        ProgressScorer(pol, tiny_tokenizer)


def test_from_pretrained_lora_dir(tiny_dir, tiny_tokenizer, trajectories, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"])
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    in_memory = ProgressScorer(pm.eval(), tiny_tokenizer).score(trajectories[:2])
    loaded = ProgressScorer.from_pretrained(tmp_path / "adapter", tiny_dir["reference"]).score(trajectories[:2])
    for a, b in zip(in_memory, loaded):
        np.testing.assert_allclose(a.advantages, b.advantages, atol=1e-6)


def test_llama_architecture(tiny_tokenizer, trajectories, tmp_path):
    from progadv_trl.demo.tiny import build_model, perturbed_copy

    ref = build_model(tiny_tokenizer, tmp_path / "ref", arch="llama").eval()
    pol = perturbed_copy(ref).eval()
    scores = ProgressScorer(pol, tiny_tokenizer, ref).score(trajectories[:2])
    _check_agreement(scores, as_dicts(trajectories[:2]), _double(pol), _double(ref), tiny_tokenizer)


def as_dicts(items):
    return [t.to_dict() for t in as_trajectories(items)]


def test_score_many_matches_separate_scoring(tiny_models, tiny_tokenizer, trajectories):
    from progadv_trl.evaluation import reduction_grid

    pol, ref = tiny_models
    grid = reduction_grid(ScoringConfig(beta=0.3))
    assert len(grid) == 9 * 7 and "paper_min/min_cumsum" in grid
    picked = {k: grid[k] for k in ("sum/sum", "mean/min", "paper_last/bottom10")}
    many = ProgressScorer(pol, tiny_tokenizer, ref).score_many(trajectories[:3], picked)
    for name, cfg in picked.items():
        alone = ProgressScorer(pol, tiny_tokenizer, ref, config=cfg).score(trajectories[:3])
        np.testing.assert_allclose([s.score for s in many[name]], [s.score for s in alone], atol=1e-9)


# -- shared prompts computed once (prefix.py) --------------------------------------------------------------------

SYSTEM = "You are a careful booking agent; follow the policy below. " * 6  # with the tool schema: a 535-token prompt


def _rollout(task, k, *, system=SYSTEM, lead=True, tool_words=1):
    """Rollout k of a task: the task's prompt, then 1-4 tool calls; with `lead`, odd rollouts open with text (so the
    group's common prefix ends exactly at the first action), without, every rollout opens with the same tokens."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"Task {task}: the weather in city {task}?"}]
    for t in range(1 + k % 4):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"c{k}{t}"}}}
        msgs.append({"role": "assistant", "content": f"Let me check {k}." if lead and k % 2 else "", "tool_calls": [call]})
        msgs.append({"role": "tool", "content": " ".join(["sunny", str(k + t)] * tool_words)})
    msgs.append({"role": "assistant", "content": f"It is sunny in city {k}."})
    return {"id": f"task{task}-r{k}", "messages": msgs, "tools": [WEATHER_TOOL]}


def _groups(**kw):
    """Two tasks x 8 rollouts sharing a long prompt, one trajectory (index 5) that shares nothing, and a rollout
    logged twice (as a padded shard repeats one): all but its last token shared."""
    trajs = [_rollout(0, k, **kw) for k in range(8)] + [_rollout(1, k, lead=False, **kw) for k in range(8)]
    trajs.insert(5, _rollout(2, 0, system="Another agent.", tool_words=kw.get("tool_words", 1)))
    twice = _rollout(3, 1, **kw)
    return trajs + [twice, {**twice, "id": "again"}]


def _lora(ref):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(ref), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return pm.eval()


def _shared_vs_plain(pol, ref, tokenizer, trajs, **kw):
    """Scores with and without prefix sharing (every step advantage, token count and baseline), and the plan."""
    from progadv_trl.prefix import plan

    shared = ProgressScorer(pol, tokenizer, ref, share_prefix=True, **kw)
    a = shared.score(trajs)
    b = ProgressScorer(pol, tokenizer, ref, share_prefix=False, **kw).score(trajs)
    for x, y in zip(a, b, strict=True):
        assert x.id == y.id and [s.tokens for s in x.steps] == [s.tokens for s in y.steps]
        np.testing.assert_allclose(x.advantages, y.advantages, atol=1e-4, rtol=0)  # NaN (dropped step) == NaN
        assert x.baselines.keys() == y.baselines.keys() and len(x.baselines) >= 3
        np.testing.assert_allclose([x.baselines[k] for k in x.baselines], [y.baselines[k] for k in x.baselines], atol=1e-4)
    assert max(abs(s.advantage) for sc in a for s in sc.steps if not math.isnan(s.advantage)) > 0.01  # not 0 == 0
    rendered = shared.render(trajs)[1]
    return rendered, plan(rendered, shared.batch_budget())


@pytest.mark.parametrize("policy", ["full", "lora", "full_forward"])
def test_shared_prefix_matches_plain_scoring(tiny_models, tiny_tokenizer, policy, monkeypatch):
    import progadv_trl.engine as engine

    pol, ref = tiny_models
    if policy == "lora":
        pol, ref = _lora(ref), None  # reference = the same model, adapter disabled, also while caching the prefix
    if policy == "full_forward":  # as for models with logit soft-capping: logits from the model's own forward
        monkeypatch.setattr(engine, "_hidden_fn", lambda model: None)
    trajs = _groups()
    # a budget of about 3 rows: each group's continuations run in several batches on copies of one prefix cache
    rendered, (groups, rest) = _shared_vs_plain(pol, ref, tiny_tokenizer, trajs, batch_tokens=2600)
    assert rest == [5] and sorted(len(g.members) for g in groups) == [2, 8, 8]
    assert sum(len(g.batches) > 1 for g in groups) == 2
    twice = next(g for g in groups if len(g.members) == 2)
    assert twice.prefix_len == len(rendered[-1].input_ids) - 1 > rendered[-1].spans[-1][0]
    first_action = {g.prefix_len - min(rendered[i].spans[0][0] for i in g.members) for g in groups}
    # task 0: the prefix ends where actions start (the first action token is predicted by the last cached position);
    # task 1: the rollouts also open alike, so the prefix reaches into their first actions
    assert 0 in first_action and max(first_action) > 0
    assert min(g.prefix_len for g in groups) >= 500
    if policy == "lora":
        assert not pol.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters


def test_shared_prefix_with_truncation(tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    trajs = _groups(tool_words=40)
    # the prompt (535 tokens) fits in the kept start: truncated rollouts still share it with their group
    rendered, (groups, rest) = _shared_vs_plain(pol, ref, tiny_tokenizer, trajs, max_length=1100)
    cut = [i for i, r in enumerate(rendered) if r.truncation is not None]
    assert len(cut) >= 4 and set(cut) & {i for g in groups for i in g.members} and len(groups) == 3
    # a budget that cuts into the prompt: the kept start (350 tokens of system prompt and tools) is still shared
    rendered, (groups, rest) = _shared_vs_plain(pol, ref, tiny_tokenizer, trajs, max_length=700)
    assert sum(r.truncation is not None for r in rendered) >= 16 and [g.prefix_len for g in groups] == [350]
