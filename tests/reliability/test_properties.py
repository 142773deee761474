"""Property-based tests (hypothesis) on random tool-calling conversations rendered with a real chat template (TRL's
Qwen2.5 template with tool calls, on the tiny Qwen2-style tokenizer):

- every action span decodes to exactly what its assistant message says (content, tool calls, end of turn);
- beta x the sum of a step's token log-ratios equals that action's log-ratio computed on its own (float64, no batch);
- scores do not depend on batch composition, batch size, order or padding side;
- rollouts that share their prompt score the same with the prompt computed once (`prefix.py`) as without.

Derandomized with no example database, so CI runs the same examples every time and leaves no files behind.
"""

import copy
import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_helpers import one_torch_thread  # noqa: F401 - autouse
from conftest import WEATHER_TOOL
from progadv_trl.engine import ProgressScorer, taken_token_stats
from progadv_trl.prefix import plan
from progadv_trl.scoring import ScoringConfig
from progadv_trl.trajectories import as_trajectories
from progadv_trl.rendering import render

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BETA = 0.37

# NFC-stable text (the tokenizer normalizes to NFC): ASCII, accented letters, CJK, an emoji, digits, inner newlines.
ALPHABET = st.sampled_from(list("abcdefgh xyz ABC 0123456789 .,:;!?'\"()[]{}-_/@#%&*+=") + ["é", "ü", "ß", "東", "京", "😀", "\n", "\t"])
TEXT = st.text(ALPHABET, max_size=40)
ARG_VALUES = st.one_of(st.text(ALPHABET, max_size=12), st.integers(-10**6, 10**6), st.floats(-1e3, 1e3, allow_nan=False).map(lambda x: round(x, 3)), st.booleans())
ARGS = st.dictionaries(st.sampled_from(["city", "date", "n", "query", "ok"]), ARG_VALUES, max_size=3)
TOOL_CALL = st.builds(lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}},
                      st.sampled_from(["get_weather", "lookup", "search"]), ARGS)


@st.composite
def conversations(draw, i=0):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(TEXT)})
    msgs.append({"role": "user", "content": draw(TEXT.filter(bool))})
    for _ in range(draw(st.integers(1, 3))):
        calls = draw(st.lists(TOOL_CALL, max_size=2))
        content = draw(TEXT)
        if not calls and not content:
            content = "ok"
        msg = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        msgs.append(msg)
        for _ in calls:
            msgs.append({"role": "tool", "content": draw(TEXT)})
        if not calls and draw(st.booleans()):
            msgs.append({"role": "user", "content": draw(TEXT.filter(bool))})
    if msgs[-1]["role"] != "assistant":
        msgs.append({"role": "assistant", "content": draw(TEXT.filter(bool))})
    tools = [WEATHER_TOOL] if draw(st.booleans()) else None
    return {"id": f"c{i}", "messages": msgs, "tools": tools}


@st.composite
def conversation_sets(draw):
    n = draw(st.integers(2, 5))
    return [draw(conversations(i)) for i in range(n)]


def _expected_action(msg) -> str:
    """What the model wrote in this turn under the Qwen2.5 template, after its generation prompt "<|im_start|>assistant\\n"."""
    text = msg["content"]
    for tc in msg.get("tool_calls", []):
        fn = tc["function"]
        text += f'\n<tool_call>\n{{"name": "{fn["name"]}", "arguments": {json.dumps(fn["arguments"], ensure_ascii=False)}}}\n</tool_call>'
    return text.removeprefix("\n") + "<|im_end|>"  # with no content, the generation prompt's newline is the first one


@pytest.fixture(scope="module")
def models64(tiny_models):
    return tuple(copy.deepcopy(m).double().eval() for m in tiny_models)


@SETTINGS
@given(conv=conversations())
def test_action_spans_decode_to_their_messages(tiny_tokenizer, conv):
    traj = as_trajectories([conv])[0]
    r = render(traj, tiny_tokenizer)
    assert len(r.spans) == sum(m["role"] == "assistant" for m in conv["messages"])
    prev_end = 0
    for (s, e), mi in zip(r.spans, r.message_indices):
        assert prev_end <= s < e  # ordered, disjoint, never empty
        prev_end = e
        msg = traj.messages[mi]
        decoded = tiny_tokenizer.decode(r.input_ids[s:e])
        assert decoded == _expected_action(msg)
        for block, tc in zip(re.findall(r"<tool_call>\n(.*?)\n</tool_call>", decoded, re.S), msg.get("tool_calls", [])):
            assert json.loads(block) == {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
        # and the text before the span ends with the generation prompt the model wrote after
        assert tiny_tokenizer.decode(r.input_ids[:s]).endswith("<|im_start|>assistant\n")


def _alone(model, ids, s, e):
    """log p of tokens s..e-1 from the sequence cut right after the action: one sequence, float64, full logits."""
    x = torch.tensor([ids[:e]])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0].double(), -1)
    return lp[s - 1 : e - 1].gather(-1, x[0, s:e, None]).squeeze(-1)


@SETTINGS
@given(conv=conversations())
def test_step_advantage_is_beta_times_its_own_log_ratio(tiny_models, models64, tiny_tokenizer, conv):
    pol, ref = tiny_models
    res = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(beta=BETA)).score([conv], with_token_ratios=True)[0]
    r = render(as_trajectories([conv])[0], tiny_tokenizer)
    for step, (s, e), ratios in zip(res.steps, r.spans, res.token_log_ratios):
        assert step.tokens == e - s == len(ratios)
        assert step.advantage == pytest.approx(BETA * sum(ratios), abs=1e-9)  # the reduction is the sum, times beta
        own = float((_alone(models64[0], r.input_ids, s, e) - _alone(models64[1], r.input_ids, s, e)).sum())
        assert step.advantage == pytest.approx(BETA * own, abs=2e-4)  # float32 engine against float64 alone


@SETTINGS
@given(convs=conversation_sets(), data=st.data())
def test_scores_do_not_depend_on_batching_order_or_padding(tiny_models, tiny_tokenizer, convs, data):
    pol, ref = tiny_models

    def scores(items, tokenizer=tiny_tokenizer, batch_tokens=10**6):
        got = ProgressScorer(pol, tokenizer, ref, batch_tokens=batch_tokens).score(items)
        return {s.id: [st_.advantage for st_ in s.steps] + [s.score] + list(s.baselines.values()) for s in got}

    together = scores(convs)
    alone = {k: v for c in convs for k, v in scores([c]).items()}
    order = data.draw(st.permutations(range(len(convs))))
    small = data.draw(st.integers(64, 2048))  # anything from one trajectory per batch to several per batch
    shuffled = scores([convs[i] for i in order], batch_tokens=small)
    left = copy.copy(tiny_tokenizer)
    left.padding_side = "left"  # the engine pads itself; a tokenizer set up for generation must not change a score
    padded_left = scores(convs, tokenizer=left)
    for k, v in together.items():
        for other in (alone, shuffled, padded_left):
            assert other[k] == pytest.approx(v, abs=1e-4)

    # and the forward itself, padded on the left: positions come from the attention mask
    rs = [render(t, tiny_tokenizer) for t in as_trajectories(convs)]
    T = max(len(r.input_ids) for r in rs)
    out = {}
    for side in ("right", "left"):
        ids = torch.zeros((len(rs), T), dtype=torch.long)
        mask = torch.zeros((len(rs), T), dtype=torch.long)
        b_idx, p_idx = [], []
        for row, r in enumerate(rs):
            off = 0 if side == "right" else T - len(r.input_ids)
            ids[row, off : off + len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[row, off : off + len(r.input_ids)] = 1
            for s, e in r.spans:
                b_idx += [row] * (e - s)
                p_idx += [off + p for p in range(s, e)]
        with torch.no_grad():
            out[side] = taken_token_stats(pol, ids, mask, (torch.tensor(b_idx), torch.tensor(p_idx)))["logp"]
    torch.testing.assert_close(out["left"], out["right"], atol=1e-4, rtol=0)


@st.composite
def rollout_groups(draw):
    """Rollouts of one task: one drawn prompt (system?, user) with a tool schema, as agents' prompts have (long
    enough to share), then 2-5 continuations drawn independently."""
    def split(conv):
        first = next(i for i, m in enumerate(conv["messages"]) if m["role"] == "assistant")
        return conv["messages"][:first], conv["messages"][first:]

    base = draw(conversations())
    prompt = split(base)[0]
    return [{"id": f"r{k}", "messages": prompt + split(draw(conversations()))[1], "tools": [WEATHER_TOOL]}
            for k in range(draw(st.integers(2, 5)))]


@SETTINGS
@given(group=rollout_groups(), data=st.data())
def test_shared_prompt_scores_as_without_sharing(tiny_models, tiny_tokenizer, group, data):
    pol, ref = tiny_models
    small = data.draw(st.integers(64, 2048))  # from one continuation per batch to all of them in one

    def scorer(share):
        return ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=small, share_prefix=share)

    rendered = scorer(True).render(group)[1]
    assert plan(rendered, small)[0]  # the prompt really is computed once here
    for a, b in zip(scorer(True).score(group), scorer(False).score(group), strict=True):
        assert [s.tokens for s in a.steps] == [s.tokens for s in b.steps]
        assert [s.advantage for s in a.steps] + list(a.baselines.values()) == pytest.approx(
            [s.advantage for s in b.steps] + list(b.baselines.values()), abs=1e-4
        )
