"""The demo world: policy labels, irreversibility, seeds, records that round-trip through the chat template, and the
multi-turn rollout_func driving TRL's GRPOTrainer for a couple of steps."""

import json
import re

import pytest
import torch

from progadv_trl.demo.rollout import (
    encode,
    end_of_turn,
    episode_tokens,
    make_rollout_func,
    parse_turn,
    play,
    render,
)
from progadv_trl.demo.world import (
    SAY,
    SAY_FREE,
    SAY_MISTAKEN_REFUSAL,
    Episode,
    WorldConfig,
    classify_text,
    correct_agent,
    demo_agent,
    make_tasks,
    run_episode,
    say_message,
    tool_call_message,
)


def _task(situation, seed=0):
    return next(t for t in make_tasks(300, seed) if t.situation == situation)


def _lucky_seed(task, n_timeouts=0):
    """A world seed whose first lookups time out exactly `n_timeouts` times with no hang-up."""
    for s in range(1000):
        ep = run_episode(task, correct_agent, seed=s)
        if ep.timeouts == n_timeouts and ep.success:
            return s
    raise AssertionError("no such seed")


# ----------------------------------------------------------------------------------------------------------------
# Labels


def test_correct_agent_fails_only_by_luck():
    tasks = make_tasks(200, 1)
    kinds = {}
    for i, t in enumerate(tasks):
        r = run_episode(t, correct_agent, seed=i).record()
        kinds[r["metadata"]["failure_kind"]] = kinds.get(r["metadata"]["failure_kind"], 0) + 1
        assert r["failure_step"] is None
        if not r["success"]:
            assert r["metadata"]["failure_kind"] == "luck"
            assert r["metadata"]["outcome"] in ("hangup", "max_steps")
        else:
            assert r["metadata"]["failure_kind"] is None
    assert kinds.get("luck", 0) > 0  # the dice do matter...
    assert kinds[None] > 0.85 * len(tasks)  # ...but rarely


def test_refusing_24h_only_is_a_decision_failure_at_that_step():
    task = _task("24h_only")
    seed = _lucky_seed(task, n_timeouts=1)  # lookup, retry, then the decision: failure_step must be 2, not 1

    def refuser(ep, rng):
        return say_message("refuse") if ep.looked_up else correct_agent(ep)

    r = run_episode(task, refuser, seed=seed).record()
    assert r["success"] is False
    assert r["metadata"]["failure_kind"] == "decision"
    assert r["failure_step"] == 2
    assert r["metadata"]["failure_reason"].startswith("say:refuse instead of cancel_reservation")
    assert sum(m["role"] == "assistant" for m in r["messages"]) == 3


def test_cancelling_without_lookup_fails_at_step_zero():
    task = _task("insured_only")  # cancelling is even allowed here: skipping the lookup still breaks the policy
    ep = Episode(task, seed=0)
    ep.step(tool_call_message("cancel_reservation", task.res_id))
    while not ep.done:
        ep.step(correct_agent(ep))
    assert not ep.success and ep.failure_step == 0 and ep.failure_kind == "decision"


def test_cancellation_is_irreversible():
    task = _task("neither")
    ep = Episode(task, seed=_lucky_seed(task))
    ep.step(tool_call_message("get_reservation", task.res_id))
    out = ep.step(tool_call_message("cancel_reservation", task.res_id))  # against the policy
    assert json.loads(out[0]["content"]) == {"status": "cancelled", "id": task.res_id}
    again = ep.step(tool_call_message("cancel_reservation", task.res_id))
    assert json.loads(again[0]["content"]) == {"error": "already cancelled", "id": task.res_id}
    ep.step(say_message("refuse"))  # saying the right thing afterwards undoes nothing
    assert ep.cancelled and ep.done and not ep.success
    assert ep.failure_step == 1 and ep.record()["failure_step"] == 1


def test_wrong_id_and_unreadable_output_are_mistakes():
    task = _task("both")
    ep = Episode(task, seed=0)
    out = ep.step(tool_call_message("get_reservation", "R0000"))
    assert json.loads(out[0]["content"]) == {"error": "not found", "id": "R0000"} and ep.failure_step == 0
    ep2 = Episode(task, seed=0)
    ep2.step({"content": '<tool_call>\n{"name": "get_res'}, unfinished=True)
    assert ep2.done and ep2.failure_kind == "decision" and ep2.failure_step == 0


def test_luck_hangup_after_correct_retry_has_no_failure_step():
    task = _task("neither")
    for s in range(1000):
        ep = run_episode(task, correct_agent, seed=s)
        if ep.outcome == "hangup":
            break
    r = ep.record()
    assert r["messages"][-1]["role"] == "user" and r["messages"][-2]["role"] == "tool"
    assert r["metadata"]["failure_kind"] == "luck" and r["failure_step"] is None and r["success"] is False


def test_demo_agent_makes_the_systematic_mistake_mostly():
    import random

    task = _task("24h_only")
    seed = _lucky_seed(task)
    n, refused = 400, 0
    for k in range(n):
        ep = Episode(task, seed)
        ep.step(correct_agent(ep))
        refused += demo_agent()(ep, random.Random(k))["content"] == SAY_MISTAKEN_REFUSAL
    assert 0.55 < refused / n < 0.75  # the majority action: greedy decoding of the reference repeats it
    assert classify_text(SAY_MISTAKEN_REFUSAL) == "refuse"  # the world judges it as any refusal


def test_demo_agent_gives_up_at_the_first_timeout_only():
    import random

    from progadv_trl.demo.world import DemoMix, WorldConfig

    world = WorldConfig(p_timeout=1.0, p_hangup=0.0)  # every lookup times out; nobody hangs up
    task = _task("neither")

    def gave_up(mix, timeouts, n=400):
        out = 0
        for k in range(n):
            ep = Episode(task, k, world)
            for _ in range(timeouts):
                ep.step(correct_agent(ep))  # a lookup, which times out
            assert ep.timeouts == timeouts and not ep.done
            out += classify_text(demo_agent(mix)(ep, random.Random(k))["content"]) == "give_up"
        return out / n

    assert 0.6 < gave_up(DemoMix(), 1) < 0.8  # the systematic mistake, at the first timeout
    assert gave_up(DemoMix(), 2) < 0.1  # who retried keeps retrying (only p_noise slips remain)
    assert 0.6 < gave_up(DemoMix(p_give_up_after_retry=None), 2) < 0.8  # the earlier demonstrator: at every timeout


def test_mistaken_refusal_is_worded_apart_only_where_only_24h_applies():
    # The demonstrations say "not insured" exactly in the mistake, so imitating them takes reading within_24h.
    for world in (WorldConfig(), WorldConfig(free_form=True)):
        rows = [(t, x) for rs in _replies(world, n=300).values() for t, x in rs]
        mistaken = [t.situation for t, x in rows if x.startswith("Unfortunately")]
        assert mistaken and set(mistaken) == {"24h_only"}
        others = [t.situation for t, x in rows if classify_text(x) == "refuse" and not x.startswith("Unfortunately")]
        assert "neither" in others


# ----------------------------------------------------------------------------------------------------------------
# Seeds


def test_tasks_and_episodes_are_reproducible():
    assert make_tasks(50, 3) == make_tasks(50, 3)
    assert make_tasks(50, 3) != make_tasks(50, 4)
    a, b = make_tasks(40, 3), make_tasks(40, 3, skip=40)
    assert not {t.res_id for t in a} & {t.res_id for t in b}
    assert make_tasks(60, 3)[40:] == b[:20]  # a task does not depend on how many were asked for
    t = a[0]
    r1 = run_episode(t, demo_agent(), seed=11).record()
    r2 = run_episode(t, demo_agent(), seed=11).record()
    assert r1 == r2
    recs = {json.dumps(run_episode(t, demo_agent(), seed=s).record()["messages"]) for s in range(30)}
    assert len(recs) > 3  # the same task leads to different conversations


def test_same_seed_same_dice_for_different_agents():
    # Common random numbers: the k-th lookup draws the same numbers whoever makes it.
    t = make_tasks(1, 0)[0]
    for s in range(20):
        a = run_episode(t, correct_agent, seed=s)
        b = run_episode(t, correct_agent, seed=s)
        assert a.timeouts == b.timeouts and a.outcome == b.outcome


# ----------------------------------------------------------------------------------------------------------------
# The free-form world (WorldConfig.free_form): noisy content, the same decisions


def _replies(world, n=200, seed=4, agent=None):
    """{kind: [text of every plain reply]} over n episodes of the demo agent, and the tasks."""
    tasks = make_tasks(n, seed, config=world)
    out = {}
    for i, t in enumerate(tasks):
        ep = run_episode(t, agent or demo_agent(), seed=i, config=world)
        for m in ep.messages:
            if m["role"] == "assistant" and not m.get("tool_calls"):
                out.setdefault(classify_text(m["content"]), []).append((t, m["content"]))
    return out


def test_free_form_keeps_facts_decisions_and_labels():
    plain, free = WorldConfig(), WorldConfig(free_form=True)
    a, b = make_tasks(120, 2, config=plain), make_tasks(120, 2, config=free)
    assert [(t.id, t.insured, t.within_24h) for t in a] == [(t.id, t.insured, t.within_24h) for t in b]
    assert all(t.name == "" for t in a) and len({t.name for t in b}) >= 10
    assert all(t.name in t.user_text and t.user_text.rstrip(".?").endswith(t.res_id) for t in b)  # the id stays last
    assert all(x.user_text != y.user_text for x, y in zip(a, b))
    for i, (ta, tb) in enumerate(zip(a, b)):  # the correct agent: the same actions, outcomes and labels in both worlds
        ra = run_episode(ta, correct_agent, seed=i, config=plain).record()
        rb = run_episode(tb, correct_agent, seed=i, config=free).record()
        assert ra["metadata"]["actions"] == rb["metadata"]["actions"]
        assert (ra["success"], ra["failure_step"], ra["metadata"]["outcome"]) == (rb["success"], rb["failure_step"],
                                                                                rb["metadata"]["outcome"])  # fmt: skip
    assert sum(run_episode(t, correct_agent, seed=i, config=free).success for i, t in enumerate(b)) > 0.85 * len(b)


def test_free_form_replies_are_improbable_content_of_the_right_kind():
    free = _replies(WorldConfig(free_form=True))
    plain = _replies(WorldConfig())
    assert set(free) == set(plain) == {"refuse", "done", "give_up"}  # every wording is read as its kind, never "other"
    for kind, rows in free.items():
        texts = [x for _, x in rows]
        assert all(t.name in x for t, x in rows)  # addressed to the customer by name
        top = max(texts.count(x) for x in set(texts))
        assert top / len(texts) < 0.25, kind  # no reply is likely: a model matching the wording pays >1.4 nats a turn
        # the plain world: one phrasing (and the demonstrations' mistaken refusal), nearly free to predict
        assert {x for _, x in plain[kind]} == {SAY[kind]} | ({SAY_MISTAKEN_REFUSAL} if kind == "refuse" else set())
    # several wordings of each kind (names aside), and refusals with several free-text reasons
    for kind, rows in free.items():
        shapes = {x.replace(t.name, "{name}") for t, x in rows}
        assert len(shapes) >= (6 if kind == "refuse" else len(SAY_FREE[kind])), kind
        # one first word (the mistaken refusal has its own): the decision stays in it
        assert len({x.split()[0].strip(",") for _, x in rows if not x.startswith("Unfortunately")}) == 1, kind


def test_demo_config_free_form():
    from progadv_trl.demo.pipeline import DemoConfig

    assert DemoConfig().world == WorldConfig() and DemoConfig().max_new_tokens == 24
    cfg = DemoConfig(free_form=True)
    assert cfg.world.free_form and cfg.max_new_tokens == 32  # the longest free-form reply is 26 tokens
    assert DemoConfig(free_form=True, max_new_tokens=40).max_new_tokens == 40
    assert all(t.name for t in DemoConfig.fast(free_form=True).tasks("test"))


def test_grpo_curriculum_changes_only_the_training_world():
    from progadv_trl.demo.pipeline import DemoConfig

    cfg = DemoConfig()
    assert cfg.world.p_timeout == 0.25 and cfg.train_world.p_timeout == 0.5  # RL meets repeated timeouts more often
    assert cfg.train_world == WorldConfig(p_timeout=0.5)  # nothing else moves
    assert DemoConfig(grpo_p_timeout=None).train_world == WorldConfig()
    noisy = DemoConfig(free_form=True, grpo_p_timeout=0.4).train_world
    assert noisy.free_form and noisy.p_timeout == 0.4


# ----------------------------------------------------------------------------------------------------------------
# Rendering round trip


@pytest.fixture(scope="module")
def demo_tok(tmp_path_factory):
    from progadv_trl.demo.pipeline import DemoConfig, build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("demo_tok"), DemoConfig.fast())


@pytest.mark.parametrize("free_form", [False, True])
def test_records_round_trip_through_the_chat_template(demo_tok, free_form):
    from progadv_trl.rendering import render as core_render
    from progadv_trl.trajectories import load_trajectories

    world = WorldConfig(free_form=free_form)
    tasks = make_tasks(30, 5, config=world)
    recs = [run_episode(t, demo_agent(), seed=i, config=world).record() for i, t in enumerate(tasks)]
    loaded = load_trajectories(recs).trajectories  # the core loader accepts them as they are
    for rec, traj in zip(recs, loaded):
        text = demo_tok.apply_chat_template(rec["messages"], tokenize=False)
        calls = [m for m in rec["messages"] if m["role"] == "assistant" and m.get("tool_calls")]
        for m in calls:  # each tool call appears in the template's own format
            fn = m["tool_calls"][0]["function"]
            assert f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {{"id": "{fn["arguments"]["id"]}"}}}}\n</tool_call>' in text
        # The piecewise tokens (how rollouts and SFT tokenize) equal tokenizing the whole rendered record once.
        p, c, mask = episode_tokens(demo_tok, rec["messages"])
        whole = encode(demo_tok, text)
        assert whole[: len(p) + len(c)] == p + c and len(whole) - len(p) - len(c) in (0, 1)
        # ...and the core renderer's action spans cover exactly the env_mask=1 tokens.
        r = core_render(traj, demo_tok)
        spans = [i for s, e in r.spans for i in range(s, e)]
        assert spans == [len(p) + i for i, k in enumerate(mask) if k]
        assert rec["failure_step"] is None or rec["metadata"]["failure_kind"] == "decision"


def test_parse_turn():
    msg = parse_turn('<tool_call>\n{"name": "issue_refund", "arguments": {"id": "R1234"}}\n</tool_call>')
    assert msg["tool_calls"][0]["function"] == {"name": "issue_refund", "arguments": {"id": "R1234"}}
    assert parse_turn('<tool_call>\n{"name": "issue_refund", "argu\n</tool_call>')["content"].startswith("<tool_call>")
    assert parse_turn(SAY["refuse"]) == {"role": "assistant", "content": SAY["refuse"]}


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM that writes the policy's correct turn token by token, read off the conversation text:
    lets us check play() and the records against exact expectations without training anything."""

    def __init__(self, tok, chatty: bool = False):
        super().__init__()
        self.tok, self.dummy = tok, torch.nn.Parameter(torch.zeros(1))
        self.training = False
        self.chatty = chatty  # a few words before the calls for odd ids: turns of different lengths in one batch

    def _next(self, seq):
        text = self.tok.decode(seq, skip_special_tokens=False)
        head, _, gen = text.rpartition("<|im_start|>assistant\n")
        rid = re.search(r"R\d+", head.split("<|im_start|>user\n", 1)[1]).group(0)
        results = [json.loads(x) for x in re.findall(r"<tool_response>\n(.*?)\n</tool_response>", head)]
        last = results[-1] if results else None
        if last is None or last.get("error") == "timeout":
            target = tool_call_message("get_reservation", rid)
        elif "insured" in last:
            target = tool_call_message("cancel_reservation", rid) if (last["insured"] or last["within_24h"]) else say_message("refuse")
        elif last.get("status") == "cancelled":
            target = tool_call_message("issue_refund", rid)
        else:
            target = say_message("done")
        if self.chatty and int(rid[-1]) % 2 and target.get("tool_calls"):
            target = {**target, "content": "One moment, please."}
        full = render(self.tok, [{"role": "system", "content": "x"}, target])
        want = encode(self.tok, full[full.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):].rstrip("\n"))
        got = encode(self.tok, gen)
        return want[len(got)] if len(got) < len(want) else self.tok.pad_token_id  # rows already done get pads

    class Cache(list):  # a row's "cache" is its tokens so far (the unmasked ones)
        def batch_select_indices(self, idx):
            self[:] = [self[i] for i in idx.tolist()]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        if past_key_values is None:
            past_key_values = self.Cache([] for _ in range(len(input_ids)))
        n = input_ids.shape[1]  # the new columns: a context, a turn's new tokens, or one sampled token
        for row, ids, am in zip(past_key_values, input_ids.tolist(), attention_mask[:, -n:].tolist()):
            row.extend(t for t, a in zip(ids, am) if a)
        logits = torch.full((len(past_key_values), 1, len(self.tok)), -30.0)
        for i, row in enumerate(past_key_values):
            logits[i, 0, self._next(row)] = 30.0
        return type("Out", (), {"logits": logits, "past_key_values": past_key_values})()


def test_play_records_reproduce_generated_tokens(demo_tok):
    from progadv_trl.trajectories import Trajectory
    from progadv_trl.rendering import render as core_render

    tasks = make_tasks(12, 9)
    eps = [Episode(t, seed=i) for i, t in enumerate(tasks)]
    tes = play(ScriptedLM(demo_tok), demo_tok, eps, greedy=True, max_new_tokens=24)
    for te in tes:
        rec = te.record()
        assert all(te.canonical) and rec["metadata"]["canonical"] is True
        assert rec["success"] or rec["metadata"]["failure_kind"] == "luck"
        # the scorer's rendering of the record is exactly the token sequence the model produced
        r = core_render(Trajectory(rec["id"], rec["messages"]), demo_tok)
        n = len(te.ids)
        assert r.input_ids[:n] == te.ids and len(r.input_ids) - n in (0, 1)
        assert [i for s, e in r.spans for i in range(s, e)] == [
            len(te.prompt_ids) + i for i, k in enumerate(te.env_mask) if k
        ]
        eot = end_of_turn(demo_tok)  # every agent turn ends with its own end-of-turn token, inside env_mask=1
        assert sum(c == eot and k for c, k in zip(te.completion_ids, te.env_mask)) == te.episode.n_steps
        assert len(te.logprobs) == len(te.completion_ids) == len(te.env_mask)


class Guided(torch.nn.Module):
    """A real tiny transformer (its KV cache, masks and positions are what play() manages) nudged towards the
    scripted turn (ScriptedLM's next token gets +BIAS), so that episodes last several turns and end at different ones."""

    BIAS = 12.0

    class Cache:
        def __init__(self, kv, rows):
            self.kv, self.rows = kv, rows

        def batch_select_indices(self, idx):
            self.kv.batch_select_indices(idx)
            self.rows = [self.rows[i] for i in idx.tolist()]

    def __init__(self, model, tok):
        super().__init__()
        self.model, self.script = model, ScriptedLM(tok, chatty=True)
        self.seen = {}  # the model's own next-token logits inside play(), keyed by the tokens before that position

    def bias(self, seq):
        return self.script._next(seq)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        cache = past_key_values or self.Cache(None, [[] for _ in range(len(input_ids))])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache.kv, use_cache=True)
        n = input_ids.shape[1]
        for row, ids, am in zip(cache.rows, input_ids.tolist(), attention_mask[:, -n:].tolist()):
            row.extend(t for t, a in zip(ids, am) if a)
        logits = out.logits[:, -1:].clone()
        for i, row in enumerate(cache.rows):
            self.seen.setdefault(tuple(row), logits[i, 0].clone())
            logits[i, 0, self.bias(row)] += self.BIAS
        return type("Out", (), {"logits": logits, "past_key_values": self.Cache(out.past_key_values, cache.rows)})()


def test_play_keeps_one_cache_per_episode_and_its_log_probs_are_the_models(fast_run):
    """play() runs only each turn's new tokens over the episode's KV cache (rows leave the batch as their episodes
    end; later turns read earlier turns' cache, pads masked). The log-probs it reports must be the model's own,
    recomputed here by one plain forward over each finished episode's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fast_run.path("reference"))
    model = AutoModelForCausalLM.from_pretrained(fast_run.path("reference")).eval()
    guided = Guided(model, tok)
    eps = [Episode(t, seed=i) for i, t in enumerate(make_tasks(10, 3))]
    tes = play(guided, tok, eps, max_new_tokens=24, generator=torch.Generator().manual_seed(0), batch_size=4)
    turns = [te.episode.n_steps for te in tes]
    assert max(turns) >= 3 and len(set(turns)) > 1  # several turns, and episodes that end at different turns
    lengths = {len(te.episode.messages[2].get("content") or "") for te in tes}
    assert len(lengths) > 1  # first turns of different lengths: the shorter rows' pads sit in the cache after them
    checked = 0
    for te in tes:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([te.ids])).logits[0]
        n0 = len(te.prompt_ids)
        gen = [n0 + i for i, k in enumerate(te.env_mask) if k]
        assert len(gen) >= te.episode.n_steps
        for p in gen:  # the cached pass's logits at every generated position = the plain pass's
            assert torch.allclose(guided.seen[tuple(te.ids[:p])], logits[p - 1], atol=1e-4), (te.episode.task.id, p)
            row = logits[p - 1].double()
            row[guided.bias(te.ids[:p])] += Guided.BIAS
            want = torch.log_softmax(row, -1)[te.ids[p]].item()
            assert abs(te.logprobs[p - n0] - want) < 1e-4, (te.episode.task.id, p)
            checked += 1
    assert checked > 100


def test_generate_turns_repeat_runs_each_context_once(fast_run):
    """Step selection's K candidates of a state: one prefill of the state, its cache copied K times. The turns equal
    those from the state written out K times (greedy: the same tokens; log-probs to float rounding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.demo.rollout import generate_turns

    tok = AutoTokenizer.from_pretrained(fast_run.path("reference"))
    model = AutoModelForCausalLM.from_pretrained(fast_run.path("reference")).eval()
    ctx = [encode(tok, render(tok, Episode(t, seed=0).messages, True)) for t in make_tasks(3, 4)]
    ctx[1] = ctx[1][:-5]  # contexts of different lengths: left padding is repeated with them
    kw = dict(eos_id=end_of_turn(tok), pad_id=tok.pad_token_id, max_new_tokens=6, greedy=True)
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    toks, lps = generate_turns(model, ctx, repeat=3, **kw)
    assert calls[0][0] == 3 and all(c[0] == 9 for c in calls[1:])  # the prefill ran 3 rows, the decoding 9
    want_t, want_l = generate_turns(model, [c for c in ctx for _ in range(3)], **kw)
    assert toks == want_t
    assert max(abs(a - b) for x, y in zip(lps, want_l) for a, b in zip(x, y)) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Through TRL: rollout_func for a couple of GRPO steps, and labelled rollouts of a (barely) trained model


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    from progadv_trl.demo.pipeline import DemoConfig, build_assets, train_reference

    cfg = DemoConfig.fast(out_dir=str(tmp_path_factory.mktemp("demo_fast")))
    build_assets(cfg.out_dir, cfg.seed, cfg)
    train_reference(cfg)
    return cfg


def test_rollout_func_drives_grpo(fast_run, monkeypatch):
    from progadv_trl.demo import pipeline
    from progadv_trl.demo.pipeline import train_policy

    seen, worlds = [], []
    real = pipeline.make_rollout_func
    monkeypatch.setattr(pipeline, "make_rollout_func", lambda *a, **k: worlds.append(k["world"]) or real(*a, **k))

    class Probe:  # a callback built from the trainer, like the lead's ProgressAdvantageCallback
        def __init__(self, trainer):
            self.trainer = trainer

        def __getattr__(self, name):  # every TrainerCallback event: no-op
            return lambda *a, **k: None

        def on_step_end(self, args, state, control, **kw):
            seen.append(state.global_step)

    trainer, path = train_policy(fast_run, callbacks=[Probe])
    assert trainer.state.global_step == fast_run.grpo_steps == len(seen)
    assert worlds == [fast_run.train_world] and worlds[0].p_timeout == fast_run.grpo_p_timeout  # the curriculum
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == fast_run.grpo_steps and all("kl" in h for h in logs)  # beta > 0: GRPO logged its KL term
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(fast_run.path("reference")).state_dict()
    frozen = trainer.ref_model.state_dict()
    assert all(torch.equal(frozen[k], ref[k]) for k in ref)  # the KL anchor is the SFT reference, untouched
    assert set(saved) == set(ref)  # the saved policy is a full checkpoint of the same model


def test_rollout_func_output_shapes(fast_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fast_run.path("reference"))
    model = AutoModelForCausalLM.from_pretrained(fast_run.path("reference"))
    tasks = fast_run.tasks("train")[:2]
    fn = make_rollout_func(tasks, seed=0, max_new_tokens=8)

    class T:  # the two trainer attributes rollout_func reads
        accelerator = type("A", (), {"process_index": 0, "unwrap_model": staticmethod(lambda m: m)})()
        processing_class, temperature = tok, 1.0

    T.model = model.train()  # TRL's mode test: training rollouts while the model trains
    out = fn([t.prompt() for t in tasks for _ in range(3)], T)
    assert len(out["prompt_ids"]) == 6 and set(out["success"]) <= {0.0, 1.0}
    for c, m, lp in zip(out["completion_ids"], out["env_mask"], out["logprobs"]):
        assert len(c) == len(m) == len(lp) and m[0] == 1
    again = make_rollout_func(tasks, seed=0, max_new_tokens=8)([t.prompt() for t in tasks for _ in range(3)], T)
    assert again["completion_ids"] == out["completion_ids"]  # seeded
    with pytest.raises(KeyError, match="not one of the demo world's training tasks"):
        fn([[{"role": "user", "content": "hello"}]], T)
    # evaluation (the model in eval mode): the validation tasks, greedy, the same dice at every evaluation, and the
    # training episodes' dice untouched by it
    val = fast_run.tasks("val")[:2]
    fn = make_rollout_func(tasks, seed=0, max_new_tokens=8, eval_tasks=val)
    T.model = model.eval()
    e1 = fn([t.prompt() for t in val], T)
    e2 = fn([t.prompt() for t in val], T)
    assert e1["completion_ids"] == e2["completion_ids"] and e1["success"] == e2["success"]
    with pytest.raises(KeyError, match="evaluation tasks"):
        fn([tasks[0].prompt()], T)
    T.model = model.train()
    assert fn([t.prompt() for t in tasks for _ in range(3)], T)["completion_ids"] == out["completion_ids"]


def test_sample_rollouts_are_labelled_records(fast_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.demo.pipeline import sample_rollouts, success_rate
    from progadv_trl.trajectories import load_trajectories

    tok = AutoTokenizer.from_pretrained(fast_run.path("reference"))
    model = AutoModelForCausalLM.from_pretrained(fast_run.path("reference"))
    tasks = fast_run.tasks("test")
    recs = sample_rollouts(model, tok, tasks, n_per_task=3, temperature=1.0, seed=0)
    assert len(recs) == 3 * len(tasks) and len({r["id"] for r in recs}) == len(recs)
    assert load_trajectories(recs).trajectories
    for r in recs:
        kind = r["metadata"]["failure_kind"]
        assert kind in (None, "decision", "luck")
        assert (kind is None) == r["success"]
        assert (r["failure_step"] is not None) == (kind == "decision")
        assert r["group"] in {t.id for t in tasks}
    assert recs == sample_rollouts(model, tok, tasks, n_per_task=3, temperature=1.0, seed=0)
    greedy = sample_rollouts(model, tok, tasks, n_per_task=1, seed=0, greedy=True, tag="eval")
    assert success_rate(model, tok, tasks, greedy=True) == sum(r["success"] for r in greedy) / len(tasks)
